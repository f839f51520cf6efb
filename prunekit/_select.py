"""Exact "prune the k lowest-scored entries" over many tensors, streamed.

The scores of every tensor are turned, chunk by chunk, into int32 keys whose integer
order is the scores' order (the IEEE-754 bit pattern, with negative floats flipped).
A radix selection then finds the k lowest keys in two streaming passes:

1. a histogram of the high 16 bits of every still-kept key gives the bucket that holds
   the k-th lowest key, and how many of the bucket's entries must go;
2. masks are cleared where the key is below that bucket, and the bucket's own entries
   (a small fraction of the whole) are gathered; a stable sort of them picks the exact
   ones to clear. Ties go in a fixed order (tensor order, then flat index), so the count
   is exact and deterministic.

When the bucket is too crowded to gather (many equal scores), pass 2 histograms the low
16 bits inside it instead, and a third pass clears up to the exact threshold key.

Nothing is concatenated: the temporaries are a few chunk-sized buffers per thread plus
the gathered bucket (at most 1/256 of the entries), so the extra memory is the masks plus
a few megabytes, whatever the model's size. Passes 1 and 2 split the chunks between
torch's threads (each running single-threaded ops on its own run of chunks).

Accelerators and sharded tensors (DTensor) take another route to the same result
(:func:`_prune_lowest_hist`): only histograms, with large chunks and no per-chunk host
synchronisation. Pass 2 histograms the low half inside the bucket, and when the threshold
key is shared by more entries than must go, further histograms of the tied entries'
global positions find the exact cut. Each pass ends in one host read of its histogram
(after an all-reduce across ranks when sharded), so ranks exchange a few histograms,
never weights. Every temporary lives on its tensor's device.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

from prunekit._distributed import Layout, Sharding, local

CHUNK = 1 << 18
_HI_BINS = 1 << 16
_EXCLUDED = _HI_BINS  # histogram bin for entries that are already pruned
_NONFINITE_HI = 0x7F80  # high half of +inf: keys at or above it are inf or NaN
_MIN_CHUNKS_PER_THREAD = 8  # below this, threads cost more than they save
DEVICE_CHUNK = 1 << 24  # chunk of the histogram route on accelerators
_DIGIT = 16  # bits per histogram pass over tied entries' positions
_FORCE_HIST = False  # tests: take the accelerator route on CPU tensors too
T = TypeVar("T")


class KeySource:
    """Scores of several tensors, handed out as order-preserving int32 keys per chunk.

    ``keys`` must give the same keys for the same chunk every time it is asked, from
    any thread: chunks are read once per pass, by several threads at once.
    """

    layouts: Sequence[Layout] | None = None  # set by prune_lowest when the tensors are shards

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.flats = [local(t).detach().reshape(-1) for t in tensors]

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        raise NotImplementedError


class MagnitudeKeys(KeySource):
    """|w|: non-negative floats, whose bit patterns already sort like their values."""

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        chunk, out = self.flats[i].narrow(0, start, stop - start), buf.narrow(0, 0, stop - start)
        if chunk.dtype == torch.float32:
            torch.abs(chunk, out=out)
        else:
            torch.add(chunk, 0.0, out=out).abs_()  # converts to float32 (no copy_: see tests)
        return out.view(torch.int32)


class ScoreKeys(KeySource):
    """Arbitrary float scores (higher = more important); negatives allowed."""

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        n = stop - start
        # + 0.0 turns -0.0 into +0.0: equal scores must tie (and go by position)
        chunk = self.flats[i].narrow(0, start, n)
        key = torch.add(chunk, 0.0, out=buf.narrow(0, 0, n)).view(torch.int32)
        flip = torch.bitwise_right_shift(key, 31, out=tmp.narrow(0, 0, n)).bitwise_and_(0x7FFFFFFF)
        return key.bitwise_xor_(flip)


class RandomKeys(KeySource):
    """Uniform random keys: a hash of the seed, the tensor's position and each entry's
    global flat index, so they are the same on any device and any sharding."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        n, device = stop - start, buf.device
        layout = self.layouts[i] if self.layouts is not None else None
        salt = _mix32(_mix32(self.seed % 2**32 ^ _mix32(self.seed >> 32)) ^ i)
        key = buf.narrow(0, 0, n).view(torch.int32)
        if layout is None and stop <= 2**31:
            torch.arange(start, stop, dtype=torch.int32, device=device, out=key)
            return _hash_(key.bitwise_xor_(_signed(salt)), tmp.narrow(0, 0, n)).bitwise_and_(
                0x3FFFFFFF
            )
        index = (layout or Layout.whole((stop,))).index(start, stop, device)
        torch.bitwise_and(index, 0x7FFFFFFF, out=key).bitwise_xor_(_signed(salt))
        _hash_(key, tmp.narrow(0, 0, n))
        if (layout.numel if layout else stop) > 2**31:
            _hash_(
                key.bitwise_xor_(index.bitwise_right_shift_(31).to(torch.int32)),
                tmp.narrow(0, 0, n),
            )
        return key.bitwise_and_(0x3FFFFFFF)  # 30 bits: never read as a non-finite key


