"""Tensor-level mask functions: exact counts, ties, monotonicity, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit import (
    global_magnitude_masks,
    ln_structured_mask,
    magnitude_mask,
    nm_mask,
    prune,
    prune_,
    random_mask,
    random_structured_mask,
)
from prunekit._select import CHUNK


def kth_threshold_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: keep entries strictly above the k-th smallest |value| (no ties assumed)."""
    flat = values.abs().flatten()
    threshold = flat.kthvalue(k).values
    return values.abs() > threshold


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_magnitude_matches_sorting_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    t = (
        torch.randperm(1000, generator=g).to(dtype).view(20, 50) - 500
    )  # distinct magnitudes except ±
    t = t + 0.25  # no two entries share a magnitude
    mask = magnitude_mask(t, 0.3)
    assert mask.dtype == torch.bool and mask.shape == t.shape
    assert int((~mask).sum()) == 300
    assert torch.equal(mask, kth_threshold_mask(t.double(), 300))


def test_ties_are_broken_by_position_and_count_is_exact() -> None:
    t = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, 2.0])
    assert magnitude_mask(t, 3).tolist() == [False, False, False, True, True, True]
    assert magnitude_mask(t, 0.5).tolist() == [False, False, False, True, True, True]
    assert magnitude_mask(torch.zeros(7), 4).tolist() == [False] * 4 + [True] * 3


def test_ties_across_chunk_boundaries() -> None:
    n = CHUNK * 2 + 123
    t = torch.ones(n)
    t[::7] = 0.5
    low = len(range(0, n, 7))
    k = low + 1000  # all the 0.5s, then the first 1000 ones in flat order
    mask = magnitude_mask(t, k)
    assert int((~mask).sum()) == k
    ones_pruned = (~mask) & (t == 1.0)
    first = torch.nonzero(t == 1.0).flatten()[:1000]
    assert torch.equal(torch.nonzero(ones_pruned).flatten(), first)


def test_given_mask_counts_toward_amount_and_stays_pruned() -> None:
    t = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    previous = torch.tensor([False, True, True, True, True])  # the largest is already pruned
    mask = magnitude_mask(t, 0.4, mask=previous)  # 2 pruned in all: the old one and 1.0
    assert mask.tolist() == [False, True, True, True, False]
    assert previous.tolist() == [False, True, True, True, True]  # input untouched
    with pytest.raises(ValueError, match="masks only shrink"):
        magnitude_mask(t, 0, mask=previous)


def test_scores_replace_magnitudes_and_may_be_negative() -> None:
    t = torch.ones(4)
    scores = torch.tensor([0.5, -2.0, 3.0, -0.1])
    assert magnitude_mask(t, 2, scores=scores).tolist() == [True, False, True, False]


def test_input_is_not_modified() -> None:
    t = torch.randn(30)
    before = t.clone()
    for fn in (magnitude_mask, random_mask):
        fn(t, 0.5)
    ln_structured_mask(t.view(5, 6), 0.4)
    nm_mask(t.view(5, 6), 1, 2)
    assert torch.equal(t, before)


def test_random_mask_exact_seeded_and_subset() -> None:
    t = torch.randn(40, 25)
    m1 = random_mask(t, 0.3, generator=torch.Generator().manual_seed(3))
    m2 = random_mask(t, 0.3, generator=torch.Generator().manual_seed(3))
    m3 = random_mask(t, 0.3, generator=torch.Generator().manual_seed(4))
    assert int((~m1).sum()) == 300 and torch.equal(m1, m2) and not torch.equal(m1, m3)
    deeper = random_mask(t, 0.6, mask=m1, generator=torch.Generator().manual_seed(5))
    assert int((~deeper).sum()) == 600 and bool((deeper <= m1).all())


@pytest.mark.parametrize(
    ("n", "expected_pruned_rows"),
    [
        (1, [2]),  # L1 norms 2, 3, 0.3, 2.5
        (2, [2]),
        (math.inf, [2]),
        (0, [1]),  # non-zero counts 2, 1, 2, 2: row 1 has the fewest
    ],
)
def test_ln_structured_rows(n: float, expected_pruned_rows: list[int]) -> None:
    t = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.1, 0.2], [2.0, 0.5]])
    mask = ln_structured_mask(t, 1, n=n, dim=0)
    pruned = [i for i in range(4) if not mask[i].any()]
    assert pruned == expected_pruned_rows
    assert all(mask[i].all() for i in range(4) if i not in expected_pruned_rows)


def test_ln_structured_columns_of_conv_weight() -> None:
    w = torch.ones(4, 3, 2, 2)
    w[:, 1] *= 0.1  # input channel 1 is the weakest
    w[:, 2] *= 0.5
    mask = ln_structured_mask(w, 2, n=2, dim=1)
    assert not mask[:, 1].any() and not mask[:, 2].any() and mask[:, 0].all()
    assert int((~mask).sum()) == 2 * 4 * 2 * 2


