"""Property-based tests of the mask engine (hypothesis).

Over random shapes, amounts, dtypes, methods and values (including heavy ties: small
integers), every mask prunes exactly the asked count, each new mask is a subset of the
previous one, the selection equals a plain sorting reference, ``Pruner.prune_to`` is
idempotent at the same sparsity, and global and layer scope agree on a single tensor.
Explicit examples larger than the engine's chunk exercise the chunk boundaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from prunekit import (
    Pruner,
    ln_structured_mask,
    magnitude_mask,
    nm_mask,
    random_mask,
    random_structured_mask,
)
from prunekit._select import CHUNK
from prunekit._validate import amount_to_count
from tests.checks import one_thread

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
BIG = (CHUNK + 5,)  # one entry-list longer than a chunk
BIG_2D = (CHUNK // 1024 + 1, 1024)  # the first chunk boundary falls inside the last row


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from(sorted(DTYPES))
kinds = st.sampled_from(["normal", "integers", "zeros-and-ones", "spread-ties"])
seeds = st.integers(0, 2**31 - 1)
fractions = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4).map(sorted)


def make(shape: tuple[int, ...], dtype: str, kind: str, seed: int) -> torch.Tensor:
    """A tensor of ``shape``: normal values, small integers (huge ties), 0s and 1s, or
    thousands of distinct values (ties spread over every chunk, but few per value)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        t = torch.randn(shape, generator=g)
    elif kind == "spread-ties":
        t = torch.randint(-5000, 5000, shape, generator=g).float() / 7
    elif kind == "integers":
        t = torch.randint(-3, 4, shape, generator=g).float()
    else:
        t = torch.randint(0, 2, shape, generator=g).float()
    return t.to(DTYPES[dtype])


def reference_magnitude(t: torch.Tensor, k: int, previous: torch.Tensor) -> torch.Tensor:
    """Prune the ``k`` kept entries of smallest ``|t|`` (ranked as float32, as the engine
    keys them), ties to the lower flat index, by a stable sort."""
    keys = t.detach().abs().float().flatten().double()
    keys[~previous.flatten()] = -math.inf  # already pruned: first in line
    order = torch.sort(keys, stable=True).indices
    already = int((~previous).sum())
    mask = torch.ones(t.numel(), dtype=torch.bool)
    mask[order[: already + k]] = False
    return mask.view(t.shape)


@SETTINGS
@given(shape=shapes, dtype=dtypes, kind=kinds, seed=seeds, amounts=fractions)
@example(shape=BIG, dtype="float32", kind="integers", seed=1, amounts=[0.3, 0.71])
@example(shape=BIG_2D, dtype="float32", kind="spread-ties", seed=3, amounts=[0.4, 0.83])
@example(shape=BIG_2D, dtype="bfloat16", kind="zeros-and-ones", seed=2, amounts=[0.5, 0.5, 0.9])
def test_magnitude_exact_nested_and_equal_to_sorting(
    shape: tuple[int, ...], dtype: str, kind: str, seed: int, amounts: list[float]
) -> None:
    t = make(shape, dtype, kind, seed)
    original = t.clone()
    previous = torch.ones(shape, dtype=torch.bool)
    for amount in amounts:
        mask = magnitude_mask(t, amount, mask=previous)
        count = amount_to_count(amount, t.numel())
        assert int((~mask).sum()) == count
        assert bool((mask <= previous).all())
        already = int((~previous).sum())
        assert torch.equal(mask, reference_magnitude(t, count - already, previous))
        # without the previous mask, magnitude masks at rising amounts are nested too
        assert bool((magnitude_mask(t, amount) <= magnitude_mask(t, amounts[0])).all())
        previous = mask
    assert torch.equal(t, original)  # the input is never modified


