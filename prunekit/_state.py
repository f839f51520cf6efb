"""Bit-packing of bool masks for checkpoints: 8 mask entries per byte."""

from __future__ import annotations

import torch
from torch import Tensor

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask into uint8, 8 entries per byte (shape is stored separately).

    >>> m = torch.tensor([True, False, True, True, False, False, False, False, True])
    >>> pack_mask(m).tolist()
    [13, 1]
    """
    flat = mask.reshape(-1).cpu()
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_mask`.

    >>> m = torch.rand(3, 5) > 0.5
    >>> bool((unpack_mask(pack_mask(m), m.shape) == m).all())
    True
    """
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed mask must be a torch.uint8 tensor, got {type(packed).__name__}")
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.ndim != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed mask has {packed.numel()} {packed.dtype} bytes; shape {tuple(shape)} "
            f"needs {(numel + 7) // 8} uint8 bytes"
        )
    bits = packed.cpu().reshape(-1, 1).bitwise_and(_BITS).ne(0).reshape(-1)
    if numel % 8 and bool(bits[numel:].any()):  # pack_mask writes 0 there: a corrupt mask
        raise ValueError(
            f"packed mask has bits set past its {numel} entries (in its last byte): corrupt"
        )
    return bits[:numel].reshape(shape)
