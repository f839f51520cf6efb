"""Tensor-level pruning: pure functions from a tensor (and an optional previous mask) to a
``torch.bool`` mask of the same shape, True = kept. Inputs are never modified.

Every ``amount`` is absolute: a float is the fraction of entries (or slices) pruned
afterwards, an int is that count. Entries already pruned by ``mask`` stay pruned and count
toward the amount; the count is exact, ties broken by position (lower index pruned first).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from prunekit._distributed import exact_slice_norms, local
from prunekit._select import KeySource, RandomKeys
from prunekit._select_wide import WideKeys, key_source, select_lowest
from prunekit._validate import (
    amount_to_count,
    as_amount,
    check_dim,
    check_finite,
    check_mask,
    check_tensor,
    suggest,
)

MaskFn = Callable[..., Tensor]
ScoreFn = Callable[..., Tensor]
#: What a method ranks: single entries (ranked globally across targets, or per tensor),
#: whole slices along ``dim`` (per tensor), or nothing (it computes a mask directly).
RANKS = ("entries", "slices", "mask")
#: Statistics the engine can collect for a method (see ``prunekit._stats``).
STATISTICS = ("inputs", "grads", "outputs")
# Arguments the engine supplies to a mask function (never user options).
ENGINE_ARGS = frozenset({"t", "amount", "mask", "scores", "generator"})


class Method:
    """A pruning method: what it ranks, the statistics it needs, its scores and checks.

    ``fn(t, amount, *, mask=None, **options) -> bool mask`` is its tensor-level function
    (what :func:`prune` and :func:`get_method` callers use; the object itself calls it).
    ``ranks`` says what the engine ranks: ``"entries"`` (one score per weight, ranked
    globally across targets or per tensor), ``"slices"`` (one score per slice along
    ``dim``, ranked per tensor) or ``"mask"`` (``fn`` decides the mask, per tensor).
    ``needs`` lists the statistics the engine collects for it (``STATISTICS``: input
    activation norms, summed weight x gradient, output activity) and ``score(weight,
    stats, **options)`` turns the weight and those statistics into scores (higher = kept;
    ``None``: the engine ranks ``|weight|`` for entries, or ``fn`` scores slices itself).
    ``fed`` names ``fn``'s tensor arguments that carry the statistics at tensor level
    (``input_norm``, ``grad``: inputs, not options); ``check(weight, options, where)``
    validates options per target;
    ``keeps_stats(options)`` is True when statistics survive an update (movement);
    ``per_row(options)`` is True when entries compete only within their output row;
    ``global_slices(options)`` is True when slice scores compare across tensors (then
    ``scope="global"`` ranks the slices of all targets together);
    ``random`` methods get a seeded ``generator``; a ``pattern`` (N:M) fixes the sparsity
    itself (any amount above 0 applies it); ``memory`` states the statistics' memory.

    >>> m = Method("half_demo", lambda t, amount, *, mask=None: t.abs() > t.abs().median())
    >>> m.ranks, m.needs, sorted(m.options)
    ('mask', (), [])

    A data-aware method is one object (pass it to ``register_method("sq_taylor")``):

    >>> def sq_taylor_mask(t, amount, *, grad, mask=None):  # (W g)^2, tensor level
    ...     return magnitude_mask(t, amount, mask=mask, scores=(t * grad) ** 2)
    >>> sq = Method("sq_taylor", sq_taylor_mask, ranks="entries", needs=("grads",),
    ...             score=lambda w, stats: stats.grads**2, fed=("grad",))
    >>> sq.ranks_globally({}), sorted(sq.options)
    (True, [])
    >>> sq(torch.tensor([1.0, 2.0, 3.0]), 1, grad=torch.tensor([3.0, 0.1, 1.0]))
    tensor([ True, False,  True])
    """

    def __init__(
        self,
        name: str,
        fn: MaskFn,
        *,
        ranks: str = "mask",
        needs: Iterable[str] = (),
        score: ScoreFn | None = None,
        fed: Iterable[str] = (),
        check: Callable[[Tensor, Mapping[str, Any], str], None] | None = None,
        keeps_stats: Callable[[Mapping[str, Any]], bool] | None = None,
        per_row: Callable[[Mapping[str, Any]], bool] | None = None,
        global_slices: Callable[[Mapping[str, Any]], bool] | None = None,
        random: bool = False,
        pattern: bool = False,
        memory: str = "",
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"name={name!r} must be a non-empty str")
        if not callable(fn):
            raise TypeError(f"method {name!r}: fn={fn!r} must be callable")
        if ranks not in RANKS:
            raise ValueError(f"method {name!r}: ranks={ranks!r} must be one of {RANKS}")
        needs = tuple(needs)
        for stat in needs:
            if stat not in STATISTICS:
                raise ValueError(
                    f"method {name!r}: needs statistic {stat!r}{suggest(str(stat), STATISTICS)}; "
                    f"the engine collects {list(STATISTICS)}"
                )
        if needs and score is None:
            raise ValueError(f"method {name!r} needs statistics {list(needs)} but has no score")
        self.name, self.fn, self.ranks, self.needs = name, fn, ranks, needs
        self.score, self.fed, self.check, self.random = score, frozenset(fed), check, random
        self.memory, self.pattern = memory, pattern
        self._keeps_stats, self._per_row, self._global_slices = keeps_stats, per_row, global_slices
        self.__signature__ = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        params = self.__signature__.parameters
        self.options = (
            frozenset(params)
            - ENGINE_ARGS
            - self.fed
            - {n for n, p in params.items() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        )

    def __call__(self, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(t, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Method({self.name!r}, ranks={self.ranks!r}, needs={list(self.needs)})"

    def keeps_stats(self, options: Mapping[str, Any]) -> bool:
        """Whether the statistics survive an update (True for movement by default)."""
        return bool(self._keeps_stats and self._keeps_stats(options))

    def per_row(self, options: Mapping[str, Any]) -> bool:
        """Whether entries are compared only within their row (dim 0) of the weight."""
        return bool(self._per_row and self._per_row(options))

    def ranks_globally(self, options: Mapping[str, Any]) -> bool:
        """Whether one ranking across several targets is meaningful for these options:
        entries (unless compared within rows), or slices whose scores compare across
        tensors (``global_slices``, e.g. APoZ, a fraction)."""
        if self.ranks == "slices":
            return bool(self._global_slices and self._global_slices(options))
        return self.ranks == "entries" and not self.per_row(options)

    def accepts_mask(self) -> bool:
        params = self.__signature__.parameters
        return "mask" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


_METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[MaskFn | Method], MaskFn | Method]:
    """Register a pruning method under ``name``: a plain mask function
    ``fn(t, amount, **kw) -> bool mask`` (ranked per tensor; its result is intersected
    with the current mask, so it can never regrow weights) or a :class:`Method`.

    >>> @register_method("sign_demo")
    ... def sign_mask(t, amount, **kw):
    ...     return t >= 0
    >>> "sign_demo" in list_methods()
    True
    """

    def add(fn: MaskFn | Method) -> MaskFn | Method:
        if name in _METHODS:
            raise ValueError(f"a pruning method named {name!r} is already registered")
        if isinstance(fn, Method):
            if fn.name != name:
                raise ValueError(f"Method named {fn.name!r} registered as {name!r}; use one name")
            _METHODS[name] = fn
        else:
            _METHODS[name] = Method(name, fn)
        return fn

    return add


def list_methods() -> list[str]:
    """Names of the registered pruning methods.

    >>> {"magnitude", "random", "ln_structured", "nm"} <= set(list_methods())
    True
    """
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as ``name`` (callable like its mask function); unknown names
    list the valid ones.

    >>> get_method("magnitude").ranks, get_method("ln_structured").ranks
    ('entries', 'slices')
    """
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(
            f"method={name!r} is not a pruning method{suggest(str(name), _METHODS)}; "
            f"choose one of {list_methods()}"
        )
    return _METHODS[name]


