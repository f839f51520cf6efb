"""Data-aware pruning methods: scores from activations, gradients and movement.

Each method is one :class:`~prunekit._masks.Method` registered by name: its tensor-level
mask function (for a bare tensor and the statistics passed by hand), the statistics the
engine collects for it (``prunekit._stats``), how its scores come from the weight and
those statistics, and its option checks. Adding a method means adding it here.

Scores are "higher = kept"; every result is intersected with the current mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunekit._masks import (
    Method,
    _prune_entries,
    _prune_slices,
    register_method,
)
from prunekit._select_wide import key_source
from prunekit._stats import TargetStats
from prunekit._validate import amount_to_count, check_finite, check_mask, check_tensor

CRITERIA = ("mean_abs", "apoz")


def _score_check(scores: Tensor, shape: tuple[int, ...], name: str, method: str) -> Tensor:
    check_tensor(scores, name)
    if tuple(scores.shape) != tuple(shape):
        raise ValueError(
            f"method={method!r}: {name} has shape {tuple(scores.shape)}, expected {tuple(shape)}"
        )
    check_finite(scores, f"method={method!r}: {name}")
    return scores


def _entries(
    t: Tensor, amount: float | int, scores: Tensor, mask: Tensor | None, per_row: bool
) -> Tensor:
    if per_row:
        return rank_rows(t, amount, scores, mask)
    return _prune_entries(t, amount, mask, key_source([scores], magnitude=False))


def rank_rows(t: Tensor, amount: float | int, scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Prune the lowest ``scores`` within each row (dim 0) of ``t``: every row ends with at
    least ``round(amount * row_size)`` (or ``amount`` if an int) pruned; entries already
    pruned by ``mask`` count toward it; ties go by position.

    >>> rank_rows(torch.ones(2, 4), 0.5, torch.tensor([[4.0, 1, 3, 2], [1, 2, 3, 4]]))
    tensor([[ True, False,  True, False],
            [False, False,  True,  True]])
    """
    check_tensor(t)
    if t.ndim < 2:
        raise ValueError(
            f"per-row ranking needs a weight with rows (ndim >= 2), got shape {tuple(t.shape)}"
        )
    keep = (
        torch.ones(t.shape, dtype=torch.bool, device=t.device)
        if mask is None
        else check_mask(mask, t.shape).clone(memory_format=torch.contiguous_format)
    )
    rows = keep.view(t.shape[0], -1)
    width = rows.shape[1]
    target = amount_to_count(amount, width)
    s = scores.reshape(t.shape[0], -1).double().masked_fill(~rows, -torch.inf)
    order = torch.sort(s, dim=1, stable=True).indices
    already = (~rows).sum(dim=1, keepdim=True)
    prune = torch.arange(width, device=t.device).view(1, -1) < torch.clamp(already, min=target)
    rows.scatter_(1, order, ~prune & rows.gather(1, order))
    return keep


def _broadcast(norm: Tensor, t: Tensor) -> Tensor:
    if norm.ndim == 1 and t.ndim >= 2 and norm.shape[0] == t.shape[1]:
        return norm.view(1, -1, *([1] * (t.ndim - 2)))
    try:
        torch.broadcast_shapes(norm.shape, t.shape)
    except RuntimeError:
        raise ValueError(
            f"input_norm has shape {tuple(norm.shape)}: give one norm per input feature "
            f"({t.shape[1] if t.ndim > 1 else '?'},) or a tensor broadcastable to {tuple(t.shape)}"
        ) from None
    return norm


# ------------------------------------------------------------------ wanda
def wanda_mask(
    t: Tensor,
    amount: float | int,
    *,
    input_norm: Tensor,
    mask: Tensor | None = None,
    per_output: bool = False,
) -> Tensor:
    """Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
    Models"): prune the lowest ``S_ij = |W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the
    norm of input feature ``j`` over every token / sample seen (for a Conv, ``j`` is an
    input channel and kernel position: the norm of that column of the unfolded (im2col)
    input over every sample and output position, with the conv's padding, stride and
    dilation; by hand, pass ``input_norm`` of shape ``(in_channels / groups, *kernel)``
    or per input channel ``(in_channels,)`` to broadcast).

    ``per_output=True`` compares entries within each output row (the paper's choice: every
    row loses ``round(amount * row_size)``); the default ranks all entries of the tensor
    (and, in a Pruner with ``scope="global"``, across targets), like every entry-level
    method, so the pruned count is exactly ``round(amount * N)``. Statistics: one float64
    per input feature (``inputs``).

    >>> w = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    >>> wanda_mask(w, 0.5, input_norm=torch.tensor([4.0, 1.0]))  # scores [[4, 2], [12, .5]]
    tensor([[ True, False],
            [ True, False]])
    >>> wanda_mask(w, 0.5, input_norm=torch.tensor([1.0, 1.0]), per_output=True)
    tensor([[False,  True],
            [ True, False]])
    """
    check_tensor(t)
    check_tensor(input_norm, "input_norm")
    _check_bool(per_output, "per_output")
    scores = t.detach().abs() * _broadcast(input_norm.to(t.device), t)
    check_finite(scores, "method='wanda': scores")
    return _entries(t, amount, scores, mask, per_output)