_M32 = 0xFFFFFFFF
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39)  # odd, below 2**31: exact as int32


def _mix32(x: int) -> int:
    """The hash of :func:`_hash_` on one Python int (unsigned 32-bit result)."""
    x &= _M32
    for multiplier in _MULTIPLIERS:
        x = ((x ^ (x >> 15)) * multiplier) & _M32
    return x ^ (x >> 15)


def _signed(x: int) -> int:
    return x - 2**32 if x >= 2**31 else x


def _hash_(x: Tensor, tmp: Tensor) -> Tensor:
    """:func:`_mix32` in place on int32 (two's-complement wrapping products, logical
    shifts made from arithmetic ones): integer ops only, identical on every device."""
    for multiplier in _MULTIPLIERS:
        torch.bitwise_right_shift(x, 15, out=tmp).bitwise_and_((1 << 17) - 1)
        x.bitwise_xor_(tmp).mul_(multiplier)
    torch.bitwise_right_shift(x, 15, out=tmp).bitwise_and_((1 << 17) - 1)
    return x.bitwise_xor_(tmp)


_Chunk = tuple[int, int, int]  # (tensor, start, stop)


class _Scratch:
    """One thread's chunk-sized buffers."""

    def __init__(self, size: int, device: torch.device | None = None) -> None:
        self.buf = torch.empty(size, dtype=torch.float32, device=device)
        self.tmp = torch.empty(size, dtype=torch.int32, device=device)
        self.flags = torch.empty(size, dtype=torch.bool, device=device)
        self.flags2 = torch.empty(size, dtype=torch.bool, device=device)


def _any(flags: Tensor) -> bool:
    return bool(flags.view(torch.uint8).max())  # much faster than Tensor.any() on CPU