def _start_mask(t: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    return check_mask(mask, t.shape).clone(memory_format=torch.contiguous_format)


def _extra_count(amount: float | int, total: int, already: int) -> int:
    target = amount_to_count(amount, total)
    if target < already:
        raise ValueError(
            f"amount={amount} asks for {target} pruned of {total}, but the given mask already "
            f"prunes {already}; masks only shrink (amount is absolute, not relative)"
        )
    return target - already


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _prune_entries(
    t: Tensor, amount: float | int, mask: Tensor | None, source: KeySource | WideKeys
) -> Tensor:
    new = _start_mask(t, mask)
    k = _extra_count(amount, t.numel(), t.numel() - int(new.count_nonzero()))
    select_lowest(source, [new], k, ["t"])
    return new


def magnitude_mask(
    t: Tensor, amount: float | int, *, mask: Tensor | None = None, scores: Tensor | None = None
) -> Tensor:
    """Unstructured L1 pruning: prune the entries of smallest ``|t|`` (or lowest ``scores``).

    >>> magnitude_mask(torch.tensor([0.5, -3.0, 0.1, 2.0]), 0.5)
    tensor([False,  True, False,  True])
    """
    check_tensor(t)
    if scores is None:
        return _prune_entries(t, amount, mask, key_source([t], magnitude=True))
    check_tensor(scores, "scores")
    if scores.shape != t.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected {tuple(t.shape)}")
    check_finite(scores, "scores")
    return _prune_entries(t, amount, mask, key_source([scores], magnitude=False))


def random_mask(
    t: Tensor,
    amount: float | int,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Unstructured random pruning: prune ``amount`` entries chosen uniformly at random.

    >>> g = torch.Generator().manual_seed(0)
    >>> int(random_mask(torch.ones(10), 3, generator=g).sum())
    7
    """
    check_tensor(t)
    return _prune_entries(t, amount, mask, RandomKeys(_seed(generator)))


def _slice_norms(t: Tensor, n: float, dim: int) -> Tensor:
    others = [d for d in range(t.ndim) if d != dim]
    if not others:
        return t.abs() if n != 0 else (t != 0).to(t.dtype)
    if n in (1, 2) and t.dtype == torch.float32 and t.numel():
        return _rounded_norms(t, int(n), dim, others)
    return torch.linalg.vector_norm(t, ord=n, dim=others)


_NORM_BLOCK = 1 << 22  # entries widened to float64 at a time


def _rounded_norms(t: Tensor, n: int, dim: int, others: list[int]) -> Tensor:
    """The correctly rounded float32 L1 / L2 norms of the slices, as sharded ranks compute
    them from exact integer sums (so one process and any sharding agree bit for bit).

    Norms are summed in float64, whose relative error is at most (width + 2) * 2**-52;
    only slices that close to a float32 rounding midpoint are summed exactly."""
    width = t.numel() // t.shape[dim]
    step = max(1, _NORM_BLOCK // max(width, 1))
    wide = torch.cat(
        [
            torch.linalg.vector_norm(
                t.narrow(dim, i, min(step, t.shape[dim] - i)).double(), ord=n, dim=others
            )
            for i in range(0, t.shape[dim], step)
        ]
    )
    rounded = wide.float()
    up = torch.nextafter(rounded, torch.full_like(rounded, math.inf)).double()
    down = torch.nextafter(rounded, torch.full_like(rounded, -math.inf)).double()
    slack = wide * ((width + 2) * 2.0**-52)
    near = ((wide - (rounded.double() + up) / 2).abs() <= slack) | (
        (wide - (rounded.double() + down) / 2).abs() <= slack
    )
    near |= ~torch.isfinite(rounded)
    if near.any():
        rows = near.nonzero().flatten()
        rounded[rows] = exact_slice_norms(t.index_select(dim, rows), n, dim).to(t.device)
    return rounded


def _prune_slices(
    t: Tensor, amount: float | int, dim: int, mask: Tensor | None, source: KeySource | WideKeys
) -> Tensor:
    new = _start_mask(t, mask)
    others = [d for d in range(t.ndim) if d != dim]
    alive = new.any(dim=others) if others else new.clone()
    kept = int(alive.count_nonzero())
    k = _extra_count(amount, t.shape[dim], t.shape[dim] - kept)
    if k and k == kept and isinstance(as_amount(amount), float) and as_amount(amount) < 1.0:
        k -= 1  # a fraction below 1 never removes the last slice (1.0 or a count can)
    select_lowest(source, [alive], k, ["t"])
    shape = [1] * t.ndim
    shape[dim] = -1
    new &= alive.view(shape)
    return new


def ln_structured_mask(
    t: Tensor,
    amount: float | int,
    *,
    n: float = 2,
    dim: int = 0,
    mask: Tensor | None = None,
    scores: Tensor | None = None,
) -> Tensor:
    """Structured pruning: prune whole slices along ``dim`` with the smallest Ln norm.

    ``n`` is 1, 2, ``inf`` or 0 (the count of non-zeros); ``amount`` counts slices. A
    fraction below 1 keeps at least one slice (``round(0.9 * 2)`` would prune both rows
    of a 2-row layer); ``1.0`` or a count of all slices prunes them all.
    ``scores`` (one per slice) replaces the norms. Pruned entries of ``mask`` are zero
    when norms are taken.

    >>> w = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.1, 0.2]])
    >>> ln_structured_mask(w, 1, n=1, dim=0)[:, 0]
    tensor([ True,  True, False])
    """
    check_tensor(t)
    dim = check_dim(dim, t.ndim)
    if n not in (0, 1, 2, math.inf) or isinstance(n, bool):
        raise ValueError(f"n={n!r} must be one of 0, 1, 2, inf")
    if scores is None:
        weights = t.detach() if mask is None else t.detach() * check_mask(mask, t.shape)
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        scores = _slice_norms(weights.to(wide), n, dim)
    else:
        check_tensor(scores, "scores")
        if scores.shape != (t.shape[dim],):
            raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({t.shape[dim]},)")
        check_finite(scores, "scores")
    return _prune_slices(t, amount, dim, mask, key_source([scores], magnitude=False))


def random_structured_mask(
    t: Tensor,
    amount: float | int,
    *,
    dim: int = 0,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Structured random pruning: prune ``amount`` whole slices along ``dim`` at random.

    >>> g = torch.Generator().manual_seed(0)
    >>> m = random_structured_mask(torch.ones(4, 3), 2, dim=0, generator=g)
    >>> m.all(dim=1).sum().item(), (~m).all(dim=1).sum().item()
    (2, 2)
    """
    check_tensor(t)
    dim = check_dim(dim, t.ndim)
    return _prune_slices(t, amount, dim, mask, RandomKeys(_seed(generator)))