def _wanda_score(weight: Tensor, stats: TargetStats, **options: Any) -> Tensor:
    assert stats.input_norm is not None
    return weight.detach().abs() * stats.input_norm.to(weight.device)


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")


def _check_wanda(t: Tensor, options: Mapping[str, Any], where: str) -> None:
    _check_bool(options.get("per_output", False), f"per_output for {where}")


# ----------------------------------------------------------------- taylor
def taylor_mask(
    t: Tensor, amount: float | int, *, grad: Tensor, mask: Tensor | None = None
) -> Tensor:
    """First-order Taylor importance (Molchanov et al. 2019, "Importance Estimation for
    Neural Network Pruning"): prune the lowest ``|W * dL/dW|``, the estimated change of the
    loss when a weight is removed.

    In a Pruner the gradient term is the engine's ``grads`` statistic, ``G = sum_b W_b *
    g_b`` over every backward pass since the last update, and the score is ``|G|`` (the
    absolute value of the sum, not a sum of absolute values): the Taylor estimate for the
    loss summed over everything seen since the last update. The paper averages
    per-minibatch importances; we take ``|sum|`` because it is exact under gradient
    accumulation and DDP (a per-backward absolute value would depend on how a batch is
    split into micro-batches and ranks); for one batch (one-shot, ``calibrate`` over a
    single batch) the two agree. Statistics: one float32 per weight, reset at each update.
    Under ``scope="global"`` a target frozen during backward passes that reached the
    others (unfrozen part-way) makes ``prune_to`` raise: its sum covers fewer passes.

    >>> taylor_mask(torch.tensor([1.0, -2.0, 3.0, 0.5]), 2, grad=torch.tensor([1.0, 1.0, 0.1, -4.0]))
    tensor([False,  True, False,  True])
    """
    check_tensor(t)
    _score_check(grad, tuple(t.shape), "grad", "taylor")
    scores = (t.detach() * grad.to(t.device)).abs()
    return _entries(t, amount, scores, mask, False)


def _abs_grads(weight: Tensor, stats: TargetStats, **options: Any) -> Tensor:
    assert stats.grads is not None
    return stats.grads.abs()


# ------------------------------------------------------------------- snip
def snip_mask(
    t: Tensor, amount: float | int, *, grad: Tensor, mask: Tensor | None = None
) -> Tensor:
    """SNIP (Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity"): at initialisation, prune the lowest connection sensitivity
    ``|W * dL/dW|`` on a batch of data (the paper's normalisation by the sum is a common
    factor and does not change the ranking).

    In a Pruner, call ``calibrate(batches, loss_fn)`` on the freshly initialised model and
    ``prune_to``: the score is ``|sum_b W * g_b|`` over the calibration batches (SNIP on
    their summed loss). In a training loop it behaves exactly like ``taylor`` over the
    backward passes since the last update. Statistics: one float32 per weight.

    >>> snip_mask(torch.tensor([1.0, -2.0, 3.0, 0.5]), 2, grad=torch.tensor([1.0, 1.0, 0.1, -4.0]))
    tensor([False,  True, False,  True])
    """
    check_tensor(t)
    _score_check(grad, tuple(t.shape), "grad", "snip")
    scores = (t.detach() * grad.to(t.device)).abs()
    return _entries(t, amount, scores, mask, False)


