"""Exact "prune the k lowest" for float64 scores: 64-bit keys, radix over 16-bit digits.

``prunekit._select`` ranks float32 (and narrower) scores through int32 keys. float64
scores would lose their order there (``1.0`` and ``1 + 1e-12`` tie, ``1e300`` becomes
inf), so a ranking that involves a float64 tensor goes here instead: every score becomes
an int64 key whose integer order is the float64 order, and a most-significant-digit radix
selection over four 16-bit digits finds the exact threshold key in four streaming
histogram passes. When the threshold key is shared by more kept entries than must go,
histograms of the tied entries' global positions find the cut (ties in tensor order,
then global flat index, as in ``_select``), and a last pass clears the masks.

The same passes serve every case: CPU tensors, accelerators (whole-tensor chunks, one
host read per pass, temporaries on each tensor's device) and sharded tensors (DTensor:
every histogram is summed across ranks, weights never move, and the masks equal one
process's bit for bit). float32 and narrower tensors ranked together with float64 ones
are widened exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from prunekit import _select
from prunekit._distributed import Layout, Sharding, local
from prunekit._select import (
    CHUNK,
    KeySource,
    MagnitudeKeys,
    ScoreKeys,
    _Hist,
    _pick,
    _position_cut,
    count_true,
    prune_lowest,
)

_DIGITS = (48, 32, 16, 0)  # shifts of the four 16-bit digits, most significant first
_BINS = 1 << 16
_EXCLUDED = _BINS  # histogram bin of entries outside the current bucket (or pruned)
_LOW63 = (1 << 63) - 1  # every bit but the sign


class WideKeys:
    """float64 scores as order-preserving int64 keys, chunk by chunk.

    ``magnitude=True`` ranks ``|t|``, otherwise the signed scores (higher = kept).
    Sharded tensors (DTensor) give the keys of their local block.
    """

    def __init__(self, tensors: Sequence[Tensor], *, magnitude: bool) -> None:
        self.flats = [local(t).detach().reshape(-1) for t in tensors]
        self.magnitude = magnitude

    def keys(self, i: int, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """The chunk's keys and a bool flag per entry: whether its score is finite."""
        chunk = self.flats[i].narrow(0, start, stop - start)
        x = torch.empty(chunk.shape, dtype=torch.float64, device=chunk.device)
        # widens exactly (an add, not a copy: see tests/test_devices.py); + 0.0 makes
        # -0.0 and 0.0 tie
        torch.add(chunk, 0.0, out=x)
        finite = torch.isfinite(x)
        if self.magnitude:
            x.abs_()
        key = x.view(torch.int64)
        if not self.magnitude:  # negative floats sort backwards: flip their other bits
            key.bitwise_xor_(torch.bitwise_right_shift(key, 63).bitwise_and_(_LOW63))
        return key, finite


def key_source(tensors: Sequence[Tensor], *, magnitude: bool) -> KeySource | WideKeys:
    """The key source for ranking ``tensors``: 64-bit keys if any of them is float64
    (sharded tensors included), 32-bit keys otherwise."""
    if any(t.dtype == torch.float64 for t in tensors):
        return WideKeys(tensors, magnitude=magnitude)
    return MagnitudeKeys(tensors) if magnitude else ScoreKeys(tensors)


