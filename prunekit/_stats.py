"""Statistics for data-aware pruning methods, collected where they arise.

Three statistics exist (``prunekit._masks.STATISTICS``); a Pruner collects only those its
targets' methods need, and only while hooked (attached to an optimizer, or inside
:meth:`Pruner.calibrate`): a Pruner whose methods need none installs nothing.

``inputs``
    Per input feature ``j`` of a Linear, the sum of squares ``sum x_j**2`` over every row
    (token, sample) of the module's input, so ``||X_j||_2 = sqrt(sum)``; a forward
    pre-hook on the module. One float64 per input feature. For a Conv, ``j`` is an
    (input channel, kernel position) pair, a column of the unfolded (im2col) input that the
    weight entry multiplies: the sum runs over every sample and output position, with the
    conv's padding (zero or its ``padding_mode``), stride and dilation, so border and
    strided positions count as often as the weight sees them. One float64 per input
    channel and kernel position (the weight's size divided by ``out_channels / groups``).
``grads``
    ``G = sum_b W_b * g_b`` per weight: the sum over every backward pass ``b`` that
    reaches the weight of the weight's value at that backward times the gradient that
    backward contributes (a tensor hook: before it is added to ``.grad``, before DDP
    averages it, before clipping). Linear in the gradients, so k micro-batches of
    gradient accumulation give exactly what one backward of their summed loss gives, and
    ranks' sums add up to one process's on the concatenated batch. One float32 per
    weight (float64 for float64 weights).
``outputs``
    Per output channel ``c`` (last dim of a Linear's output, dim 1 of a batched Conv's):
    ``sum |y_c|`` and the count of ``y_c > 0`` over every output position, and the number
    of positions; a forward hook. Two float64 per output channel.

With AMP loss scaling (``GradScaler``) the gradients a hook sees are scaled: ``grads``
then holds scaled values (an overflowing step makes it non-finite, and ``prune_to``
refuses it, naming the method); unscaled losses are exact.

Forward statistics count forwards of modules in training mode (``module.training``), and
every forward inside ``calibrate``; evaluation passes of a training loop are not
counted (a module recomputed by activation checkpointing is counted at each forward).
Activation statistics are the one case where the engine touches the forward pass: hooks
on the targets' modules, present only while the Pruner is attached or calibrating, and
only for methods that need them (wanda, activation); gradient statistics add one
multiply-add per weight to each backward. Under ``torch.distributed`` (DDP) every rank collects its own; they are summed
across ranks (all-reduce) before ranking, so masks are identical on every rank.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit._targets import output_dim

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED = (nn.Linear, *_CONVS)
_STATE_FORMAT = 1


@dataclass
class TargetStats:
    """One target's statistics, summed across ranks: what a method's ``score`` reads.

    ``input_norm`` is ``||X_j||_2`` shaped to broadcast against the weight (for a Conv one
    per input channel and kernel position, the im2col column norms); ``grads`` is ``sum W * g`` (weight shape);
    ``out_abs`` / ``out_pos`` are per output channel sums of ``|y|`` / counts of ``y > 0``
    over ``positions`` output positions. ``rows`` input rows and ``backwards`` backward
    passes were seen; ``missed`` counts gradients of other targets that arrived while
    this one could not be observed (frozen, or unfrozen and not yet hooked): when not 0,
    ``grads`` lacks some backward passes (a count of hook calls, not of passes).
    """

    input_norm: Tensor | None = None
    rows: int = 0
    grads: Tensor | None = None
    backwards: int = 0
    out_abs: Tensor | None = None
    out_pos: Tensor | None = None
    positions: int = 0
    missed: int = 0


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


class _Site:
    """Where one target's statistics come from: its parameter and (for activation
    statistics) the one module that uses it as its ``weight``."""

    def __init__(self, name: str, param: Tensor, module: nn.Module | None, needs: set[str]) -> None:
        self.name, self.param, self.module, self.needs = name, param, module, needs
        self.values: dict[str, Tensor] = {}  # buffers, made when hooked
        # (``missed``: backward passes of other targets while this one was unobserved;
        # saved in state_dict only when not 0)
        self.counts: dict[str, int] = {"rows": 0, "backwards": 0, "positions": 0, "missed": 0}

    def buffers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The buffers this site needs: name -> (shape, dtype)."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        p = self.param
        if "inputs" in self.needs:
            assert self.module is not None
            width = (
                (self.module.in_channels, *self.module.kernel_size)
                if isinstance(self.module, _CONVS)
                else (self.param.shape[_in_dim(self.module)],)
            )
            out["inputs_sq"] = (tuple(width), torch.float64)
        if "grads" in self.needs:
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            out["grads"] = (tuple(p.shape), dtype)
        if "outputs" in self.needs:
            out["out_abs"] = ((p.shape[0],), torch.float64)
            out["out_pos"] = ((p.shape[0],), torch.float64)
        return out

    def ensure(self) -> None:
        device = self.param.device
        for key, (shape, dtype) in self.buffers().items():
            if key not in self.values or self.values[key].device != device:
                old = self.values.get(key)
                self.values[key] = (
                    torch.zeros(shape, dtype=dtype, device=device)
                    if old is None
                    else old.to(device)
                )


def _in_dim(module: nn.Module) -> int:
    """The dim of a matrix weight holding input features: 1 for Linear's (out, in), 0 for
    an (in, out) layout such as Hugging Face's ``Conv1D``."""
    return 0 if output_dim(module) == 1 else 1


