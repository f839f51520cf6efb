"""Model-level pruning: which parameters, how, and keeping them pruned while training."""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import numbers
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from prunekit import _methods  # noqa: F401  (registers the data-aware methods)
from prunekit._distributed import (
    full_mask,
    like,
    local,
    new_mask,
    place_mask,
    structured_mask,
)
from prunekit._masks import Method, _prune_slices, get_method, list_methods, zero_pruned_
from prunekit._methods import rank_rows, stats_options
from prunekit._report import SparsityReport, TargetSparsity
from prunekit._select import KeySource, RandomKeys, count_true
from prunekit._select_wide import WideKeys, key_source, select_lowest
from prunekit._state import pack_mask, unpack_mask
from prunekit._stats import Statistics, TargetStats
from prunekit._targets import (
    dense_by_default,
    layout_types,
    matching_aliases,
    parameter_aliases,
    storage_options,
    summary,
    transposed_weights,
)
from prunekit._validate import amount_to_count, as_amount, check_dim, check_finite, suggest

#: Module types whose weights are pruned by default, with HF Conv1D (see _targets.py for
#: the rule: embeddings and Hugging Face models' heads stay dense).
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
    nn.MultiheadAttention,
)
SCOPES = ("global", "layer")
_STATE_FORMAT = 1

TargetSpec = str | Mapping[str, Any] | None
Targets = str | type | Sequence[str | type] | Mapping[str, TargetSpec] | None


@dataclass
class _Target:
    name: str
    param: nn.Parameter
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    sparsity: float | int | None = None  # a fixed amount of its own, from the targets mapping
    #: for the direction ``v`` of a weight_norm: the dim its norm keeps (None: whole tensor)
    norm_dim: int | None = None
    norm_of: str | None = None  # the weight_norm's weight, e.g. "0.weight"
    seen: tuple[Any, ...] = ()  # where the parameter's data was when last masked
    transposed: bool = False  # stored (in, out) (HF Conv1D): output rows are its columns


class _Attached(NamedTuple):
    """One optimizer the Pruner keeps masked, and what it held when last looked at."""

    optimizer: torch.optim.Optimizer
    handles: list[RemovableHandle]
    live: _Held


@dataclass
class _Held:
    names: list[str]
    params: list[tuple[Tensor, str]]
    groups: tuple[tuple[int, int], ...]  # (id, length) of each group's params list


def _groups(optimizer: torch.optim.Optimizer) -> tuple[tuple[int, int], ...]:
    """A cheap fingerprint of the optimizer's parameter groups (checked every step)."""
    return tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def _where(param: Tensor) -> tuple[Any, ...]:
    """Where a parameter's values live; ``.to()``, ``to_empty`` or ``.data = ...`` change it."""
    data = getattr(param, "_local_tensor", param)  # a DTensor's shard
    return (data.data_ptr(), param.dtype, param.device)


def _is_meta(t: Tensor) -> bool:
    return local(t).device.type == "meta"


def _whole(mask: Tensor) -> Tensor:
    """The whole mask on the CPU (all True for a meta-device one: it was never pruned)."""
    return torch.ones(mask.shape, dtype=torch.bool) if _is_meta(mask) else full_mask(mask)


def _cacheable(param: Tensor) -> bool:
    return param.device.type == "cpu" and not hasattr(param, "device_mesh")


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    updated: list[str] = field(default_factory=list)  # targets this update brings to an amount


def _settings(target: _Target) -> tuple[Any, ...]:
    return target.method, target.options, target.sparsity


