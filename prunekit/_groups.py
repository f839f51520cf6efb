"""Dependency groups: which parameter slices must be pruned together.

The model is traced with ``torch.fx`` (shapes from one example input). Every channel a
layer produces (a Linear output feature, a Conv output channel, an attention head, the
intermediate feature of a transformer MLP) is an *element*; the trace follows where each
channel goes. Elements joined by an elementwise operation (a residual addition) are one
group: they are kept or removed together. A group's *members* are every slice it owns:
the producing weights' output slices and bias entries, BatchNorm entries, and the
consumers' input slices (after a flatten, a channel owns ``H*W`` consecutive inputs).

Channels that cannot be removed without changing what the model computes are *pinned*:
those reaching the model's output, mixed by a normalisation over channels (LayerNorm),
a softmax or a reduction over channels, combined with an untracked tensor, or of a layer
whose parameters the model also reads outside the layer's forward (``x @ fc.weight.t()``).
A group member that is a tied weight or a tensor a hook computes (``torch.nn.utils.prune``,
a parametrization) raises ``ValueError`` when the graph is built. An
operation the trace does not understand, applied to tracked channels, raises
:class:`UnsupportedModelError` naming the node: never a guess.
"""

from __future__ import annotations

import contextlib
import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from prunekit._pruner import Pruner
from prunekit._report import SparsityReport, TargetSparsity
from prunekit._state import unpack_mask
from prunekit._targets import matching_aliases, parameter_aliases
from prunekit._validate import amount_to_count

SCOPES = ("layer", "global")


TRACERS = ("auto", "fx", "export")


class UnsupportedModelError(ValueError):
    """The model cannot be traced, or uses an operation on channels prunekit does not
    understand; the message names the operation (the fx node) and why."""


# ------------------------------------------------------------------ op tables
_UNARY_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
_POOL_MODULES: dict[type, int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}  # fmt: skip
_UNARY_FUNCTIONS: set[Any] = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.mish, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.neg, operator.neg, torch.abs,
}  # fmt: skip
_UNARY_METHODS = {
    "relu", "sigmoid", "tanh", "neg", "abs", "contiguous", "clone", "float", "double",
    "half", "bfloat16", "to", "type_as", "detach",
}  # fmt: skip
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}  # fmt: skip
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div,
}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_META_METHODS = {"size", "dim", "numel"}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_MIXING_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
#: Hugging Face modules of the BERT family whose heads / intermediate features are
#: self-contained (checked against transformers 5.18)
_HF_ATTENTION = {"BertAttention", "RobertaAttention"}
_HF_LAYER = {"BertLayer", "RobertaLayer"}


@dataclass
class _Track:
    """Which dimension of a tensor carries tracked channels, and their elements."""

    dim: int
    ids: list[int]


@dataclass
class _Element:
    members: list[tuple[str, str, int, int, tuple[int, int] | None]] = field(default_factory=list)
    producers: set[str] = field(default_factory=set)
    pinned: bool = False


@dataclass(frozen=True)
class Group:
    """Parameter slices pruned together (one channel, head or coupled set of channels).

    ``members`` holds ``(param_name, kind, dim, indices, rows)``: ``kind`` is ``"out"``
    (a producing weight's output slice), ``"aux"`` (a bias or normalisation entry) or
    ``"in"`` (a consumer's input slice); ``rows`` optionally narrows the other dimension
    (the q, k or v block of a packed attention projection). ``layer`` names the groups
    made by the same producing layers (by the first of them; groups are ranked within it
    for ``scope="layer"``): one layer's channels, or channels coupled by residual
    additions; where a residual stream grows by zero padding, the channels each stage
    adds are a layer of their own.
    """

    members: tuple[tuple[str, str, int, tuple[int, ...], tuple[int, int] | None], ...]
    producers: tuple[str, ...]
    layer: str

    def slices(self, params: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
        """Each member's values, ``(param_name, tensor)``."""
        return [(m[0], _member_slice(params[m[0]], m)) for m in self.members]


def _shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Each name of a parameter that several modules hold (tied weights): all its names
    (a module registered under two names is one module: not a tie)."""
    names: dict[int, list[str]] = {}
    owners: dict[int, set[int]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
            owners.setdefault(id(p), set()).add(id(mod))
    return {n: group for i, group in names.items() if len(owners[i]) > 1 for n in group}


def _check_members(model: nn.Module, groups: Sequence[Group]) -> None:
    """Raise ``ValueError`` unless every group member is a parameter of its own: not a
    tied weight (masking one layer's slices would mask the other layer's weight too, and
    compaction would cut it for one layer only; its second name is not in
    ``named_parameters()``), nor a tensor a hook computes from other parameters (a
    ``torch.nn.utils.prune`` mask, a parametrization)."""
    tied = _shared_parameters(model)
    params = dict(model.named_parameters())
    for g in groups:
        for name, *_ in g.members:
            if name in tied:
                raise ValueError(
                    f"{' and '.join(tied[name])} are one shared (tied) parameter, and "
                    f"{name} is a member of the dependency group of {', '.join(g.producers)}: "
                    "pruning its slices for one layer would prune them for the other too, "
                    "and compaction would cut it for one layer and not the other; untie the "
                    "weights (e.g. copy.deepcopy the parameter) before pruning groups or "
                    "compacting"
                )
            if name not in params:
                raise ValueError(
                    f"{name} is not a parameter of {type(model).__name__} (a "
                    "torch.nn.utils.prune hook or a parametrization computes it): make "
                    "those permanent (prune.remove, parametrize.remove_parametrizations) "
                    "before pruning groups or compacting"
                )


def _member_slice(t: Tensor, member: tuple[str, str, int, tuple[int, ...], Any]) -> Tensor:
    _, _, dim, idx, rows = member
    if rows is not None:
        t = t.narrow(1 - dim, rows[0], rows[1] - rows[0])
    return t.index_select(dim, torch.tensor(idx, device=t.device))


def _patterns(exclude: Any) -> tuple[str, ...]:
    """``exclude`` as a tuple of patterns (one str is one pattern)."""
    if isinstance(exclude, str):
        return (exclude,)
    if not isinstance(exclude, Iterable) or isinstance(exclude, Mapping):
        raise TypeError(f"exclude={exclude!r} must be a name, a glob or a list of them")
    return tuple(exclude)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _like_model(inputs: tuple[Tensor, ...], model: nn.Module) -> tuple[Tensor, ...]:
    """``inputs`` on the model's device, floating-point tensors in its floating-point dtype
    (a trainer may have converted the model, e.g. to bfloat16); integer tensors (token ids)
    keep theirs. New tensors: the caller's are not changed."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = next((p.dtype for p in params if p.is_floating_point()), None)
    return tuple(
        t.to(device=device, dtype=dtype)
        if dtype is not None and t.is_floating_point()
        else t.to(device)
        for t in inputs
    )


GROUP_OPTIONS = ("reduce", "blocks_only")
#: what a training-loop callback prunes: weights (a Pruner) or dependency groups
STRUCTURES = ("weights", "groups")


def check_group_arguments(
    structure: str,
    example_input: Any,
    *,
    method: str = "magnitude",
    targets: Any = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Raise unless a training-loop callback's ``structure`` is one of :data:`STRUCTURES`
    and its arguments fit it (checked when the callback is made, before any training):
    ``example_input`` only with ``"groups"``, and there None or a tensor / tuple of
    tensors, the default ``method``, no ``targets`` (``exclude=`` leaves groups dense) and
    only :class:`GroupPruner` options (``reduce``, ``blocks_only``).

    >>> check_group_arguments("groups", torch.zeros(1, 4), options={"reduce": "sum"})
    >>> check_group_arguments("groups", None, method="wanda")
    Traceback (most recent call last):
    ...
    ValueError: structure='groups' ranks whole groups by their members' L2 norms; method='wanda' does not apply (leave the default)
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r} must be one of {STRUCTURES}")
    if structure == "weights":
        if example_input is not None:
            raise ValueError("example_input= is only used with structure='groups'")
        return
    if example_input is not None and not (
        isinstance(example_input, Tensor)
        or (
            isinstance(example_input, tuple)
            and example_input
            and all(isinstance(t, Tensor) for t in example_input)
        )
    ):
        raise TypeError(
            f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}"
        )
    if method != "magnitude":
        raise ValueError(
            f"structure='groups' ranks whole groups by their members' L2 norms; method={method!r} "
            "does not apply (leave the default)"
        )
    if targets is not None:
        raise ValueError(
            f"structure='groups' prunes every dependency group the trace finds; {targets=!r} "
            "is not supported with it (leave groups dense with exclude=)"
        )
    unknown = sorted(set(options or {}) - set(GROUP_OPTIONS))
    if unknown:
        raise ValueError(
            f"options {unknown} are not options of structure='groups' (valid: {list(GROUP_OPTIONS)})"
        )