def nm_mask(
    t: Tensor, n: int = 2, m: int = 4, *, dim: int = -1, scores: Tensor | None = None
) -> Tensor:
    """N:M semi-structured pruning: in every group of ``m`` consecutive entries along
    ``dim``, keep the ``n`` of largest ``|t|`` (or ``scores``); ties keep the lower index.

    >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4)
    tensor([[ True, False,  True, False]])
    """
    check_tensor(t)
    dim = check_dim(dim, t.ndim)
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}={value!r} must be an int")
    if not 0 < n <= m:
        raise ValueError(f"n={n}, m={m}: need 0 < n <= m")
    if t.shape[dim] % m:
        raise ValueError(f"m={m} does not divide the size {t.shape[dim]} of dim={dim}")
    if scores is None:
        check_finite(t, "t")
        scores = t.detach().abs()
    else:
        check_tensor(scores, "scores")
        if scores.shape != t.shape:
            raise ValueError(f"scores has shape {tuple(scores.shape)}, expected {tuple(t.shape)}")
        check_finite(scores, "scores")
    groups = scores.movedim(dim, -1).reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
    moved = t.movedim(dim, -1).shape
    return keep.reshape(moved).movedim(-1, dim).contiguous()


def _check_nm(t: Tensor, options: Mapping[str, Any], where: str) -> None:
    n, m, dim = options.get("n", 2), options.get("m", 4), options.get("dim", -1)
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"n={n!r}, m={m!r} for {where}: need ints with 0 < n <= m")
    if t.shape[dim] % m:
        raise ValueError(f"m={m} does not divide size {t.shape[dim]} of dim={dim} of {where}")