@SETTINGS
@given(shape=shapes, dtype=dtypes, kind=kinds, seed=seeds, amount=st.floats(0.0, 1.0))
@example(shape=BIG, dtype="float32", kind="zeros-and-ones", seed=7, amount=0.5)
def test_scores_rank_like_a_stable_sort_signed_zeros_tie(
    shape: tuple[int, ...], dtype: str, kind: str, seed: int, amount: float
) -> None:
    """Scores may be negative; -0.0 and +0.0 are equal scores, so they tie by position."""
    values = make(shape, dtype, kind, seed)
    signs = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
    scores = values * signs.to(values.dtype)  # 0 * -1 is -0.0
    t = torch.ones(shape)
    mask = magnitude_mask(t, amount, scores=scores)
    k = amount_to_count(amount, t.numel())
    order = torch.sort((scores.float() + 0.0).flatten().double(), stable=True).indices
    expected = torch.ones(t.numel(), dtype=torch.bool)
    expected[order[:k]] = False
    assert torch.equal(mask, expected.view(shape))


@SETTINGS
@given(shape=shapes, dtype=dtypes, kind=kinds, seed=seeds, amounts=fractions)
@example(shape=BIG, dtype="float64", kind="normal", seed=3, amounts=[0.25, 0.999999])
def test_random_exact_nested_and_seeded(
    shape: tuple[int, ...], dtype: str, kind: str, seed: int, amounts: list[float]
) -> None:
    t = make(shape, dtype, kind, seed)
    previous = torch.ones(shape, dtype=torch.bool)
    for i, amount in enumerate(amounts):
        mask, again = (
            random_mask(t, amount, mask=previous, generator=torch.Generator().manual_seed(seed + i))
            for _ in range(2)
        )
        assert int((~mask).sum()) == amount_to_count(amount, t.numel())
        assert bool((mask <= previous).all())
        assert torch.equal(mask, again)  # the same seed, the same mask
        previous = mask


@SETTINGS
@given(
    shape=shapes,
    dtype=dtypes,
    kind=kinds,
    seed=seeds,
    amounts=fractions,
    method=st.sampled_from(["ln_structured", "random_structured"]),
    n=st.sampled_from([1, 2, math.inf, 0]),
    dim=st.integers(-3, 2),
)
@example(
    shape=BIG_2D,
    dtype="float32",
    kind="integers",
    seed=4,
    amounts=[0.2, 0.6],
    method="ln_structured",
    n=1,
    dim=1,
)
def test_structured_exact_slices_nested(
    shape: tuple[int, ...],
    dtype: str,
    kind: str,
    seed: int,
    amounts: list[float],
    method: str,
    n: float,
    dim: int,
) -> None:
    dim = dim % len(shape)
    t = make(shape, dtype, kind, seed)
    others = [d for d in range(t.ndim) if d != dim]
    previous = torch.ones(shape, dtype=torch.bool)
    for i, amount in enumerate(amounts):
        if method == "ln_structured":
            mask = ln_structured_mask(t, amount, n=n, dim=dim, mask=previous)
        else:
            g = torch.Generator().manual_seed(seed + i)
            mask = random_structured_mask(t, amount, dim=dim, mask=previous, generator=g)
        kept = mask.all(dim=others) if others else mask
        gone = ~mask.any(dim=others) if others else ~mask
        assert bool((kept | gone).all())  # whole slices only
        expected = amount_to_count(amount, shape[dim])
        if expected == shape[dim] and amount < 1:  # a fraction below 1 keeps one slice
            expected -= 1
        assert int(gone.sum()) == expected
        assert bool((mask <= previous).all())
        if method == "ln_structured":  # the newly pruned slices have the smallest norms
            masked = (t * previous).float()
            norms = (
                torch.linalg.vector_norm(masked, ord=n, dim=others)
                if others
                else (masked.abs() if n != 0 else (masked != 0).float())
            )
            alive = previous.all(dim=others) if others else previous
            new = alive & gone
            if bool(new.any()) and bool(kept.any()):
                assert float(norms[new].max()) <= float(norms[kept].min())
        previous = mask


