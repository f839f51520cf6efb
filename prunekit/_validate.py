"""Argument checks shared by the engine: every public entry point validates here first."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable

import torch
from torch import Tensor


def as_amount(value: object, name: str = "amount") -> int | float:
    """``value`` as a Python int (a count) or float (a fraction), checked for type and NaN.

    Any integral number (Python, numpy, a 0-d integer tensor) is a count, any other real
    number (numpy floats, 0-d float tensors included) a fraction; bools and NaN are refused.

    >>> as_amount(3), as_amount(torch.tensor(0.25))
    (3, 0.25)
    """
    if isinstance(value, Tensor) and value.ndim == 0 and value.dtype != torch.bool:
        value = value.item()
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a float in [0, 1] or an int count")
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name}=nan must be a fraction in [0, 1] or an int count")
    return value


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too


def amount_to_count(amount: object, total: int, *, name: str = "amount") -> int:
    """Turn an absolute ``amount`` (fraction or count) into a count of pruned items.

    A float is the fraction of ``total`` pruned afterwards, rounded with Python's
    ``round`` (half to even); an int is the count itself (see :func:`as_amount` for
    what counts as either).

    >>> amount_to_count(0.9, 10), amount_to_count(3, 10)
    (9, 3)
    """
    value = as_amount(amount, name)
    if isinstance(value, int):
        if not 0 <= value <= total:
            raise ValueError(f"{name}={value} must be a count in [0, {total}]")
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be a fraction in [0, 1]")
    return round(value * total)


def check_fraction(value: object, name: str) -> float:
    """Require a real number in [0, 1] (not NaN, not a bool); numpy scalars are fine.

    >>> check_fraction(0.5, "amount")
    0.5
    """
    if isinstance(value, Tensor) and value.ndim == 0 and value.dtype != torch.bool:
        value = value.item()
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a float in [0, 1]")
    value = float(value)
    if math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f"{name}={value} must be in [0, 1]")
    return value


def check_tensor(t: object, name: str = "t") -> Tensor:
    """Require a floating-point tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_mask(mask: object, shape: torch.Size, name: str = "mask") -> Tensor:
    """Require a bool tensor of ``shape`` (True = kept)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a torch.bool tensor (True = kept), got {got}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask


def check_dim(dim: object, ndim: int, name: str = "dim", where: str = "") -> int:
    """Normalise ``dim`` to a non-negative index into a tensor of ``ndim`` dimensions."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name}={dim!r} must be an int")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim}{where} is out of range for a tensor with {ndim} dimensions")
    return dim % ndim


def check_finite(t: Tensor, name: str) -> None:
    """Refuse NaN or inf values: a ranking over them is meaningless."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} NaN or inf values; refusing to prune it")


def suggest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for an unknown name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