def _in_parallel(work: Callable[[list[_Chunk]], T], chunks: list[_Chunk]) -> list[T]:
    """``work`` on consecutive runs of ``chunks``, one per torch thread, in order.

    Torch is set to one thread meanwhile: several single-threaded chunk loops beat one
    loop of multi-threaded small ops, and some of the ops (bincount) are serial anyway.
    """
    available = torch.get_num_threads()
    threads = min(available, len(chunks) // _MIN_CHUNKS_PER_THREAD)
    if threads <= 1:
        return [work(chunks)]
    step = math.ceil(len(chunks) / threads)
    runs = [chunks[j : j + step] for j in range(0, len(chunks), step)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(runs)) as pool:
            return list(pool.map(work, runs))
    finally:
        torch.set_num_threads(available)


def count_true(masks: Sequence[Tensor]) -> list[int]:
    """True entries of each mask, whole-tensor counts for DTensors (one host read;
    a collective when sharded, so every rank must call it)."""
    if not masks:
        return []
    sharded = Sharding.of(masks)
    if sharded is None:
        counts = torch.stack([local(m).count_nonzero().to(local(masks[0]).device) for m in masks])
        return _host(counts)
    counts = torch.stack(
        [
            local(m).count_nonzero().to(sharded.device) * int(own)
            for m, own in zip(masks, sharded.owns, strict=True)
        ]
    )
    return _host(sharded.reduce(counts))


def prune_lowest(
    source: KeySource,
    masks: Sequence[Tensor],
    k: int,
    names: Sequence[str],
    kept: Sequence[int] | None = None,
) -> None:
    """Clear, in place, the ``k`` lowest-keyed entries still True in ``masks``.

    ``masks`` are contiguous bool tensors, one per tensor of ``source``; ``kept`` their
    True counts if the caller knows them. Raises ``ValueError`` naming the tensor if a
    score is NaN or inf, before any mask changes. Masks may live on any device, and may
    be DTensors (shards of full masks; every rank must call, and the result is that of
    one process ranking the full tensors).
    """
    if kept is None:
        kept = count_true(masks)
    if not 0 <= k <= sum(kept):
        raise ValueError(f"cannot prune {k} entries: only {sum(kept)} are still kept")
    if k == 0:
        return
    sharded = Sharding.of(masks)
    flat_masks = [local(m).view(-1) for m in masks]
    if sharded is not None:
        source.layouts = sharded.layouts
        _prune_lowest_hist(source, flat_masks, k, names, sharded)
        return
    if _FORCE_HIST or any(m.device.type != "cpu" for m in flat_masks):
        _prune_lowest_hist(source, flat_masks, k, names, None)
        return
    partial = [kept_i < m.numel() for kept_i, m in zip(kept, flat_masks, strict=True)]
    size = min(CHUNK, max(m.numel() for m in flat_masks))
    chunks = [
        (i, start, min(start + CHUNK, m.numel()))
        for i, m in enumerate(flat_masks)
        for start in range(0, m.numel(), CHUNK)
    ]
    excluded = torch.tensor(_EXCLUDED, dtype=torch.int32)  # CPU route: CPU tensors only

    # Pass 1: which high-half bucket holds the k-th lowest key.
    def histogram(run: list[_Chunk]) -> tuple[Tensor, set[int]]:
        scratch = _Scratch(size)
        counts = torch.zeros(_HI_BINS + 1, dtype=torch.int64)
        nonfinite: set[int] = set()  # tensors holding NaN or inf
        for i, start, stop in run:
            key = source.keys(i, start, stop, scratch.buf, scratch.tmp)
            h = torch.bitwise_right_shift(key, 16, out=scratch.tmp.narrow(0, 0, stop - start))
            h.add_(_HI_BINS // 2)
            if partial[i]:
                torch.where(flat_masks[i].narrow(0, start, stop - start), h, excluded, out=h)
            chunk_counts = torch.bincount(h, minlength=_HI_BINS + 1)
            if _count_nonfinite(chunk_counts):
                nonfinite.add(i)
            counts += chunk_counts
        return counts, nonfinite

    results = _in_parallel(histogram, chunks)
    bad = set().union(*(nonfinite for _, nonfinite in results))
    if bad:
        raise ValueError(f"{names[min(bad)]} holds NaN or inf values; refusing to prune it")
    counts = torch.stack([counts for counts, _ in results]).sum(0)
    cumulative = counts[:_HI_BINS].cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    need = k - (int(cumulative[bucket - 1]) if bucket else 0)
    low_key = (bucket - _HI_BINS // 2) * _HI_BINS  # the bucket's keys: [low_key, low_key + 2**16)
    gather = int(counts[bucket]) <= max(1 << 16, sum(m.numel() for m in flat_masks) >> 8)

    # Pass 2: clear keys below the bucket; gather the bucket (or histogram its low half).
    def below_and_bucket(run: list[_Chunk]) -> tuple[list[tuple[int, Tensor, Tensor]], Tensor]:
        scratch, gathered = _Scratch(size), []
        low_counts = torch.zeros(_HI_BINS, dtype=torch.int64)
        for i, start, stop in run:
            key = source.keys(i, start, stop, scratch.buf, scratch.tmp)
            part, n = flat_masks[i].narrow(0, start, stop - start), stop - start
            part.logical_and_(torch.ge(key, low_key, out=scratch.flags.narrow(0, 0, n)))
            inside = torch.lt(
                key, low_key + _HI_BINS, out=scratch.flags2.narrow(0, 0, n)
            ).logical_and_(part)
            if not _any(inside):
                continue
            where = inside.nonzero().view(-1)
            if gather:
                gathered.append((i, where + start, key[where]))
            else:
                low_counts += torch.bincount(key[where] - low_key, minlength=_HI_BINS)
        return gathered, low_counts

    results2 = _in_parallel(below_and_bucket, chunks)
    if gather:
        # The `need` lowest of the bucket; a stable sort keeps ties in gathered order,
        # which is tensor order, then flat index. Sorting the picks restores that order.
        gathered = [g for run_gathered, _ in results2 for g in run_gathered]
        keys = torch.cat([g[2] for g in gathered])
        picked = torch.sort(keys, stable=True).indices[:need].sort().values
        owner = torch.cat([torch.full_like(g[1], g[0]) for g in gathered])[picked]
        where = torch.cat([g[1] for g in gathered])[picked]
        per_mask = torch.bincount(owner, minlength=len(flat_masks)).tolist()
        for m, drop in zip(flat_masks, where.split(per_mask), strict=True):
            m[drop] = False
        return

    # Pass 3 (crowded bucket): the exact threshold key, then the first `ties` equal to it.
    low_cumulative = torch.stack([low for _, low in results2]).sum(0).cumsum(0)
    low = int(torch.searchsorted(low_cumulative, need))
    ties = need - (int(low_cumulative[low - 1]) if low else 0)
    threshold = low_key + low
    scratch = _Scratch(size)
    for i, start, stop in chunks:
        key = source.keys(i, start, stop, scratch.buf, scratch.tmp)
        part, flags = (
            flat_masks[i].narrow(0, start, stop - start),
            scratch.flags.narrow(0, 0, stop - start),
        )
        part.logical_and_(torch.ge(key, threshold, out=flags))
        if ties:
            tied = torch.eq(key, threshold, out=flags).logical_and_(part)
            drop = tied.nonzero().view(-1)[:ties]
            part[drop] = False
            ties -= drop.numel()


def _host(counts: Tensor) -> list[int]:
    """The one host read that ends each pass of the histogram route."""
    return counts.tolist()


class _Hist:
    """A histogram summed on the tensors' own devices, without host reads."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.parts: dict[torch.device, Tensor] = {}

    def add(self, index: Tensor) -> None:
        counts = self.parts.get(index.device)
        if counts is None:
            counts = torch.zeros(self.bins, dtype=torch.int64, device=index.device)
            self.parts[index.device] = counts
        if index.device.type == "cpu":
            counts += torch.bincount(index, minlength=self.bins)
        else:  # bincount reads its input's maximum back to the host: index_add_ does not
            ones = torch.ones((), dtype=torch.int64, device=index.device)
            counts.index_add_(0, index, ones.expand(index.numel()))

    def total(self, sharded: Sharding | None) -> list[int]:
        """The counts summed over devices (and over ranks when sharded): one host read."""
        parts = list(self.parts.values())
        counts = parts[0] if parts else torch.zeros(self.bins, dtype=torch.int64)
        for part in parts[1:]:
            counts = counts + part.to(counts.device)
        if sharded is not None:
            counts = sharded.reduce(counts)
        return _host(counts)


def _pick(counts: Sequence[int], rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th (1-based) counted entry, and its rank inside the bin."""
    cumulative = list(itertools.accumulate(counts))
    found = bisect.bisect_left(cumulative, rank)
    return found, rank - (cumulative[found - 1] if found else 0)


def _prune_lowest_hist(
    source: KeySource,
    flat_masks: Sequence[Tensor],
    k: int,
    names: Sequence[str],
    sharded: Sharding | None,
) -> None:
    """:func:`prune_lowest` by histograms only: whole chunks, one host read per pass.

    Ranks (when ``sharded``) sum every histogram and so take the same decisions; each
    then clears its own block. Ties go by tensor order, then global flat index.
    """
    owns = sharded.owns if sharded else [True] * len(flat_masks)
    layouts = sharded.layouts if sharded else [Layout.whole((m.numel(),)) for m in flat_masks]
    bases = [0, *itertools.accumulate(layout.numel for layout in layouts)]
    scratches: dict[torch.device, _Scratch] = {}

    def step(m: Tensor) -> int:
        return CHUNK if m.device.type == "cpu" else DEVICE_CHUNK

    def chunks(owned_only: bool = True) -> list[_Chunk]:
        return [
            (i, start, min(start + step(m), m.numel()))
            for i, m in enumerate(flat_masks)
            if owns[i] or not owned_only
            for start in range(0, m.numel(), step(m))
        ]

    def read(i: int, start: int, stop: int) -> tuple[Tensor, Tensor, _Scratch]:
        mask = flat_masks[i]
        scratch = scratches.get(mask.device)
        if scratch is None:
            on_device = [m.numel() for m in flat_masks if m.device == mask.device]
            scratch = scratches[mask.device] = _Scratch(
                min(step(mask), max(on_device)), mask.device
            )
        key = source.keys(i, start, stop, scratch.buf, scratch.tmp)
        return key, mask.narrow(0, start, stop - start), scratch

    def positions(i: int, start: int, stop: int, device: torch.device) -> Tensor:
        return layouts[i].index(start, stop, device).add_(bases[i])

    # Pass 1: which high-half bucket holds the k-th lowest key.
    hist = _Hist(_HI_BINS + 1)
    for i, start, stop in chunks():
        key, part, scratch = read(i, start, stop)
        hist.add(_high_bins(key, part, scratch.tmp.narrow(0, 0, stop - start)))
    counts = hist.total(sharded)
    if sum(counts[: _HI_BINS // 2 - _NONFINITE_HI]) + sum(
        counts[_HI_BINS // 2 + _NONFINITE_HI : _HI_BINS]
    ):
        bad = torch.zeros(len(flat_masks), dtype=torch.int64)
        for i, start, stop in chunks():
            key, part, scratch = read(i, start, stop)
            high = _high_bins(key, part, scratch.tmp.narrow(0, 0, stop - start))
            bad[i] += _count_nonfinite(torch.bincount(high.cpu(), minlength=_HI_BINS + 1))
        first = next(i for i, n in enumerate(_host(sharded.reduce(bad) if sharded else bad)) if n)
        raise ValueError(f"{names[first]} holds NaN or inf values; refusing to prune it")
    bucket, need = _pick(counts[:_HI_BINS], k)
    low_key = (bucket - _HI_BINS // 2) * _HI_BINS  # the bucket's keys: [low_key, low_key + 2**16)

    # Pass 2: histogram of the low half inside the bucket: the exact threshold key.
    hist = _Hist(_HI_BINS + 1)
    for i, start, stop in chunks():
        key, part, scratch = read(i, start, stop)
        n = stop - start
        inside = torch.ge(key, low_key, out=scratch.flags.narrow(0, 0, n)).logical_and_(part)
        inside.logical_and_(torch.lt(key, low_key + _HI_BINS, out=scratch.flags2.narrow(0, 0, n)))
        low = torch.bitwise_and(key, _HI_BINS - 1, out=scratch.tmp.narrow(0, 0, n))
        hist.add(torch.where(inside, low, _excluded(scratch), out=low))
    low_counts = hist.total(sharded)
    low, ties = _pick(low_counts[:_HI_BINS], need)
    threshold, tied = low_key + low, low_counts[low]

    # Passes over tied entries' positions (only when some, not all, of them must go).
    cut = -1
    if ties < tied:

        def tied_entries() -> Iterator[tuple[Tensor, Tensor]]:
            for i, start, stop in chunks():
                key, part, scratch = read(i, start, stop)
                chosen = torch.eq(key, threshold, out=scratch.flags.narrow(0, 0, stop - start))
                yield positions(i, start, stop, key.device), chosen.logical_and_(part)

        cut = _position_cut(tied_entries, bases[-1], ties, sharded)

    # Last pass (every block, replicas too): clear below the threshold, and the ties.
    for i, start, stop in chunks(owned_only=False):
        key, part, scratch = read(i, start, stop)
        n = stop - start
        if ties == tied:
            part.logical_and_(torch.gt(key, threshold, out=scratch.flags.narrow(0, 0, n)))
            continue
        part.logical_and_(torch.ge(key, threshold, out=scratch.flags.narrow(0, 0, n)))
        if ties:
            drop = torch.eq(key, threshold, out=scratch.flags.narrow(0, 0, n))
            drop.logical_and_(positions(i, start, stop, key.device).le_(cut))
            part.logical_and_(drop.logical_not_())


def _position_cut(
    tied_entries: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    positions: int,
    rank: int,
    sharded: Sharding | None,
) -> int:
    """The global position of the ``rank``-th (1-based) tied entry, in position order.

    ``tied_entries()`` yields, chunk by chunk, the global positions (int64, below
    ``positions``) and a bool flag per entry saying whether it is tied; flags may be
    overwritten. One histogram pass per 16-bit digit of the positions, most significant
    first (summed across ranks when ``sharded``): no position is ever gathered.
    """
    shift = max(0, (positions - 1).bit_length() - 1) // _DIGIT * _DIGIT
    prefix = 0
    while True:
        hist = _Hist((1 << _DIGIT) + 1)
        for pos, chosen in tied_entries():
            chosen.logical_and_(torch.bitwise_right_shift(pos, shift + _DIGIT).eq_(prefix))
            digit = torch.bitwise_right_shift(pos, shift).bitwise_and_((1 << _DIGIT) - 1)
            hist.add(digit.masked_fill_(chosen.logical_not_(), 1 << _DIGIT))
        digit_value, rank = _pick(hist.total(sharded)[: 1 << _DIGIT], rank)
        prefix = (prefix << _DIGIT) | digit_value
        if shift == 0:
            return prefix
        shift -= _DIGIT


def _high_bins(key: Tensor, part: Tensor, out: Tensor) -> Tensor:
    """Pass-1 histogram bin of every key; entries already pruned go to ``_EXCLUDED``."""
    high = torch.bitwise_right_shift(key, 16, out=out).add_(_HI_BINS // 2)
    return high.masked_fill_(part.logical_not(), _EXCLUDED)


def _excluded(scratch: _Scratch) -> Tensor:
    return torch.full((), _HI_BINS, dtype=torch.int32, device=scratch.tmp.device)


def _count_nonfinite(counts: Tensor) -> int:
    """Keys at or above the high half of +inf (or below that of -inf) are inf or NaN."""
    return int(
        counts[: _HI_BINS // 2 - _NONFINITE_HI].sum()
        + counts[_HI_BINS // 2 + _NONFINITE_HI : _HI_BINS].sum()
    )