def _is_matrix(module: nn.Module) -> bool:
    """A module computing ``x @ W.T`` (Linear) or ``x @ W`` (HF ``Conv1D``) on the last dim."""
    return isinstance(module, nn.Linear) or output_dim(module) == 1


def owner(model: nn.Module, name: str, param: Tensor, needs: set[str] | None = None) -> nn.Module:
    """The module whose ``weight`` is ``param`` (the module activation statistics hook)."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    if attr != "weight" or getattr(module, "weight", None) is not param:
        raise NotImplementedError(
            f"{name} is not the weight of a module, so its inputs/outputs cannot be "
            "observed; activation statistics need a Linear or Conv1d/2d/3d weight"
        )
    if not isinstance(module, _SUPPORTED) and not (
        _is_matrix(module) and "outputs" not in (needs or set())
    ):
        raise NotImplementedError(
            f"{name} belongs to a {type(module).__name__}; activation statistics are "
            "collected for Linear and Conv1d/2d/3d weights (input statistics also for "
            "Hugging Face Conv1D) only"
        )
    for parent in model.modules():  # its forward is never called: no hook would fire
        if isinstance(parent, nn.MultiheadAttention) and parent.out_proj is module:
            raise NotImplementedError(
                f"{name} is the out_proj of a MultiheadAttention, which uses the weight "
                "without calling out_proj's forward, so its inputs/outputs cannot be observed"
            )
    users = [m for m in model.modules() if getattr(m, "weight", None) is param]
    if len(users) != 1:
        raise NotImplementedError(
            f"{name} is the weight of {len(users)} modules (tied); activation statistics "
            "need one module per weight"
        )
    return module


class Statistics:
    """The statistics of a Pruner's targets: buffers, hooks, reduction and state."""

    def __init__(
        self,
        model: nn.Module,
        needs: Mapping[str, tuple[str, Tensor, Iterable[str]]],
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``needs``: target name -> (method name, parameter, statistics it needs);
        ``options``: target name -> the method options that change what its statistics
        mean (saved with them and compared on loading)."""
        self.model = model
        self.sites: dict[str, _Site] = {}
        self.methods: dict[str, str] = {}
        self.options: dict[str, dict[str, Any]] = {}
        for name, (method, param, stats) in needs.items():
            wanted = set(stats)
            if not wanted:
                continue
            module = None
            if wanted & {"inputs", "outputs"}:
                try:
                    module = owner(model, name, param, wanted)
                except NotImplementedError as e:
                    raise NotImplementedError(
                        f"method={method!r}: {e}; exclude it (exclude=[{name!r}]) or give it "
                        f"another method (targets={{{name!r}: 'magnitude', ...}})"
                    ) from None
            if hasattr(param, "device_mesh"):
                raise NotImplementedError(
                    f"method={method!r} on the sharded (DTensor) parameter {name}: data-aware "
                    "statistics are collected for unsharded parameters only"
                )
            self.sites[name] = _Site(name, param, module, wanted)
            self.methods[name] = method
            self.options[name] = dict((options or {}).get(name, {}))
        self.handles: dict[str, list[RemovableHandle]] = {}  # forward hooks per target
        self.grad_handles: dict[str, tuple[Tensor, RemovableHandle]] = {}
        self.unobserved: list[_Site] = []  # sites needing gradients with no gradient hook (frozen)
        self.calibrating = False

    def __bool__(self) -> bool:
        return bool(self.sites)

    @property
    def hooked(self) -> bool:
        return bool(self.handles or self.grad_handles)

    # ------------------------------------------------------------ hooks
    def hook(self, params: Mapping[str, Tensor]) -> None:
        """Install (or follow replaced parameters with) the hooks; idempotent."""
        for name, site in self.sites.items():
            site.param = params[name]
            site.ensure()
            if site.module is not None and getattr(site.module, "weight", None) is not site.param:
                # the module itself was replaced (``model.fc = nn.Linear(...)``): observe the
                # new one (its old one's hooks would never see the new module's forwards)
                try:
                    module = owner(self.model, name, site.param, site.needs)
                except NotImplementedError as e:
                    raise NotImplementedError(f"method={self.methods[name]!r}: {e}") from None
                for handle in self.handles.pop(name, []):
                    handle.remove()
                site.module = module
        for name, site in self.sites.items():
            if site.module is None or name in self.handles:
                continue
            handles = []
            if "inputs" in site.needs:
                handles.append(
                    site.module.register_forward_pre_hook(self._input_hook(site), with_kwargs=True)
                )
            if "outputs" in site.needs:
                handles.append(site.module.register_forward_hook(self._output_hook(site)))
            self.handles[name] = handles
        for name, site in self.sites.items():
            if "grads" not in site.needs:
                continue
            held = self.grad_handles.get(name)
            if held is not None and held[0] is site.param:
                continue
            if held is not None:
                held[1].remove()
                del self.grad_handles[name]
            if site.param.requires_grad:  # a frozen one is hooked when hook() is called again
                self.grad_handles[name] = (
                    site.param,
                    site.param.register_hook(self._grad_hook(site, site.param)),
                )
        self.unobserved = [
            s for n, s in self.sites.items() if "grads" in s.needs and n not in self.grad_handles
        ]

    def unhook(self) -> None:
        for handles in self.handles.values():
            for handle in handles:
                handle.remove()
        for _, handle in self.grad_handles.values():
            handle.remove()
        self.handles, self.grad_handles, self.unobserved = {}, {}, []

    def strip_copies(self, memo: Mapping[int, Any]) -> None:
        """Remove this collector's forward hooks from deep copies of the hooked modules
        (``copy.deepcopy`` copies a module's hook dicts; those entries would call back
        here, where the module check ignores them)."""
        for site in self.sites.values():
            copied = memo.get(id(site.module))
            if copied is None or copied is site.module:
                continue
            for hooks in (copied._forward_pre_hooks, copied._forward_hooks):
                for handles in self.handles.values():
                    for handle in handles:
                        hooks.pop(handle.id, None)

    def _counts(self, module: nn.Module) -> bool:
        return self.calibrating or module.training

    def _input_hook(self, site: _Site) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if module is not site.module or not self._counts(module):
                return
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if not isinstance(x, Tensor):
                return
            with torch.no_grad():
                x = x.detach()
                if _is_matrix(module):
                    flat = x.reshape(-1, x.shape[-1]).float()
                    sq, rows = flat.square().sum(0), flat.shape[0]
                else:
                    sq, rows = _conv_column_squares(module, x)
                site.values["inputs_sq"] += sq.to(torch.float64)
                site.counts["rows"] += rows

        return record

    def _output_hook(self, site: _Site) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], y: Any) -> None:
            if module is not site.module or not self._counts(module) or not isinstance(y, Tensor):
                return
            with torch.no_grad():
                y = y.detach()
                if isinstance(module, nn.Linear):
                    flat = y.reshape(-1, y.shape[-1]).float()
                else:
                    channel = 1 if y.ndim == module.weight.ndim else 0
                    flat = y.movedim(channel, -1).reshape(-1, y.shape[channel]).float()
                site.values["out_abs"] += flat.abs().sum(0).to(torch.float64)
                site.values["out_pos"] += (flat > 0).sum(0).to(torch.float64)
                site.counts["positions"] += flat.shape[0]

        return record

    def _grad_hook(self, site: _Site, param: Tensor) -> Any:
        def record(grad: Tensor) -> None:
            if site.param is not param:  # a replaced (or deep-copied) parameter's hook
                return
            with torch.no_grad():
                buf = site.values["grads"]
                w = param.detach()
                if w.dtype == buf.dtype and grad.dtype == buf.dtype:
                    buf.addcmul_(w, grad)
                else:
                    buf.add_(w.to(buf.dtype) * grad.to(buf.dtype))
                site.counts["backwards"] += 1
            for other in self.unobserved:  # a pass (or part of one) it cannot see
                other.counts["missed"] += 1

        return record

    # ------------------------------------------------------- reading them
    def needs_grads(self) -> list[str]:
        return [n for n, s in self.sites.items() if "grads" in s.needs]

    def reduced(self, names: Iterable[str]) -> dict[str, TargetStats]:
        """The statistics of ``names``, summed across ranks (into copies: the buffers keep
        this rank's own sums; read-only views of them in one process). Every rank must call
        this for the same names in the same order."""
        out = {}
        for name in names:
            site = self.sites.get(name)
            if site is None:
                continue
            site.ensure()
            shared = _dist()  # (a copy to sum into; one process reads its buffers as they are)
            values = {k: v.clone() if shared else v for k, v in sorted(site.values.items())}
            counts = torch.tensor(
                [site.counts[k] for k in ("rows", "backwards", "positions", "missed")],
                dtype=torch.float64,
                device=site.param.device,
            )
            if shared:
                for v in values.values():
                    dist.all_reduce(v)
                dist.all_reduce(counts)
            rows, backwards, positions, missed = (int(c) for c in counts.tolist())
            stats = TargetStats(rows=rows, backwards=backwards, positions=positions, missed=missed)
            if "inputs_sq" in values:
                stats.input_norm = _broadcast_norm(site, values["inputs_sq"].sqrt())
            stats.grads = values.get("grads")
            stats.out_abs = values.get("out_abs")
            stats.out_pos = values.get("out_pos")
            out[name] = stats
        return out

    def missing(self, name: str, stats: TargetStats) -> str | None:
        """What ``name`` still lacks: a statistic that saw no data, or None."""
        needs = self.sites[name].needs
        if "inputs" in needs and stats.rows == 0:
            return "input activations (no forward pass of its module was seen)"
        if "outputs" in needs and stats.positions == 0:
            return "output activations (no forward pass of its module was seen)"
        if "grads" in needs and stats.backwards == 0:
            if not self.sites[name].param.requires_grad:
                return "gradients (none: it has requires_grad=False; exclude it or unfreeze it)"
            return "gradients (no backward pass reached it)"
        return None

    def snapshot(self) -> dict[str, tuple[dict[str, Tensor], dict[str, int]]]:
        """A copy of every target's buffers and counts, for :meth:`restore`."""
        return {
            name: ({k: v.clone() for k, v in site.values.items()}, dict(site.counts))
            for name, site in self.sites.items()
        }

    def restore(self, saved: Mapping[str, tuple[dict[str, Tensor], dict[str, int]]]) -> None:
        """Put back what :meth:`snapshot` copied (a failed calibration adds nothing)."""
        for name, (values, counts) in saved.items():
            site = self.sites[name]
            site.values = {k: v.to(site.param.device) for k, v in values.items()}
            site.counts = dict(counts)

    def reset(self, names: Iterable[str]) -> None:
        for name in names:
            site = self.sites.get(name)
            if site is None:
                continue
            for v in site.values.values():
                v.zero_()
            site.counts = dict.fromkeys(site.counts, 0)

    # ------------------------------------------------------------- state
    def local_state(self) -> dict[str, Any]:
        """This rank's own statistics, as :meth:`state_dict` lays them out."""
        return self.state_dict(reduce=False)

    def state_dict(self, reduce: bool = True) -> dict[str, Any]:
        """Every target's statistics summed across ranks (all ranks must call it)."""
        reduced: dict[str, Any] = {}
        for name, site in self.sites.items():
            site.ensure()
            values = {k: v.detach().clone() for k, v in sorted(site.values.items())}
            counts = torch.tensor(
                [site.counts[k] for k in ("rows", "backwards", "positions", "missed")],
                dtype=torch.float64,
                device=site.param.device,
            )
            if reduce and _dist():
                for v in values.values():
                    dist.all_reduce(v)
                dist.all_reduce(counts)
            rows, backwards, positions, missed = (int(c) for c in counts.tolist())
            saved = {"rows": rows, "backwards": backwards, "positions": positions}
            if missed:  # (only then: a prunekit that cannot honour it refuses the state)
                saved["missed"] = missed
            reduced[name] = {
                "method": self.methods[name],
                "options": dict(self.options[name]),
                "values": {k: v.cpu() for k, v in values.items()},
                "counts": saved,
            }
        return {"format": _STATE_FORMAT, "targets": reduced}

    def check_state(self, state: Any) -> dict[str, dict[str, Any]]:
        """Validate saved statistics (nothing changes); the entries to load."""
        if not isinstance(state, Mapping) or not isinstance(state.get("targets"), Mapping):
            raise ValueError("state_dict stats must be a dict with a 'targets' mapping")
        if state.get("format", _STATE_FORMAT) != _STATE_FORMAT:
            raise ValueError(
                f"state_dict stats format={state.get('format')!r} is not {_STATE_FORMAT}"
            )
        saved = state["targets"]
        if set(saved) != set(self.sites):
            raise ValueError(
                f"state_dict stats are for targets {sorted(saved)}, this Pruner collects "
                f"statistics for {sorted(self.sites)}"
            )
        out = {}
        for name, entry in saved.items():
            site = self.sites[name]
            where = f"state_dict stats[{name!r}]"
            if not isinstance(entry, Mapping) or not {"values", "counts"} <= set(entry):
                raise ValueError(f"{where} must be a dict with 'values' and 'counts'")
            if entry.get("method", self.methods[name]) != self.methods[name]:
                raise ValueError(
                    f"{where} was collected for method={entry['method']!r}, this target "
                    f"uses method={self.methods[name]!r}"
                )
            saved_options = entry.get("options", {})  # absent: saved before the record
            if not isinstance(saved_options, Mapping):
                raise ValueError(f"{where} options must be a dict, got {saved_options!r}")
            for key, now in self.options[name].items():
                if key in saved_options and saved_options[key] != now:
                    raise ValueError(
                        f"{where} was collected with {key}={saved_options[key]!r}, this "
                        f"Pruner uses {key}={now!r} for {name} (method="
                        f"{self.methods[name]!r}): the statistics would mean something else; "
                        f"load them into a Pruner with {key}={saved_options[key]!r}"
                    )
            expected = site.buffers()
            values = entry["values"]
            if not isinstance(values, Mapping) or set(values) != set(expected):
                raise ValueError(
                    f"{where} values {sorted(values) if isinstance(values, Mapping) else values!r} must be {sorted(expected)}"
                )
            for key, (shape, _) in expected.items():
                v = values[key]
                if (
                    not isinstance(v, Tensor)
                    or not v.is_floating_point()
                    or tuple(v.shape) != shape
                ):
                    older = (
                        " (saved by a prunekit that kept one norm per input channel of a Conv; "
                        "Wanda now uses one per input channel and kernel position: calibrate "
                        "again)"
                        if key == "inputs_sq"
                        and isinstance(v, Tensor)
                        and len(shape) > 1
                        and tuple(v.shape) == shape[:1]
                        else ""
                    )
                    raise ValueError(
                        f"{where}[{key!r}] must be a float tensor of shape {shape}{older}"
                    )
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"{where}[{key!r}] holds NaN or inf values")
            counts = entry["counts"]
            if (
                not isinstance(counts, Mapping)
                or not {"rows", "backwards", "positions"}
                <= set(counts)
                <= {"rows", "backwards", "positions", "missed"}
                or not all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0
                    for c in counts.values()
                )
            ):
                raise ValueError(
                    f"{where} counts must be non-negative ints for rows, backwards, positions "
                    "(and optionally missed)"
                )
            out[name] = {"values": values, "counts": dict(counts)}
        return out

    def load(self, checked: Mapping[str, Mapping[str, Any]], *, summed: bool = False) -> None:
        """Load what :meth:`check_state` accepted. ``summed`` (a saved state, summed across
        ranks): under DDP rank 0 holds the sums and the other ranks start from zero, so the
        next all-reduce gives the saved totals."""
        keep = not summed or _rank() == 0
        for name, entry in checked.items():
            site = self.sites[name]
            site.ensure()
            for key, v in entry["values"].items():
                site.values[key].copy_(v if keep else torch.zeros_like(v))
            site.counts = dict.fromkeys(site.counts, 0)
            if keep:
                site.counts.update(entry["counts"])


