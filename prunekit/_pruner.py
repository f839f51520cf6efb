"""Model-level pruning: which parameters, how, and keeping them pruned while training."""

from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prunekit._masks import UNSTRUCTURED, get_method, zero_pruned_
from prunekit._report import SparsityReport, TargetSparsity
from prunekit._select import KeySource, MagnitudeKeys, RandomKeys, ScoreKeys, prune_lowest
from prunekit._state import pack_mask, unpack_mask
from prunekit._validate import amount_to_count, check_dim, check_finite, suggest

#: Module types whose weight matrices are pruned by default.
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.RNNBase,
    nn.MultiheadAttention,
)
SCOPES = ("global", "layer")
_STATE_FORMAT = 1
# Options a caller may pass for each method (the tensor inputs are supplied by the engine).
_ENGINE_ARGS = {"t", "amount", "mask", "scores", "generator"}

TargetSpec = str | Mapping[str, Any] | None
Targets = str | type | Sequence[str | type] | Mapping[str, TargetSpec] | None


@dataclass
class _Target:
    name: str
    param: nn.Parameter
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    sparsity: float | int | None = None  # a fixed amount of its own, from the targets mapping
    overridden: bool = False


@dataclass
class _Selection:
    """Prune the ``k`` lowest-keyed of the still kept entries (``kept`` per name) of ``names``."""

    names: list[str]
    k: int
    source: KeySource
    kept: list[int]


@dataclass
class _Plan:
    """What one prune_to call will do, fully validated before anything changes."""

    selections: list[_Selection] = field(default_factory=list)
    masks: dict[str, Tensor] = field(default_factory=dict)  # new masks of structured targets


def _is_weight(pname: str) -> bool:
    return "weight" in pname and "bias" not in pname


def _method_options(method: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    fn = get_method(method)
    allowed = set(inspect.signature(fn).parameters) - _ENGINE_ARGS
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"{where}: option(s) {sorted(unknown)} are not options of method={method!r}; "
            f"valid: {sorted(allowed)}"
        )
    return dict(options)


