"""Tests for prunekit.schedules: exact values, properties, validation and serialisation.

Expected values are computed here from the published formulas, never copied from the code.
"""

from __future__ import annotations

import ast
import functools
import itertools
import math
import pickle
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from prunekit.schedules import (
    Constant,
    Cosine,
    Exponential,
    FromCallable,
    Join,
    Linear,
    LotteryTicketPlan,
    Polynomial,
    Schedule,
    Steps,
    from_dict,
    join,
    list_schedules,
    plot_schedule,
    register_schedule,
    to_omegaconf,
    update_points,
)

NAN = float("nan")
INF = float("inf")

# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

sparsities = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
rates = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)
times = st.integers(min_value=0, max_value=500)
layer_names = st.sampled_from(["output", "fc3.weight", "features.0.weight", "x"]) | st.text(
    alphabet=string.ascii_letters + string.digits + "._", min_size=1, max_size=12
)
RAMPS = (Polynomial, Linear, Cosine)


@st.composite
def ramps(draw: st.DrawFn) -> Polynomial | Linear | Cosine:
    cls = draw(st.sampled_from(RAMPS))
    initial, final = sorted([draw(sparsities), draw(sparsities)])
    begin = draw(times)
    end = begin + draw(st.integers(min_value=1, max_value=300))
    frequency = draw(st.integers(min_value=1, max_value=end - begin + 5))
    if cls is Polynomial:
        power = draw(st.floats(min_value=0.05, max_value=10.0))
        return Polynomial(initial, final, begin, end, frequency, power)
    return cls(initial, final, begin, end, frequency)


constants = st.builds(Constant, sparsities, times)
exponentials = st.builds(
    Exponential, rates, times, st.integers(min_value=1, max_value=50), st.none() | sparsities
)
steps = st.dictionaries(times, sparsities, min_size=1, max_size=8).map(
    lambda points: Steps(sorted(points.items()))
)
callables = st.builds(
    FromCallable,
    st.sampled_from([math.tanh, math.sin, math.erf]),
    st.integers(min_value=1, max_value=20),
)
plans = st.builds(
    LotteryTicketPlan,
    st.integers(min_value=1, max_value=40),
    rates,
    st.none() | st.dictionaries(layer_names, rates, max_size=4),
)
held_kinds = ramps() | constants | exponentials | steps | plans


def _joins(children: st.SearchStrategy[Schedule]) -> st.SearchStrategy[Schedule]:
    return st.lists(children, min_size=1, max_size=3).flatmap(
        lambda parts: st.lists(
            st.integers(min_value=1, max_value=1000),
            min_size=len(parts) - 1,
            max_size=len(parts) - 1,
            unique=True,
        ).map(lambda bounds: Join(parts, sorted(bounds)))
    )


any_schedule = st.recursive(held_kinds | callables, _joins, max_leaves=6)
callable_free = st.recursive(held_kinds, _joins, max_leaves=6)  # math.sin(t) < 0 for some t


# ---------------------------------------------------------------------------------------
# Exact values
# ---------------------------------------------------------------------------------------