def _conv_column_squares(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``sum x_col**2`` per (input channel, kernel position) of a Conv's input ``x``: the
    columns of the unfolded (im2col) input that the weight multiplies, over every sample
    and output position, with the conv's padding (zeros or its ``padding_mode``), stride
    and dilation; and the number of rows (samples x output positions)."""
    spatial = module.weight.ndim - 2
    sq = x.float().square()
    if x.ndim == spatial + 2:  # batched: sum the samples first (the sums are linear)
        samples, sq = x.shape[0], sq.sum(0)
    else:
        samples = 1
    # reflect / replicate / circular padding copy values, so padding x**2 = (padded x)**2
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    sq = nn.functional.pad(sq, module._reversed_padding_repeated_twice, mode=mode)
    sizes = [
        (n - d * (k - 1) - 1) // s + 1
        for n, k, s, d in zip(
            sq.shape[1:], module.kernel_size, module.stride, module.dilation, strict=True
        )
    ]
    out = sq.new_zeros((sq.shape[0], *module.kernel_size))
    if min(sizes) <= 0:
        return out, 0
    for position in itertools.product(*(range(k) for k in module.kernel_size)):
        steps = zip(position, module.dilation, module.stride, sizes, strict=True)
        window = (slice(None), *(slice(i * d, i * d + s * (n - 1) + 1, s) for i, d, s, n in steps))
        out[(slice(None), *position)] = sq[window].reshape(sq.shape[0], -1).sum(1)
    return out, samples * math.prod(sizes)


def _broadcast_norm(site: _Site, norm: Tensor) -> Tensor:
    """Per-input-feature norms shaped to broadcast against the weight."""
    module, weight = site.module, site.param
    norm = norm.to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if _is_matrix(module):
        return norm.view(-1, 1) if _in_dim(module) == 0 else norm.view(1, -1)
    groups = module.groups
    kernel = tuple(weight.shape[2:])
    if groups == 1:
        return norm.view(1, -1, *kernel)
    per_group = norm.view(groups, -1, *kernel)  # input channels of each group
    rows = per_group.repeat_interleave(weight.shape[0] // groups, dim=0)  # per output row
    return rows.view(weight.shape[0], -1, *kernel)


def nonfinite(t: Tensor | None) -> bool:
    return t is not None and not bool(torch.isfinite(t).all())
