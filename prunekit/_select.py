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

Nothing is concatenated: the temporaries are a few chunk-sized buffers plus the gathered
bucket (at most 1/256 of the entries), so the extra memory is the masks plus a few
megabytes, whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CHUNK = 1 << 20
_HI_BINS = 1 << 16
_EXCLUDED = _HI_BINS  # histogram bin for entries that are already pruned
_NONFINITE_HI = 0x7F80  # high half of +inf: keys at or above it are inf or NaN


class KeySource:
    """Scores of several tensors, handed out as order-preserving int32 keys per chunk."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.flats = [t.detach().reshape(-1) for t in tensors]

    def restart(self) -> None:
        """Called before each pass; sources that draw random numbers re-seed here."""

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
    """Uniform random scores drawn chunk by chunk from a seed, identical on every pass."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator()

    def restart(self) -> None:
        self.generator.manual_seed(self.seed)

    def keys(self, i: int, start: int, stop: int, buf: Tensor, tmp: Tensor) -> Tensor:
        out = buf[: stop - start]
        torch.rand(stop - start, generator=self.generator, out=out)
        return out.view(torch.int32)


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def _any(flags: Tensor) -> bool:
    return bool(flags.view(torch.uint8).max())  # much faster than Tensor.any() on CPU


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
    buf = torch.empty(size, dtype=torch.float32)
    tmp = torch.empty(size, dtype=torch.int32)
    flags = torch.empty(size, dtype=torch.bool)
    flags2 = torch.empty(size, dtype=torch.bool)
    excluded = torch.tensor(_EXCLUDED, dtype=torch.int32)

    def chunks():
        source.restart()
        for i, m in enumerate(flat_masks):
            for start, stop in _chunks(m.numel()):
                yield i, start, stop, source.keys(i, start, stop, buf, tmp), m[start:stop]

    # Pass 1: which high-half bucket holds the k-th lowest key.
    counts = torch.zeros(_HI_BINS + 1, dtype=torch.int64)
    last = 0
    for i, start, stop, key, part in chunks():
        if i != last:
            _check_finite(counts, names[last])
            last = i
        h = torch.bitwise_right_shift(key, 16, out=tmp[: stop - start]).add_(_HI_BINS // 2)
        if partial[i]:
            torch.where(part, h, excluded, out=h)
        counts += torch.bincount(h, minlength=_HI_BINS + 1)
    _check_finite(counts, names[last])
    cumulative = counts[:_HI_BINS].cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    need = k - (int(cumulative[bucket - 1]) if bucket else 0)
    low_key = (bucket - _HI_BINS // 2) * _HI_BINS  # the bucket's keys: [low_key, low_key + 2**16)
    gather = int(counts[bucket]) <= max(1 << 16, sum(m.numel() for m in flat_masks) >> 8)

    # Pass 2: clear keys below the bucket; gather the bucket (or histogram its low half).
    gathered: list[tuple[int, Tensor, Tensor]] = []
    low_counts = torch.zeros(_HI_BINS, dtype=torch.int64)
    for i, start, stop, key, part in chunks():
        part.logical_and_(torch.ge(key, low_key, out=flags[: stop - start]))
        inside = torch.lt(key, low_key + _HI_BINS, out=flags2[: stop - start]).logical_and_(part)
        if not _any(inside):
            continue
        where = inside.nonzero().view(-1)
        if gather:
            gathered.append((i, where + start, key[where]))
        else:
            low_counts += torch.bincount(key[where] - low_key, minlength=_HI_BINS)

    if gather:
        # The `need` lowest of the bucket; a stable sort keeps ties in gathered order,
        # which is tensor order, then flat index. Sorting the picks restores that order.
        keys = torch.cat([g[2] for g in gathered])
        picked = torch.sort(keys, stable=True).indices[:need].sort().values
        owner = torch.cat([torch.full_like(g[1], g[0]) for g in gathered])[picked]
        where = torch.cat([g[1] for g in gathered])[picked]
        per_mask = torch.bincount(owner, minlength=len(flat_masks)).tolist()
        for m, drop in zip(flat_masks, where.split(per_mask), strict=True):
            m[drop] = False
        return

    # Pass 3 (crowded bucket): the exact threshold key, then the first `ties` equal to it.
    low_cumulative = low_counts.cumsum(0)
    low = int(torch.searchsorted(low_cumulative, need))
    ties = need - (int(low_cumulative[low - 1]) if low else 0)
    threshold = low_key + low
    for _, start, stop, key, part in chunks():
        part.logical_and_(torch.ge(key, threshold, out=flags[: stop - start]))
        if ties:
            tied = torch.eq(key, threshold, out=flags[: stop - start]).logical_and_(part)
            drop = tied.nonzero().view(-1)[:ties]
            part[drop] = False
            ties -= drop.numel()


def _check_finite(counts: Tensor, name: str) -> None:
    """Keys at or above the high half of +inf (or below that of -inf) are inf or NaN."""
    nonfinite = (
        counts[: _HI_BINS // 2 - _NONFINITE_HI].sum()
        + counts[_HI_BINS // 2 + _NONFINITE_HI : _HI_BINS].sum()
    )
    if nonfinite:
        raise ValueError(f"{name} holds NaN or inf values; refusing to prune it")