class DependencyGraph:
    """The dependency groups of ``model``, traced with ``torch.fx`` on ``example_input``.

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> graph = DependencyGraph(model, torch.zeros(1, 4))
    >>> len(graph.groups), [m[:3] for m in graph.groups[0].members]
    (3, [('0.weight', 'out', 0), ('0.bias', 'aux', 0), ('2.weight', 'in', 1)])
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor | tuple[Tensor, ...],
        *,
        blocks_only: bool = False,
        tracer: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if tracer not in TRACERS:
            raise ValueError(f"tracer={tracer!r} must be one of {TRACERS}")
        inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError(
                f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}"
            )
        if not isinstance(blocks_only, bool):
            raise TypeError(f"blocks_only={blocks_only!r} must be a bool")
        inputs = _like_model(inputs, model)
        self.model = model
        self.example_input = inputs
        self.blocks_only = blocks_only
        self._parent: list[int] = []
        self._elements: list[_Element] = []
        self.tracks: dict[str, _Track | None] = {}
        #: per module: the tracks it reads and writes, for compaction
        self.module_io: dict[str, dict[str, Any]] = {}
        #: attention nodes (they return a tuple): the track of their output, element 0
        self._attention_outputs: dict[str, _Track] = {}
        self._called: set[str] = set()
        self._modules = dict(model.named_modules())
        self._params = dict(model.named_parameters())
        self.gm: fx.GraphModule | None = None
        #: how the graph was made: "torch.fx", "torch.export" or None (blocks_only)
        self.traced_by: str | None = None
        if blocks_only:
            self._blocks(model)
            self.groups = self._build_groups()
            _check_members(model, self.groups)
            return
        self.gm, self.traced_by, inputs = _trace(model, inputs, tracer)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(*inputs)
        except RuntimeError as e:  # ShapeProp wraps what the model raised
            given = ", ".join(
                f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                for t in inputs
            )
            raise ValueError(
                f"example_input ({given}) does not run through {type(model).__name__}: "
                f"{_first_line(e.__cause__ or e)}"
            ) from e
        finally:
            model.train(was_training)
        for node in self.gm.graph.nodes:
            self.tracks[node.name] = self._visit(node)
        self._pin_direct_reads()
        self.groups = self._build_groups()
        _check_members(model, self.groups)

    # ------------------------------------------------------------ union-find
    def _new(self, n: int, *, pinned: bool = False) -> list[int]:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self._elements.extend(_Element(pinned=pinned) for _ in range(n))
        return list(range(start, start + n))

    def find(self, e: int) -> int:
        while self._parent[e] != e:
            self._parent[e] = self._parent[self._parent[e]]
            e = self._parent[e]
        return e

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra
            ea, eb = self._elements[ra], self._elements[rb]
            ea.members += eb.members
            ea.producers |= eb.producers
            ea.pinned |= eb.pinned

    def _pin(self, ids: Sequence[int]) -> None:
        for e in ids:
            self._elements[self.find(e)].pinned = True

    def _member(self, e: int, name: str, kind: str, dim: int, idx: int, rows: Any = None) -> None:
        el = self._elements[self.find(e)]
        el.members.append((name, kind, dim, idx, rows))
        if kind == "out":
            el.producers.add(name.rsplit(".", 1)[0])

    def pinned(self, e: int) -> bool:
        return self._elements[self.find(e)].pinned

    # ------------------------------------------------------------ the trace
    def _refuse(self, node: fx.Node, why: str) -> UnsupportedModelError:
        what = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__name__", repr(node.target))
        )
        return UnsupportedModelError(
            f"cannot follow channels through node {node.name!r} ({node.op} {what}): {why}; "
            "prunekit refuses rather than build a wrong model (blocks_only=True prunes only "
            "inside self-contained attention and MLP blocks, without following the graph)"
        )

    def _track(self, arg: Any) -> _Track | None:
        return self.tracks.get(arg.name) if isinstance(arg, fx.Node) else None

    def _visit(self, node: fx.Node) -> _Track | None:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self._pin_all(node.args)
            return None
        tracked = [t for a in node.all_input_nodes if (t := self._track(a)) is not None]
        if node.op == "call_module":
            return self._visit_module(node, self._modules[node.target], tracked)
        if node.op == "call_function" and node.target is operator.getitem:
            return self._visit_getitem(node)
        if not tracked:
            return None  # nothing tracked flows in: whatever this is, channels are unaffected
        if node.op == "call_function":
            return self._visit_function(node)
        if node.op == "call_method":
            return self._visit_method(node)
        raise self._refuse(node, "unknown node kind")

    def _pin_direct_reads(self) -> None:
        """Pin every channel of a layer whose parameter or buffer the model reads outside
        that layer's forward (an fx ``get_attr``, e.g. ``x @ self.fc.weight.t()``): the
        trace does not follow such a read, and removing the layer's channels would change
        what it reads (a shape of an output, a value)."""
        if self.gm is None:
            return
        reads = [n.target for n in self.gm.graph.nodes if n.op == "get_attr" and n.users]
        for name, io in self.module_io.items():
            if name.startswith("node:") or not any(r.startswith(f"{name}.") for r in reads):
                continue
            for key in ("in", "out", "ids", "heads", "q", "k", "v"):
                if io.get(key) is not None:
                    self._pin(io[key])

    def _pin_all(self, arg: Any) -> None:
        if isinstance(arg, fx.Node):
            t = self._track(arg)
            if t is not None:
                self._pin(t.ids)
        elif isinstance(arg, list | tuple):
            for a in arg:
                self._pin_all(a)
        elif isinstance(arg, dict):
            for a in arg.values():
                self._pin_all(a)

    def _visit_module(self, node: fx.Node, mod: nn.Module, tracked: list[_Track]) -> _Track | None:
        name = node.target
        x = node.args[0] if node.args else None
        tx = self._track(x)
        shape = _shape(x)
        if name in self.module_io and self.module_io[name]["kind"] != "attention":
            return self._again(node, self.module_io[name], tx)
        if name in self._called and any(True for _ in mod.parameters()):
            raise self._refuse(node, f"{type(mod).__name__} {name!r} is called more than once")
        self._called.add(name)
        if isinstance(mod, nn.Linear):
            if tx is not None and tx.dim != len(shape) - 1:
                raise self._refuse(node, "a Linear reads the last dim but channels are on another")
            return self._producer(node, name, mod, tx, 1, out_dim=len(_shape(node)) - 1)
        if isinstance(mod, _CONV):
            spatial = mod.weight.dim() - 2
            if tx is not None and tx.dim != len(shape) - spatial - 1:
                raise self._refuse(node, "a convolution's input channels are not the tracked dim")
            cdim = len(_shape(node)) - spatial - 1
            if mod.groups == 1:
                return self._producer(node, name, mod, tx, 1, out_dim=cdim)
            if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: channel j -> j
                ids = tx.ids if tx is not None else self._new(mod.out_channels, pinned=True)
                for c, e in enumerate(ids):
                    self._member(e, f"{name}.weight", "out", 0, c)
                    if mod.bias is not None:
                        self._member(e, f"{name}.bias", "aux", 0, c)
                self.module_io[name] = {"kind": "depthwise", "ids": list(ids)}
                return _Track(cdim, list(ids))
            if tx is not None:  # grouped convolution: its channels stay as they are
                self._pin(tx.ids)
            ids = self._new(mod.out_channels, pinned=True)
            return _Track(cdim, ids)
        if isinstance(mod, _BATCHNORM):
            if tx is None:
                return None
            if tx.dim != 1:
                raise self._refuse(node, "BatchNorm normalises dim 1 but channels are on another")
            for c, e in enumerate(tx.ids):
                for pname in ("weight", "bias"):
                    if getattr(mod, pname) is not None:
                        self._member(e, f"{name}.{pname}", "aux", 0, c)
            self.module_io[name] = {"kind": "batchnorm", "ids": list(tx.ids)}
            return _Track(tx.dim, list(tx.ids))
        if isinstance(mod, _UNARY_MODULES):
            return tx
        if type(mod) in _POOL_MODULES:
            if tx is not None and tx.dim >= len(shape) - _POOL_MODULES[type(mod)]:
                raise self._refuse(node, "pooling over the channel dim")
            return tx
        if isinstance(mod, nn.Flatten):
            return self._flatten(node, tx, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.Softmax | nn.LogSoftmax):
            return self._softmax(node, tx, mod.dim)
        if isinstance(mod, _CHANNEL_MIXING_MODULES):
            if tx is not None:
                self._pin(tx.ids)  # normalising over channels mixes them: keep them all
            return tx
        if isinstance(mod, nn.MultiheadAttention):
            return self._attention(node, name, mod)
        if isinstance(mod, nn.TransformerEncoderLayer | nn.TransformerEncoder):
            layers = mod.layers if isinstance(mod, nn.TransformerEncoder) else [mod]
            prefix = f"{name}.layers." if isinstance(mod, nn.TransformerEncoder) else f"{name}."
            if tx is not None:
                self._pin(tx.ids)  # the residual stream runs through LayerNorm
            for i, layer in enumerate(layers):
                lname = f"{prefix}{i}" if isinstance(mod, nn.TransformerEncoder) else name
                self._encoder_layer(lname, layer)
            if tx is None:
                return None
            return _Track(tx.dim, self._new(len(tx.ids), pinned=True))
        if not tracked:
            return None
        raise self._refuse(node, f"module type {type(mod).__name__} is not supported on channels")

    def _again(self, node: fx.Node, io: dict[str, Any], tx: _Track | None) -> _Track | None:
        """A layer called again: the same weights, so the same output elements, and its
        inputs in both calls go (or stay) together."""
        before = io["in"] if io["kind"] == "layer" else io["ids"]
        if before is not None and tx is not None:
            for a, b in zip(before, tx.ids, strict=True):
                self._union(a, b)
        elif before is not None or tx is not None:  # one call reads untracked channels
            self._pin(before if before is not None else tx.ids)
        if io["kind"] == "layer":
            return _Track(len(_shape(node)) - io["out_from_end"], io["out"])
        return None if tx is None else _Track(tx.dim, io["ids"])

    def _producer(
        self, node: fx.Node, name: str, mod: nn.Module, tx: _Track | None, in_dim: int, out_dim: int
    ) -> _Track:
        w = mod.weight
        if tx is not None:
            for j, e in enumerate(tx.ids):
                self._member(e, f"{name}.weight", "in", in_dim, j)
        ids = self._new(w.shape[0])
        for c, e in enumerate(ids):
            self._member(e, f"{name}.weight", "out", 0, c)
            if getattr(mod, "bias", None) is not None:
                self._member(e, f"{name}.bias", "aux", 0, c)
        self.module_io[name] = {
            "kind": "layer",
            "in": None if tx is None else list(tx.ids),
            "out": list(ids),
            "out_from_end": len(_shape(node)) - out_dim,  # the same for every call
        }
        return _Track(out_dim, ids)

    def _attention(self, node: fx.Node, name: str, mod: nn.MultiheadAttention) -> _Track | None:
        if mod.bias_k is not None or mod.add_zero_attn:
            raise self._refuse(node, "MultiheadAttention with add_bias_kv/add_zero_attn")
        qkv = list(node.args[:3]) + [None] * (3 - len(node.args[:3]))
        for i, key in enumerate(("query", "key", "value")):
            if key in node.kwargs:
                qkv[i] = node.kwargs[key]
        io: dict[str, Any] = {"kind": "attention"}
        for role, arg in zip("qkv", qkv, strict=True):
            t = self._track(arg)
            ndim = len(_shape(arg)) if _shape(arg) is not None else 3
            if t is not None and t.dim != ndim - 1:
                raise self._refuse(node, "attention inputs must carry channels on the last dim")
            pname, rows = self._attention_proj(name, mod, role)
            io[role] = None if t is None else list(t.ids)
            for j, e in enumerate(t.ids if t is not None else []):
                self._member(e, pname, "in", 1, j, rows)
        io["heads"] = self._heads(name, mod)
        out = self._new(mod.embed_dim)
        for c, e in enumerate(out):
            self._member(e, f"{name}.out_proj.weight", "out", 0, c)
            if mod.out_proj.bias is not None:
                self._member(e, f"{name}.out_proj.bias", "aux", 0, c)
        io["out"] = out
        self.module_io[name] = io
        self._attention_outputs[node.name] = _Track(len(_shape(qkv[0]) or (0, 0, 0)) - 1, out)
        return None  # the tuple; getitem 0 picks the track

    @staticmethod
    def _attention_proj(name: str, mod: nn.MultiheadAttention, role: str) -> tuple[str, Any]:
        e = mod.embed_dim
        if mod._qkv_same_embed_dim:
            i = "qkv".index(role)
            return f"{name}.in_proj_weight", (i * e, (i + 1) * e)
        return f"{name}.{role}_proj_weight", None

    def _heads(self, name: str, mod: nn.MultiheadAttention) -> list[int]:
        heads = self._new(mod.num_heads)
        hd, e = mod.head_dim, mod.embed_dim
        for h, el in enumerate(heads):
            for i, role in enumerate("qkv"):
                pname, _ = self._attention_proj(name, mod, role)
                for r in range(h * hd, (h + 1) * hd):
                    off = i * e if mod._qkv_same_embed_dim else 0
                    self._member(el, pname, "out", 0, off + r)
                    if mod.in_proj_bias is not None:
                        self._member(el, f"{name}.in_proj_bias", "aux", 0, i * e + r)
                    if i == 0:
                        self._member(el, f"{name}.out_proj.weight", "in", 1, r)
            self._elements[el].producers = {f"{name}.heads"}
        return heads

    def _encoder_layer(self, name: str, layer: nn.TransformerEncoderLayer) -> None:
        self._attention_heads(f"{name}.self_attn", layer.self_attn)
        self._mlp(f"{name}.linear1", layer.linear1, f"{name}.linear2")

    def _attention_heads(self, name: str, attn: nn.MultiheadAttention) -> None:
        """The heads of an attention whose inputs and outputs all stay."""
        if attn.bias_k is not None or attn.add_zero_attn:
            raise UnsupportedModelError(
                f"{name}: MultiheadAttention with add_bias_kv/add_zero_attn"
            )
        heads = self._heads(name, attn)
        self.module_io[name] = {"kind": "attention", "q": None, "k": None,
                                "v": None, "heads": heads, "out": None}  # fmt: skip

    def _mlp(self, first: str, layer: nn.Linear, second: str) -> None:
        """The intermediate features of ``first`` (a Linear) read only by ``second``."""
        ffn = self._new(layer.out_features)
        for c, e in enumerate(ffn):
            self._member(e, f"{first}.weight", "out", 0, c)
            if layer.bias is not None:
                self._member(e, f"{first}.bias", "aux", 0, c)
            self._member(e, f"{second}.weight", "in", 1, c)
        self.module_io[first] = {"kind": "layer", "in": None, "out": ffn}
        self.module_io[second] = {"kind": "layer", "in": ffn, "out": None}

    def _hf_attention(self, name: str, mod: nn.Module) -> None:
        """Heads of a Hugging Face BERT-style attention: ``self.query/key/value`` rows of
        each head and the matching inputs of ``output.dense``."""
        sa = mod.self
        hd, n = sa.attention_head_size, sa.num_attention_heads
        heads = self._new(n)
        for h, el in enumerate(heads):
            for r in range(h * hd, (h + 1) * hd):
                for proj in ("query", "key", "value"):
                    self._member(el, f"{name}.self.{proj}.weight", "out", 0, r)
                    if getattr(sa, proj).bias is not None:
                        self._member(el, f"{name}.self.{proj}.bias", "aux", 0, r)
                self._member(el, f"{name}.output.dense.weight", "in", 1, r)
            self._elements[el].producers = {f"{name}.heads"}
        self.module_io[name] = {"kind": "hf_attention", "heads": heads, "head_dim": hd}

    def _blocks(self, model: nn.Module) -> None:
        """Groups that stay inside self-contained blocks: whatever the code around them
        does, it never sees these channels (attention heads, MLP intermediates)."""
        inside: set[str] = set()
        for name, mod in model.named_modules():
            if any(name.startswith(f"{p}.") for p in inside):
                continue
            kind = type(mod).__name__
            if isinstance(mod, nn.TransformerEncoderLayer):
                self._encoder_layer(name, mod)
            elif isinstance(mod, nn.MultiheadAttention):
                self._attention_heads(name, mod)
            elif kind in _HF_ATTENTION and not getattr(mod.self, "is_decoder", False):
                self._hf_attention(name, mod)
                continue  # its dense layers are not a BertLayer's intermediate
            elif kind in _HF_LAYER:
                self._mlp(
                    f"{name}.intermediate.dense", mod.intermediate.dense, f"{name}.output.dense"
                )
                continue  # still look inside for the attention
            else:
                continue
            inside.add(name)
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        for el in self._elements:
            for pname, *_ in el.members:
                if uses[id(self._params[pname])] > 1:
                    raise UnsupportedModelError(
                        f"{pname} is shared with another layer (tied weights): blocks_only=True "
                        "cannot tell where else it is used"
                    )

    def _visit_getitem(self, node: fx.Node) -> _Track | None:
        src, index = node.args
        outs = self._attention_outputs
        if isinstance(src, fx.Node) and src.name in outs:
            return outs[src.name] if index == 0 else None
        t = self._track(src)
        if t is None:
            return None
        shape = _shape(src)
        if shape is None:
            raise self._refuse(node, "indexing a tracked value of unknown shape")
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node | Tensor | list) for i in index):
            raise self._refuse(node, "advanced indexing of tracked channels")
        if sum(i is Ellipsis for i in index) > 1:
            raise self._refuse(node, "indexing with several ellipses")
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in index:
            if i is Ellipsis:
                expanded += [slice(None)] * (len(shape) - consumed)
            else:
                expanded.append(i)
        expanded += [slice(None)] * (len(shape) - sum(1 for i in expanded if i is not None))
        src_dim, out_dim = 0, 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if src_dim == t.dim:
                if i != slice(None):
                    raise self._refuse(node, "indexing into the channel dim")
                return _Track(out_dim, t.ids)
            src_dim += 1
            if not isinstance(i, int):
                out_dim += 1
        raise self._refuse(node, "indexing that drops the channel dim")

    def _args(self, node: fx.Node, names: Sequence[str], defaults: Sequence[Any]) -> list[Any]:
        vals = list(node.args) + list(defaults[len(node.args) :])
        for i, n in enumerate(names):
            if n in node.kwargs:
                vals[i] = node.kwargs[n]
        return vals

    def _visit_function(self, node: fx.Node) -> _Track | None:
        f = node.target
        x = node.args[0] if node.args else node.kwargs.get("input")
        tx = self._track(x)
        if f in _UNARY_FUNCTIONS:
            return tx
        if f in _POOL_FUNCTIONS:
            if tx is not None and tx.dim >= len(_shape(x)) - _POOL_FUNCTIONS[f]:
                raise self._refuse(node, "pooling over the channel dim")
            return tx
        if f in _BINARY_FUNCTIONS:
            return self._elementwise(node, [*node.args[:2], node.kwargs.get("other")])
        if f is torch.flatten:
            _, start, end = self._args(node, ("input", "start_dim", "end_dim"), (None, 0, -1))
            return self._flatten(node, tx, start, end)
        if f is torch.reshape:
            return self._reshape(node, tx)
        if f is torch.cat or f is torch.concat:
            tensors, dim = self._args(node, ("tensors", "dim"), (None, 0))
            return self._cat(node, tensors, dim)
        if f is F.pad:
            x, pad, mode, value = self._args(
                node, ("input", "pad", "mode", "value"), (None, None, "constant", None)
            )
            return self._pad(node, tx, pad, mode, value)
        if f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            _, dim = self._args(node, ("input", "dim"), (None, None))
            return self._softmax(node, tx, dim)
        if f in (torch.mean, torch.sum, torch.amax, torch.amin):
            _, dim, keepdim = self._args(node, ("input", "dim", "keepdim"), (None, None, False))
            return self._reduce(node, tx, dim, keepdim)
        if f in (torch.transpose, torch.permute):
            return self._permute(node, tx)
        if f is getattr:
            return None  # x.shape and friends: metadata, not channels
        raise self._refuse(node, "this function is not supported on tracked channels")

    def _visit_method(self, node: fx.Node) -> _Track | None:
        m = node.target
        tx = self._track(node.args[0])
        if m in _META_METHODS:
            return None
        if m in _UNARY_METHODS:
            return tx
        if m in _BINARY_METHODS:
            return self._elementwise(node, [*node.args[:2], node.kwargs.get("other")])
        if m == "flatten":
            _, start, end = self._args(node, ("self", "start_dim", "end_dim"), (None, 0, -1))
            return self._flatten(node, tx, start, end)
        if m in ("view", "reshape"):
            return self._reshape(node, tx)
        if m in ("softmax", "log_softmax"):
            _, dim = self._args(node, ("self", "dim"), (None, None))
            return self._softmax(node, tx, dim)
        if m in ("mean", "sum", "amax", "amin"):
            _, dim, keepdim = self._args(node, ("self", "dim", "keepdim"), (None, None, False))
            return self._reduce(node, tx, dim, keepdim)
        if m in ("transpose", "permute"):
            return self._permute(node, tx)
        raise self._refuse(node, "this method is not supported on tracked channels")

    # ------------------------------------------------------------ op rules
    def _elementwise(self, node: fx.Node, operands: list[Any]) -> _Track | None:
        out_shape = _shape(node)
        if out_shape is None:
            raise self._refuse(node, "elementwise result of unknown shape")
        nd = len(out_shape)
        dims = {nd - len(_shape(a)) + t.dim for a in operands if (t := self._track(a)) is not None}
        if len(dims) != 1:
            raise self._refuse(node, "operands carry channels on different dims")
        cdim = dims.pop()
        ids: list[int] | None = None
        pin = False
        for a in operands:
            t, shape = self._track(a), _shape(a)
            if t is not None:
                if len(t.ids) != out_shape[cdim]:  # one channel broadcast over many
                    self._pin(t.ids)
                elif ids is None:
                    ids = list(t.ids)
                else:
                    for e1, e2 in zip(ids, t.ids, strict=True):
                        self._union(e1, e2)
            elif shape is not None:  # an untracked tensor varying along the channels
                k = cdim - (nd - len(shape))
                pin |= k >= 0 and shape[k] != 1
        if ids is None:
            ids = self._new(out_shape[cdim], pinned=True)
        if pin:
            self._pin(ids)
        return _Track(cdim, ids)

    def _flatten(self, node: fx.Node, tx: _Track | None, start: int, end: int) -> _Track | None:
        if tx is None:
            return None
        shape = _shape(node.args[0])
        start, end = _norm_dim(start, len(shape)), _norm_dim(end, len(shape))
        if tx.dim < start:
            return tx
        if tx.dim > end:
            return _Track(tx.dim - (end - start), tx.ids)
        return _Track(start, self._merged_ids(tx, shape, start, end))

    @staticmethod
    def _merged_ids(tx: _Track, shape: tuple[int, ...], start: int, end: int) -> list[int]:
        view = [1] * (end - start + 1)
        view[tx.dim - start] = -1
        grid = torch.tensor(tx.ids).view(view).expand(*shape[start : end + 1])
        return grid.reshape(-1).tolist()

    def _reshape(self, node: fx.Node, tx: _Track | None) -> _Track | None:
        if tx is None:
            return None
        src, out = _shape(node.args[0]), _shape(node)
        if src is None or out is None:
            raise self._refuse(node, "reshape of unknown shape")
        lead = 0
        while lead < min(len(src), len(out)) and src[lead] == out[lead]:
            lead += 1
        trail = 0
        while (
            trail < min(len(src), len(out)) - lead
            and src[len(src) - 1 - trail] == out[len(out) - 1 - trail]
        ):
            trail += 1
        if tx.dim < lead:
            track = _Track(tx.dim, tx.ids)
        elif tx.dim >= len(src) - trail:
            track = _Track(tx.dim - len(src) + len(out), tx.ids)
        elif len(out) - lead - trail == 1:
            track = _Track(lead, self._merged_ids(tx, src, lead, len(src) - trail - 1))
        else:
            raise self._refuse(node, "a reshape that splits or reorders the channel dim")
        self.module_io[f"node:{node.name}"] = {
            "kind": "reshape",
            "dim": track.dim,
            "ids": track.ids,
        }
        return track

    def _cat(self, node: fx.Node, tensors: Sequence[Any], dim: int) -> _Track:
        nd = len(_shape(node))
        dim = _norm_dim(dim, nd)
        tracks = [self._track(t) for t in tensors]
        cdims = {t.dim for t in tracks if t is not None}
        if len(cdims) != 1:
            raise self._refuse(node, "concatenated tensors carry channels on different dims")
        cdim = cdims.pop()
        if dim == cdim:
            ids: list[int] = []
            for t, a in zip(tracks, tensors, strict=True):
                ids += t.ids if t is not None else self._new(_shape(a)[cdim], pinned=True)
            return _Track(cdim, ids)
        return self._elementwise(node, list(tensors))

    def _pad(
        self, node: fx.Node, tx: _Track | None, pad: Sequence[int], mode: str, value: Any
    ) -> _Track | None:
        if tx is None:
            return None
        nd = len(_shape(node))
        k = nd - 1 - tx.dim
        if 2 * k >= len(pad):
            return tx
        if any(isinstance(p, fx.Node) for p in pad[2 * k : 2 * k + 2]):
            raise self._refuse(node, "padding of the channel dim by a computed amount")
        lo, hi = pad[2 * k], pad[2 * k + 1]
        if mode != "constant" or lo < 0 or hi < 0:
            raise self._refuse(node, f"padding the channel dim with mode={mode!r} or cropping")
        zero = value in (None, 0, 0.0)
        left, right = self._new(lo, pinned=not zero), self._new(hi, pinned=not zero)
        ids = left + tx.ids + right
        self.module_io[f"node:{node.name}"] = {
            "kind": "pad", "index": 2 * k, "left": left, "right": right,
        }  # fmt: skip
        return _Track(tx.dim, ids)

    def _softmax(self, node: fx.Node, tx: _Track | None, dim: Any) -> _Track | None:
        if tx is None:
            return None
        if dim is None or _norm_dim(dim, len(_shape(node))) == tx.dim:
            self._pin(tx.ids)
        return tx

    def _reduce(self, node: fx.Node, tx: _Track | None, dim: Any, keepdim: bool) -> _Track | None:
        if tx is None:
            return None
        nd = len(_shape(node.args[0]))
        dims = range(nd) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        dims = sorted(_norm_dim(d, nd) for d in dims)
        if tx.dim in dims:
            self._pin(tx.ids)  # summing channels together: none can go
            return None
        return _Track(tx.dim - (0 if keepdim else sum(d < tx.dim for d in dims)), tx.ids)

    def _permute(self, node: fx.Node, tx: _Track | None) -> _Track | None:
        if tx is None:
            return None
        nd = len(_shape(node.args[0]))
        rest = list(node.args[1:])
        if node.target in ("transpose", torch.transpose):
            d0, d1 = (_norm_dim(d, nd) for d in rest[:2])
            new = d1 if tx.dim == d0 else d0 if tx.dim == d1 else tx.dim
            return _Track(new, tx.ids)
        order = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest
        order = [_norm_dim(d, nd) for d in order]
        return _Track(order.index(tx.dim), tx.ids)

    # ------------------------------------------------------------ groups
    def _build_groups(self) -> tuple[Group, ...]:
        roots: dict[int, list[int]] = {}
        for e in range(len(self._parent)):
            roots.setdefault(self.find(e), []).append(e)
        candidates = []
        for root in roots:
            el = self._elements[root]
            if el.pinned or not any(m[1] == "out" for m in el.members):
                continue
            candidates.append(root)
        # layers: groups made by the same producers are ranked together. (Not the whole
        # set of coupled layers: in a ResNet whose shortcuts zero-pad, the stem's channels,
        # those stage 2 adds and those stage 3 adds are coupled, but an amount of each
        # keeps every stage at the same fraction of its width, as a thinner network would.)
        order = {n: i for i, n in enumerate(self._modules)}
        layer_of: dict[frozenset[str], str] = {}
        for root in sorted(candidates):
            prods = frozenset(self._elements[root].producers)
            if prods not in layer_of:
                first = min(prods, key=lambda n: (order.get(n.removesuffix(".heads"), 0), n))
                name, k = first, 1
                while name in layer_of.values():
                    k += 1
                    name = f"{first}#{k}"
                layer_of[prods] = name
        groups = []
        self.group_of_root: dict[int, int] = {}
        for root in sorted(candidates):
            el = self._elements[root]
            merged: dict[tuple[str, str, int, Any], list[int]] = {}
            for name, kind, dim, idx, rows in el.members:
                merged.setdefault((name, kind, dim, rows), []).append(idx)
            members = tuple(
                (name, kind, dim, tuple(sorted(set(idx))), rows)
                for (name, kind, dim, rows), idx in merged.items()
            )
            self.group_of_root[root] = len(groups)
            groups.append(
                Group(members, tuple(sorted(el.producers)), layer_of[frozenset(el.producers)])
            )
        return tuple(groups)

    # ------------------------------------------------------------ ranking and masks
    @property
    def param_names(self) -> list[str]:
        """Every parameter some group has a member in (the targets a Pruner needs)."""
        names = {m[0] for g in self.groups for m in g.members}
        return [n for n in self._params if n in names]

    def scores(self, reduce: str = "normalized", *, alive: Sequence[bool] | None = None) -> Tensor:
        """Each group's importance, in ``groups`` order, from the squared L2 norms of its
        members' slices:

        - ``"sum"``: their sum (the group's L2 norm squared);
        - ``"mean"``: that sum divided by the number of entries;
        - ``"normalized"`` (default): each member's norm divided by the average over all
          groups of the same parameter slice kind, then averaged over the members. Layers
          of different scale and groups coupling different numbers of layers (a residual
          stream's channels, zero-padded shortcut channels) then compare fairly. With
          ``alive`` (one bool per group), the averages are taken over the alive groups
          only, so groups pruned earlier (norm 0) do not shift them.

        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        ...     _ = model[1].weight.copy_(torch.tensor([[3.0, 1.0]]))
        >>> graph = DependencyGraph(model, torch.zeros(1, 2))
        >>> graph.scores("sum").tolist(), graph.scores("mean").tolist()
        ([14.0, 2.0], [4.666666666666667, 0.6666666666666666])
        >>> [round(v, 4) for v in graph.scores().tolist()]  # ((5/3 + 9/5) / 2, (1/3 + 1/5) / 2)
        [1.7333, 0.2667]
        """
        if reduce not in ("normalized", "mean", "sum"):
            raise ValueError(f"reduce={reduce!r} must be 'normalized', 'mean' or 'sum'")
        params = self._current_params()
        norms = [
            [(m[:3] + m[4:], float(t.double().pow(2).sum()), t.numel()) for m, (_, t) in
             zip(g.members, g.slices(params), strict=True)]
            for g in self.groups
        ]  # fmt: skip
        if reduce == "sum":
            return torch.tensor([sum(n for _, n, _ in g) for g in norms], dtype=torch.float64)
        if reduce == "mean":
            return torch.tensor(
                [sum(n for _, n, _ in g) / sum(c for _, _, c in g) for g in norms],
                dtype=torch.float64,
            )
        if alive is not None and len(alive) != len(norms):
            raise ValueError(f"alive has {len(alive)} entries for {len(norms)} groups")
        totals: dict[Any, list[float]] = {}
        for i, g in enumerate(norms):
            if alive is not None and not alive[i]:
                continue
            for key, n, _ in g:
                totals.setdefault(key, []).append(n)
        means = {k: sum(v) / len(v) for k, v in totals.items()}
        return torch.tensor(
            [
                sum(n / means[k] if means.get(k, 0.0) > 0 else 0.0 for k, n, _ in g) / len(g)
                for g in norms
            ],
            dtype=torch.float64,
        )

    def pruned(self, masks: Mapping[str, Tensor]) -> list[bool]:
        """Which groups ``masks`` prunes: every producing (``"out"``) slice is masked, or
        zero where its weight has no mask, and at least one is masked.

        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> graph = DependencyGraph(model, torch.zeros(1, 2))
        >>> graph.pruned({"0.weight": torch.tensor([[True, True], [False, False], [True, False]])})
        [False, True, False]
        """
        self._check_masks(masks)
        params = self._current_params()
        out = []
        for g in self.groups:
            masked_any, dead = False, True
            for member, (name, t) in zip(g.members, g.slices(params), strict=True):
                if member[1] != "out":
                    continue
                if name in masks:
                    gone = not bool(_member_slice(masks[name], member).any())
                    masked_any |= gone
                    dead &= gone
                else:
                    dead &= not bool(t.any())
            out.append(dead and masked_any)
        return out

    def _current_params(self) -> dict[str, Tensor]:
        """The parameters, detached; raises if the model changed since the trace."""
        now = dict(self.model.named_parameters())
        for name in [*self._params, *(n for n in now if n not in self._params)]:
            if now.get(name) is not self._params.get(name):
                what = (
                    "added"
                    if name not in self._params
                    else "removed"
                    if name not in now
                    else "replaced"
                )
                raise ValueError(
                    f"parameter {name!r} of {type(self.model).__name__} was {what} after this "
                    "DependencyGraph was built: build a new one for the changed model"
                )
        return {n: p.detach() for n, p in now.items()}

    def _check_masks(self, masks: Mapping[str, Tensor]) -> None:
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"masks must be a mapping of parameter names to bool tensors, got {type(masks).__name__}"
            )
        for name, m in masks.items():
            if name not in self._params:
                raise ValueError(
                    f"masks names {name!r}, not a parameter of {type(self.model).__name__}"
                )
            if (
                not isinstance(m, Tensor)
                or m.dtype != torch.bool
                or m.shape != self._params[name].shape
            ):
                raise ValueError(
                    f"masks[{name!r}] must be a bool tensor of shape {tuple(self._params[name].shape)}"
                )

    def masks_for(self, pruned: Sequence[bool]) -> dict[str, Tensor]:
        """Bool masks (True = kept) over every member parameter, False on the members
        of each pruned group.

        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> masks = DependencyGraph(model, torch.zeros(1, 2)).masks_for([False, True, False])
        >>> masks["0.weight"][1].tolist(), masks["0.bias"].tolist(), masks["2.weight"].tolist()
        ([False, False], [True, False, True], [[True, False, True]])
        """
        self._current_params()
        masks = {n: torch.ones_like(self._params[n], dtype=torch.bool) for n in self.param_names}
        for g, gone in zip(self.groups, pruned, strict=True):
            if not gone:
                continue
            for name, _, dim, idx, rows in g.members:
                view = masks[name]
                if rows is not None:
                    view = view.narrow(1 - dim, rows[0], rows[1] - rows[0])
                view.index_fill_(dim, torch.tensor(idx), False)
        return masks

    def excluded(self, exclude: str | Iterable[str]) -> list[bool]:
        """Per group (``groups`` order): True where one of its members' parameters matches
        a name or glob of ``exclude`` (the rule of :class:`prunekit.Pruner`'s ``exclude``:
        ``fnmatch`` on parameter names, tied parameters under any of their names; a module
        name alone matches nothing, write ``"fc1.*"``). An excluded group is never pruned,
        so an excluded parameter is never masked: excluding ``"fc.weight"`` keeps ``fc``
        dense, and with it the channels of the layer feeding it (their removal would remove
        columns of ``fc.weight``). A pattern that matches no parameter raises ``ValueError``
        naming it; one that matches only parameters outside every group (already dense)
        changes nothing.

        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(),
        ...                       nn.Linear(3, 2))
        >>> graph = DependencyGraph(model, torch.zeros(1, 4))
        >>> graph.excluded("0.*"), graph.excluded(["4.weight"])
        ([True, True, True, False, False, False], [False, False, False, True, True, True])
        """
        patterns = _patterns(exclude)
        canonical = parameter_aliases(self.model)
        owner = type(self.model).__name__
        names = {
            canonical[a]
            for p in patterns
            for a in matching_aliases(p, canonical, owner, "exclude entry")
        }
        return [any(m[0] in names for m in g.members) for g in self.groups]

    def _check_excluded(self, excluded: Sequence[bool], exclude: Any) -> None:
        if all(excluded):
            raise ValueError(
                f"exclude={exclude!r} leaves no dependency group to prune: each of the "
                f"{len(self.groups)} groups has a member parameter it matches"
            )

    def group_masks(
        self,
        amount: float | int,
        *,
        scope: str = "layer",
        masks: Mapping[str, Tensor] | None = None,
        reduce: str = "normalized",
        exclude: str | Iterable[str] = (),
    ) -> dict[str, Tensor]:
        """Masks pruning ``amount`` of the groups with the lowest :meth:`scores`
        (``reduce`` is passed on).

        ``scope="layer"`` prunes ``amount`` within each layer (the groups made by the same
        producing layers, see :class:`Group`); ``"global"`` ranks all groups together,
        each score divided by its layer's mean (over the groups not pruned yet) so wide and
        narrow layers compare. Groups already pruned by ``masks`` stay pruned and count
        toward the amount; they are left out of the averages of ``reduce="normalized"``. A
        layer is never emptied: an amount that would remove all of a layer's groups raises
        ``ValueError``.

        ``exclude`` (names or globs of parameters, see :meth:`excluded`): groups with a
        member parameter it matches are never pruned and **do not count**: a fraction is
        of the prunable groups only (of each layer's with ``scope="layer"``, of all
        with ``"global"``), an int counts prunable groups, and a layer with none is left
        out. ``masks`` that prune an excluded group, or an ``exclude`` that leaves no group
        to prune, raise ``ValueError``; everything is checked before any mask is made.

        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> m = DependencyGraph(model, torch.zeros(1, 4)).group_masks(0.5)
        >>> int(m["0.weight"].all(dim=1).sum()), int(m["2.weight"].all(dim=0).sum())
        (2, 2)
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 6), nn.ReLU(),
        ...                       nn.Linear(6, 2))
        >>> m = DependencyGraph(model, torch.zeros(1, 4)).group_masks(0.5, exclude="0.*")
        >>> bool(m["0.weight"].all()), int(m["2.weight"].all(dim=1).sum())  # 3 of 6 kept
        (True, 3)
        """
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
        if reduce not in ("normalized", "mean", "sum"):
            raise ValueError(f"reduce={reduce!r} must be 'normalized', 'mean' or 'sum'")
        excluded = self.excluded(exclude)
        self._check_excluded(excluded, exclude)
        already = self.pruned(masks) if masks is not None else [False] * len(self.groups)
        self._check_not_pruned(already, excluded, "masks")
        pruned = self._select(amount, scope, already, reduce, strict=True, excluded=excluded)
        result = self.masks_for(pruned)
        if masks is not None:
            for n, m in masks.items():
                if n in result:
                    result[n] &= m
        return result

    def _check_not_pruned(
        self, pruned: Sequence[bool], excluded: Sequence[bool], what: str
    ) -> None:
        hit = [i for i, (p, e) in enumerate(zip(pruned, excluded, strict=True)) if p and e]
        if hit:
            g = self.groups[hit[0]]
            raise ValueError(
                f"{what} prune {len(hit)} excluded group(s), e.g. one of layer {g.layer!r} "
                f"with members {[m[0] for m in g.members]}: excluded groups are never pruned"
            )

    def _select(
        self,
        amount: float | int,
        scope: str,
        already: list[bool],
        reduce: str,
        *,
        strict: bool,
        excluded: Sequence[bool] | None = None,
    ) -> list[bool]:
        """Which groups are pruned after pruning ``amount``; ``strict=False``: an amount
        below what ``already`` prunes keeps it (masks only shrink) instead of raising.
        ``excluded`` groups (never pruned by ``already``) neither count nor go."""
        alive = [not a for a in already]
        scores = self.scores(reduce, alive=alive)
        layers: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            if excluded is None or not excluded[i]:
                layers.setdefault(g.layer, []).append(i)
        pruned = list(already)
        if scope == "layer":
            counts = {}
            for layer, idx in layers.items():
                k = amount_to_count(amount, len(idx))
                self._check_count(k, len(idx), layer, amount)
                counts[layer] = k
            for layer, idx in layers.items():
                self._prune_lowest(pruned, idx, scores, counts[layer], strict)
            return pruned
        norm = scores.clone()
        for idx in layers.values():
            live = [i for i in idx if alive[i]]
            mean = float(scores[live].mean()) if live else 0.0
            norm[idx] = scores[idx] / mean if mean > 0 else 0.0
        prunable = [i for idx in layers.values() for i in idx]
        k = amount_to_count(amount, len(prunable))
        self._prune_lowest(pruned, sorted(prunable), norm, k, strict)
        for layer, idx in layers.items():
            if all(pruned[i] for i in idx):
                raise ValueError(
                    f"{amount=} with scope='global' would remove every group of layer {layer!r}"
                )
        return pruned

    @staticmethod
    def _check_count(k: int, total: int, layer: str, amount: float | int) -> None:
        if k >= total:
            raise ValueError(f"{amount=} would remove every group ({total}) of layer {layer!r}")

    @staticmethod
    def _prune_lowest(
        pruned: list[bool], idx: list[int], scores: Tensor, k: int, strict: bool = True
    ) -> None:
        have = sum(pruned[i] for i in idx)
        if k < have and strict:
            raise ValueError(f"amount asks for {k} pruned groups but {have} already are")
        if k <= have:  # (not strict: masks only shrink, nothing more to prune)
            return
        alive = sorted((i for i in idx if not pruned[i]), key=lambda i: (float(scores[i]), i))
        for i in alive[: k - have]:
            pruned[i] = True

    def kept(self, pruned: Sequence[bool]) -> list[bool]:
        """Per traced element (channel): kept unless its group is pruned (for compaction)."""
        gone = {r for r, gi in self.group_of_root.items() if pruned[gi]}
        return [self.find(e) not in gone for e in range(len(self._parent))]


class GroupPruner:
    """Structured pruning of whole dependency groups, kept pruned while the model trains.

    The groups of a :class:`DependencyGraph` (a channel with its bias and BatchNorm
    entries and the next layers' input slices; coupled residual channels; attention
    heads) are ranked by :meth:`DependencyGraph.scores` (``reduce``: by default each
    member's squared L2 norm over the average of that kind of slice, averaged over the
    members, so a group's size does not decide its rank). :meth:`prune_to` prunes the
    lowest, and a :class:`prunekit.Pruner` whose targets are every member of every group
    applies the masks and keeps them at zero through training (:meth:`attach`). Every
    member of a pruned group is masked, so the masked model computes what
    ``compact(model, example_input, pruner=group_pruner)`` computes.

    Sparsity here counts **groups** (channels, heads): ``prune_to(0.5)`` leaves half of
    each layer's groups (``scope="layer"``; a layer: the groups of the same producers) or
    half of all groups, ranked together after dividing each score by its layer's mean
    (``"global"``; no layer is emptied). Pruned groups stay pruned; an amount below what
    is already pruned changes nothing. :meth:`sparsity` reports groups per layer,
    :meth:`weight_sparsity` the masked weights.

    ``exclude`` (parameter names or globs, as for :class:`prunekit.Pruner`; see
    :meth:`DependencyGraph.excluded`) leaves layers dense: a group with a member
    parameter it matches is never pruned and does not count, so fractions and
    :meth:`sparsity` are over the prunable groups only and a layer with none is not
    reported. Excluding ``"conv1.*"`` keeps the first conv's channels; excluding a
    classifier head ``"fc.*"`` keeps it dense, so the channels feeding it stay too.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> pruner = GroupPruner(model, torch.zeros(1, 4))
    >>> pruner.prune_to(0.75)
    >>> pruner.sparsity().fraction, int((model[0].weight.abs().sum(dim=1) > 0).sum())
    (0.75, 2)
    >>> int(model[0].bias.count_nonzero()) <= 2, int((model[2].weight.abs().sum(dim=0) > 0).sum()) <= 2
    (True, True)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
    ...                       nn.Linear(6, 2))
    >>> pruner = GroupPruner(model, torch.zeros(1, 4), exclude=["0.weight"])
    >>> pruner.prune_to(0.5)  # half of layer 2's 6 channels; layer 0's 8 are kept
    >>> pruner.sparsity().per_target(), bool(pruner.masks["0.weight"].all())
    ({'2': 0.5}, True)
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor | tuple[Tensor, ...],
        *,
        scope: str = "layer",
        reduce: str = "normalized",
        blocks_only: bool = False,
        exclude: str | Iterable[str] = (),
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} must be one of {SCOPES}")
        if reduce not in ("normalized", "mean", "sum"):
            raise ValueError(f"reduce={reduce!r} must be 'normalized', 'mean' or 'sum'")
        patterns = _patterns(exclude)
        self.graph = DependencyGraph(model, example_input, blocks_only=blocks_only)
        if not self.graph.groups:
            raise ValueError(
                f"{type(model).__name__} has no prunable dependency group: every channel "
                "reaches the output or is pinned (see DependencyGraph)"
            )
        self._excluded = self.graph.excluded(patterns)
        self.graph._check_excluded(self._excluded, exclude)
        self.model = model
        self.scope = scope
        self.reduce = reduce
        #: the patterns given (a list; one str is one pattern)
        self.exclude = list(patterns)
        # every member parameter, excluded ones too (their masks stay all True)
        self.pruner = Pruner(model, targets=self.graph.param_names)
        self._layers: dict[str, list[int]] = {}  # prunable groups per layer
        for i, g in enumerate(self.graph.groups):
            if not self._excluded[i]:
                self._layers.setdefault(g.layer, []).append(i)

    # --------------------------------------------------------------- pruning
    @property
    def masks(self) -> dict[str, Tensor]:
        """The masks of every member parameter (the inner Pruner's, True = kept)."""
        return self.pruner.masks

    @property
    def names(self) -> list[str]:
        """Every parameter some group has a member in, in model order."""
        return self.pruner.names

    def pruned(self) -> list[bool]:
        """Per group (``graph.groups`` order): pruned or not."""
        return self.graph.pruned(self.pruner.masks)

    def prune_to(self, sparsity: float | int) -> None:
        """Prune the lowest-ranked groups until ``sparsity`` of them is pruned (a fraction,
        or an int count per layer with ``scope="layer"``, of all groups with ``"global"``).
        Everything is checked before any mask changes."""
        if isinstance(sparsity, Mapping):
            raise TypeError("GroupPruner.prune_to takes one fraction or count, not a mapping")
        already = self.pruned()
        self.graph._check_not_pruned(already, self._excluded, "the masks")
        pruned = self.graph._select(
            sparsity, self.scope, already, self.reduce, strict=False, excluded=self._excluded
        )
        self.pruner.set_masks(self.graph.masks_for(pruned))

    def sparsity(self) -> SparsityReport:
        """Pruned groups per layer (groups of the same producers, named by the first),
        counting prunable (not excluded) groups only."""
        pruned = self.pruned()
        return SparsityReport(
            tuple(
                TargetSparsity(layer, len(idx), sum(pruned[i] for i in idx))
                for layer, idx in self._layers.items()
            )
        )

    def weight_sparsity(self) -> SparsityReport:
        """Pruned entries of every member parameter (the inner Pruner's report)."""
        return self.pruner.sparsity()

    def describe(self) -> str:
        """One line: groups, layers, and the member parameters."""
        return (
            f"{len(self.graph.groups)} dependency groups in {len(self._layers)} prunable layers "
            f"(scope={self.scope!r}, reduce={self.reduce!r}{self._exclude_note()}); "
            f"members: {self.pruner.describe()}"
        )

    def _exclude_note(self) -> str:
        if not self.exclude:
            return ""
        return f", exclude={self.exclude!r}: {sum(self._excluded)} groups kept"

    # ------------------------------------------------- the Pruner underneath
    def attach(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        """Keep pruned members at zero through ``optimizer``'s steps (:meth:`Pruner.attach`)."""
        self.pruner.attach(optimizer, **kwargs)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self.pruner.optimizers

    def apply_masks(self) -> None:
        """Zero every pruned member in place (e.g. after rewinding weights)."""
        self.pruner.apply_masks()

    def remove(self) -> None:
        """Detach all hooks; the zeros stay (:meth:`Pruner.remove`)."""
        self.pruner.remove()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The inner Pruner's state plus what the groups were built with."""
        return {
            "kind": "groups",
            "scope": self.scope,
            "reduce": self.reduce,
            "exclude": list(self.exclude),
            "groups": len(self.graph.groups),
            "pruner": self.pruner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks saved by :meth:`state_dict`. A state of another kind, scope,
        ranking, ``exclude`` (compared as a set of patterns; states saved before
        ``exclude`` existed had none) or group count, or masks that prune part of a group
        or an excluded group, raise ``ValueError`` before anything changes."""
        if not isinstance(state, Mapping) or state.get("kind") != "groups":
            raise ValueError("state is not a GroupPruner state_dict (no kind='groups')")
        saved = dict(state)
        saved.setdefault("exclude", [])
        mine = {
            "scope": self.scope,
            "reduce": self.reduce,
            "exclude": self.exclude,
            "groups": len(self.graph.groups),
        }

        def same(k: str) -> bool:
            if k == "exclude":
                have = saved[k]
                return isinstance(have, list | tuple) and set(have) == set(self.exclude)
            return saved.get(k) == mine[k]

        differ = [k for k in mine if not same(k)]
        if differ:
            there = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            here = ", ".join(f"{k}={mine[k]!r}" for k in differ)
            raise ValueError(f"state_dict was saved with {there}; this GroupPruner has {here}")
        inner = state.get("pruner")
        masks = _unpacked(inner)
        if masks is not None and set(masks) == set(self.pruner.masks):
            pruned = self.graph.pruned(masks)
            self.graph._check_not_pruned(pruned, self._excluded, "state_dict masks")
            expected = self.graph.masks_for(pruned)
            partial = [n for n in expected if not torch.equal(expected[n], masks[n])]
            if partial:
                raise ValueError(
                    f"state_dict masks prune part of a dependency group in {partial[:4]}: "
                    "not a GroupPruner's masks"
                )
        self.pruner.load_state_dict(inner)  # (checks the rest, before changing anything)

    def __repr__(self) -> str:
        return (
            f"GroupPruner({type(self.model).__name__}, groups={len(self.graph.groups)}, "
            f"scope={self.scope!r}, reduce={self.reduce!r}"
            f"{f', exclude={self.exclude!r}' if self.exclude else ''})"
        )


def _unpacked(state: Any) -> dict[str, Tensor] | None:
    """The masks of a Pruner state_dict, or None when they do not unpack (the Pruner's
    own load then says why)."""
    try:
        return {n: unpack_mask(e["packed"], tuple(e["shape"])) for n, e in state["masks"].items()}
    except Exception:  # malformed: reported by Pruner.load_state_dict
        return None


# ------------------------------------------------------------------ torch.export fallback
def _first_line(e: Exception | None) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _trace(
    model: nn.Module, inputs: tuple[Tensor, ...], tracer: str
) -> tuple[fx.GraphModule, str, tuple[Tensor, ...]]:
    """``torch.fx.symbolic_trace``, or where it fails (``tracer="auto"``) a graph made
    from ``torch.export``; neither: :class:`UnsupportedModelError` with both reasons.
    Also returns inputs the graph accepts (for the shapes)."""
    fx_error: Exception | None = None
    if tracer in ("auto", "fx"):
        try:
            return fx.symbolic_trace(model), "torch.fx", inputs
        except Exception as e:  # fx raises TraceError, TypeError, RuntimeError...
            fx_error = e
    if tracer == "fx":
        raise UnsupportedModelError(
            f"torch.fx cannot trace {type(model).__name__} (data-dependent control flow or "
            f"an untraceable call?): {_first_line(fx_error)}"
        ) from fx_error
    try:
        gm, sample = _from_export(model, inputs)
        return gm, "torch.export", sample
    except UnsupportedModelError:
        raise
    except Exception as e:  # export raises UserError, Unsupported, RuntimeError...
        fx_part = f"torch.fx cannot trace it ({_first_line(fx_error)}); " if fx_error else ""
        raise UnsupportedModelError(
            f"{type(model).__name__}: {fx_part}torch.export cannot either: {_first_line(e)}. "
            "Models with data-dependent control flow cannot be traced; blocks_only=True "
            "prunes only inside self-contained blocks (attention heads, transformer MLPs), "
            "which needs no trace"
        ) from e


def _check_input(x: Any, name: str, shape: tuple[int | None, ...], low: int, high: int) -> None:
    """Inputs of a model traced through torch.export must have the shapes it was traced
    with: its code may branch on them (the batch dim may vary within [low, high])."""
    if not isinstance(x, Tensor) or len(x.shape) != len(shape):
        raise ValueError(
            f"input {name!r} must be a tensor of {len(shape)} dims, like the traced one"
        )
    for i, (have, want) in enumerate(zip(x.shape, shape, strict=True)):
        if want is None:
            if not low <= have <= high:
                raise ValueError(
                    f"input {name!r} has size {have} on dim {i}; the model was traced by "
                    f"torch.export for sizes in [{low}, {high if high < 2**62 else 'any'}] "
                    "there (its code may branch on that size)"
                )
        elif have != want:
            raise ValueError(
                f"input {name!r} has shape {tuple(x.shape)}; the model was traced by "
                f"torch.export with {tuple('*' if s is None else s for s in shape)} (its "
                "code may branch on shapes): trace it with an input of the shape you need"
            )


def _aten_tables() -> tuple[dict[Any, Any], dict[Any, str]]:
    a = torch.ops.aten
    functions: dict[Any, Any] = {
        a.relu.default: torch.relu, a.sigmoid.default: torch.sigmoid,
        a.tanh.default: torch.tanh, a.gelu.default: F.gelu, a.silu.default: F.silu,
        a.hardswish.default: F.hardswish, a.hardsigmoid.default: F.hardsigmoid,
        a.leaky_relu.default: F.leaky_relu, a.neg.default: torch.neg, a.abs.default: torch.abs,
        a.dropout.default: F.dropout,
        a.add.Tensor: operator.add, a.sub.Tensor: operator.sub, a.mul.Tensor: operator.mul,
        a.div.Tensor: operator.truediv,
        a.max_pool1d.default: F.max_pool1d, a.max_pool2d.default: F.max_pool2d,
        a.max_pool3d.default: F.max_pool3d, a.avg_pool1d.default: F.avg_pool1d,
        a.avg_pool2d.default: F.avg_pool2d, a.avg_pool3d.default: F.avg_pool3d,
        a.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
        a.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
        a.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d,
        a.flatten.using_ints: torch.flatten, a.reshape.default: torch.reshape,
        a.cat.default: torch.cat, a.mean.dim: torch.mean, a.sum.dim_IntList: torch.sum,
        a.amax.default: torch.amax, a.amin.default: torch.amin,
        a.permute.default: torch.permute, a.transpose.int: torch.transpose,
        a.softmax.int: torch.softmax, a.log_softmax.int: torch.log_softmax,
    }  # fmt: skip
    methods = {
        a.view.default: "view", a.clone.default: "clone", a.contiguous.default: "contiguous",
        a.detach.default: "detach", a.to.dtype: "to",
    }  # fmt: skip
    return functions, methods


def _tuple(v: Any, n: int) -> tuple[Any, ...]:
    return tuple(v) * (n if len(v) == 1 else 1) if isinstance(v, list | tuple) else (v,) * n


def _module_call(
    node: fx.Node, params: dict[str, str], modules: dict[str, nn.Module]
) -> str | None:
    """The module whose own forward ``node`` (an aten conv / linear / batch_norm) is, or
    None: weights, buffers and settings must all be that module's."""
    a = torch.ops.aten
    args = list(node.args)
    if node.kwargs or len(args) < 2 or not isinstance(args[1], fx.Node):
        return None
    weight = params.get(args[1].name, "")
    name = weight.rpartition(".")[0]
    mod = modules.get(name) if weight.endswith(".weight") else None
    if mod is None:
        return None
    stack = node.meta.get("nn_module_stack")
    if stack and list(stack.values())[-1][0] != name:
        return None  # the weight is used by other code than the module's forward

    def same(i: int, suffix: str | None) -> bool:
        arg = args[i] if i < len(args) else None
        if suffix is None or getattr(mod, suffix, None) is None:
            return arg is None
        return isinstance(arg, fx.Node) and params.get(arg.name) == f"{name}.{suffix}"

    convs = {a.conv1d.default: 1, a.conv2d.default: 2, a.conv3d.default: 3}
    if node.target in convs and isinstance(mod, _CONV) and mod.padding_mode == "zeros":
        n = convs[node.target]
        settings = [*args[3:], *[None] * 4][:4]
        wanted = (mod.stride, mod.padding, mod.dilation, mod.groups)
        defaults = ((1,) * n, (0,) * n, (1,) * n, 1)
        for got, want, default in zip(settings, wanted, defaults, strict=True):
            got = default if got is None else got
            if (got if isinstance(want, int) else _tuple(got, n)) != want:
                return None
        return name if same(2, "bias") else None
    if node.target is a.linear.default and isinstance(mod, nn.Linear):
        return name if same(2, "bias") else None
    if node.target is a.batch_norm.default and isinstance(mod, _BATCHNORM):
        ok = same(2, "bias") and same(3, "running_mean") and same(4, "running_var")
        return name if ok and len(args) == 9 and args[7] == mod.eps else None
    return None


def _ops(graph: fx.Graph) -> list[Any]:
    """The operations a graph calls, without slices that keep everything (export drops
    those where the size is known)."""

    def whole(n: fx.Node) -> bool:
        if n.target is not torch.ops.aten.slice.Tensor:
            return False
        start, end, step = [*n.args[2:], None, None, None][:3]
        return start in (None, 0) and (end is None or end >= 2**62) and step in (None, 1)

    return [n.target for n in graph.nodes if n.op == "call_function" and not whole(n)]


def _from_export(
    model: nn.Module, inputs: tuple[Tensor, ...]
) -> tuple[fx.GraphModule, tuple[Tensor, ...]]:
    """A torch-level fx graph of ``model`` from ``torch.export``: the aten calls that are a
    Linear / Conv / BatchNorm module's own forward become calls of that module, common
    aten ops their torch functions (so the trace rules and compaction apply); any other
    aten op stays as it is (refused by the trace if channels flow through it). The graph
    checks that its inputs have the traced shapes (the batch dim may vary where export
    found it free). Also returns the inputs it was traced with."""
    from torch.export import Dim
    from torch.export.graph_signature import InputKind, OutputKind
    from torch.utils import _pytree as pytree

    was_training = model.training
    model.eval()
    try:
        # the batch dim is left free; export fixes any size of 1, so trace a batch of 2
        # (and check that a batch of 1 runs the same operations)
        batched = all(t.dim() > 0 and t.shape[0] == inputs[0].shape[0] for t in inputs)
        ones = batched and inputs[0].shape[0] == 1
        sample = tuple(t.expand(2, *t.shape[1:]).clone() for t in inputs) if ones else inputs
        dynamic = tuple({0: Dim.AUTO} if batched else None for _ in inputs)
        ep = torch.export.export(model, sample, dynamic_shapes=dynamic)
        one_ok = False
        if batched:
            single = torch.export.export(model, tuple(t[:1] for t in inputs))
            one_ok = _ops(single.graph) == _ops(ep.graph)
    finally:
        model.train(was_training)
    sig = ep.graph_signature
    attrs = {
        s.arg.name: s.target
        for s in sig.input_specs
        if s.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    }
    params = {s.arg.name: s.target for s in sig.input_specs if s.kind == InputKind.PARAMETER}
    params.update({s.arg.name: s.target for s in sig.input_specs if s.kind == InputKind.BUFFER})
    user = [s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    mutated = [s.target for s in sig.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if mutated:
        raise UnsupportedModelError(
            f"{type(model).__name__} changes {mutated} in its forward (in eval mode): a "
            "graph from torch.export would not"
        )
    modules = dict(model.named_modules())
    functions, methods = _aten_tables()
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    order = {n: i for i, n in enumerate(ep.graph.nodes)}
    bounds = dict(ep.range_constraints)

    def arg(v: Any) -> Any:
        if isinstance(v, fx.Node):
            if v.name not in env:  # a parameter or buffer read outside a module call
                env[v.name] = graph.get_attr(attrs[v.name])
            return env[v.name]
        return fx.node.map_aggregate(v, lambda x: arg(x) if isinstance(x, fx.Node) else x)

    outputs: list[Any] = []
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if node.name in user:
                env[node.name] = graph.placeholder(node.name)
                val = node.meta.get("val")
                shape, low, high = [], 1, 2**62
                for s in val.shape:
                    if isinstance(s, int):
                        shape.append(s)
                        continue
                    shape.append(None)
                    r = bounds.get(s.node.expr)
                    if r is not None:
                        low = max(low, int(r.lower))
                        # (no upper bound: torch's int_oo does not convert)
                        with contextlib.suppress(
                            TypeError, ValueError, OverflowError, AttributeError
                        ):
                            high = min(high, int(r.upper))
                    if low == 2 and one_ok:
                        low = 1
                graph.call_function(
                    _check_input, (env[node.name], node.name, tuple(shape), low, high)
                )
            continue
        if node.op == "output":
            user_outs = [
                o
                for o, s in zip(node.args[0], sig.output_specs, strict=True)
                if s.kind == OutputKind.USER_OUTPUT
            ]
            outputs = [arg(o) for o in user_outs]
            continue
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        name = getattr(packet, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and node.args:
            # an in-place op is its functional twin when nothing reads the input after it
            src = node.args[0]
            twin = getattr(torch.ops.aten, name[:-1], None)
            functional = getattr(twin, target._overloadname, None) if twin else None
            later = (
                [u for u in src.users if u is not node and order[u] > order[node]]
                if isinstance(src, fx.Node)
                else [None]
            )
            if functional is not None and not later:
                target = functional
        module = _module_call(node, params, modules) if node.op == "call_function" else None
        if module is not None:
            env[node.name] = graph.call_module(module, (arg(node.args[0]),))
        elif target in functions and not (
            target in (torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor) and node.kwargs
        ):
            env[node.name] = graph.call_function(
                functions[target], arg(node.args), arg(node.kwargs)
            )
        elif target in methods:
            env[node.name] = graph.call_method(methods[target], arg(node.args), arg(node.kwargs))
        elif target in (torch.ops.aten.constant_pad_nd.default, torch.ops.aten.pad.default):
            x, pad, *rest = arg(node.args)
            if target is torch.ops.aten.constant_pad_nd.default:
                rest = ["constant", rest[0] if rest else 0]
            env[node.name] = graph.call_function(F.pad, (x, pad, *rest))
        elif target in (torch.ops.aten.slice.Tensor, torch.ops.aten.select.int):
            x, dim, *rest = arg(node.args)
            if target is torch.ops.aten.select.int:
                index: Any = rest[0]
            else:
                start, end, step = [*rest, None, None, 1][:3]
                index = slice(start, end, step)
            ndim = len(node.args[0].meta["val"].shape)
            key = (slice(None),) * _norm_dim(dim, ndim) + (index,)
            env[node.name] = graph.call_function(operator.getitem, (x, key))
        elif target is torch.ops.aten._softmax.default:
            env[node.name] = graph.call_function(torch.softmax, arg(node.args[:2]))
        else:  # kept as is: fine where no tracked channel flows, refused where one does
            env[node.name] = graph.create_node(
                node.op, target, arg(node.args), arg(node.kwargs), name=node.name
            )
    graph.output(pytree.tree_unflatten(outputs, ep.call_spec.out_spec))
    gm = fx.GraphModule(model, graph)
    gm.graph.lint()
    return gm, sample