class Pruner:
    """Prunes chosen parameters of a model and keeps them pruned while it trains.

    Masks (``pruner.masks``) are ``torch.bool`` tensors (True = kept) keyed by parameter
    name; weights are zeroed where they are False, in place. Change masks only through
    :meth:`prune_to`, :meth:`set_masks` or :meth:`load_state_dict`. After :meth:`attach`,
    gradients of pruned entries are zeroed as they are accumulated and the weights are
    re-masked after every optimizer step, so a plain PyTorch loop keeps them at zero. The forward pass and the model's
    ``state_dict`` keys are untouched.

    Args:
        model: the module to prune.
        targets: ``None`` (weights of Linear / Conv / Embedding / RNN / attention
            layers), parameter names or globs, module types, or a mapping from a name
            or glob to that target's own settings: a method name or a dict with
            ``method``, an optional fixed ``sparsity`` and the method's options.
        method: the default method (``list_methods()``).
        scope: ``"global"`` ranks all default-method targets together (unstructured
            methods only); ``"layer"`` brings each target to the sparsity separately.
        exclude: names or globs removed from the targets.
        seed: seeds the random methods (identical on every rank under DDP).
        **options: options of the default method, e.g. ``n=1, dim=0``.

    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> pruner = Pruner(model)
    >>> pruner.prune_to(0.75)
    >>> pruner.sparsity().pruned, sum(int((p == 0).sum()) for p in (model[0].weight, model[2].weight))
    (60, 60)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        targets: Targets = None,
        method: str = "magnitude",
        scope: str = "global",
        exclude: str | Iterable[str] = (),
        seed: int = 0,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed={seed!r} must be an int")
        self.model = model
        self.method = method
        self.scope = scope
        self.seed = seed
        self.options = _method_options(method, options, "Pruner")
        if scope == "global" and method not in UNSTRUCTURED:
            raise ValueError(
                f"scope='global' ranks single weights across layers; method={method!r} does not, "
                f"use scope='layer' (global works with {sorted(UNSTRUCTURED)})"
            )
        self._targets = self._resolve(model, targets, exclude)
        for target in self._targets.values():
            self._check_options(target)
        self.masks: dict[str, Tensor] = {
            name: torch.ones_like(t.param, dtype=torch.bool) for name, t in self._targets.items()
        }
        self.updates = 0
        # While attached, what the per-step hooks apply to each target: None (nothing
        # pruned), its bool mask, or a copy of it in the weight's dtype (see attach).
        self._cache_masks: bool | None = None
        self._step_masks: dict[str, Tensor | None] = {}
        self._grad_hooks: list[RemovableHandle] = []
        self._optimizers: list[tuple[torch.optim.Optimizer, RemovableHandle, list[str]]] = []
        self._removed = False

    # ----------------------------------------------------------------- targets
    def _resolve(
        self, model: nn.Module, targets: Targets, exclude: str | Iterable[str]
    ) -> dict[str, _Target]:
        canonical = {}  # every name of a parameter (tied ones have several) -> its first name
        first_name: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            canonical[name] = first_name.setdefault(id(param), name)
        params = dict(model.named_parameters())

        def default(name: str) -> _Target:
            return _Target(name, params[name], self.method, dict(self.options))

        def match(pattern: str) -> list[str]:
            if not isinstance(pattern, str):
                raise TypeError(
                    f"targets entry {pattern!r} must be a name, a glob or a module type"
                )
            found = [canonical[n] for n in canonical if fnmatch.fnmatchcase(n, pattern)]
            if not found:
                raise ValueError(
                    f"targets entry {pattern!r} matches no parameter of "
                    f"{type(model).__name__}{suggest(pattern, canonical)}"
                )
            return list(dict.fromkeys(found))

        def by_type(types: tuple[type, ...]) -> list[str]:
            names = []
            for mname, module in model.named_modules():
                if isinstance(module, types):
                    for pname, _ in module.named_parameters(recurse=False):
                        if _is_weight(pname):
                            names.append(canonical[f"{mname}.{pname}" if mname else pname])
            return list(dict.fromkeys(names))

        resolved: dict[str, _Target] = {}
        if targets is None:
            resolved = {n: default(n) for n in by_type(DEFAULT_MODULE_TYPES)}
        elif isinstance(targets, Mapping):
            for pattern, spec in targets.items():
                for name in match(pattern):
                    resolved[name] = self._override(default(name), spec, pattern)
        else:
            entries = [targets] if isinstance(targets, str | type) else list(targets)
            for entry in entries:
                if isinstance(entry, type):
                    if not issubclass(entry, nn.Module):
                        raise TypeError(f"targets entry {entry!r} is a type but not an nn.Module")
                    names = by_type((entry,))
                    if not names:
                        raise ValueError(
                            f"targets entry {entry.__name__} matches no module of the model"
                        )
                else:
                    names = match(entry)
                resolved.update({n: default(n) for n in names})
        for pattern in [exclude] if isinstance(exclude, str) else list(exclude):
            for name in match(pattern):
                resolved.pop(name, None)
        if not resolved:
            raise ValueError(
                f"no parameter of {type(model).__name__} is left to prune "
                f"(targets={targets!r}, exclude={exclude!r})"
            )
        return resolved

    def _override(self, target: _Target, spec: TargetSpec, pattern: str) -> _Target:
        if spec is None:
            return target
        if isinstance(spec, str):
            spec = {"method": spec}
        if not isinstance(spec, Mapping):
            raise TypeError(f"targets[{pattern!r}]={spec!r} must be None, a method name or a dict")
        options = dict(spec)
        method = options.pop("method", self.method)
        sparsity = options.pop("sparsity", None)
        if sparsity is not None:
            amount_to_count(
                sparsity, target.param.numel(), name=f"targets[{pattern!r}]['sparsity']"
            )
        base = self.options if method == self.method else {}
        options = _method_options(method, {**base, **options}, f"targets[{pattern!r}]")
        return _Target(target.name, target.param, method, options, sparsity, overridden=True)

    @staticmethod
    def _check_options(target: _Target) -> None:
        shape, opts = target.param.shape, target.options
        where = f"{target.name} (shape {tuple(shape)})"
        if "dim" in opts:
            check_dim(opts["dim"], len(shape), where=f" for {where}")
        if target.method == "nm":
            n, m = opts.get("n", 2), opts.get("m", 4)
            dim = opts.get("dim", -1)
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
                raise ValueError(f"n={n!r}, m={m!r} for {where}: need ints with 0 < n <= m")
            if shape[dim] % m:
                raise ValueError(f"m={m} does not divide size {shape[dim]} of dim={dim} of {where}")
        if target.method == "ln_structured" and opts.get("n", 2) not in (0, 1, 2, math.inf):
            raise ValueError(f"n={opts['n']!r} for {where} must be one of 0, 1, 2, inf")

    @property
    def names(self) -> list[str]:
        """Names of the targeted parameters, in model order."""
        return list(self._targets)

    # ----------------------------------------------------------------- pruning
    def prune_to(
        self,
        sparsity: float | int | Mapping[str, float | int],
        *,
        scores: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Prune until ``sparsity`` of the targeted weights is zero; masks only shrink.

        ``sparsity`` is absolute: with ``scope="global"`` exactly ``round(s·N)`` of all
        ``N`` default-method target weights are pruned afterwards, with ``"layer"`` each
        target reaches it on its own. A mapping gives per-target sparsities (targets
        not named are left alone). Targets with a fixed ``sparsity`` of their own use
        it. ``scores`` (name -> importance, higher = kept) replace the magnitudes.
        Everything is validated before any mask or weight changes.
        """
        self._check_live()
        plan = self._plan(sparsity, dict(scores or {}))
        for sel in plan.selections:
            prune_lowest(sel.source, [self.masks[n] for n in sel.names], sel.k, sel.names, sel.kept)
        self.masks.update(plan.masks)
        self._masks_changed()
        self.updates += 1

    def _plan(self, sparsity: Any, scores: dict[str, Tensor]) -> _Plan:
        for name, score in scores.items():
            if name not in self._targets:
                raise ValueError(
                    f"scores names {name!r}, not a target{suggest(name, self._targets)}"
                )
            if not isinstance(score, Tensor) or not score.is_floating_point():
                raise TypeError(f"scores[{name!r}] must be a floating-point tensor")
            check_finite(score, f"scores[{name!r}]")
        if isinstance(sparsity, Mapping):
            for name in sparsity:
                if name not in self._targets:
                    raise ValueError(
                        f"sparsity names {name!r}, not a target{suggest(str(name), self._targets)}"
                    )
            amounts = dict(sparsity)
            group: list[str] = []
        else:
            amount_to_count(sparsity, 1, name="sparsity")  # type and range check
            amounts = {
                n: t.sparsity if t.sparsity is not None else sparsity
                for n, t in self._targets.items()
            }
            group = [
                n for n, t in self._targets.items() if self.scope == "global" and not t.overridden
            ]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.updates)
        plan = _Plan()
        if group:
            plan.selections.append(self._selection(group, sparsity, scores, generator))
        for name, amount in amounts.items():
            if name in group:
                continue
            target = self._targets[name]
            if target.method in UNSTRUCTURED:
                plan.selections.append(self._selection([name], amount, scores, generator))
            else:
                plan.masks[name] = self._structured(target, amount, scores.get(name), generator)
        return plan

    def _selection(
        self,
        names: list[str],
        amount: float | int,
        scores: dict[str, Tensor],
        generator: torch.Generator,
    ) -> _Selection:
        total = sum(self.masks[n].numel() for n in names)
        target_count = amount_to_count(amount, total, name="sparsity")
        kept = [int(self.masks[n].count_nonzero()) for n in names]
        already = total - sum(kept)
        what = names[0] if len(names) == 1 else f"the {len(names)} globally ranked targets"
        if target_count < already:
            raise ValueError(
                f"sparsity={amount} asks for {target_count} pruned weights in {what}, but "
                f"{already} already are; masks only shrink"
            )
        method = self._targets[names[0]].method
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        given = [n for n in names if n in scores]
        if given and len(given) != len(names):
            raise ValueError(
                f"scores must cover all of {what} or none; missing {sorted(set(names) - set(given))}"
            )
        if given:
            for n in names:
                if scores[n].shape != self.masks[n].shape:
                    raise ValueError(
                        f"scores[{n!r}] has shape {tuple(scores[n].shape)}, expected {tuple(self.masks[n].shape)}"
                    )
            source: KeySource = ScoreKeys([scores[n] for n in names])
        elif method == "random":
            source = RandomKeys(seed)
        else:
            for n in names if len(names) == 1 else ():
                check_finite(self._targets[n].param, n)
            source = MagnitudeKeys([self._targets[n].param for n in names])
        return _Selection(names, target_count - already, source, kept)

    def _structured(
        self, target: _Target, amount: float | int, score: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        fn = get_method(target.method)
        kwargs = dict(target.options)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        accepts = inspect.signature(fn).parameters
        if score is not None:
            kwargs["scores"] = score
        if "generator" in accepts:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        param, mask = target.param.detach(), self.masks[target.name]
        check_finite(param, target.name)
        if target.method == "nm":  # the pattern fixes the sparsity; any amount > 0 applies it
            return fn(param, **kwargs) & mask if amount else mask
        return fn(param, amount, mask=mask, **kwargs)

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Intersect the current masks with given ones (custom masks); weights follow.

        >>> model = nn.Linear(2, 2)
        >>> pruner = Pruner(model)
        >>> pruner.set_masks({"weight": torch.tensor([[True, False], [True, True]])})
        >>> model.weight[0, 1].item() == 0
        True
        """
        self._check_live()
        for name, mask in masks.items():
            if name not in self.masks:
                raise ValueError(f"masks names {name!r}, not a target{suggest(name, self.masks)}")
            if (
                not isinstance(mask, Tensor)
                or mask.dtype != torch.bool
                or mask.shape != self.masks[name].shape
            ):
                raise ValueError(
                    f"masks[{name!r}] must be a bool tensor of shape {tuple(self.masks[name].shape)}"
                )
        for name, mask in masks.items():
            self.masks[name] &= mask.to(self.masks[name].device)
        self._masks_changed()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every target weight where its mask is False, in place (e.g. after rewinding)."""
        for name, target in self._targets.items():
            zero_pruned_(target.param, self.masks[name])

    def _masks_changed(self) -> None:
        self.apply_masks()
        self._clear_optimizer_state()
        if self._optimizers:
            self._step_masks = self._make_step_masks()

    def _make_step_masks(self) -> dict[str, Tensor | None]:
        step_masks: dict[str, Tensor | None] = {}
        for name, mask in self.masks.items():
            param = self._targets[name].param
            cache = self._cache_masks
            if cache is None:
                cache = param.device.type == "cpu"
            if bool(mask.all()):
                step_masks[name] = None  # nothing pruned: no work per step
            else:
                step_masks[name] = mask.to(param.dtype) if cache else mask
        return step_masks

    def sparsity(self) -> SparsityReport:
        """Pruned counts per target and overall (prints as a table)."""
        return SparsityReport(
            tuple(
                TargetSparsity(name, mask.numel(), mask.numel() - int(mask.count_nonzero()))
                for name, mask in self.masks.items()
            )
        )

    # ------------------------------------------------------------- training
    def attach(
        self, optimizer: torch.optim.Optimizer, *, cache_masks: bool | None = None
    ) -> Pruner:
        """Keep pruned weights at zero through ``optimizer``'s steps.

        Gradients of pruned entries are zeroed when accumulated (before clipping and the
        step), weights are re-masked after each step, and optimizer state (momentum, Adam
        moments) of pruned entries is cleared whenever masks change. Targets with nothing
        pruned cost nothing per step.

        ``cache_masks=True`` keeps, while attached, a copy of each pruned target's mask
        in the weight's dtype (4 bytes per weight for float32, refreshed only when masks
        change): on CPU, multiplying by it is about 20x faster than zeroing through the
        bool mask. The default (``None``) does so for CPU parameters only; on GPUs the
        bool mask is as fast and no copy is kept.

        >>> model = nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = Pruner(model).attach(optimizer)
        >>> pruner.prune_to(0.5)
        >>> model(torch.randn(3, 4)).sum().backward(); optimizer.step()
        >>> int((model.weight == 0).sum())
        4
        """
        self._check_live()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if cache_masks not in (None, True, False):
            raise TypeError(f"cache_masks={cache_masks!r} must be None, True or False")
        if any(opt is optimizer for opt, _, _ in self._optimizers):
            return self
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [n for n, t in self._targets.items() if id(t.param) in held]
        if not names:
            raise ValueError("optimizer holds none of the pruned parameters")
        self._cache_masks = cache_masks
        if not self._grad_hooks:
            self._grad_hooks = [
                t.param.register_post_accumulate_grad_hook(self._grad_hook(n))
                for n, t in self._targets.items()
            ]
        handle = optimizer.register_step_post_hook(self._step_hook(names))
        self._optimizers.append((optimizer, handle, names))
        self._step_masks = self._make_step_masks()
        self._clear_optimizer_state()
        return self

    def _grad_hook(self, name: str) -> Any:
        def mask_grad(param: Tensor) -> None:
            if param.grad is not None:
                self._zero_pruned(name, param.grad)

        return mask_grad

    def _step_hook(self, names: list[str]) -> Any:
        params = [(self._targets[n].param, n) for n in names]

        @torch.no_grad()
        def remask(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for param, name in params:
                self._zero_pruned(name, param)

        return remask

    def _zero_pruned(self, name: str, t: Tensor) -> None:
        step_mask = self._step_masks[name]
        if step_mask is None:
            return
        if step_mask.dtype == torch.bool:
            zero_pruned_(t, step_mask)
        else:
            t.mul_(step_mask)

    @torch.no_grad()
    def _clear_optimizer_state(self) -> None:
        for optimizer, _, names in self._optimizers:
            for name in names:
                param, mask = self._targets[name].param, self.masks[name]
                for value in optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == mask.shape:
                        zero_pruned_(value, mask)

    def remove(self) -> None:
        """Detach every hook; the model keeps its zeros as plain weights (pruning made permanent)."""
        self.apply_masks()
        for handle in self._grad_hooks + [h for _, h, _ in self._optimizers]:
            handle.remove()
        self._grad_hooks, self._optimizers = [], []
        self._step_masks = {}
        self._removed = True

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this Pruner was removed; create a new one to prune again")

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed) and what is needed to continue pruning."""
        return {
            "format": _STATE_FORMAT,
            "method": self.method,
            "scope": self.scope,
            "seed": self.seed,
            "updates": self.updates,
            "masks": {
                n: {"shape": list(m.shape), "packed": pack_mask(m)} for n, m in self.masks.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict`; the weights are re-masked.

        Fails, changing nothing, if the state belongs to other parameters or shapes.
        """
        self._check_live()
        if not isinstance(state, Mapping) or "masks" not in state:
            raise ValueError("state is not a Pruner state_dict (no 'masks' entry)")
        saved = state["masks"]
        missing, unexpected = set(self.masks) - set(saved), set(saved) - set(self.masks)
        if missing or unexpected:
            raise ValueError(
                f"state_dict belongs to another model or target set: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        restored = {}
        for name, entry in saved.items():
            if tuple(entry["shape"]) != tuple(self.masks[name].shape):
                raise ValueError(
                    f"state_dict mask {name!r} has shape {tuple(entry['shape'])}, the parameter "
                    f"has {tuple(self.masks[name].shape)}"
                )
            restored[name] = unpack_mask(entry["packed"], tuple(entry["shape"])).to(
                self.masks[name].device
            )
        self.masks.update(restored)
        self.updates = int(state.get("updates", 0))
        self._masks_changed()

    def __repr__(self) -> str:
        return (
            f"Pruner({type(self.model).__name__}, targets={len(self._targets)}, "
            f"method={self.method!r}, scope={self.scope!r}, updates={self.updates})"
        )
