"""Exact "prune the k lowest-scored entries" over many tensors, streamed.

The scores of every tensor are turned, chunk by chunk, into int32 keys whose integer
order is the scores' order (the IEEE-754 bit pattern, with negative floats flipped).
A radix selection then finds the exact k-th key in three streaming passes:

1. a histogram of the high 16 bits of every still-kept key, giving the bucket of the k-th;
2. a histogram of the low 16 bits inside that bucket, giving the exact threshold key T
   and how many entries equal to T must go (ties);
3. masks are cleared where key < T, plus the first tied entries in a fixed order
   (tensor order, then flat index), so the count is exact and deterministic.

Nothing is concatenated: the temporaries are a few chunk-sized buffers, so the extra
memory is the masks plus a few megabytes, whatever the model's size.
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


def prune_lowest(source: KeySource, masks: Sequence[Tensor], k: int, names: Sequence[str]) -> None:
    """Clear, in place, the ``k`` lowest-keyed entries still True in ``masks``.

    ``masks`` are contiguous bool tensors, one per tensor of ``source``. Raises
    ``ValueError`` naming the tensor if a score is NaN or inf, before any mask changes.
    """
    flat_masks = [m.view(-1) for m in masks]
    kept = [int(m.count_nonzero()) for m in flat_masks]
    if not 0 <= k <= sum(kept):
        raise ValueError(f"cannot prune {k} entries: only {sum(kept)} are still kept")
    if k == 0:
        return
    partial = [kept_i < m.numel() for kept_i, m in zip(kept, flat_masks, strict=True)]
    size = min(CHUNK, max(m.numel() for m in flat_masks))
    buf = torch.empty(size, dtype=torch.float32)
    tmp = torch.empty(size, dtype=torch.int32)
    hi = torch.empty(size, dtype=torch.int32)
    flags = torch.empty(size, dtype=torch.bool)

    def high_half(i: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
        key = source.keys(i, start, stop, buf, tmp)
        h = torch.bitwise_right_shift(key, 16, out=hi[: stop - start]).add_(_HI_BINS // 2)
        if partial[i]:
            pruned = torch.logical_not(flat_masks[i][start:stop], out=flags[: stop - start])
            h.masked_fill_(pruned, _EXCLUDED)
        return key, h

    # Pass 1: which high-half bucket holds the k-th lowest key.
    source.restart()
    counts = torch.zeros(_HI_BINS + 1, dtype=torch.int64)
    for i, m in enumerate(flat_masks):
        for start, stop in _chunks(m.numel()):
            counts += torch.bincount(high_half(i, start, stop)[1], minlength=_HI_BINS + 1)
        nonfinite = (
            counts[: _HI_BINS // 2 - _NONFINITE_HI].sum()
            + counts[_HI_BINS // 2 + _NONFINITE_HI : _HI_BINS].sum()
        )
        if nonfinite:
            raise ValueError(f"{names[i]} holds NaN or inf values; refusing to prune it")
    cumulative = counts[:_HI_BINS].cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    need = k - (int(cumulative[bucket - 1]) if bucket else 0)

    # Pass 2: the exact threshold key inside that bucket, and how many ties go.
    source.restart()
    low_counts = torch.zeros(_HI_BINS, dtype=torch.int64)
    for i, m in enumerate(flat_masks):
        for start, stop in _chunks(m.numel()):
            key, h = high_half(i, start, stop)
            inside = torch.eq(h, bucket, out=flags[: stop - start])
            if inside.any():
                low = key[inside].bitwise_and_(0xFFFF)
                low_counts += torch.bincount(low, minlength=_HI_BINS)
    low_cumulative = low_counts.cumsum(0)
    low = int(torch.searchsorted(low_cumulative, need))
    ties = need - (int(low_cumulative[low - 1]) if low else 0)
    threshold = (bucket - _HI_BINS // 2) * _HI_BINS + low

    # Pass 3: clear keys below the threshold, then the first `ties` entries equal to it.
    source.restart()
    for i, m in enumerate(flat_masks):
        for start, stop in _chunks(m.numel()):
            key = source.keys(i, start, stop, buf, tmp)
            part = m[start:stop]
            part.logical_and_(torch.ge(key, threshold, out=flags[: stop - start]))
            if ties:
                tied = torch.eq(key, threshold, out=flags[: stop - start]).logical_and_(part)
                drop = tied.nonzero().view(-1)[:ties]
                part[drop] = False
                ties -= drop.numel()