class _LazyScores(Sequence[Tensor]):
    """The flat scores of each of several targets, computed when a selection pass reads
    them and dropped soon after: a data-aware ranking holds the scores of a few targets
    at a time (at most one per torch thread, plus one), never those of all targets.
    Recomputing gives bit-identical scores (elementwise ops), so every pass sees the same
    keys."""

    def __init__(self, compute: list[Callable[[], Tensor]]) -> None:
        self._compute = compute
        self._held: OrderedDict[int, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = torch.get_num_threads() + 1

    def __len__(self) -> int:
        return len(self._compute)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        with self._lock:
            flat = self._held.get(i)
            if flat is None:
                flat = self._compute[i]().detach().reshape(-1)
                self._held[i] = flat
                while len(self._held) > self._keep:
                    self._held.popitem(last=False)
            else:
                self._held.move_to_end(i)
            return flat


def _feed(model: nn.Module, batch: Any) -> Any:
    """``model`` applied to a calibration batch (see :meth:`Pruner.calibrate`)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list | tuple):
        if not batch:
            raise ValueError("a calibration batch is an empty tuple/list")
        return model(batch[0])
    return model(batch)


def _is_weight(pname: str) -> bool:
    return "weight" in pname and "bias" not in pname


def _method_options(method: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    allowed = get_method(method).options
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
    re-masked after every optimizer step, so a plain PyTorch loop keeps them at zero. The
    forward pass and the model's ``state_dict`` keys are untouched.

    The Pruner follows the model by parameter name: at every public call (and at a step
    whose optimizer groups changed) a target whose parameter object the model replaced
    (``load_state_dict(assign=True)``, ``to_empty``, ``fully_shard``) keeps its mask and is
    re-masked; one that vanished or changed shape raises ``RuntimeError`` naming it.

    Args:
        model: the module to prune.
        targets: ``None`` (weights of Linear / Conv / RNN / attention layers and HF
            ``Conv1D``; embeddings and Hugging Face models' heads stay dense, see
            docs/targets.md), parameter names or globs, module types, or a mapping from a name
            or glob to that target's own settings: a method name or a dict with
            ``method``, an optional fixed ``sparsity`` and the method's options. Two
            names of one tied parameter given different settings are an error. A layer
            parametrized by ``weight_norm`` is targeted through its direction
            ``parametrizations.weight.original1`` (v): zeros of v are zeros of the weight
            ``g * v / ||v||``, and a mask that would prune a whole slice of v (norm 0,
            NaN weight) is refused. Other parametrizations of a default layer raise
            unless excluded (their originals' zeros need not be the weight's).
        method: the default method (``list_methods()``). Data-aware methods (``wanda``,
            ``taylor``, ``snip``, ``movement``, ``activation``) rank by statistics the
            Pruner collects while attached to an optimizer or in :meth:`calibrate`
            (``prunekit._stats``); hooks exist only for methods that need them.
        scope: ``"global"`` ranks all targets together (methods that rank entries: every
            entry-level score, data-aware ones included) except those whose mapping
            entry names another method, a ``sparsity`` of its own or options comparing
            within rows (``per_output=True``): those reach their own amount separately
            (an entry that keeps the default method, like ``{}`` or ``"magnitude"``,
            stays in the ranking); ``"layer"`` brings each target to the sparsity
            separately. Slice methods (structured, ``activation``) rank per tensor,
            except ``activation`` with its default ``criterion="apoz"``, whose channels
            rank globally.
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
        if not -(2**40) <= seed < 2**40:  # seeds generators as seed * 1_000_003 + updates
            raise ValueError(f"seed={seed} must be in [-2**40, 2**40)")
        self.model = model
        self.method = method
        self.scope = scope
        self.seed = seed
        self.options = _method_options(method, options, "Pruner")
        spec = get_method(method)
        if scope == "global" and not spec.ranks_globally(self.options):
            why = (
                " with per_output=True (it ranks within each output row)"
                if spec.per_row(self.options)
                else f" with options {self.options} (slice scores that compare across layers "
                "do: activation with criterion='apoz')"
                if spec.ranks == "slices" and spec.score is not None
                else ""
            )
            ranked = [n for n in list_methods() if get_method(n).ranks == "entries"]
            raise ValueError(
                f"scope='global' ranks single weights across layers; method={method!r} does "
                f"not{why}, use scope='layer' (global works with {ranked})"
            )
        self._targets = self._resolve(model, targets, exclude)
        for target in self._targets.values():
            self._check_options(target)
        self._stats = Statistics(
            model,
            {n: (t.method, t.param, get_method(t.method).needs) for n, t in self._targets.items()},
            {n: stats_options(t.method, t.options) for n, t in self._targets.items()},
        )
        self.masks: dict[str, Tensor] = {  # contiguous whatever the parameter's layout
            name: new_mask(t.param)  # a DTensor for a DTensor parameter
            for name, t in self._targets.items()
        }
        for target in self._targets.values():
            target.seen = _where(target.param)
        self.updates = 0
        # While attached, what the per-step hooks apply to each target: None (nothing
        # pruned), its bool mask, or an integer copy of it (see attach).
        self._cache_masks: bool | None = None
        self._step_masks: dict[str, Tensor | None] = {}
        # (name, parameter, handle) of the gradient hooks; targets that do not require
        # gradients get theirs when they do (_pending)
        self._grad_hooks: list[tuple[str, Tensor, RemovableHandle]] = []
        self._pending: set[str] = set()
        self._optimizers: list[_Attached] = []
        self._removed = False

    # ----------------------------------------------------------------- targets
    def _resolve(
        self, model: nn.Module, targets: Targets, exclude: str | Iterable[str]
    ) -> dict[str, _Target]:
        canonical = parameter_aliases(model)  # every name of a parameter -> its first name
        params = dict(model.named_parameters())

        def default(name: str) -> _Target:
            return _Target(name, params[name], self.method, dict(self.options))

        def aliases(pattern: str) -> list[str]:
            return matching_aliases(pattern, canonical, type(model).__name__)

        def match(pattern: str) -> list[str]:
            return list(dict.fromkeys(canonical[n] for n in aliases(pattern)))

        if not isinstance(exclude, str | Iterable):
            raise TypeError(f"exclude={exclude!r} must be a name, a glob or a list of them")
        excluded = [exclude] if isinstance(exclude, str) else list(exclude)
        weight_norms: dict[str, tuple[str, int | None]] = {}  # direction v -> (weight, dim)

        def by_type(types: tuple[type, ...]) -> list[str]:
            names = []
            for mname, module in model.named_modules():
                if isinstance(module, types):
                    prefix = f"{mname}." if mname else ""
                    for pname, _ in module.named_parameters(recurse=False):
                        if _is_weight(pname):
                            names.append(canonical[prefix + pname])
                    names += parametrized(module, prefix)
            return list(dict.fromkeys(names))

        def parametrized(module: nn.Module, prefix: str) -> list[str]:
            """The pruned originals of a module's parametrized weights (see the class doc)."""
            if not parametrize.is_parametrized(module):
                return []
            names = []
            for pname, chain in module.parametrizations.items():
                base = f"{prefix}parametrizations.{pname}.original"
                if not _is_weight(pname) or any(
                    fnmatch.fnmatchcase(f"{base}{tail}", pattern)
                    for pattern in excluded
                    for tail in ("", "0", "1")
                ):
                    continue
                if len(chain) == 1 and type(chain[0]).__name__ == "_WeightNorm":
                    direction = canonical[f"{base}1"]
                    dim = chain[0].dim
                    weight_norms[direction] = (prefix + pname, None if dim == -1 else dim)
                    names.append(direction)
                    continue
                kinds = [type(p).__name__ for p in chain]
                raise ValueError(
                    f"{prefix}{pname} is computed by the parametrization(s) {kinds}: zeros in "
                    f"their original(s) need not be zeros of {prefix}{pname}, so it is not a "
                    f"default target; exclude it (exclude={f'{base}*'!r}) or name the "
                    "parameter to prune in targets"
                )
            return names

        resolved: dict[str, _Target] = {}
        if targets is None:
            dense = dense_by_default(model, canonical)
            found = by_type(DEFAULT_MODULE_TYPES + layout_types(model))
            resolved = {n: default(n) for n in found if n not in dense}
        elif isinstance(targets, Mapping):
            specs: dict[str, tuple[str, _Target]] = {}  # alias -> (its pattern, its target)
            for pattern, spec in targets.items():
                for alias in aliases(pattern):
                    specs[alias] = (
                        pattern,
                        self._override(default(canonical[alias]), spec, pattern),
                    )
            first: dict[str, str] = {}  # parameter -> the alias whose settings it has
            for alias, (pattern, target) in specs.items():
                name = target.name
                if name in resolved and _settings(resolved[name]) != _settings(target):
                    other = first[name]
                    raise ValueError(
                        f"{other!r} and {alias!r} are one tied parameter with two different "
                        f"settings: targets[{specs[other][0]!r}]={targets[specs[other][0]]!r} "
                        f"and targets[{pattern!r}]={targets[pattern]!r}; give them one"
                    )
                resolved[name] = target
                first.setdefault(name, alias)
        else:
            if not isinstance(targets, str | type | Iterable):
                raise TypeError(
                    f"targets={targets!r} must be None, a name or glob, a module type, a list "
                    "of those or a mapping"
                )
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
        for pattern in excluded:
            for name in match(pattern):
                resolved.pop(name, None)
        for direction, (weight, dim) in weight_norms.items():
            if direction in resolved:
                resolved[direction] = replace(resolved[direction], norm_of=weight, norm_dim=dim)
        for name in transposed_weights(model, canonical) & set(resolved):
            t = resolved[name]  # (in, out) weights: `dim` counts as for Linear's (out, in)
            t.options = storage_options(get_method(t.method), t.options, t.param.ndim)
            t.transposed = t.param.ndim == 2
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
        return _Target(target.name, target.param, method, options, sparsity)

    @staticmethod
    def _check_options(target: _Target) -> None:
        shape, opts = target.param.shape, target.options
        where = f"{target.name} (shape {tuple(shape)})"
        if "dim" in opts:
            check_dim(opts["dim"], len(shape), where=f" for {where}")
        spec = get_method(target.method)
        if spec.check is not None:
            spec.check(target.param, opts, where)
        if spec.per_row(opts) and target.param.ndim < 2:
            raise ValueError(f"method={target.method!r} ranks within rows; {where} has none")

    @property
    def names(self) -> list[str]:
        """Names of the targeted parameters, in model order."""
        return list(self._targets)

    def describe(self) -> str:
        """One line: how much is targeted, and the largest matrices left dense.

        ``dim`` options count in PyTorch's (out, in) layout for every target: for a weight
        stored (in, out) (HF ``Conv1D``) the engine turns them, so ``dim=0`` always means
        output features.

        >>> model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> Pruner(model).describe()
        'Sequential: 2 targets, 80 of 890 parameters (9.0%); matrices left dense: 0.weight 100x8'
        """
        return summary(self.model, {n: t.param for n, t in self._targets.items()})

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

        A float is a fraction, an int a count (of entries, or of slices for structured
        methods); numpy scalars and 0-d tensors count as what they hold.
        """
        self._check_live()
        self._follow()
        self._check_values("prune_to")
        if scores is not None and not isinstance(scores, Mapping):
            raise TypeError(
                f"scores must be a mapping from target name to tensor, got {type(scores).__name__}"
            )
        plan = self._plan(sparsity, dict(scores or {}))
        new = dict(plan.masks)
        for sel in plan.selections:
            # weight_norm directions are checked before anything changes: work on copies
            copies = any(self._targets[n].norm_of for n in sel.names)
            masks = [self.masks[n].clone() if copies else self.masks[n] for n in sel.names]
            select_lowest(sel.source, masks, sel.k, sel.names, sel.kept)
            if copies:
                new.update(zip(sel.names, masks, strict=True))
        self._check_norms(new)
        self.masks.update(new)
        self._masks_changed()
        self.updates += 1
        self._stats.reset(
            n
            for n in plan.updated
            if not get_method(self._targets[n].method).keeps_stats(self._targets[n].options)
        )

    def _plan(self, sparsity: Any, scores: dict[str, Tensor]) -> _Plan:
        for name, score in scores.items():
            if name not in self._targets:
                raise ValueError(
                    f"scores names {name!r}, not a target{suggest(str(name), self._targets)}"
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
            amounts = {n: as_amount(v, f"sparsity[{n!r}]") for n, v in sparsity.items()}
            group: list[str] = []
        else:
            sparsity = as_amount(sparsity, "sparsity")
            if isinstance(sparsity, float):
                amount_to_count(sparsity, 1, name="sparsity")  # range check
            elif sparsity < 0:
                raise ValueError(f"{sparsity=} must be a count >= 0 or a fraction in [0, 1]")
            amounts = {
                n: t.sparsity if t.sparsity is not None else sparsity
                for n, t in self._targets.items()
            }
            group = [n for n, t in self._targets.items() if self._ranked_globally(t)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.updates)
        # (targets given scores by the caller need no statistics)
        stats = self._gather_stats([n for n in self._targets if n in amounts and n not in scores])
        self._check_backwards([n for n in group if n in stats], stats)
        plan = _Plan(updated=list(amounts))
        if group and get_method(self.method).ranks == "slices":
            plan.masks.update(self._global_slices(group, sparsity, scores, stats))
        elif group:
            plan.selections.append(self._selection(group, sparsity, scores, generator, stats))
        for name, amount in amounts.items():
            if name in group:
                continue
            target = self._targets[name]
            spec = get_method(target.method)
            if spec.ranks == "entries" and spec.ranks_globally(target.options):
                plan.selections.append(self._selection([name], amount, scores, generator, stats))
            else:
                plan.masks[name] = self._structured(
                    target, amount, scores.get(name), generator, stats
                )
        return plan

    def _global_slices(
        self,
        names: list[str],
        amount: float | int,
        scores: Mapping[str, Tensor],
        stats: Mapping[str, TargetStats],
    ) -> dict[str, Tensor]:
        """One ranking of the slices of several targets (a slice method whose scores compare
        across tensors): exactly ``round(amount * S)`` of all ``S`` slices pruned afterwards,
        already pruned ones included; a fraction below 1 keeps each target's best slice.
        Slice scores are one number per slice: they are ranked in one small vector."""
        keys, shapes = [], []
        for n in names:
            target, mask = self._targets[n], self.masks[n]
            dim = check_dim(target.options.get("dim", 0), mask.ndim)
            shape = (mask.shape[dim],)
            if n in scores:
                if tuple(scores[n].shape) != shape:
                    raise ValueError(
                        f"scores[{n!r}] has shape {tuple(scores[n].shape)}, expected {shape}"
                    )
                score = scores[n]
            else:
                score = self._scores(n, stats, shape)
            others = [d for d in range(mask.ndim) if d != dim]
            alive = mask.any(dim=others) if others else mask.clone()
            key = score.detach().double().cpu().masked_fill(~alive.cpu(), -math.inf)
            keys.append(key)
            shapes.append((dim, alive))
        total = sum(k.numel() for k in keys)
        count = amount_to_count(amount, total, name="sparsity")
        already = sum(int((~a).sum()) for _, a in shapes)
        if count < already:
            raise ValueError(
                f"sparsity={amount} asks for {count} pruned slices of the {len(names)} globally "
                f"ranked targets, but {already} already are; masks only shrink"
            )
        spare = isinstance(as_amount(amount), float) and as_amount(amount) < 1.0
        if spare:  # never the last slice of a target: its best alive slice is kept
            for key in keys:
                if bool((key > -math.inf).any()):
                    key[int(torch.argmax(key))] = math.inf
        flat = torch.cat(keys)
        if count > int((flat < math.inf).sum()):
            raise ValueError(
                f"sparsity={amount} would prune every slice of a target; a fraction below 1 "
                "keeps one slice per target"
            )
        pruned = torch.ones(total, dtype=torch.bool)
        pruned[torch.sort(flat, stable=True).indices[:count]] = False
        new, start = {}, 0
        for n, (dim, alive) in zip(names, shapes, strict=True):
            keep = pruned[start : start + alive.numel()].to(alive.device)
            start += alive.numel()
            view = [1] * self.masks[n].ndim
            view[dim] = -1
            spec = get_method(self._targets[n].method)
            new[n] = self._checked(spec, n, self.masks[n] & keep.view(view), self.masks[n])
        return new

    def _lazy_source(
        self, names: list[str], stats: Mapping[str, TargetStats]
    ) -> KeySource | WideKeys:
        """Keys of the method's scores of ``names``, each target's computed when a pass of
        the selection reads it (see :class:`_LazyScores`). Every target's scores are
        computed and checked once here, one at a time, before anything changes."""
        compute = [
            functools.partial(self._scores, n, stats, tuple(self.masks[n].shape)) for n in names
        ]
        dtypes = []
        for make in compute:
            dtypes.append(make().dtype)  # checked (shape, dtype, finite), then dropped
        source = key_source([torch.empty(0, dtype=d) for d in dtypes], magnitude=False)
        source.flats = _LazyScores(compute)  # type: ignore[assignment]
        return source

    def _gather_stats(self, names: list[str]) -> dict[str, TargetStats]:
        """The statistics of ``names`` summed across ranks; raises if a method lacks them."""
        if not self._stats:
            return {}
        stats = self._stats.reduced(names)
        for name, got in stats.items():
            missing = self._stats.missing(name, got)
            if missing is not None:
                method = self._targets[name].method
                raise RuntimeError(
                    f"method={method!r} ranks {name} by its {missing}; no statistics were "
                    "collected since the last update: call pruner.calibrate(batches"
                    f"{', loss_fn' if 'gradients' in missing else ''}) or train with the "
                    "pruner attached to the optimizer first"
                )
        return stats

    def _check_backwards(self, names: list[str], stats: Mapping[str, TargetStats]) -> None:
        """Refuse to rank gradient sums together when a target could not be observed during
        backward passes that reached the others (frozen, or unfrozen part-way and hooked
        only at the next optimizer step): its sum covers fewer passes, so the sums are not
        comparable. (A pass that does not reach a weight adds zero to its sum: no error.)"""
        grads = [n for n in names if "grads" in self._stats.sites[n].needs]
        short = [n for n in grads if stats[n].missed]
        if len(grads) > 1 and short:
            seen = ", ".join(f"{n}: {stats[n].backwards}" for n in grads)
            raise ValueError(
                f"method={self.method!r} with scope='global' ranks the gradient sums of "
                f"{grads} together, but {short} could not be observed during some backward "
                f"passes (frozen, or unfrozen part-way: hooked only from the next optimizer "
                f"step); backward passes seen since the statistics were last reset: {seen}. "
                "Their sums are not comparable: rank the targets alone (scope='layer' or a "
                "mapping of per-target sparsities), or collect statistics for a new Pruner with "
                "every target requiring gradients"
            )

    def _scores(
        self, name: str, stats: Mapping[str, TargetStats], shape: tuple[int, ...]
    ) -> Tensor:
        """The method's scores for target ``name``, checked (shape, dtype, finite)."""
        target = self._targets[name]
        spec = get_method(target.method)
        assert spec.score is not None
        scores = spec.score(target.param.detach(), stats.get(name, TargetStats()), **target.options)
        if not isinstance(scores, Tensor) or not scores.is_floating_point():
            got = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
            raise TypeError(
                f"method={target.method!r} returned scores of {got} for {name}; need a float tensor"
            )
        if tuple(scores.shape) != shape:
            raise ValueError(
                f"method={target.method!r} returned scores of shape {tuple(scores.shape)} for "
                f"{name}, expected {shape}"
            )
        check_finite(scores, f"method={target.method!r}: the scores of {name}")
        return scores

    def _ranked_globally(self, target: _Target) -> bool:
        # the documented rule: only another method, a fixed sparsity of its own (or options
        # that compare within rows) take a target out of the global ranking
        return (
            self.scope == "global"
            and target.method == self.method
            and target.sparsity is None
            and get_method(target.method).ranks_globally(target.options)
        )

    def _check_norms(self, masks: Mapping[str, Tensor]) -> None:
        """Refuse masks that would prune a whole slice of a weight_norm direction v: its
        norm would be 0 and the weight g * v / ||v|| NaN."""
        for name, mask in masks.items():
            target = self._targets[name]
            if target.norm_of is None:
                continue
            dim = target.norm_dim
            if dim is None:
                dead = int(not bool(mask.any()))
            else:
                others = [d for d in range(mask.ndim) if d != dim % mask.ndim]
                dead = int((~mask.any(dim=others)).sum()) if others else int((~mask).sum())
            if dead:
                raise ValueError(
                    f"{name} is the direction v of weight_norm({target.norm_of}); pruning "
                    f"would zero {dead} whole slice(s) along dim={dim}, whose norm 0 makes "
                    f"the weight NaN; prune less of it or remove the weight_norm"
                )

    def _selection(
        self,
        names: list[str],
        amount: float | int,
        scores: dict[str, Tensor],
        generator: torch.Generator,
        stats: Mapping[str, TargetStats],
    ) -> _Selection:
        total = sum(self.masks[n].numel() for n in names)
        target_count = amount_to_count(amount, total, name="sparsity")
        kept = count_true([self.masks[n] for n in names])  # whole-tensor counts if sharded
        already = total - sum(kept)
        what = names[0] if len(names) == 1 else f"the {len(names)} globally ranked targets"
        if target_count < already:
            raise ValueError(
                f"sparsity={amount} asks for {target_count} pruned weights in {what}, but "
                f"{already} already are; masks only shrink"
            )
        spec = get_method(self._targets[names[0]].method)
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
            source: KeySource | WideKeys = key_source([scores[n] for n in names], magnitude=False)
        elif spec.random:
            source = RandomKeys(seed)
        elif spec.score is not None:
            source = self._lazy_source(names, stats)
        else:
            for n in names if len(names) == 1 else ():
                check_finite(self._targets[n].param, n)
            source = key_source([self._targets[n].param for n in names], magnitude=True)
        return _Selection(names, target_count - already, source, kept)

    def _structured(
        self,
        target: _Target,
        amount: float | int,
        score: Tensor | None,
        generator: torch.Generator,
        stats: Mapping[str, TargetStats],
    ) -> Tensor:
        """A per-tensor method's new mask (slices, rows, N:M or a plain mask function),
        checked and intersected with the current mask."""
        spec = get_method(target.method)
        kwargs = dict(target.options)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        accepts = spec.__signature__.parameters
        param, mask = target.param.detach(), self.masks[target.name]
        check_finite(param, target.name)
        if spec.score is not None:  # data-aware: scores from the weight and statistics
            if spec.ranks == "slices":
                dim = check_dim(kwargs.get("dim", 0), param.ndim)
                shape: tuple[int, ...] = (param.shape[dim],)
                if score is None:
                    score = self._scores(target.name, stats, shape)
                elif tuple(score.shape) != shape:
                    raise ValueError(
                        f"scores[{target.name!r}] has shape {tuple(score.shape)}, expected {shape}"
                    )
                new = _prune_slices(param, amount, dim, mask, key_source([score], magnitude=False))
            else:  # entries compared within rows
                if score is None:
                    score = self._scores(target.name, stats, tuple(param.shape))
                elif score.shape != param.shape:
                    raise ValueError(
                        f"scores[{target.name!r}] has shape {tuple(score.shape)}, expected {tuple(param.shape)}"
                    )
                if target.transposed:  # rows of outputs are the columns of an (in, out) weight
                    new = rank_rows(param.T, amount, score.T, mask.T).T
                else:
                    new = rank_rows(param, amount, score, mask)
            return self._checked(spec, target.name, new, mask)
        if score is not None:
            kwargs["scores"] = score
        if spec.random or "generator" in accepts:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        if isinstance(param, DTensor):  # ranks exchange slice scores, never weights
            return structured_mask(target.method, param, amount, mask, kwargs)
        if spec.pattern:  # the pattern fixes the sparsity; any amount > 0 applies it
            return self._checked(spec, target.name, spec(param, **kwargs), mask) if amount else mask
        if spec.ranks == "entries" and spec.per_row(kwargs):
            return self._checked(
                spec, target.name, rank_rows(param, amount, param.abs(), mask), mask
            )
        if spec.accepts_mask():
            kwargs["mask"] = mask
        return self._checked(spec, target.name, spec(param, amount, **kwargs), mask)

    @staticmethod
    def _checked(spec: Method, name: str, new: Any, mask: Tensor) -> Tensor:
        """A method's result checked (a bool tensor of the mask's shape) and intersected
        with the current mask: masks only shrink, whatever the method does."""
        if not isinstance(new, Tensor) or new.dtype != torch.bool:
            got = new.dtype if isinstance(new, Tensor) else type(new).__name__
            raise TypeError(
                f"method={spec.name!r} returned {got} for {name}; a mask must be a torch.bool "
                "tensor (True = kept)"
            )
        if new.shape != mask.shape:
            raise ValueError(
                f"method={spec.name!r} returned a mask of shape {tuple(new.shape)} for {name}, "
                f"expected {tuple(mask.shape)}"
            )
        return (new.to(local(mask).device) & mask).contiguous()

    def calibrate(
        self, batches: Iterable[Any], loss_fn: Callable[[Any, Any], Tensor] | None = None
    ) -> int:
        """Collect the statistics the targets' methods need over ``batches`` (one-shot use,
        the ``X`` of activation pruning), without training; returns the number of batches.

        Each batch is fed to the model as ``model(batch)`` for a tensor, ``model(batch[0])``
        for a tuple or list (e.g. ``(x, y)``) and ``model(**batch)`` for a mapping, in the
        mode the model is in. Activation statistics need a forward only (run under
        ``torch.no_grad``); gradient statistics (taylor, snip, movement) need
        ``loss_fn(output, batch) -> scalar loss``, whose backward is run per batch. The
        model's ``.grad`` are left as they were found, no optimizer steps. Statistics add up
        with those collected since the last update; :meth:`prune_to` uses and resets them.
        If a batch, the model or ``loss_fn`` raises, the statistics are left as they were.
        A Pruner whose methods need no statistics returns 0 without reading ``batches``.

        >>> model = nn.Sequential(nn.Linear(4, 3))
        >>> pruner = Pruner(model, method="wanda")
        >>> pruner.calibrate([torch.randn(8, 4) for _ in range(2)])
        2
        >>> pruner.prune_to(0.5)
        >>> int((model[0].weight == 0).sum())
        6
        """
        self._check_live()
        self._follow()
        self._check_values("calibrate")
        if not self._stats:
            return 0
        if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
            raise TypeError(
                f"batches must be an iterable of batches, got {type(batches).__name__}"
                + (" (wrap one tensor as [x])" if isinstance(batches, Tensor) else "")
            )
        grads = self._stats.needs_grads()
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} must be a callable (output, batch) -> loss")
        if grads and loss_fn is None:
            methods = sorted({self._targets[n].method for n in grads})
            raise ValueError(
                f"method(s) {methods} rank by gradients: give calibrate a loss_fn(output, batch) "
                "returning a scalar loss"
            )
        hooked_here = not self._stats.hooked
        self._stats.hook({n: t.param for n, t in self._targets.items()})
        params = list(self.model.parameters())
        found = [p.grad for p in params]
        count = 0
        saved = self._stats.snapshot()  # an error part-way adds nothing
        self._stats.calibrating = True
        try:
            for batch in batches:
                if grads:
                    for p in params:
                        p.grad = None
                    with torch.enable_grad():
                        loss = loss_fn(_feed(self.model, batch), batch)  # type: ignore[misc]
                        if (
                            not isinstance(loss, Tensor)
                            or loss.numel() != 1
                            or not loss.requires_grad
                        ):
                            raise ValueError(
                                f"loss_fn returned {type(loss).__name__}"
                                f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}; it "
                                "must return a scalar tensor that requires grad"
                            )
                        loss.backward()
                else:
                    with torch.no_grad():
                        _feed(self.model, batch)
                count += 1
        except BaseException:
            self._stats.restore(saved)
            raise
        finally:
            self._stats.calibrating = False
            for p, g in zip(params, found, strict=True):
                p.grad = g
            if hooked_here and not self._optimizers:
                self._stats.unhook()
        if not count:
            raise ValueError("batches is empty: nothing to calibrate on")
        return count

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Intersect the current masks with given ones (custom masks); weights follow.

        >>> model = nn.Linear(2, 2)
        >>> pruner = Pruner(model)
        >>> pruner.set_masks({"weight": torch.tensor([[True, False], [True, True]])})
        >>> model.weight[0, 1].item() == 0
        True
        """
        self._check_live()
        self._follow()
        self._check_values("set_masks")
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"masks must be a mapping from target name to bool mask, got {type(masks).__name__}"
            )
        for name, mask in masks.items():
            if name not in self.masks:
                raise ValueError(
                    f"masks names {name!r}, not a target{suggest(str(name), self.masks)}"
                )
            if (
                not isinstance(mask, Tensor)
                or mask.dtype != torch.bool
                or mask.shape != self.masks[name].shape
            ):
                raise ValueError(
                    f"masks[{name!r}] must be a bool tensor of shape {tuple(self.masks[name].shape)}"
                )
        new = {
            n: self.masks[n] & place_mask(m, self.masks[n], f"masks[{n!r}]")
            for n, m in masks.items()
        }
        self._check_norms(new)
        for name, mask in new.items():
            self.masks[name].copy_(mask)
        self._masks_changed()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every target weight where its mask is False, in place (e.g. after rewinding)."""
        if not self._removed:
            self._follow()
        for name, target in self._targets.items():
            zero_pruned_(target.param, self.masks[name])

    def _masks_changed(self) -> None:
        self.apply_masks()
        with torch.no_grad():  # gradients already accumulated (e.g. pruning before a step)
            for name, target in self._targets.items():
                if target.param.grad is not None:
                    zero_pruned_(target.param.grad, self.masks[name])
        self._clear_optimizer_state()
        if self._optimizers:
            self._step_masks = self._make_step_masks()

    def _make_step_masks(self) -> dict[str, Tensor | None]:
        # Integer copies (all bits set where kept) zero pruned entries with one bitwise
        # AND of the values' bits: as fast as multiplying by a float mask on CPU, and
        # exact for NaN and inf too (0 * inf would be NaN).
        step_masks: dict[str, Tensor | None] = {}
        for name, mask in self.masks.items():
            param = self._targets[name].param
            cache = self._cache_masks
            if cache is None:
                cache = _cacheable(param)
            if _is_meta(mask) or bool(local(mask).all()):
                step_masks[name] = None  # nothing pruned: no work per step
            elif cache and param.element_size() in _INT_OF_SIZE:
                step_masks[name] = mask.to(_INT_OF_SIZE[param.element_size()]).neg_()
            else:
                step_masks[name] = mask
        return step_masks

    def sparsity(self) -> SparsityReport:
        """Pruned counts per target and overall (prints as a table)."""
        if not self._removed:
            self._follow()
        # whole-tensor counts if sharded; a mask on the meta device is all True (no values
        # yet, nothing can be pruned: see _check_values)
        real = [m for m in self.masks.values() if not _is_meta(m)]
        counts = iter(count_true(real))
        kept = [m.numel() if _is_meta(m) else next(counts) for m in self.masks.values()]
        return SparsityReport(
            tuple(
                TargetSparsity(name, mask.numel(), mask.numel() - n)
                for (name, mask), n in zip(self.masks.items(), kept, strict=True)
            )
        )

    # ------------------------------------------------------- following changes
    def _follow(self) -> None:
        """Follow the model: targets whose parameter the model replaced (looked up by
        name: ``load_state_dict(assign=True)``, ``fully_shard``...) or whose values moved
        (``to_empty``, ``.to()``) keep their masks and are re-masked; a target that is
        gone or changed shape raises, naming it, before anything changes."""
        replaced: dict[str, Tensor] = {}
        for name, target in self._targets.items():
            try:
                current = self.model.get_parameter(name)
            except AttributeError:
                raise RuntimeError(
                    f"target {name!r} is no longer a parameter of the model; a Pruner follows "
                    "replaced parameters by name, not removed ones: build a new Pruner"
                ) from None
            if current is not target.param:
                if current.shape != self.masks[name].shape:
                    raise RuntimeError(
                        f"parameter {name!r} was replaced by one of shape {tuple(current.shape)}; "
                        f"its mask has shape {tuple(self.masks[name].shape)}: build a new Pruner"
                    )
                replaced[name] = current
        moved = [n for n, t in self._targets.items() if n in replaced or _where(t.param) != t.seen]
        if moved:
            self._rebind(replaced, moved)
        self._hook_unfrozen()
        self._refresh_optimizers()

    @torch.no_grad()
    def _rebind(self, replaced: Mapping[str, Tensor], moved: list[str]) -> None:
        for name, param in replaced.items():
            self._targets[name].param = param  # type: ignore[assignment]
        for name in moved:
            target, mask = self._targets[name], self.masks[name]
            if _is_meta(mask):  # built on the meta device: nothing was pruned (refused)
                mask = new_mask(target.param)
            elif (isinstance(mask, DTensor) or isinstance(target.param, DTensor)) and not (
                isinstance(mask, DTensor)
                and isinstance(target.param, DTensor)
                and mask.device_mesh == target.param.device_mesh
                and mask.placements == target.param.placements
            ):
                mask = like(full_mask(mask), target.param)  # e.g. sharded after the Pruner
            self.masks[name] = mask.to(local(target.param).device)
            zero_pruned_(target.param, self.masks[name])
            target.seen = _where(target.param)
        if self._optimizers:
            self._step_masks = self._make_step_masks()
            self._hook_grads()
            for attached in self._optimizers:
                attached.live.groups = ()  # re-read what each optimizer holds

    def _hook_grads(self) -> None:
        """Gradient hooks on exactly the current target parameters that require grad."""
        keep = []
        for name, param, handle in self._grad_hooks:
            if param is self._targets[name].param:
                keep.append((name, param, handle))
            else:
                handle.remove()
        hooked = {name for name, _, _ in keep}
        self._pending = set()
        for name, target in self._targets.items():
            if name in hooked:
                continue
            if target.param.requires_grad:
                handle = target.param.register_post_accumulate_grad_hook(self._grad_hook(name))
                keep.append((name, target.param, handle))
            else:
                self._pending.add(name)
        self._grad_hooks = keep
        if self._stats:
            self._stats.hook({n: t.param for n, t in self._targets.items()})

    def _check_values(self, what: str) -> None:
        for name, target in self._targets.items():
            if _is_meta(target.param):
                raise RuntimeError(
                    f"{what}: target {name!r} is on the meta device (no values yet); "
                    "materialise the model first (to_empty, then initialise or load weights): "
                    "the Pruner follows the new parameters"
                )

    def _hook_unfrozen(self) -> bool:
        """Hook the gradients of frozen targets that now require them; whether any did."""
        if self._pending and any(self._targets[n].param.requires_grad for n in self._pending):
            self._hook_grads()
            return True
        return False

    def _refresh_optimizers(self) -> None:
        """Re-read the parameter groups of optimizers whose groups changed (added groups)."""
        for attached in self._optimizers:
            live = attached.live
            groups = _groups(attached.optimizer)
            if groups == live.groups:
                continue
            held = {id(p) for g in attached.optimizer.param_groups for p in g["params"]}
            live.names = [n for n, t in self._targets.items() if id(t.param) in held]
            live.params = [(self._targets[n].param, n) for n in live.names]
            live.groups = groups
            self._clear_optimizer_state([attached])
            with torch.no_grad():
                for param, name in live.params:
                    zero_pruned_(param, self.masks[name])

    # ------------------------------------------------------------- training
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers this Pruner is attached to."""
        return [attached.optimizer for attached in self._optimizers]

    def attach(
        self, optimizer: torch.optim.Optimizer, *, cache_masks: bool | None = None
    ) -> Pruner:
        """Keep pruned weights at zero through ``optimizer``'s steps.

        Gradients of pruned entries are zeroed when accumulated (before clipping and the
        step), weights are re-masked after each step, and optimizer state (momentum, Adam
        moments) of pruned entries is cleared whenever masks change. Targets with nothing
        pruned cost nothing per step.

        The optimizer is followed: parameter groups added later
        (``add_param_group``, e.g. when unfreezing) are picked up at the next step (or by
        calling ``attach`` again), a loaded optimizer state is cleared where pruned, and
        frozen targets get their gradient hook once they require gradients. An object
        wrapping an optimizer in ``.optimizer`` (Lightning's, accelerate's) is unwrapped.

        ``cache_masks=True`` keeps, while attached, a copy of each pruned target's mask as
        integers of the weight's width (all bits set where kept; 4 bytes per weight for
        float32, refreshed only when masks change): on CPU, a bitwise AND with it is about
        10x faster than zeroing through the bool mask (about as fast as multiplying by a
        float mask), and like the bool mask it turns NaN or inf at pruned entries into 0
        (a float mask would make 0 * inf = NaN). The default (``None``) does so for CPU parameters only; on
        GPUs the bool mask is as fast and no copy is kept.

        >>> model = nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pruner = Pruner(model).attach(optimizer)
        >>> pruner.prune_to(0.5)
        >>> model(torch.randn(3, 4)).sum().backward(); optimizer.step()
        >>> int((model.weight == 0).sum())
        4
        """
        self._check_live()
        # A wrapper is unwrapped when it is no optimizer, or an Optimizer subclass that never
        # set up step hooks (accelerate's AcceleratedOptimizer); a real optimizer wrapping
        # another (e.g. Lookahead) keeps its own step and is attached as it is.
        while not hasattr(optimizer, "_optimizer_step_post_hooks") and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer
        ):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if cache_masks is not None and not isinstance(cache_masks, bool):
            raise TypeError(f"cache_masks={cache_masks!r} must be None, True or False")
        self._follow()
        if any(a.optimizer is optimizer for a in self._optimizers):
            return self  # _follow re-read its groups
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(t.param) in held for t in self._targets.values()):
            raise ValueError(
                "optimizer holds none of the pruned parameters (if the model's parameters "
                "were replaced, e.g. by load_state_dict(assign=True) or fully_shard, build the "
                "optimizer over the new ones)"
            )
        self._cache_masks = cache_masks
        self._attach(optimizer)
        return self

    def _attach(self, optimizer: torch.optim.Optimizer) -> None:
        attached = _Attached(optimizer, [], _Held([], [], ()))
        attached.handles.append(optimizer.register_step_post_hook(self._step_hook(attached)))
        attached.handles.append(
            optimizer.register_load_state_dict_post_hook(self._loaded_hook(attached))
        )
        self._optimizers.append(attached)
        self._hook_grads()
        self._step_masks = self._make_step_masks()
        self._refresh_optimizers()

    def _grad_hook(self, name: str) -> Any:
        def mask_grad(param: Tensor) -> None:
            if param.grad is not None:
                self._zero_pruned(name, param.grad)

        return mask_grad

    def _step_hook(self, attached: _Attached) -> Any:
        live = attached.live

        @torch.no_grad()
        def remask(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            unfrozen = self._hook_unfrozen()  # this step saw their unmasked gradients
            if _groups(optimizer) != live.groups:  # groups added or replaced
                self._follow()
            if unfrozen:
                self._clear_optimizer_state()
            for param, name in live.params:
                self._zero_pruned(name, param)

        return remask

    def _loaded_hook(self, attached: _Attached) -> Any:
        def clear(optimizer: torch.optim.Optimizer) -> None:
            self._clear_optimizer_state([attached])

        return clear

    def _zero_pruned(self, name: str, t: Tensor) -> None:
        step_mask = self._step_masks[name]
        if step_mask is None:
            return
        if step_mask.dtype == torch.bool:
            zero_pruned_(t, step_mask)
        elif t.element_size() == step_mask.element_size():
            t.view(step_mask.dtype).bitwise_and_(step_mask)
        else:  # e.g. the model changed dtype since: the bool mask until masks are rebuilt
            zero_pruned_(t, self.masks[name])

    @torch.no_grad()
    def _clear_optimizer_state(self, attached: Sequence[_Attached] | None = None) -> None:
        for entry in self._optimizers if attached is None else attached:
            for param, name in entry.live.params:
                mask = self.masks[name]
                for value in entry.optimizer.state.get(param, {}).values():
                    if isinstance(value, Tensor) and value.shape == mask.shape:
                        zero_pruned_(value, mask)

    def remove(self) -> None:
        """Detach every hook; the model keeps its zeros as plain weights (pruning made permanent)."""
        if not self._removed:
            self._follow()
        self.apply_masks()
        for _, _, handle in self._grad_hooks:
            handle.remove()
        for attached in self._optimizers:
            for handle in attached.handles:
                handle.remove()
        self._grad_hooks, self._optimizers, self._pending = [], [], set()
        self._stats.unhook()
        self._step_masks = {}
        self._removed = True

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this Pruner was removed; create a new one to prune again")

    def __getstate__(self) -> dict[str, Any]:
        if self._optimizers:
            raise TypeError(
                "an attached Pruner cannot be pickled or shallow-copied (its hooks are bound "
                "to this model's parameters and optimizers): save pruner.state_dict(), or "
                "copy.deepcopy it"
            )
        return self.__dict__.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> Pruner:
        """A copy with its own copy of the model and of the attached optimizers (the same
        copies when they are copied in the same ``deepcopy`` call), attached to those."""
        new = object.__new__(Pruner)
        memo[id(self)] = new
        model = copy.deepcopy(self.model, memo)
        new.__dict__.update(
            model=model,
            method=self.method,
            scope=self.scope,
            seed=self.seed,
            options=copy.deepcopy(self.options, memo),
            masks={n: m.clone() for n, m in self.masks.items()},
            updates=self.updates,
            _cache_masks=self._cache_masks,
            _step_masks={},
            _grad_hooks=[],
            _pending=set(),
            _optimizers=[],
            _removed=self._removed,
        )
        new._targets = {}
        for name, target in self._targets.items():
            param = copy.deepcopy(target.param, memo)  # the model's copy of it, via memo
            new._targets[name] = replace(
                target, param=param, options=copy.deepcopy(target.options, memo)
            )
        self._stats.strip_copies(memo)  # the copied modules' hook dicts hold ours
        new._stats = Statistics(
            model,
            {n: (t.method, t.param, get_method(t.method).needs) for n, t in new._targets.items()},
            {n: stats_options(t.method, t.options) for n, t in new._targets.items()},
        )
        if self._stats:
            new._stats.load(self._stats.check_state(self._stats.local_state()))
        for attached in self._optimizers:  # even one that now holds none of the targets
            new._attach(copy.deepcopy(attached.optimizer, memo))
        return new

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed) and what is needed to continue pruning."""
        if not self._removed:
            self._follow()
        state = {
            "format": _STATE_FORMAT,
            "method": self.method,
            "scope": self.scope,
            "seed": self.seed,
            "updates": self.updates,
            "masks": {
                # the whole mask (gathered if sharded): loads on any world size
                n: {"shape": list(m.shape), "packed": pack_mask(_whole(m))}
                for n, m in self.masks.items()
            },
        }
        if self._stats:  # summed across ranks: under DDP every rank must call state_dict
            state["stats"] = self._stats.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict`; the weights are re-masked.

        Everything is checked first (format, counters, every mask's shape, bytes and
        padding bits); on any error nothing has changed.
        """
        self._check_live()
        self._follow()
        self._check_values("load_state_dict")
        if not isinstance(state, Mapping) or "masks" not in state:
            raise ValueError("state is not a Pruner state_dict (no 'masks' entry)")
        fmt = state.get("format", _STATE_FORMAT)
        if fmt != _STATE_FORMAT:
            raise ValueError(f"state_dict format={fmt!r} is not {_STATE_FORMAT} (this prunekit's)")
        updates = state.get("updates", 0)
        if isinstance(updates, bool) or not isinstance(updates, numbers.Integral):
            raise TypeError(f"state_dict updates={updates!r} must be an int")
        if updates < 0:
            raise ValueError(f"state_dict updates={updates!r} must be >= 0")
        saved = state["masks"]
        if not isinstance(saved, Mapping):
            raise TypeError(f"state_dict masks must be a mapping, got {type(saved).__name__}")
        missing, unexpected = set(self.masks) - set(saved), set(saved) - set(self.masks)
        if missing or unexpected:
            raise ValueError(
                f"state_dict belongs to another model or target set: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        restored = {}
        for name, entry in saved.items():
            if not isinstance(entry, Mapping) or not {"shape", "packed"} <= set(entry):
                raise ValueError(
                    f"state_dict mask {name!r} must be a dict with 'shape' and 'packed'"
                )
            shape = entry["shape"]
            if not isinstance(shape, Sequence) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in shape
            ):
                raise TypeError(
                    f"state_dict mask {name!r} has shape={shape!r}; need a list of ints"
                )
            if tuple(shape) != tuple(self.masks[name].shape):
                raise ValueError(
                    f"state_dict mask {name!r} has shape {tuple(shape)}, the parameter "
                    f"has {tuple(self.masks[name].shape)}"
                )
            try:
                mask = unpack_mask(entry["packed"], tuple(shape))
            except (TypeError, ValueError) as e:
                raise type(e)(f"state_dict mask {name!r}: {e}") from None
            restored[name] = like(mask, self.masks[name])  # this rank's shard if sharded
        self._check_norms(restored)
        stats = None
        if "stats" in state:
            stats = self._stats.check_state(state["stats"])
        self.masks.update(restored)
        self.updates = int(updates)
        if stats is not None:
            self._stats.load(stats, summed=True)
        self._masks_changed()

    def __repr__(self) -> str:
        return (
            f"Pruner({type(self.model).__name__}, targets={len(self._targets)}, "
            f"method={self.method!r}, scope={self.scope!r}, updates={self.updates}, "
            f"optimizers={len(self._optimizers)})"
        )