@SETTINGS
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    m=st.sampled_from([1, 2, 4, 8]),
    data=st.data(),
    dtype=dtypes,
    kind=kinds,
    seed=seeds,
    transpose=st.booleans(),
)
def test_nm_keeps_exactly_n_largest_of_every_m(
    rows: int,
    groups: int,
    m: int,
    data: Any,
    dtype: str,
    kind: str,
    seed: int,
    transpose: bool,
) -> None:
    n = data.draw(st.integers(1, m), label="n")
    t = make((rows, groups * m), dtype, kind, seed)
    # groups along the last dim, or (transposed) along dim 0
    mask = nm_mask(t.t().contiguous(), n, m, dim=0).t() if transpose else nm_mask(t, n, m)
    grouped, values = mask.view(rows, groups, m), t.abs().float().view(rows, groups, m)
    assert bool((grouped.sum(dim=-1) == n).all())
    if n < m:
        kept_min = values.masked_fill(~grouped, math.inf).amin(dim=-1)
        pruned_max = values.masked_fill(grouped, -math.inf).amax(dim=-1)
        assert bool((kept_min >= pruned_max).all())


class Params(nn.Module):
    """A module holding given tensors as parameters (targets: all of them)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(t) for t in tensors)


METHODS = {
    "magnitude": {"scope": "global"},
    "random": {"scope": "global"},
    "ln_structured": {"scope": "layer", "n": 1, "dim": 0},
    "random_structured": {"scope": "layer", "dim": -1},
    "nm": {"scope": "layer", "n": 1, "m": 2},
}


@SETTINGS
@given(
    shapes=st.lists(
        st.lists(st.integers(1, 6), min_size=1, max_size=3).map(lambda s: (*s[:-1], 2 * s[-1])),
        min_size=1,
        max_size=3,
    ),
    dtype=dtypes,
    kind=kinds,
    seed=seeds,
    sparsity=st.floats(0.0, 1.0),
    method=st.sampled_from(sorted(METHODS)),
)
@example(
    shapes=[BIG, (3, 4)], dtype="float32", kind="integers", seed=5, sparsity=0.6, method="magnitude"
)
def test_prune_to_is_idempotent(
    shapes: list[tuple[int, ...]],
    dtype: str,
    kind: str,
    seed: int,
    sparsity: float,
    method: str,
) -> None:
    model = Params(*(make(s, dtype, kind, seed + i) for i, s in enumerate(shapes)))
    pruner = Pruner(model, targets="params.*", method=method, seed=seed, **METHODS[method])
    pruner.prune_to(sparsity)
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pruner.prune_to(sparsity)
    for name, mask in masks.items():
        assert torch.equal(pruner.masks[name], mask), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    if METHODS[method]["scope"] == "global":
        report = pruner.sparsity()
        assert report.pruned == amount_to_count(sparsity, report.total)


@SETTINGS
@given(
    shape=shapes,
    dtype=dtypes,
    kind=kinds,
    seed=seeds,
    amounts=fractions,
    method=st.sampled_from(["magnitude", "random"]),
)
@example(shape=BIG, dtype="bfloat16", kind="integers", seed=6, amounts=[0.4, 0.8], method="random")
def test_global_and_layer_scope_agree_on_one_tensor(
    shape: tuple[int, ...], dtype: str, kind: str, seed: int, amounts: list[float], method: str
) -> None:
    pruners = []
    for scope in ("global", "layer"):
        model = Params(make(shape, dtype, kind, seed))
        pruners.append(Pruner(model, targets="params.*", method=method, scope=scope, seed=seed))
    for amount in amounts:
        for pruner in pruners:
            pruner.prune_to(amount)
        glob, layer = (p.masks["params.0"] for p in pruners)
        assert torch.equal(glob, layer)
        assert int((~glob).sum()) == amount_to_count(amount, glob.numel())
        assert torch.equal(pruners[0].model.params[0], pruners[1].model.params[0])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_ties_at_the_chunk_boundary_go_to_the_lower_index(dtype: str) -> None:
    """All-equal magnitudes over two chunks: the pruned entries are exactly the first k."""
    t = torch.full((CHUNK + 7,), -2.0, dtype=DTYPES[dtype])
    for k in (CHUNK - 1, CHUNK, CHUNK + 1):
        mask = magnitude_mask(t, k)
        assert int((~mask).sum()) == k
        assert not bool(mask[:k].any()) and bool(mask[k:].all())