def _check_ln(t: Tensor, options: Mapping[str, Any], where: str) -> None:
    if options.get("n", 2) not in (0, 1, 2, math.inf):
        raise ValueError(f"n={options['n']!r} for {where} must be one of 0, 1, 2, inf")


register_method("magnitude")(Method("magnitude", magnitude_mask, ranks="entries"))
register_method("random")(Method("random", random_mask, ranks="entries", random=True))
register_method("ln_structured")(
    Method("ln_structured", ln_structured_mask, ranks="slices", check=_check_ln)
)
register_method("random_structured")(
    Method("random_structured", random_structured_mask, ranks="slices", random=True)
)
register_method("nm")(Method("nm", nm_mask, ranks="mask", pattern=True, check=_check_nm))


def global_magnitude_masks(
    named_tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    amount: float | int,
    *,
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One magnitude ranking across several tensors: exactly ``round(amount·N)`` of all
    ``N`` entries are pruned afterwards, wherever they lie.

    >>> masks = global_magnitude_masks({"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([2.0, 0.5])}, 0.5)
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([False, True], [True, False])
    """
    named = dict(named_tensors)
    if not named:
        raise ValueError("named_tensors is empty: nothing to prune")
    masks = dict(masks or {})
    unknown = set(masks) - set(named)
    if unknown:
        raise ValueError(f"masks names {sorted(unknown)} that are not in named_tensors")
    new = {}
    for name, t in named.items():
        check_tensor(t, name)
        new[name] = _start_mask(t, masks.get(name))
    total = sum(t.numel() for t in named.values())
    already = total - sum(int(m.count_nonzero()) for m in new.values())
    k = _extra_count(amount, total, already)
    select_lowest(
        key_source(list(named.values()), magnitude=True), list(new.values()), k, list(named)
    )
    return new


def _mask_for(t: Tensor, method: str, amount: float | int | None, **kwargs: Any) -> Tensor:
    fn = get_method(method)
    if fn.pattern:
        return fn(t, **kwargs)
    if amount is None:
        raise TypeError(f"method={method!r} needs an amount")
    return fn(t, amount, **kwargs)


def prune(t: Tensor, method: str, amount: float | int | None = None, **kwargs: Any) -> Tensor:
    """A pruned copy of ``t``: ``t * mask`` for the mask ``method`` computes.

    >>> prune(torch.tensor([1.0, -2.0, 0.5, 4.0]), "magnitude", 0.5)
    tensor([ 0., -2.,  0.,  4.])
    >>> prune(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "nm", n=1, m=2)
    tensor([[0., 2., 0., 4.]])
    """
    return t * _mask_for(t, method, amount, **kwargs)


def prune_(t: Tensor, method: str, amount: float | int | None = None, **kwargs: Any) -> Tensor:
    """Prune ``t`` in place and return it.

    >>> t = torch.tensor([3.0, 1.0, 2.0])
    >>> _ = prune_(t, "magnitude", 1)
    >>> t
    tensor([3., 0., 2.])
    """
    mask = _mask_for(t, method, amount, **kwargs)
    with torch.no_grad():
        return zero_pruned_(t, mask)


def zero_pruned_(t: Tensor, mask: Tensor) -> Tensor:
    """Set ``t`` to exactly 0 where ``mask`` is False, in place, allocating nothing.

    (``t.mul_(mask)`` would first copy the bool mask into ``t``'s dtype, and would keep
    NaN and inf where they are pruned.)

    >>> zero_pruned_(torch.tensor([1.0, float("nan")]), torch.tensor([True, False]))
    tensor([1., 0.])
    """
    if isinstance(t, DTensor) or isinstance(mask, DTensor):  # a shard: its local part
        zero_pruned_(local(t), local(mask))
        return t
    return torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device), out=t)
