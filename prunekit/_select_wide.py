"""Exact "prune the k lowest" for float64 scores: 64-bit keys, radix over 16-bit digits.

``prunekit._select`` ranks float32 (and narrower) scores through int32 keys. float64
scores would lose their order there (``1.0`` and ``1 + 1e-12`` tie, ``1e300`` becomes
inf), so a ranking that involves a float64 tensor goes here instead: every score becomes
an int64 key whose integer order is the float64 order, and a most-significant-digit radix
selection over four 16-bit digits finds the exact threshold key in four streaming
passes, a fifth clears up to it (ties in tensor order, then flat index, as in
``_select``). Temporaries are chunk-sized and live on each tensor's device; nothing is
concatenated. float32 and narrower tensors ranked together with float64 ones are
widened exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prunekit._select import KeySource, MagnitudeKeys, ScoreKeys, prune_lowest

CHUNK = 1 << 18
_DIGITS = (48, 32, 16, 0)  # shifts of the four 16-bit digits, most significant first
_LOW63 = (1 << 63) - 1  # every bit but the sign


class WideKeys:
    """float64 scores as order-preserving int64 keys, chunk by chunk.

    ``magnitude=True`` ranks ``|t|``, otherwise the signed scores (higher = kept).
    """

    def __init__(self, tensors: Sequence[Tensor], *, magnitude: bool) -> None:
        self.flats = [t.detach().reshape(-1) for t in tensors]
        self.magnitude = magnitude

    def keys(self, i: int, start: int, stop: int) -> tuple[Tensor, bool]:
        """The chunk's keys and whether every score in it is finite."""
        x = self.flats[i][start:stop].to(torch.float64)
        finite = bool(torch.isfinite(x).all())
        x = x.abs() if self.magnitude else x + 0.0  # + 0.0: -0.0 and 0.0 tie
        key = x.view(torch.int64)
        if not self.magnitude:  # negative floats sort backwards: flip their other bits
            key = key ^ (key >> 63).bitwise_and_(_LOW63)
        return key, finite


def key_source(tensors: Sequence[Tensor], *, magnitude: bool) -> KeySource | WideKeys:
    """The key source for ranking ``tensors``: 64-bit keys if any of them is float64.

    Sharded tensors (DTensor) always take ``_select``'s 32-bit route, which ranks across
    ranks: float64 shards are ranked in float32 there (nearby values may tie).
    """
    if any(t.dtype == torch.float64 for t in tensors) and not any(
        hasattr(t, "device_mesh") for t in tensors
    ):
        return WideKeys(tensors, magnitude=magnitude)
    return MagnitudeKeys(tensors) if magnitude else ScoreKeys(tensors)


def select_lowest(
    source: KeySource | WideKeys,
    masks: Sequence[Tensor],
    k: int,
    names: Sequence[str],
    kept: Sequence[int] | None = None,
) -> None:
    """:func:`prunekit._select.prune_lowest` for any key source (64-bit ones included)."""
    if not isinstance(source, WideKeys):
        prune_lowest(source, masks, k, names, kept)
        return
    flat_masks = [m.view(-1) for m in masks]
    if kept is None:
        kept = [int(m.count_nonzero()) for m in flat_masks]
    if not 0 <= k <= sum(kept):
        raise ValueError(f"cannot prune {k} entries: only {sum(kept)} are still kept")
    if k == 0:
        return
    chunks = [
        (i, start, min(start + CHUNK, m.numel()))
        for i, m in enumerate(flat_masks)
        for start in range(0, m.numel(), CHUNK)
    ]
    need, prefix = k, 0  # prefix: the threshold key's digits found so far (key >> shift)
    for level, shift in enumerate(_DIGITS):
        counts = torch.zeros(1 << 16, dtype=torch.int64, device=flat_masks[0].device)
        for i, start, stop in chunks:
            key, finite = source.keys(i, start, stop)
            if not finite:  # only pass 1 reads every score: nothing has changed yet
                raise ValueError(f"{names[i]} holds NaN or inf values; refusing to prune it")
            part = flat_masks[i][start:stop]
            if level:
                high = key >> (shift + 16)
                part.logical_and_(high >= prefix)  # below the bucket: pruned for sure
                inside = part & (high == prefix)
            else:
                inside = part
            digit = (key >> shift).bitwise_and_(0xFFFF)[inside]
            counts += torch.bincount(digit, minlength=1 << 16).to(counts.device)
        if level == 0:  # the top digit carries the sign: signed order is 0x8000.., 0xFFFF, 0..
            order = torch.cat([torch.arange(1 << 15, 1 << 16), torch.arange(0, 1 << 15)])
            cumulative = counts[order.to(counts.device)].cumsum(0)
            pos = int(torch.searchsorted(cumulative, need))
            need -= int(cumulative[pos - 1]) if pos else 0
            prefix = pos - (1 << 15)  # key >> 48 of the threshold (arithmetic shift)
        else:
            cumulative = counts.cumsum(0)
            digit = int(torch.searchsorted(cumulative, need))
            need -= int(cumulative[digit - 1]) if digit else 0
            prefix = (prefix << 16) | digit
    # prefix is the exact threshold key: clear every key below it, then `need` ties.
    for i, start, stop in chunks:
        key, _ = source.keys(i, start, stop)
        part = flat_masks[i][start:stop]
        part.logical_and_(key >= prefix)
        if need:
            drop = (part & (key == prefix)).nonzero().view(-1)[:need]
            part[drop] = False
            need -= drop.numel()
