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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

CHUNK = 1 << 18
_HI_BINS = 1 << 16
_EXCLUDED = _HI_BINS  # histogram bin for entries that are already pruned
_NONFINITE_HI = 0x7F80  # high half of +inf: keys at or above it are inf or NaN
_MIN_CHUNKS_PER_THREAD = 8  # below this, threads cost more than they save
T = TypeVar("T")


class KeySource:
    """Scores of several tensors, handed out as order-preserving int32 keys per chunk.

    ``keys`` must give the same keys for the same chunk every time it is asked, from
    any thread: chunks are read once per pass, by several threads at once.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.flats = [t.detach().reshape(-1) for t in tensors]

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        raise NotImplementedError


class MagnitudeKeys(KeySource):
    """|w|: non-negative floats, whose bit patterns already sort like their values."""

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        chunk, out = self.flats[i][start:stop], buf[: stop - start]
        if chunk.dtype == torch.float32:
            torch.abs(chunk, out=out)
        else:
            out.copy_(chunk).abs_()
        return out.view(torch.int32)


class ScoreKeys(KeySource):
    """Arbitrary float scores (higher = more important); negatives allowed."""

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        n = stop - start
        # + 0.0 turns -0.0 into +0.0: equal scores must tie (and go by position)
        key = buf[:n].copy_(self.flats[i][start:stop]).add_(0.0).view(torch.int32)
        flip = torch.bitwise_right_shift(key, 31, out=tmp[:n]).bitwise_and_(0x7FFFFFFF)
        return key.bitwise_xor_(flip)


class RandomKeys(KeySource):
    """Uniform random scores, drawn per chunk from a seed and the chunk's position."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        chunk_seed = (self.seed * 1_000_003 + i * 1_000_033 + start // CHUNK) % 2**63
        out = buf[: stop - start]
        torch.rand(stop - start, generator=torch.Generator().manual_seed(chunk_seed), out=out)
        return out.view(torch.int32)


_Chunk = tuple[int, int, int]  # (tensor, start, stop)


class _Scratch:
    """One thread's chunk-sized buffers."""

    def __init__(self, size: int) -> None:
        self.buf = torch.empty(size, dtype=torch.float32)
        self.tmp = torch.empty(size, dtype=torch.int32)
        self.flags = torch.empty(size, dtype=torch.bool)
        self.flags2 = torch.empty(size, dtype=torch.bool)


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
    score is NaN or inf, before any mask changes.
    """
    flat_masks = [m.view(-1) for m in masks]
    if kept is None:
        kept = [int(m.count_nonzero()) for m in flat_masks]
    if not 0 <= k <= sum(kept):
        raise ValueError(f"cannot prune {k} entries: only {sum(kept)} are still kept")
    if k == 0:
        return
    partial = [kept_i < m.numel() for kept_i, m in zip(kept, flat_masks, strict=True)]
    size = min(CHUNK, max(m.numel() for m in flat_masks))
    chunks = [
        (i, start, min(start + CHUNK, m.numel()))
        for i, m in enumerate(flat_masks)
        for start in range(0, m.numel(), CHUNK)
    ]
    excluded = torch.tensor(_EXCLUDED, dtype=torch.int32)

    # Pass 1: which high-half bucket holds the k-th lowest key.
    def histogram(run: list[_Chunk]) -> tuple[Tensor, set[int]]:
        scratch = _Scratch(size)
        counts = torch.zeros(_HI_BINS + 1, dtype=torch.int64)
        nonfinite: set[int] = set()  # tensors holding NaN or inf
        for i, start, stop in run:
            key = source.keys(i, start, stop, scratch.buf, scratch.tmp)
            h = torch.bitwise_right_shift(key, 16, out=scratch.tmp[: stop - start])
            h.add_(_HI_BINS // 2)
            if partial[i]:
                torch.where(flat_masks[i][start:stop], h, excluded, out=h)
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
            part, n = flat_masks[i][start:stop], stop - start
            part.logical_and_(torch.ge(key, low_key, out=scratch.flags[:n]))
            inside = torch.lt(key, low_key + _HI_BINS, out=scratch.flags2[:n]).logical_and_(part)
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
        part, flags = flat_masks[i][start:stop], scratch.flags[: stop - start]
        part.logical_and_(torch.ge(key, threshold, out=flags))
        if ties:
            tied = torch.eq(key, threshold, out=flags).logical_and_(part)
            drop = tied.nonzero().view(-1)[:ties]
            part[drop] = False
            ties -= drop.numel()


def _count_nonfinite(counts: Tensor) -> int:
    """Keys at or above the high half of +inf (or below that of -inf) are inf or NaN."""
    return int(
        counts[: _HI_BINS // 2 - _NONFINITE_HI].sum()
        + counts[_HI_BINS // 2 + _NONFINITE_HI : _HI_BINS].sum()
    )