def zhu_gupta(t: int, s_i: float, s_f: float, t0: int, t1: int, p: float = 3.0) -> float:
    """Zhu & Gupta (2017), eq. 1, without the update grid."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** p


def test_polynomial_published_values() -> None:
    s = Polynomial(0.0, 0.9, begin=0, end=100)
    for t, expected in [(25, 0.5203), (50, 0.7875), (75, 0.8859), (100, 0.9)]:
        assert s(t) == pytest.approx(expected, abs=1e-4)
        assert s(t) == pytest.approx(zhu_gupta(t, 0.0, 0.9, 0, 100), abs=1e-12)
    assert s(100) == 0.9
    assert all(s(t) == 0.9 for t in range(100, 400))


def test_polynomial_before_and_after_the_window() -> None:
    s = Polynomial(0.1, 0.9, begin=20, end=120)
    assert all(s(t) == 0.1 for t in range(20 + 1)) and s(21) > 0.1
    assert all(s(t) == 0.9 for t in range(120, 300))
    assert s(70) == pytest.approx(zhu_gupta(70, 0.1, 0.9, 20, 120), abs=1e-12)
    assert not any(s.is_update(t) for t in range(20))
    assert not any(s.is_update(t) for t in range(121, 300))


def test_polynomial_holds_between_update_points() -> None:
    s = Polynomial(0.0, 0.8, begin=10, end=45, frequency=10, power=2)
    assert update_points(s, 100) == [10, 20, 30, 40, 45]
    for t in range(10, 45):
        last = 10 + (t - 10) // 10 * 10
        assert s(t) == pytest.approx(zhu_gupta(last, 0.0, 0.8, 10, 45, 2), abs=1e-12)
    assert s(45) == 0.8


def test_linear_and_cosine_values() -> None:
    lin = Linear(0.2, 0.6, begin=4, end=14)
    cos = Cosine(0.2, 0.6, begin=4, end=14)
    for t in range(4, 14):
        x = (t - 4) / 10
        assert lin(t) == pytest.approx(0.2 + 0.4 * x, abs=1e-12)
        assert cos(t) == pytest.approx(0.2 + 0.4 * 0.5 * (1 - math.cos(math.pi * x)), abs=1e-12)
    assert lin(3) == cos(3) == 0.2
    assert lin(14) == cos(14) == 0.6


def test_constant_is_one_shot() -> None:
    s = Constant(0.7, begin=3)
    assert [s(t) for t in range(6)] == [0.0, 0.0, 0.0, 0.7, 0.7, 0.7]
    assert update_points(s, 50) == [3]
    assert Constant(0.5)(0) == 0.5 and Constant(0.5).is_update(0)


def test_exponential_values_and_cap() -> None:
    s = Exponential(0.2, begin=5, frequency=10)
    assert s(4) == 0.0
    for k in range(1, 6):  # the k-th update happens at 5 + 10 (k - 1)
        first, last = 5 + 10 * (k - 1), 5 + 10 * k - 1
        assert s(first) == s(last) == pytest.approx(1 - 0.8**k, abs=1e-12)
    assert update_points(s, 40) == [5, 15, 25, 35]

    capped = Exponential(0.2, begin=5, frequency=10, final=0.5)
    assert capped(25) == pytest.approx(1 - 0.8**3, abs=1e-12)  # 0.488
    assert capped(35) == 0.5 and capped(1000) == 0.5  # 0.5904 capped
    assert update_points(capped, 100) == [5, 15, 25, 35]  # no update once capped


def test_exponential_stays_below_one_far_out() -> None:
    s = Exponential(0.5)
    assert 0.999 < s(10_000) < 1.0


def test_steps_values() -> None:
    s = Steps([(5, 0.3), (8, 0.6), (20, 0.65)])
    expected = [0.0] * 5 + [0.3] * 3 + [0.6] * 12 + [0.65] * 10
    assert [s(t) for t in range(30)] == expected
    assert update_points(s, 100) == [5, 8, 20]
    assert Steps([(0, 0.5)])(0) == 0.5


def test_from_callable_values_and_updates() -> None:
    s = FromCallable(lambda t: t / 100, update_every=4)
    assert [s(t) for t in (0, 7, 99)] == [0.0, 0.07, 0.99]
    assert update_points(s, 12) == [0, 4, 8, 12]
    assert isinstance(FromCallable(lambda t: 0)(3), float)


@pytest.mark.parametrize(
    ("value", "error"),
    [(1.0, ValueError), (1.5, ValueError), (-0.1, ValueError), (NAN, ValueError), ("x", TypeError)],
)
def test_from_callable_checks_what_it_returns(value: object, error: type[Exception]) -> None:
    s = FromCallable(lambda t: value)
    with pytest.raises(error, match=r"t=3") as info:
        s(3)
    assert repr(value) in str(info.value)


def test_join_follows_optax_semantics() -> None:
    ramp = Linear(0.0, 0.5, begin=0, end=10)
    s = join([Constant(0.0), ramp, Constant(0.5)], boundaries=[20, 30])
    for t in range(20):
        assert s(t) == 0.0
    for t in range(20, 30):
        assert s(t) == ramp(t - 20)
    assert all(s(t) == 0.5 for t in range(30, 60))
    assert update_points(s, 60) == [0, *range(20, 31)]
    assert isinstance(s, Join) and s == Join([Constant(0.0), ramp, Constant(0.5)], [20, 30])


def test_join_of_one_schedule_is_that_schedule() -> None:
    inner = Steps([(3, 0.5)])
    s = join([inner], [])
    assert [s(t) for t in range(10)] == [inner(t) for t in range(10)]


def test_lottery_ticket_lenet_300_100() -> None:
    """Frankle & Carbin (2019), LeNet-300-100: hidden layers 20 %, output 10 % per round."""
    sizes = {"fc1.weight": 784 * 300, "fc2.weight": 300 * 100, "output": 100 * 10}
    plan = LotteryTicketPlan(rounds=20, rate=0.2, layer_rates={"output": 0.1})
    published = {3: 51.28, 7: 21.07, 9: 13.52, 12: 6.95, 15: 3.58}
    for r, percent in published.items():
        overall, kept = plan.remaining(r, sizes)
        assert round(100 * overall, 2) == percent
        continuous = (265_200 * 0.8**r + 1_000 * 0.9**r) / 266_200
        assert abs(100 * overall - 100 * continuous) < 0.001
        for name, n in sizes.items():
            q = 0.1 if name == "output" else 0.2
            assert kept[name] == n - round((1 - (1 - q) ** r) * n)
        assert overall == sum(kept.values()) / 266_200


def test_lottery_ticket_sparsities() -> None:
    plan = LotteryTicketPlan(rounds=5, rate=0.2, layer_rates={"fc3.weight": 0.1})
    for r in range(6):
        assert plan.sparsity(r) == pytest.approx(1 - 0.8**r, abs=1e-12)
        assert plan.sparsity(r, "fc1.weight") == plan.sparsity(r)
        assert plan.sparsity(r, "fc3.weight") == pytest.approx(1 - 0.9**r, abs=1e-12)
        assert plan(r) == plan.sparsity(r)
    assert plan.layer_sparsities(2, ["fc1.weight", "fc3.weight"]) == {
        "fc1.weight": pytest.approx(0.36),
        "fc3.weight": pytest.approx(0.19),
    }
    assert plan(99) == plan.sparsity(5)
    assert update_points(plan, 10) == [1, 2, 3, 4, 5]


def test_lottery_ticket_plan_copies_layer_rates() -> None:
    given = {"output": 0.1}
    plan = LotteryTicketPlan(3, 0.2, given)
    given["output"] = 0.5
    assert plan.sparsity(1, "output") == pytest.approx(0.1)
    assert LotteryTicketPlan(3, 0.2) == LotteryTicketPlan(3, 0.2, {})


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: p.sparsity(6), ValueError, r"round=6"),
        (lambda p: p.sparsity(-1), ValueError, r"round=-1"),
        (lambda p: p.sparsity(1.0), TypeError, r"round=1\.0"),
        (lambda p: p.layer_sparsities(1, ["fc1"]), ValueError, r"'out'.*fc1"),
        (lambda p: p.remaining(1, {"fc1": 10}), ValueError, r"'out'"),
        (lambda p: p.remaining(1, {"out": 0}), ValueError, r"layer_sizes\['out'\]=0"),
        (lambda p: p.remaining(1, {"out": 2.5}), TypeError, r"layer_sizes\['out'\]=2\.5"),
        (lambda p: p.remaining(1, {}), ValueError, r"layer_sizes"),
        (lambda p: p.remaining(1, [("out", 3)]), TypeError, r"layer_sizes"),
    ],
)
def test_lottery_ticket_bad_queries(
    call: Callable[[LotteryTicketPlan], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call(LotteryTicketPlan(rounds=5, rate=0.2, layer_rates={"out": 0.1}))


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@given(ramps())
def test_ramps_are_monotone_bounded_and_reach_final(s: Polynomial | Linear | Cosine) -> None:
    values = [s(t) for t in range(s.end + 10)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert all(s.initial <= v <= s.final for v in values)
    assert s(s.end) == s.final and values[-1] == s.final
    assert values[0] == s.initial


@given(ramps())
def test_ramp_updates_are_exactly_the_grid_and_end(s: Polynomial | Linear | Cosine) -> None:
    expected = set(range(s.begin, s.end, s.frequency)) | {s.end}
    assert {t for t in range(s.end + 20) if s.is_update(t)} == expected


@given(exponentials)
def test_exponential_updates_are_exactly_the_grid_until_capped(s: Exponential) -> None:
    horizon = s.begin + 30 * s.frequency
    expected = []
    for k in range(30):  # the (k+1)-th update; k updates happened before it
        before = 1 - (1 - s.rate) ** k
        if s.final is None or before < s.final:
            expected.append(s.begin + k * s.frequency)
    assert update_points(s, horizon - 1) == expected


@given(steps)
def test_steps_update_at_listed_times(s: Steps) -> None:
    assert update_points(s, 600) == [t for t, _ in s.points]


@given(held_kinds)
def test_value_is_held_at_the_last_update(s: Schedule) -> None:
    last = None
    for t in range(700):
        if s.is_update(t):
            last = t
        elif last is not None:
            assert s(t) == s(last)


@given(callable_free, st.lists(st.integers(min_value=0, max_value=2000), min_size=1))
def test_no_hidden_state(s: Schedule, ts: list[int]) -> None:
    first = [(s(t), s.is_update(t)) for t in ts]
    assert [(s(t), s.is_update(t)) for t in reversed(ts)] == first[::-1]
    assert all(isinstance(v, float) and 0.0 <= v < 1.0 for v, _ in first)


# ---------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------


@given(any_schedule)
def test_every_kind_round_trips_through_omegaconf(s: Schedule) -> None:
    config = OmegaConf.create(s.to_dict())
    assert from_dict(config) == s
    assert from_dict(OmegaConf.create(OmegaConf.to_yaml(config))) == s
    assert from_dict(s.to_dict()) == s
    assert from_dict(to_omegaconf(s)) == s


@settings(max_examples=30)
@given(any_schedule)
def test_every_kind_pickles(s: Schedule) -> None:
    assert pickle.loads(pickle.dumps(s)) == s


def test_dict_form_is_the_documented_one() -> None:
    assert Polynomial(0.0, 0.9, begin=0, end=100).to_dict() == {
        "kind": "polynomial",
        "initial": 0.0,
        "final": 0.9,
        "begin": 0,
        "end": 100,
        "frequency": 1,
        "power": 3,
    }
    joined = join([Constant(0.0), Steps([(1, 0.5)])], [10]).to_dict()
    assert joined == {
        "kind": "join",
        "schedules": [
            {"kind": "constant", "sparsity": 0.0, "begin": 0},
            {"kind": "steps", "points": [[1, 0.5]]},
        ],
        "boundaries": [10],
    }


def test_yaml_names_a_joined_schedule() -> None:
    yaml = """
    kind: join
    boundaries: [10, 110]
    schedules:
      - {kind: constant, sparsity: 0.0}
      - {kind: polynomial, initial: 0.0, final: 0.9, begin: 0, end: 100}
      - {kind: constant, sparsity: 0.9}
    """
    s = from_dict(OmegaConf.create(yaml))
    assert s(5) == 0.0
    assert s(60) == pytest.approx(zhu_gupta(50, 0.0, 0.9, 0, 100), abs=1e-12)
    assert s(500) == 0.9


def test_lottery_plan_with_dotted_layer_names_round_trips() -> None:
    plan = LotteryTicketPlan(rounds=20, rate=0.2, layer_rates={"fc3.weight": 0.1})
    config = to_omegaconf(plan)
    assert config.layer_rates["fc3.weight"] == 0.1
    assert from_dict(config) == plan


def _nested() -> Callable[[int], float]:
    def inner(t: int) -> float:
        return 0.0

    return inner


@pytest.mark.parametrize(
    "fn",
    [lambda t: 0.0, _nested(), functools.partial(min, 0.0)],
    ids=["lambda", "nested", "partial"],
)
def test_unimportable_callable_does_not_serialise(fn: Callable[[int], float]) -> None:
    s = FromCallable(fn)
    assert s(1) == 0.0
    with pytest.raises(ValueError, match=r"module:qualname"):
        s.to_dict()


def test_importable_callable_serialises_by_name() -> None:
    s = FromCallable(math.tanh, update_every=3)
    assert s.to_dict() == {"kind": "callable", "fn": "math:tanh", "update_every": 3}
    assert from_dict({"kind": "callable", "fn": "math:erf"}) == FromCallable(math.erf)


@pytest.mark.parametrize("ref", ["math.tanh", "math:", ":tanh", "math:no_such_fn", "no_such_mod:f"])
def test_bad_callable_reference(ref: str) -> None:
    with pytest.raises((ValueError, ImportError, AttributeError)):
        from_dict({"kind": "callable", "fn": ref})


def test_repr_is_readable_and_eval_round_trips() -> None:
    s = Polynomial(0, 0.9, begin=0, end=100)
    assert repr(s) == (
        "Polynomial(initial=0.0, final=0.9, begin=0, end=100, frequency=1, power=3.0)"
    )
    namespace = {cls.__name__: cls for cls in (Polynomial, Constant, Steps, Join, Exponential)}
    for item in [s, Constant(0.5, 3), Steps([(1, 0.5)]), Join([s, Constant(0.9)], [100])]:
        assert eval(repr(item), namespace) == item


def test_kinds_differ_even_with_equal_fields() -> None:
    assert Linear(0.0, 0.5, 0, 10) != Cosine(0.0, 0.5, 0, 10)


# ---------------------------------------------------------------------------------------
# Registry and from_dict errors
# ---------------------------------------------------------------------------------------


def test_list_schedules() -> None:
    kinds = list_schedules()
    assert kinds == sorted(kinds)
    assert set(kinds) >= {
        "constant",
        "polynomial",
        "linear",
        "cosine",
        "exponential",
        "steps",
        "callable",
        "join",
        "lottery_ticket",
    }


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match=r"'polynomial' is already registered"):

        @register_schedule("polynomial")
        class Again(Polynomial):
            pass


def test_register_needs_a_schedule_class() -> None:
    with pytest.raises(TypeError, match=r"Schedule subclass"):
        register_schedule("not_a_schedule")(dict)  # type: ignore[type-var]


def test_custom_kind_registers_and_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunekit.schedules import _core

    monkeypatch.setattr(_core, "_REGISTRY", dict(_core._REGISTRY))

    @register_schedule("test_half")
    class Half(Schedule):
        def __init__(self, every: int = 1) -> None:
            self.every = every

        def __call__(self, t: int) -> float:
            return 0.5

        def is_update(self, t: int) -> bool:
            return t % self.every == 0

        def to_dict(self) -> dict[str, Any]:
            return {"kind": "test_half", "every": self.every}

    assert "test_half" in list_schedules()
    assert from_dict({"kind": "test_half", "every": 4}).to_dict() == {
        "kind": "test_half",
        "every": 4,
    }


def test_unknown_kind_lists_valid_ones_and_suggests() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'polynomial'") as info:
        from_dict({"kind": "polynomal", "initial": 0.0})
    for kind in list_schedules():
        assert kind in str(info.value)


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ({"initial": 0.0}, ValueError, r"no 'kind' key.*polynomial"),
        ({"kind": 3}, ValueError, r"kind=3"),
        ({"kind": ["constant"]}, ValueError, r"kind=\['constant'\]"),
        (
            {"kind": "constant", "sparsity": 0.5, "stat": 1},
            ValueError,
            r"'stat'.*valid keys: kind, sparsity, begin",
        ),
        ({"kind": "linear", "initial": 0.0, "final": 0.5, "begin": 0}, ValueError, r"end"),
        ({"kind": "constant", "sparsity": 1.5}, ValueError, r"sparsity=1\.5"),
        ([("kind", "constant")], TypeError, r"mapping"),
    ],
)
def test_from_dict_errors(config: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        from_dict(config)


def test_unknown_key_names_it_and_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"'powr'") as info:
        from_dict(
            {"kind": "polynomial", "initial": 0.0, "final": 0.5, "begin": 0, "end": 9, "powr": 2}
        )
    for key in ("initial", "final", "begin", "end", "frequency", "power"):
        assert key in str(info.value)
    assert "did you mean 'power'" in str(info.value)


def test_nested_error_in_join_config() -> None:
    config = {"kind": "join", "schedules": [{"kind": "constnt", "sparsity": 0.1}], "boundaries": []}
    with pytest.raises(ValueError, match=r"'constant'"):
        from_dict(config)


# ---------------------------------------------------------------------------------------
# Validation: every bad argument raises, naming the argument and the value
# ---------------------------------------------------------------------------------------

BAD_ARGUMENTS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # sparsities outside [0, 1) or NaN
    ("sparsity=1", lambda: Constant(1.0), ValueError, r"sparsity=1\.0 must be in \[0, 1\)"),
    ("sparsity<0", lambda: Constant(-0.1), ValueError, r"sparsity=-0\.1"),
    ("sparsity nan", lambda: Constant(NAN), ValueError, r"sparsity=nan"),
    ("sparsity inf", lambda: Constant(INF), ValueError, r"sparsity=inf"),
    ("initial<0", lambda: Polynomial(-0.1, 0.5, 0, 10), ValueError, r"initial=-0\.1"),
    ("final=1", lambda: Polynomial(0.0, 1.0, 0, 10), ValueError, r"final=1\.0"),
    ("final nan", lambda: Linear(0.0, NAN, 0, 10), ValueError, r"final=nan"),
    ("initial nan", lambda: Cosine(NAN, 0.5, 0, 10), ValueError, r"initial=nan"),
    ("exp final=1", lambda: Exponential(0.2, final=1.0), ValueError, r"final=1\.0"),
    ("step sparsity", lambda: Steps([(0, 1.0)]), ValueError, r"points\[0\] sparsity=1\.0"),
    ("step nan", lambda: Steps([(0, 0.1), (5, NAN)]), ValueError, r"points\[1\] sparsity=nan"),
    # sparsity types
    ("sparsity str", lambda: Constant("0.5"), TypeError, r"sparsity='0\.5'"),  # type: ignore[arg-type]
    ("sparsity None", lambda: Constant(None), TypeError, r"sparsity=None"),  # type: ignore[arg-type]
    ("sparsity bool", lambda: Polynomial(True, 0.5, 0, 10), TypeError, r"initial=True"),
    # final < initial
    (
        "poly final<initial",
        lambda: Polynomial(0.5, 0.4, 0, 10),
        ValueError,
        r"final=0\.4.*initial=0\.5",
    ),
    ("linear final<initial", lambda: Linear(0.5, 0.4, 0, 10), ValueError, r"final=0\.4"),
    ("cosine final<initial", lambda: Cosine(0.5, 0.4, 0, 10), ValueError, r"final=0\.4"),
    # end <= begin
    ("end=begin", lambda: Polynomial(0.0, 0.5, 10, 10), ValueError, r"end=10 must be > begin=10"),
    ("end<begin", lambda: Linear(0.0, 0.5, 10, 5), ValueError, r"end=5.*begin=10"),
    # frequency < 1
    ("frequency=0", lambda: Polynomial(0.0, 0.5, 0, 10, frequency=0), ValueError, r"frequency=0"),
    ("frequency<0", lambda: Cosine(0.0, 0.5, 0, 10, frequency=-2), ValueError, r"frequency=-2"),
    ("exp frequency=0", lambda: Exponential(0.2, 0, 0), ValueError, r"frequency=0"),
    ("update_every=0", lambda: FromCallable(math.tanh, 0), ValueError, r"update_every=0"),
    (
        "frequency float",
        lambda: Linear(0.0, 0.5, 0, 10, frequency=2.0),
        TypeError,
        r"frequency=2\.0",
    ),
    # non-integer or negative times (a bool is not an int here)
    ("begin<0", lambda: Polynomial(0.0, 0.5, -1, 10), ValueError, r"begin=-1 must be >= 0"),
    ("begin float", lambda: Polynomial(0.0, 0.5, 1.5, 10), TypeError, r"begin=1\.5"),
    ("begin bool", lambda: Polynomial(0.0, 0.5, True, 10), TypeError, r"begin=True"),
    ("end float", lambda: Polynomial(0.0, 0.5, 0, 10.0), TypeError, r"end=10\.0"),
    ("constant begin<0", lambda: Constant(0.5, -3), ValueError, r"begin=-3"),
    ("exp begin bool", lambda: Exponential(0.2, False), TypeError, r"begin=False"),
    ("step time<0", lambda: Steps([(-1, 0.5)]), ValueError, r"points\[0\] time=-1"),
    ("step time float", lambda: Steps([(1.5, 0.5)]), TypeError, r"points\[0\] time=1\.5"),
    ("step time bool", lambda: Steps([(True, 0.5)]), TypeError, r"points\[0\] time=True"),
    # power <= 0
    ("power=0", lambda: Polynomial(0.0, 0.5, 0, 10, power=0), ValueError, r"power=0"),
    ("power<0", lambda: Polynomial(0.0, 0.5, 0, 10, power=-1.0), ValueError, r"power=-1\.0"),
    ("power nan", lambda: Polynomial(0.0, 0.5, 0, 10, power=NAN), ValueError, r"power=nan"),
    ("power inf", lambda: Polynomial(0.0, 0.5, 0, 10, power=INF), ValueError, r"power=inf"),
    # rounds < 1
    ("rounds=0", lambda: LotteryTicketPlan(0, 0.2), ValueError, r"rounds=0 must be >= 1"),
    ("rounds float", lambda: LotteryTicketPlan(2.0, 0.2), TypeError, r"rounds=2\.0"),
    # rates outside (0, 1)
    ("rate=0", lambda: LotteryTicketPlan(3, 0.0), ValueError, r"rate=0\.0 must be in \(0, 1\)"),
    ("rate=1", lambda: LotteryTicketPlan(3, 1.0), ValueError, r"rate=1\.0"),
    ("rate nan", lambda: LotteryTicketPlan(3, NAN), ValueError, r"rate=nan"),
    ("layer rate", lambda: LotteryTicketPlan(3, 0.2, {"out": 1.0}), ValueError, r"'out'.*=1\.0"),
    ("layer rate 0", lambda: LotteryTicketPlan(3, 0.2, {"out": 0}), ValueError, r"'out'.*=0"),
    ("layer key", lambda: LotteryTicketPlan(3, 0.2, {3: 0.1}), TypeError, r"key 3"),
    ("layer key empty", lambda: LotteryTicketPlan(3, 0.2, {"": 0.1}), ValueError, r"key ''"),
    ("layer_rates list", lambda: LotteryTicketPlan(3, 0.2, [0.1]), TypeError, r"layer_rates"),
    ("exp rate=0", lambda: Exponential(0.0), ValueError, r"rate=0\.0"),
    ("exp rate=1", lambda: Exponential(1.0), ValueError, r"rate=1\.0"),
    # unsorted, duplicate or malformed step points
    (
        "unsorted",
        lambda: Steps([(10, 0.5), (5, 0.6)]),
        ValueError,
        r"points\[1\] time=5.*increasing",
    ),
    ("duplicate", lambda: Steps([(5, 0.5), (5, 0.6)]), ValueError, r"points\[1\] time=5"),
    ("no points", lambda: Steps([]), ValueError, r"points"),
    ("bad pair", lambda: Steps([(1, 0.5, 2)]), TypeError, r"points\[0\]"),
    ("points str", lambda: Steps("0.5"), TypeError, r"points"),  # type: ignore[arg-type]
    # callables and joins
    ("fn not callable", lambda: FromCallable(0.5), TypeError, r"fn=0\.5"),  # type: ignore[arg-type]
    ("join empty", lambda: join([], []), ValueError, r"schedules"),
    ("join not schedule", lambda: join([0.5], []), TypeError, r"schedules\[0\]=0\.5"),  # type: ignore[list-item]
    ("join too few bounds", lambda: join([Constant(0.1)] * 2, []), ValueError, r"boundaries"),
    ("join bound<1", lambda: join([Constant(0.1)] * 2, [0]), ValueError, r"boundaries\[0\]=0"),
    ("join bound float", lambda: join([Constant(0.1)] * 2, [1.5]), TypeError, r"boundaries\[0\]"),
    ("join unsorted", lambda: join([Constant(0.1)] * 3, [5, 5]), ValueError, r"boundaries\[1\]=5"),
]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
def test_bad_arguments_raise(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


EXAMPLES: list[Schedule] = [
    Constant(0.5),
    Polynomial(0.0, 0.9, 0, 100),
    Linear(0.0, 0.9, 0, 100),
    Cosine(0.0, 0.9, 0, 100),
    Exponential(0.2),
    Steps([(0, 0.5)]),
    FromCallable(math.tanh),
    join([Constant(0.0), Constant(0.5)], [10]),
    LotteryTicketPlan(3, 0.2),
]


@pytest.mark.parametrize("s", EXAMPLES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize(
    ("t", "error"),
    [(-1, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError), ("3", TypeError)],
)
def test_bad_time_raises(s: Schedule, t: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"t="):
        s(t)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"t="):
        s.is_update(t)  # type: ignore[arg-type]


def test_update_points_checks_until() -> None:
    with pytest.raises(ValueError, match=r"until=-1"):
        update_points(Constant(0.5), -1)


# ---------------------------------------------------------------------------------------
# Plotting and dependencies
# ---------------------------------------------------------------------------------------


def test_plot_schedule_writes_a_png(tmp_path: Path) -> None:
    s = join([Constant(0.0), Polynomial(0.0, 0.9, 0, 100, frequency=10)], [20])
    out = plot_schedule(s, 150, tmp_path / "schedule.png", title="gradual")
    assert out == tmp_path / "schedule.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_package_imports_only_the_standard_library() -> None:
    """Module-level imports are stdlib or relative; omegaconf / matplotlib only inside functions."""
    lazy_allowed = {"omegaconf", "matplotlib"}
    for path in sorted((Path(__file__).resolve().parents[1] / "schedules").glob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            allowed = set(sys.stdlib_module_names) | {"__future__"}
            if id(node) not in top_level:  # inside a function or `if TYPE_CHECKING:`
                allowed |= lazy_allowed
            for root in roots:
                assert root in allowed, f"{path.name}:{node.lineno} imports {root}"
