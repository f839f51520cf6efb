"""Activation pruning: zero a module's smallest outputs on the fly, per sample."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prunekit._validate import amount_to_count, check_dim, check_fraction

ACTIVATION_METHODS = ("topk", "channel")


class ActivationPruning:
    """Zeroes the smallest output activations of ``module`` in every forward pass.

    ``method="topk"`` keeps, per sample, the largest-magnitude entries and zeroes the
    fraction ``amount`` of them; ``method="channel"`` zeroes whole channels (along
    ``dim``) with the smallest L2 norm, per sample. ``amount`` may be changed between
    calls (``handle.amount = 0.8``), so a schedule can drive it; ``eval_amount``
    (default: same as ``amount``) applies when the module is in eval mode, since
    activation pruning is often lighter or off at test time. Gradients flow through
    the kept entries only. ``remove()`` detaches it.

    >>> layer = nn.Linear(4, 6)
    >>> handle = ActivationPruning(layer, amount=0.5)
    >>> int((layer(torch.randn(3, 4)) == 0).sum(dim=1).min())
    3
    >>> handle.remove()
    """

    def __init__(
        self,
        module: nn.Module,
        amount: float,
        *,
        method: str = "topk",
        dim: int = 1,
        eval_amount: float | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if method not in ACTIVATION_METHODS:
            raise ValueError(f"method={method!r} must be one of {ACTIVATION_METHODS}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim={dim!r} must be an int >= 1 (dim 0 is the batch)")
        self.method, self.dim = method, dim
        self.amount = amount
        self.eval_amount = eval_amount
        self._handle = module.register_forward_hook(self._hook)

    @property
    def amount(self) -> float:
        return self._amount

    @amount.setter
    def amount(self, value: float) -> None:
        self._amount = check_fraction(value, "amount")

    @property
    def eval_amount(self) -> float | None:
        return self._eval_amount

    @eval_amount.setter
    def eval_amount(self, value: float | None) -> None:
        self._eval_amount = None if value is None else check_fraction(value, "eval_amount")

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"ActivationPruning needs a tensor output, {type(module).__name__} gave {type(output).__name__}"
            )
        amount = self.amount if module.training or self.eval_amount is None else self.eval_amount
        if amount == 0 or output.ndim < 2:
            return output
        return output * self.mask(output, amount)

    def mask(self, output: Tensor, amount: float) -> Tensor:
        """The bool keep-mask for ``output`` (batch first) at ``amount``."""
        with torch.no_grad():
            if self.method == "topk":
                flat = output.detach().abs().flatten(1)
                keep = flat.shape[1] - amount_to_count(amount, flat.shape[1])
                kept = torch.zeros_like(flat, dtype=torch.bool)
                kept.scatter_(1, flat.topk(keep, dim=1, sorted=False).indices, True)
                return kept.view_as(output)
            dim = check_dim(self.dim, output.ndim)
            moved = output.detach().movedim(dim, 1).flatten(2)
            norms = torch.linalg.vector_norm(moved.float(), dim=2)
            keep = norms.shape[1] - amount_to_count(amount, norms.shape[1])
            kept = torch.zeros_like(norms, dtype=torch.bool)
            kept.scatter_(1, norms.topk(keep, dim=1, sorted=False).indices, True)
            shape = [output.shape[0]] + [1] * (output.ndim - 1)
            shape[dim] = output.shape[dim]
            return kept.view(shape)

    def remove(self) -> None:
        """Detach the hook; the module computes its plain output again."""
        self._handle.remove()

    def __repr__(self) -> str:
        return f"ActivationPruning(method={self.method!r}, amount={self.amount}, dim={self.dim})"