# --------------------------------------------------------------- movement
def movement_mask(
    t: Tensor, amount: float | int, *, weight_grad_sum: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Movement pruning (Sanh et al. 2020, "Movement Pruning: Adaptive Sparsity by
    Fine-Tuning"), hard variant: scores ``S = -sum_t W_t * dL/dW_t`` accumulated over the
    training steps; prune the lowest ``S`` (weights moving towards zero).
    ``weight_grad_sum`` is ``sum_t W_t * dL/dW_t``.

    In a Pruner the sum is the engine's ``grads`` statistic over every backward pass. As in
    the paper the scores accumulate over the whole training, not only since the last
    update (they are saved in ``Pruner.state_dict()`` for resuming, with ``reset``: a
    Pruner with the other ``reset`` refuses to load them); ``reset=True`` restarts them
    after each update instead. Statistics: one float32 per weight, kept across updates.

    >>> movement_mask(torch.ones(4), 2, weight_grad_sum=torch.tensor([0.5, -1.0, 2.0, 0.0]))
    tensor([False,  True, False,  True])
    """
    check_tensor(t)
    _score_check(weight_grad_sum, tuple(t.shape), "weight_grad_sum", "movement")
    return _entries(t, amount, -weight_grad_sum.to(t.device), mask, False)


def _movement_score(weight: Tensor, stats: TargetStats, **options: Any) -> Tensor:
    assert stats.grads is not None
    return -stats.grads


def _check_movement(t: Tensor, options: Mapping[str, Any], where: str) -> None:
    _check_bool(options.get("reset", False), f"reset for {where}")


def _movement(
    t: Tensor,
    amount: float | int,
    *,
    weight_grad_sum: Tensor,
    mask: Tensor | None = None,
    reset: bool = False,
) -> Tensor:
    _check_bool(reset, "reset")
    return movement_mask(t, amount, weight_grad_sum=weight_grad_sum, mask=mask)


_movement.__doc__ = movement_mask.__doc__


# ------------------------------------------------------------- activation
def activation_mask(
    t: Tensor, amount: float | int, *, activity: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Structured activation-based pruning (Hu et al. 2016, "Network Trimming"): prune
    whole output channels / neurons (slices of ``t`` along dim 0) with the lowest
    ``activity``, one value per output channel: by default (``criterion="apoz"``, the
    paper's criterion) ``1 - APoZ_c``, the fraction of positive outputs (APoZ: the average
    percentage of zeros after a ReLU; highest APoZ pruned first), or the mean ``|y_c|`` of
    the module's output (``criterion="mean_abs"``). ``amount`` counts channels; a fraction
    below 1 keeps at least one. In a Pruner, APoZ (a fraction, comparable across layers)
    ranks the channels of all targets together under ``scope="global"`` (exactly
    ``round(amount * channels)``, each layer keeping its best channel for fractions < 1);
    ``mean_abs`` (its scale differs between layers) ranks per layer (``scope="layer"``).
    Statistics: two float64 per output channel. They are taken on the module's own
    output, before whatever follows it: after an in-place ReLU the fraction of positives
    is the same, but after a normalisation (Conv -> BatchNorm -> ReLU) it is not the
    post-activation APoZ of the paper.

    >>> activation_mask(torch.ones(3, 2), 1, activity=torch.tensor([0.5, 0.1, 2.0]))
    tensor([[ True,  True],
            [False, False],
            [ True,  True]])
    """
    check_tensor(t)
    _score_check(activity, (t.shape[0],), "activity", "activation")
    return _prune_slices(t, amount, 0, mask, key_source([activity.to(t.device)], magnitude=False))


def _activation(
    t: Tensor,
    amount: float | int,
    *,
    activity: Tensor,
    mask: Tensor | None = None,
    criterion: str = "apoz",
) -> Tensor:
    _check_criterion(criterion, "criterion")
    return activation_mask(t, amount, activity=activity, mask=mask)


_activation.__doc__ = activation_mask.__doc__


def _check_criterion(value: object, where: str) -> None:
    if value not in CRITERIA:
        raise ValueError(f"{where}={value!r} must be one of {CRITERIA}")


def _check_activation(t: Tensor, options: Mapping[str, Any], where: str) -> None:
    _check_criterion(options.get("criterion", "apoz"), f"criterion for {where}")
    if options.get("dim", 0) != 0:
        raise ValueError(f"method='activation' prunes output channels (dim=0) of {where}")


def _activation_score(weight: Tensor, stats: TargetStats, *, criterion: str = "apoz") -> Tensor:
    assert stats.out_abs is not None and stats.out_pos is not None
    total = stats.out_abs if criterion == "mean_abs" else stats.out_pos
    score = (total / max(stats.positions, 1)).to(torch.float32)
    # a NaN output is not > 0, so APoZ alone would count it as a zero: a channel whose
    # outputs were NaN or inf gets a non-finite score, which prune_to refuses (naming it)
    return torch.where(torch.isfinite(stats.out_abs), score, torch.nan)


def activity(y: Tensor, *, criterion: str = "apoz", channel_dim: int = 1) -> Tensor:
    """Per-channel activity of outputs ``y``: mean ``|y|`` or the fraction of ``y > 0``
    (``1 - APoZ``), over every dim but ``channel_dim``.

    >>> activity(torch.tensor([[1.0, -2.0], [-3.0, 0.0]]), channel_dim=1)
    tensor([0.5000, 0.0000])
    >>> activity(torch.tensor([[1.0, -2.0], [-3.0, 0.0]]), criterion="mean_abs", channel_dim=1)
    tensor([2., 1.])
    """
    check_tensor(y, "y")
    _check_criterion(criterion, "criterion")
    flat = y.detach().movedim(channel_dim, -1).reshape(-1, y.shape[channel_dim]).double()
    value = flat.abs() if criterion == "mean_abs" else (flat > 0).double()
    return value.mean(0).float()


def activation_based_mask(
    module: nn.Module,
    x: Tensor,
    amount: float | int,
    *,
    criterion: str = "apoz",
    mask: Tensor | None = None,
) -> Tensor:
    """The mask of ``module.weight`` pruning the output channels least active on ``x``
    (the original request's ``activation_based_pruning(module, name, X, amount)``; see
    :func:`activation_mask`). ``module`` is a Linear or Conv1d/2d/3d; nothing is changed.

    >>> layer = nn.Linear(2, 3, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.1, 0.0], [0.0, 2.0]]))
    >>> activation_based_mask(layer, torch.ones(4, 2), 1, criterion="mean_abs")[:, 0]
    tensor([ True, False,  True])
    """
    if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        raise TypeError(f"module must be a Linear or Conv1d/2d/3d, got {type(module).__name__}")
    check_tensor(x, "x")
    with torch.no_grad():
        y = module(x)
    channel = (
        y.ndim - 1 if isinstance(module, nn.Linear) else (1 if y.ndim == module.weight.ndim else 0)
    )
    return activation_mask(
        module.weight,
        amount,
        activity=activity(y, criterion=criterion, channel_dim=channel),
        mask=mask,
    )


# Options that change what a method's statistics mean (name -> default), saved with the
# statistics in ``Pruner.state_dict()`` and compared on loading: movement's ``reset``
# decides whether its sums cover the whole training or only the backward passes since the
# last update. (Other options, such as wanda's ``per_output`` or activation's
# ``criterion``, only change how the same sums are ranked.)
STATS_OPTIONS: dict[str, dict[str, Any]] = {"movement": {"reset": False}}


def stats_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``method`` that change what its statistics mean, with defaults.

    >>> stats_options("movement", {}), stats_options("taylor", {})
    ({'reset': False}, {})
    """
    return {k: options.get(k, d) for k, d in STATS_OPTIONS.get(method, {}).items()}


register_method("wanda")(
    Method(
        "wanda",
        wanda_mask,
        ranks="entries",
        needs=("inputs",),
        score=_wanda_score,
        fed=("input_norm",),
        check=_check_wanda,
        per_row=lambda options: bool(options.get("per_output", False)),
        memory="one float64 per input feature (input channel x kernel position for a Conv)",
    )
)
register_method("taylor")(
    Method(
        "taylor",
        taylor_mask,
        ranks="entries",
        needs=("grads",),
        score=_abs_grads,
        fed=("grad",),
        memory="one float32 per weight, reset at each update",
    )
)
register_method("snip")(
    Method(
        "snip",
        snip_mask,
        ranks="entries",
        needs=("grads",),
        score=_abs_grads,
        fed=("grad",),
        memory="one float32 per weight, reset at each update",
    )
)
register_method("movement")(
    Method(
        "movement",
        _movement,
        ranks="entries",
        needs=("grads",),
        score=_movement_score,
        fed=("weight_grad_sum",),
        check=_check_movement,
        keeps_stats=lambda options: not options.get("reset", False),
        memory="one float32 per weight, kept across updates (saved in state_dict)",
    )
)
register_method("activation")(
    Method(
        "activation",
        _activation,
        ranks="slices",
        needs=("outputs",),
        score=_activation_score,
        fed=("activity",),
        check=_check_activation,
        global_slices=lambda options: options.get("criterion", "apoz") == "apoz",
        memory="two float64 per output channel",
    )
)