def test_structured_amount_counts_slices_and_respects_previous_mask() -> None:
    t = torch.arange(1.0, 11.0).view(10, 1).expand(10, 3).contiguous()  # row i has norm ∝ i+1
    first = ln_structured_mask(t, 0.2, dim=0)
    assert [bool(first[i].any()) for i in range(10)] == [False, False] + [True] * 8
    second = ln_structured_mask(t, 0.5, dim=0, mask=first)
    assert [bool(second[i].any()) for i in range(10)] == [False] * 5 + [True] * 5


def test_random_structured_exact_slices() -> None:
    t = torch.randn(6, 8)
    mask = random_structured_mask(t, 3, dim=1, generator=torch.Generator().manual_seed(0))
    dead = (~mask).all(dim=0)
    assert int(dead.sum()) == 3 and bool(mask[:, ~dead].all())


def test_nm_keeps_n_of_every_m() -> None:
    t = torch.tensor([[4.0, -1.0, 3.0, 2.0, 0.0, 0.0, 5.0, -6.0]])
    assert nm_mask(t, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    w = torch.randn(16, 32)
    mask = nm_mask(w, 2, 4)
    groups = mask.view(16, 8, 4)
    assert bool((groups.sum(-1) == 2).all())
    kept_min = (w.abs().view(16, 8, 4) * groups).amax(-1)  # independent check: kept >= dropped
    dropped_max = (w.abs().view(16, 8, 4) * ~groups).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    along_rows = nm_mask(w, 1, 4, dim=0)
    assert bool((along_rows.view(4, 4, 32).sum(1) == 1).all())


def test_global_magnitude_matches_concatenated_reference() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(100, 30, generator=g), "b": torch.randn(7, generator=g) * 5}
    masks = global_magnitude_masks(tensors, 0.8)
    flat = torch.cat([t.flatten() for t in tensors.values()])
    k = round(0.8 * flat.numel())
    threshold = flat.abs().kthvalue(k).values
    for name, t in tensors.items():
        assert torch.equal(masks[name], t.abs() > threshold)
    assert sum(int((~m).sum()) for m in masks.values()) == k


def test_prune_returns_copy_and_prune_in_place() -> None:
    t = torch.tensor([1.0, -3.0, 0.5, 2.0])
    out = prune(t, "magnitude", 2)
    assert out.tolist() == [0.0, -3.0, 0.0, 2.0] and t.tolist() == [1.0, -3.0, 0.5, 2.0]
    assert prune_(t, "magnitude", 2) is t
    assert t.tolist() == [0.0, -3.0, 0.0, 2.0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda t: magnitude_mask(t, 1.5), ValueError, r"amount=1.5"),
        (lambda t: magnitude_mask(t, -0.1), ValueError, r"amount=-0.1"),
        (lambda t: magnitude_mask(t, float("nan")), ValueError, r"amount=nan"),
        (lambda t: magnitude_mask(t, -1), ValueError, r"amount=-1"),
        (lambda t: magnitude_mask(t, 13), ValueError, r"amount=13 must be a count in \[0, 12\]"),
        (lambda t: magnitude_mask(t, True), TypeError, r"amount=True"),
        (lambda t: magnitude_mask(t, "half"), TypeError, r"amount='half'"),
        (lambda t: magnitude_mask(t.long(), 0.5), TypeError, r"floating-point"),
        (lambda t: magnitude_mask(t, 0.5, mask=torch.ones(3, 4)), TypeError, r"torch.bool"),
        (
            lambda t: magnitude_mask(t, 0.5, mask=torch.ones(4, 3, dtype=torch.bool)),
            ValueError,
            r"shape",
        ),
        (lambda t: magnitude_mask(t, 0.5, scores=torch.ones(2)), ValueError, r"scores has shape"),
        (lambda t: prune(t, "l7", 0.5), ValueError, r"method='l7'"),
        (lambda t: prune(t, "magnitud", 0.5), ValueError, r"did you mean 'magnitude'"),
        (lambda t: ln_structured_mask(t, 0.5, dim=2), ValueError, r"dim=2 is out of range"),
        (lambda t: ln_structured_mask(t, 0.5, n=3), ValueError, r"n=3"),
        (lambda t: ln_structured_mask(t, 4), ValueError, r"amount=4 must be a count in \[0, 3\]"),
        (lambda t: random_structured_mask(t, 0.5, dim=-3), ValueError, r"dim=-3"),
        (lambda t: nm_mask(t, 3, 2), ValueError, r"n=3, m=2"),
        (lambda t: nm_mask(t, 0, 4), ValueError, r"n=0, m=4"),
        (lambda t: nm_mask(t, 2, 3, dim=1), ValueError, r"m=3 does not divide the size 4"),
        (lambda t: nm_mask(t, 2.0, 4), TypeError, r"n=2.0"),
        (
            lambda t: magnitude_mask(t.masked_fill(t > 0, float("nan")), 0.5),
            ValueError,
            r"NaN or inf",
        ),
        (lambda t: global_magnitude_masks({}, 0.5), ValueError, r"named_tensors is empty"),
        (
            lambda t: global_magnitude_masks({"a": t}, 0.5, masks={"b": t > 0}),
            ValueError,
            r"\['b'\]",
        ),
    ],
)
def test_bad_input(call, error: type[Exception], match: str) -> None:
    t = torch.randn(3, 4)
    before = t.clone()
    with pytest.raises(error, match=match):
        call(t)
    assert torch.equal(t, before)


