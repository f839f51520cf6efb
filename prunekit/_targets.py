"""Which parameters a `Pruner` targets by default, weight layouts, and a one-line summary.

The default rule (documented in docs/targets.md):

1. the weights of Linear, Bilinear, Conv / ConvTranspose (1-3d), RNN / LSTM / GRU and
   MultiheadAttention layers, and of modules whose weight is a matrix of a known other
   layout (``MATRIX_LAYOUTS``: Hugging Face's ``Conv1D``, matched by class name so the
   engine never imports transformers);
2. never biases or normalisation parameters;
3. embeddings stay dense: the weights of ``nn.Embedding`` / ``nn.EmbeddingBag``, and any
   weight shared with one (a language model's tied output head);
4. in a model that exposes ``get_input_embeddings`` and a ``base_model`` (Hugging Face's
   ``PreTrainedModel``, wherever it sits in the module tree), the input and output
   embedding modules and every module outside the base model (the task heads:
   ``lm_head``, ``classifier``, ...) stay dense.

Classic networks keep every layer, their output layer included (the lottery-ticket
protocol prunes LeNet's output layer). Name the parameters (``targets=...``) to prune
embeddings or heads anyway.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from prunekit._validate import suggest

#: Matrix weights stored as (in, out) instead of PyTorch's (out, in), by the class's
#: ``module.qualname`` (subclasses included): the value is the dim of the outputs.
MATRIX_LAYOUTS: dict[str, int] = {"transformers.pytorch_utils.Conv1D": 1}

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def is_weight(pname: str) -> bool:
    return "weight" in pname and "bias" not in pname


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Every name of each parameter of ``model`` (tied ones have several) -> its first
    name, the one ``named_parameters()`` gives.

    >>> parameter_aliases(nn.Linear(2, 1))
    {'weight': 'weight', 'bias': 'bias'}
    """
    canonical: dict[str, str] = {}
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical[name] = first_name.setdefault(id(param), name)
    return canonical


def matching_aliases(
    pattern: str, canonical: Mapping[str, str], owner: str, what: str = "targets entry"
) -> list[str]:
    """The names in ``canonical`` (see :func:`parameter_aliases`) that the name or glob
    ``pattern`` matches (``fnmatch.fnmatchcase``: case-sensitive, ``*`` crosses dots).
    The one rule for ``targets`` and ``exclude`` entries: a pattern that is not a str
    raises ``TypeError``, one that matches nothing ``ValueError`` naming it (``what``
    says which argument) with close names of ``owner`` (the model's class name).

    >>> matching_aliases("0.*", parameter_aliases(nn.Sequential(nn.Linear(2, 1))), "Sequential")
    ['0.weight', '0.bias']
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{what} {pattern!r} must be a name, a glob or a module type")
    found = [n for n in canonical if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        module = any(n.startswith(f"{pattern}.") for n in canonical)
        hint = f"; {pattern!r} is a module: name its parameters, e.g. {pattern + '.*'!r}"
        raise ValueError(
            f"{what} {pattern!r} matches no parameter of {owner}{suggest(pattern, canonical)}"
            f"{hint if module else ''}"
        )
    return found


def output_dim(module: nn.Module) -> int | None:
    """The dim of the outputs of ``module``'s weight if its layout is in ``MATRIX_LAYOUTS``."""
    for cls in type(module).__mro__:
        dim = MATRIX_LAYOUTS.get(f"{cls.__module__}.{cls.__qualname__}")
        if dim is not None:
            return dim
    return None


def transposed_weights(model: nn.Module, canonical: Mapping[str, str]) -> set[str]:
    """Canonical names of the weights stored as (in, out) (``MATRIX_LAYOUTS``)."""
    found = set()
    for mname, module in model.named_modules():
        if output_dim(module) == 1:
            for pname, _ in module.named_parameters(recurse=False):
                if is_weight(pname):
                    found.add(canonical[f"{mname}.{pname}" if mname else pname])
    return found


def storage_options(fn: Any, options: Mapping[str, Any], ndim: int) -> dict[str, Any]:
    """``options`` with a ``dim`` counted in PyTorch's (out, in) layout turned into the dim
    of an (in, out) weight: 0 (outputs) <-> 1 (inputs). The method's default ``dim`` is
    turned too; a dim out of range is left for the option check to refuse."""
    params = inspect.signature(fn).parameters
    if "dim" not in params or ndim != 2:
        return dict(options)
    dim = options.get("dim", params["dim"].default)
    out = dict(options)
    if isinstance(dim, int) and not isinstance(dim, bool) and -2 <= dim < 2:
        out["dim"] = 1 - dim % 2
    return out


def layout_types(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The classes of ``model``'s modules whose weight layout is in ``MATRIX_LAYOUTS``."""
    return tuple(dict.fromkeys(type(m) for m in model.modules() if output_dim(m) is not None))


def dense_by_default(model: nn.Module, canonical: Mapping[str, str]) -> set[str]:
    """Canonical names of the parameters left dense by default (rules 3 and 4 above)."""
    dense_modules: list[nn.Module] = [m for m in model.modules() if isinstance(m, _EMBEDDINGS)]
    for module in model.modules():
        if not callable(getattr(module, "get_input_embeddings", None)):
            continue
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                found = getattr(module, getter)()
            except (NotImplementedError, AttributeError):
                found = None
            if isinstance(found, nn.Module):
                dense_modules += found.modules()
        base = getattr(module, "base_model", None)
        if isinstance(base, nn.Module) and base is not module:
            body = {id(m) for m in base.modules()}
            dense_modules += [m for m in module.modules() if id(m) not in body]
    dense_params = {id(p) for m in dense_modules for p in m.parameters(recurse=False)}
    return {
        canonical[name]
        for name, param in model.named_parameters(remove_duplicate=False)
        if id(param) in dense_params
    }


def summary(model: nn.Module, targets: Mapping[str, nn.Parameter], *, show: int = 3) -> str:
    """One line: what is targeted, and the largest matrices (ndim >= 2) that are not."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    targeted = sum(p.numel() for p in targets.values())
    ids = {id(p) for p in targets.values()}
    left = sorted(
        ((n, p) for n, p in params.items() if p.ndim >= 2 and id(p) not in ids),
        key=lambda item: -item[1].numel(),
    )
    line = (
        f"{type(model).__name__}: {len(targets)} targets, {targeted:,} of {total:,} parameters "
        f"({targeted / total:.1%})"
        if total
        else f"{type(model).__name__}: no parameters"
    )
    if not left:
        return line + "; every matrix is targeted"
    shown = ", ".join(f"{n} {'x'.join(map(str, p.shape))}" for n, p in left[:show])
    more = left[show:]
    if more:
        shown += f" and {len(more)} more ({sum(p.numel() for _, p in more):,} parameters)"
    return f"{line}; matrices left dense: {shown}"