def select_lowest(
    source: KeySource | WideKeys,
    masks: Sequence[Tensor],
    k: int,
    names: Sequence[str],
    kept: Sequence[int] | None = None,
) -> None:
    """:func:`prunekit._select.prune_lowest` for any key source (64-bit ones included).

    Clears, in place, the ``k`` lowest-keyed entries still True in ``masks`` (bool,
    contiguous, on any device, DTensors allowed: then every rank must call). Raises
    ``ValueError`` naming the first tensor with a NaN or inf score among its kept
    entries, on every rank, before any mask changes.
    """
    if not isinstance(source, WideKeys):
        prune_lowest(source, masks, k, names, kept)
        return
    if kept is None:
        kept = count_true(masks)
    if not 0 <= k <= sum(kept):
        raise ValueError(f"cannot prune {k} entries: only {sum(kept)} are still kept")
    if k == 0:
        return
    sharded = Sharding.of(masks)
    flat_masks = [local(m).view(-1) for m in masks]
    owns = sharded.owns if sharded else [True] * len(flat_masks)
    layouts = sharded.layouts if sharded else [Layout.whole((m.numel(),)) for m in flat_masks]
    bases = [0, *itertools.accumulate(layout.numel for layout in layouts)]

    def chunks(owned_only: bool = True) -> Iterator[tuple[int, int, int]]:
        for i, m in enumerate(flat_masks):
            if owns[i] or not owned_only:
                step = CHUNK if m.device.type == "cpu" else _select.DEVICE_CHUNK
                for start in range(0, m.numel(), step):
                    yield i, start, min(start + step, m.numel())

    # Four passes, one 16-bit digit of the threshold key each (the first also counts the
    # non-finite scores of each tensor, in bins after the digits').
    need, prefix, tied = k, 0, 0  # prefix: the threshold key's digits so far (key >> shift)
    for level, shift in enumerate(_DIGITS):
        hist = _Hist(_BINS + 1 + (len(flat_masks) if level == 0 else 0))
        for i, start, stop in chunks():
            key, finite = source.keys(i, start, stop)
            part = flat_masks[i].narrow(0, start, stop - start)
            if level == 0:
                # the top digit carries the sign: shifting it by 2**15 gives signed order
                digit = torch.bitwise_right_shift(key, shift).add_(_BINS // 2)
                inside = torch.logical_and(part, finite)
                bad = torch.logical_and(part, finite.logical_not_())
            else:
                digit = torch.bitwise_right_shift(key, shift).bitwise_and_(_BINS - 1)
                high = torch.bitwise_right_shift(key, shift + 16)
                inside = torch.eq(high, prefix).logical_and_(part)
            index = digit.masked_fill_(inside.logical_not_(), _EXCLUDED)
            if level == 0:
                index = index.masked_fill_(bad, _EXCLUDED + 1 + i)
            hist.add(index)
        counts = hist.total(sharded)
        if level == 0 and any(counts[_EXCLUDED + 1 :]):
            first = next(i for i, n in enumerate(counts[_EXCLUDED + 1 :]) if n)
            raise ValueError(f"{names[first]} holds NaN or inf values; refusing to prune it")
        digit_value, need = _pick(counts[:_BINS], need)
        tied = counts[digit_value]
        prefix = digit_value - _BINS // 2 if level == 0 else (prefix << 16) | digit_value
    threshold = prefix  # the exact key of the k-th lowest kept entry; `need` of its ties go

    cut = -1
    if need < tied:

        def tied_entries() -> Iterator[tuple[Tensor, Tensor]]:
            for i, start, stop in chunks():
                key, _ = source.keys(i, start, stop)
                chosen = torch.eq(key, threshold).logical_and_(
                    flat_masks[i].narrow(0, start, stop - start)
                )
                yield layouts[i].index(start, stop, key.device).add_(bases[i]), chosen

        cut = _position_cut(tied_entries, bases[-1], need, sharded)

    # Last pass (every block, replicas too): clear below the threshold, and the ties.
    for i, start, stop in chunks(owned_only=False):
        key, _ = source.keys(i, start, stop)
        part = flat_masks[i].narrow(0, start, stop - start)
        if need == tied:
            part.logical_and_(torch.gt(key, threshold))
            continue
        part.logical_and_(torch.ge(key, threshold))
        if need:
            position = layouts[i].index(start, stop, key.device).add_(bases[i])
            drop = torch.eq(key, threshold).logical_and_(position.le_(cut))
            part.logical_and_(drop.logical_not_())
