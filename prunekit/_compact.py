"""Compaction: rebuild a model with its pruned groups physically removed.

The result is a ``torch.fx.GraphModule`` of the traced model with smaller Linear, Conv,
BatchNorm and attention layers and the constants that depend on a channel count (a
reshape's size, a channel padding) rewritten. It computes what the masked model
computes. The original model is not modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit._groups import DependencyGraph, _member_slice, _shared_parameters


class PrunedAttention(nn.Module):
    """Multi-head attention with some heads removed: separate q/k/v projections to
    ``num_heads * head_dim`` features, scaled by the original ``1/sqrt(head_dim)``.

    Takes :class:`torch.nn.MultiheadAttention`'s arguments and returns ``(output,
    weights or None)`` the same way, so a compacted model calls it unchanged. The
    weights are those of the masked original: ``heads_of=(H, kept)`` (``from_attention``
    sets it) puts back the ``H - len(kept)`` removed heads, whose masked queries and keys
    are zero, so their weights are the softmax of the masks alone (uniform without
    masks); averaged weights are then averaged over all ``H`` heads, as the original's.

    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> x = torch.randn(1, 3, 8)
    >>> small = PrunedAttention.from_attention(mha, heads=[0, 1])
    >>> torch.allclose(small(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
    True
    """

    #: read by nn.TransformerEncoderLayer: False sends it down the plain path that calls
    #: this module (its fused fast path assumes a full nn.MultiheadAttention)
    _qkv_same_embed_dim = False
    in_proj_bias = None

    def __init__(
        self,
        q_in: int,
        k_in: int,
        v_in: int,
        out: int,
        num_heads: int,
        head_dim: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        heads_of: tuple[int, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if heads_of is not None and (
            len(heads_of[1]) != num_heads
            or sorted(set(heads_of[1])) != list(heads_of[1])
            or not all(0 <= h < heads_of[0] for h in heads_of[1])
        ):
            raise ValueError(
                f"heads_of={heads_of!r} must be (total heads, {num_heads} sorted kept heads)"
            )
        self.heads_of = None if heads_of is None else (heads_of[0], list(heads_of[1]))
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(q_in, inner, bias=bias)
        self.k_proj = nn.Linear(k_in, inner, bias=bias)
        self.v_proj = nn.Linear(v_in, inner, bias=bias)
        self.out_proj = nn.Linear(inner, out, bias=bias)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first

    @classmethod
    @torch.no_grad()
    def from_attention(
        cls,
        mha: nn.MultiheadAttention,
        heads: Sequence[int],
        q_cols: Sequence[int] | None = None,
        k_cols: Sequence[int] | None = None,
        v_cols: Sequence[int] | None = None,
        out_rows: Sequence[int] | None = None,
    ) -> PrunedAttention:
        """The kept ``heads`` of ``mha``, reading input features ``*_cols`` and writing
        output features ``out_rows`` (``None``: all)."""
        e, hd = mha.embed_dim, mha.head_dim
        rows = [h * hd + r for h in heads for r in range(hd)]
        ins = {"q": mha.embed_dim, "k": mha.kdim, "v": mha.vdim}
        cols = {"q": q_cols, "k": k_cols, "v": v_cols}
        cols = {k: list(range(ins[k])) if c is None else list(c) for k, c in cols.items()}
        out_rows = list(range(e)) if out_rows is None else list(out_rows)
        has_bias = mha.in_proj_bias is not None
        new = cls(
            len(cols["q"]), len(cols["k"]), len(cols["v"]), len(out_rows), len(heads), hd,
            bias=has_bias, dropout=mha.dropout, batch_first=mha.batch_first,
            heads_of=(mha.num_heads, sorted(heads)),
        )  # fmt: skip
        for i, role in enumerate("qkv"):
            if mha._qkv_same_embed_dim:
                w = mha.in_proj_weight[i * e : (i + 1) * e]
            else:
                w = getattr(mha, f"{role}_proj_weight")
            proj = getattr(new, f"{role}_proj")
            proj.weight.copy_(w[rows][:, cols[role]])
            if has_bias:
                proj.bias.copy_(mha.in_proj_bias[i * e : (i + 1) * e][rows])
        new.out_proj.weight.copy_(mha.out_proj.weight[out_rows][:, rows])
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias[out_rows])
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2  # (L, E), as nn.MultiheadAttention takes it
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, _ = query.shape
        ls = key.shape[1]

        def heads(t: Tensor) -> Tensor:
            return t.view(n, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, ls, dtype=torch.bool, device=q.device).triu(1)
        masked = torch.zeros(1, 1, lq, ls, dtype=q.dtype, device=q.device)  # masks only
        for m, shape in ((attn_mask, None), (key_padding_mask, (n, 1, 1, ls))):
            if m is None:
                continue
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, -math.inf)
            if shape is not None:
                m = m.view(shape)
            elif m.dim() == 3:
                raise ValueError(
                    f"a 3-d attn_mask of shape {tuple(m.shape)} has one mask per original "
                    "head, which no longer line up once heads are pruned: pass a 2-d mask"
                )
            scores = scores + m
            masked = masked + m
        weights = scores.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout)
        out = (weights @ v).transpose(1, 2).reshape(n, lq, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if self.heads_of is not None and self.heads_of[0] != self.num_heads:
            total, kept = self.heads_of
            full = masked.softmax(dim=-1).expand(n, total, lq, ls)
            index = torch.tensor(kept, device=weights.device)
            weights = full.index_copy(1, index, weights)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights


def _kept_idx(ids: list[int] | None, kept: list[bool]) -> list[int] | None:
    return None if ids is None else [j for j, e in enumerate(ids) if kept[e]]


@torch.no_grad()
def _shrink(mod: nn.Module, out_idx: list[int] | None, in_idx: list[int] | None) -> None:
    """Keep rows ``out_idx`` (dim 0) and inputs ``in_idx`` (dim 1) of a Linear/Conv/BN."""
    for pname in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(mod, pname, None)
        if t is None:
            continue
        if out_idx is not None:
            t = t[out_idx]
        if in_idx is not None and pname == "weight" and t.dim() > 1:
            t = t[:, in_idx]
        t = t.detach().clone()
        if isinstance(getattr(mod, pname), nn.Parameter):
            setattr(mod, pname, nn.Parameter(t, requires_grad=getattr(mod, pname).requires_grad))
        else:
            setattr(mod, pname, t)
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.conv._ConvNd):
        mod.out_channels = mod.weight.shape[0]
        mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = len(out_idx) if out_idx is not None else mod.num_features


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _check_complete(
    graph: DependencyGraph, masks: Mapping[str, Tensor], pruned: list[bool]
) -> None:
    params = dict(graph.model.named_parameters())
    for g, gone in zip(graph.groups, pruned, strict=True):
        if not gone:
            continue
        for member in g.members:
            name = member[0]
            view = params[name].detach()
            if name in masks:  # (masked_fill: a masked NaN or inf counts as pruned)
                view = view.masked_fill(~masks[name], 0)
            live = _member_slice(view, member)
            if bool(live.any()):
                raise ValueError(
                    f"masks prune the channels of {', '.join(g.producers)} at {member[3][:8]}"
                    f"{'...' if len(member[3]) > 8 else ''} but {name} ({member[1]} slice) is still "
                    "non-zero there, so removing them would change the model's outputs. Build "
                    "masks that cover whole groups (DependencyGraph.group_masks / masks_for), "
                    "or pass complete=True to remove the whole groups anyway"
                )


def compact(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    *,
    masks: Mapping[str, Tensor] | None = None,
    pruner: Any = None,
    complete: bool = False,
    blocks_only: bool = False,
    tracer: str = "auto",
) -> nn.Module:
    """A copy of ``model`` with the dependency groups pruned by ``masks`` (or by
    ``pruner.masks``) physically removed.

    A group is removed when all its producing weight slices are masked (see
    :meth:`DependencyGraph.pruned`). Its other members (biases, BatchNorm entries, the
    next layers' input slices) must be masked or zero too, or the removal would change
    the outputs: that raises ``ValueError`` unless ``complete=True``, which removes them
    anyway (the result then computes what the model with whole-group masks computes).
    The masks are applied to the copy, so the result computes the masked model even where
    ``model``'s weights do not hold them yet. A tied (shared) weight in a group or in a
    layer that shrinks, a weight a hook computes (``torch.nn.utils.prune``, a
    parametrization) in a group, and a shrinking layer's parameter read outside its
    forward (the graph pins such a layer's channels, so only an attention is left to
    catch) raise ``ValueError``. The copy is a ``torch.fx.GraphModule``; ``model`` is unchanged. With
    ``blocks_only=True`` (models torch.fx cannot trace, such as Hugging Face BERT) only
    attention heads and transformer MLP features are removed, in a deep copy of ``model``.
    ``tracer``: ``"auto"`` (torch.fx, and torch.export where fx fails), ``"fx"`` or
    ``"export"`` (see :class:`DependencyGraph`).

    >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    >>> x = torch.randn(3, 4)
    >>> masks = DependencyGraph(model, x).group_masks(0.5)
    >>> with torch.no_grad():
    ...     for name, m in masks.items():
    ...         _ = model.get_parameter(name).mul_(m)
    >>> small = compact(model, x, masks=masks)
    >>> small.get_submodule("0").weight.shape, torch.allclose(small(x), model(x), atol=1e-6)
    (torch.Size([3, 4]), True)
    """
    if (masks is None) == (pruner is None):
        raise ValueError("compact needs exactly one of masks=... or pruner=...")
    if not isinstance(complete, bool):
        raise TypeError(f"complete={complete!r} must be a bool")
    if pruner is not None:
        if getattr(pruner, "model", None) is not model:
            raise ValueError(
                f"pruner=... prunes another model ({type(getattr(pruner, 'model', None)).__name__} "
                f"at {id(getattr(pruner, 'model', None)):#x}) than the one given to compact "
                f"({type(model).__name__} at {id(model):#x}); for a copy of its model pass "
                "masks=pruner.masks"
            )
        masks = pruner.masks
    # (the graph refuses tied and computed weights in its groups: _groups._check_members)
    graph = DependencyGraph(model, example_input, blocks_only=blocks_only, tracer=tracer)
    pruned = graph.pruned(masks)
    if not complete:
        _check_complete(graph, masks, pruned)
    kept = graph.kept(pruned)
    _check_tied_modules(graph, kept)
    _check_direct_reads(graph, kept)
    return _rebuild(graph, kept, masks)


def _changes(graph: DependencyGraph, kept: list[bool]) -> list[str]:
    """The modules :func:`_rebuild` rewrites (reshape and pad nodes left out)."""

    def cut(ids: list[int] | None) -> bool:
        return ids is not None and not all(kept[e] for e in ids)

    out = []
    for name, io in graph.module_io.items():
        kind = io["kind"]
        if kind == "layer":
            changed = cut(io["out"]) or cut(io["in"])
        elif kind in ("batchnorm", "depthwise"):
            changed = cut(io["ids"])
        elif kind == "attention":
            changed = True  # always swapped for a PrunedAttention
        elif kind == "hf_attention":
            changed = cut(io["heads"])
        else:
            continue
        if changed:
            out.append(name)
    return out


def _check_direct_reads(graph: DependencyGraph, kept: list[bool]) -> None:
    """Code that reads a parameter or buffer of a layer compaction shrinks (``x @
    self.fc.weight.t()``) would see the smaller tensor: its result would change shape or
    value without the trace following it."""
    if graph.gm is None:
        return
    changed = _changes(graph, kept)
    for node in graph.gm.graph.nodes:
        if node.op != "get_attr" or not node.users:
            continue
        for mod in changed:
            if node.target.startswith(f"{mod}."):
                raise ValueError(
                    f"the model reads {node.target} directly (fx node {node.name!r}), not "
                    f"only through {mod!r}'s forward, and compaction shrinks {mod!r}: that "
                    "read would change; keep this layer's channels (do not prune its "
                    "groups) or read the tensor through the layer"
                )


def _check_tied_modules(graph: DependencyGraph, kept: list[bool]) -> None:
    aliases = _shared_parameters(graph.model)
    for mod in _changes(graph, kept):
        for name, _ in graph.model.get_submodule(mod).named_parameters(prefix=mod):
            if name in aliases:
                raise ValueError(
                    f"{' and '.join(aliases[name])} are one shared (tied) parameter and "
                    f"compaction changes {mod!r}: the copy would no longer share it; untie "
                    "the weights before compacting"
                )


@torch.no_grad()
def _rebuild(graph: DependencyGraph, kept: list[bool], masks: Mapping[str, Tensor]) -> nn.Module:
    new = copy.deepcopy(graph.gm if graph.gm is not None else graph.model)
    # the copy computes the masked model even where the masks are not applied to the
    # model's weights yet (masked_fill: a masked inf or NaN becomes 0, as when pruned)
    own = dict(new.named_parameters())
    for pname, m in masks.items():
        if pname in own:  # (fx leaves out modules the forward never calls)
            own[pname].masked_fill_(~m.to(own[pname].device), 0.0)
    nodes = {n.name: n for n in new.graph.nodes} if isinstance(new, fx.GraphModule) else {}
    changed = set(_changes(graph, kept))
    for name, io in graph.module_io.items():
        kind = io["kind"]
        if kind != "reshape" and kind != "pad" and name not in changed:
            continue  # nothing removed: left as it is (a tied weight stays tied)
        if kind == "layer":
            _shrink(new.get_submodule(name), _kept_idx(io["out"], kept), _kept_idx(io["in"], kept))
        elif kind == "batchnorm":
            _shrink(new.get_submodule(name), _kept_idx(io["ids"], kept), None)
        elif kind == "depthwise":
            mod = new.get_submodule(name)
            idx = _kept_idx(io["ids"], kept)
            mod.groups = len(idx)
            _shrink(mod, idx, None)
        elif kind == "attention":
            old = new.get_submodule(name)
            _set_submodule(
                new,
                name,
                PrunedAttention.from_attention(
                    old,
                    _kept_idx(io["heads"], kept),
                    *(_kept_idx(io[r], kept) for r in ("q", "k", "v", "out")),
                ),
            )
        elif kind == "hf_attention":
            attn = new.get_submodule(name)
            hd = io["head_dim"]
            heads = _kept_idx(io["heads"], kept)
            rows = [h * hd + r for h in heads for r in range(hd)]
            for proj in ("query", "key", "value"):
                _shrink(getattr(attn.self, proj), rows, None)
            _shrink(attn.output.dense, None, rows)
            attn.self.num_attention_heads, attn.self.all_head_size = len(heads), len(rows)
        elif kind == "reshape":
            _rewrite_reshape(nodes[name.removeprefix("node:")], io, kept)
        elif kind == "pad":
            node = nodes[name.removeprefix("node:")]
            pad = list(node.args[1] if len(node.args) > 1 else node.kwargs["pad"])
            i = io["index"]
            pad[i], pad[i + 1] = (sum(kept[e] for e in io[side]) for side in ("left", "right"))
            if len(node.args) > 1:
                node.args = (node.args[0], tuple(pad), *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "pad": tuple(pad)}
    if isinstance(new, fx.GraphModule):
        new.recompile()
    return new


def _rewrite_reshape(node: fx.Node, io: dict[str, Any], kept: list[bool]) -> None:
    size = sum(kept[e] for e in io["ids"])
    args = list(node.args)
    packed = len(args) == 2 and isinstance(args[1], list | tuple)
    if "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        shape = list(node.kwargs[key])
        if isinstance(shape[io["dim"]], int) and shape[io["dim"]] != -1:
            shape[io["dim"]] = size
        node.kwargs = {**node.kwargs, key: tuple(shape)}
        return
    shape = list(args[1]) if packed else args[1:]
    if isinstance(shape[io["dim"]], int) and shape[io["dim"]] != -1:
        shape[io["dim"]] = size
    node.args = (args[0], tuple(shape)) if packed else (args[0], *shape)


# ------------------------------------------------------------------ cost
@dataclass(frozen=True)
class ModelCost:
    """Parameters and multiply-accumulates (MACs) of one forward pass; MACs count the
    Linear, Conv and attention layers (FLOPs are about 2x MACs)."""

    params: int
    macs: int


def model_cost(model: nn.Module, example_input: Tensor | tuple[Tensor, ...]) -> ModelCost:
    """Count ``model``'s parameters and the MACs of a forward pass on ``example_input``.

    >>> model_cost(nn.Linear(4, 3), torch.zeros(2, 4))
    ModelCost(params=15, macs=24)
    """
    macs = 0

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        nonlocal macs
        if isinstance(mod, nn.Linear):
            macs += out.numel() * mod.in_features
        elif isinstance(mod, nn.modules.conv._ConvTransposeNd):  # per input position
            k = math.prod(mod.kernel_size)
            macs += args[0].numel() * (mod.out_channels // mod.groups) * k
        elif isinstance(mod, nn.modules.conv._ConvNd):
            macs += out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
        elif isinstance(mod, nn.MultiheadAttention | PrunedAttention):
            q, k = args[0], args[1]
            if q.dim() == 2:  # one unbatched sequence (L, E)
                n, lq, ls = 1, q.shape[0], k.shape[0]
            elif mod.batch_first:
                n, lq, ls = q.shape[0], q.shape[1], k.shape[1]
            else:
                n, lq, ls = q.shape[1], q.shape[0], k.shape[0]
            inner = mod.num_heads * mod.head_dim
            macs += 2 * n * lq * ls * inner  # q k^T and weights @ v
            if isinstance(mod, nn.MultiheadAttention):  # projections run inside its functional
                macs += n * (lq * mod.embed_dim + ls * (mod.kdim + mod.vdim)) * inner
                macs += n * lq * inner * mod.embed_dim

    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(params, macs)


@dataclass(frozen=True)
class CompactionReport:
    """Cost before and after compaction; ``str()`` is a table.

    >>> print(CompactionReport(ModelCost(100, 1000), ModelCost(40, 250)))
                   before      after   ratio
    parameters        100         40   0.400
    MACs            1,000        250   0.250
    """

    before: ModelCost
    after: ModelCost

    def __str__(self) -> str:
        rows = [f"{'':10}{'before':>11}{'after':>11}{'ratio':>8}"]
        for label, a, b in (
            ("parameters", self.before.params, self.after.params),
            ("MACs", self.before.macs, self.after.macs),
        ):
            rows.append(f"{label:10}{a:>11,}{b:>11,}{b / a if a else float('nan'):>8.3f}")
        return "\n".join(rows)


def compaction_report(
    before: nn.Module, after: nn.Module, example_input: Tensor | tuple[Tensor, ...]
) -> CompactionReport:
    """:class:`CompactionReport` of a model and its compacted copy.

    >>> report = compaction_report(nn.Linear(4, 4), nn.Linear(4, 2), torch.zeros(1, 4))
    >>> report.before.params, report.after.params, report.after.macs
    (20, 10, 8)
    """
    return CompactionReport(model_cost(before, example_input), model_cost(after, example_input))