def test_registry_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        prunekit.register_method("magnitude")(magnitude_mask)


def _stable_sort_pruned(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the first k of a stable sort of the magnitudes (ties by position)."""
    mask = torch.ones(magnitudes.numel(), dtype=torch.bool)
    mask[torch.sort(magnitudes.flatten().double(), stable=True).indices[:k]] = False
    return mask


@pytest.mark.usefixtures("four_threads")
def test_selection_split_between_threads_is_exact_and_thread_count_free() -> None:
    # 3 tensors, 40 chunks in all: 4 threads get runs that end inside tensors. Values
    # on a fine grid (about 5 entries per magnitude), so that the k-th magnitude's bucket
    # is gathered, and k cuts a group of equal magnitudes spread over several runs.
    g = torch.Generator().manual_seed(5)
    sizes = (CHUNK * 13 + 7, CHUNK * 20, CHUNK * 7 - 3)
    named = {
        f"w{j}": torch.randint(-(2**21), 2**21, (n,), generator=g) / 2048.0
        for j, n in enumerate(sizes)
    }
    magnitudes = torch.cat(list(named.values())).abs()
    cut = magnitudes.kthvalue(round(0.62 * magnitudes.numel())).values
    tied = torch.nonzero(magnitudes == cut).flatten()
    assert tied.numel() >= 3 and tied[-1] - tied[0] > 10 * CHUNK
    k = int((magnitudes < cut).sum()) + tied.numel() // 2
    masks = global_magnitude_masks(named, k)
    flat = torch.cat([~m for m in masks.values()])
    expected = ~_stable_sort_pruned(magnitudes, k)
    assert int(flat.sum()) == k
    assert torch.equal(flat, expected)
    torch.set_num_threads(1)
    assert all(torch.equal(masks[n], m) for n, m in global_magnitude_masks(named, k).items())
    # a crowded threshold bucket (one repeated value) takes the three-pass route
    crowded = {"w": torch.full((CHUNK * 16 + 1,), 0.5)}
    torch.set_num_threads(4)
    assert torch.equal(
        ~global_magnitude_masks(crowded, 1000)["w"], torch.arange(crowded["w"].numel()) < 1000
    )


@pytest.mark.usefixtures("four_threads")
def test_random_masks_do_not_depend_on_the_thread_count() -> None:
    t = torch.randn(CHUNK * 16 + 11)
    threaded = random_mask(t, 0.7, generator=torch.Generator().manual_seed(3))
    torch.set_num_threads(1)
    single = random_mask(t, 0.7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(threaded, single)
    assert int((~threaded).sum()) == round(0.7 * t.numel())


@pytest.mark.usefixtures("four_threads")
def test_nan_found_by_a_later_thread_names_its_tensor_and_changes_nothing() -> None:
    named = {"a": torch.randn(CHUNK * 10), "b": torch.randn(CHUNK * 10)}
    named["b"][-1] = float("nan")
    with pytest.raises(ValueError, match="b holds NaN or inf"):
        global_magnitude_masks(named, 0.5)


@pytest.mark.parametrize("n", [1, 2])
def test_ln_norms_are_correctly_rounded_as_sharded_ranks_compute_them(n: int) -> None:
    """One process ranks slices by the correctly rounded float32 L1 / L2 norm, the value
    sharded ranks get from exact integer sums (so the masks agree bit for bit). Rows built
    on float32 rounding midpoints: 1 + 2**-24 is a tie (rounds to even, 1.0), and a tiny
    extra 2**-60 (lost in a float64 sum) must round it up to 1 + 2**-23."""
    from fractions import Fraction

    from prunekit._distributed import exact_slice_norms
    from prunekit._masks import _slice_norms

    torch.manual_seed(0)
    w = torch.randn(40, 50)
    ones = torch.zeros(3, 50)
    ones[:, 0] = 1.0
    ones[1:, 1] = 2.0**-24 if n == 1 else 2.0**-12 * math.sqrt(2)  # (2**-12*sqrt2)**2 ~ 2**-23
    ones[2, 2] = 2.0**-60
    w = torch.cat([w, ones])
    for dim in (0, 1):
        got = _slice_norms(w, n, dim)
        assert torch.equal(got, exact_slice_norms(w, n, dim))
    if n == 1:  # by hand with exact fractions for the constructed rows
        row = [Fraction(float(v)) for v in w[-1]]
        assert sum(row) > 1 + Fraction(1, 2**24)  # just above the midpoint
        assert float(_slice_norms(w, 1, 0)[-1]) == 1 + 2.0**-23
        assert float(_slice_norms(w, 1, 0)[-2]) == 1.0  # the exact tie goes to even
