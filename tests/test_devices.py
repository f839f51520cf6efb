"""The engine on any device: the histogram route (accelerators, shards) equals the CPU
route bit for bit, random keys do not depend on the route or the chunking, and no
temporary lands on another device than its tensor (checked on fake CUDA tensors under
FakeTensorMode, which raises on any cross-device op, so no GPU is needed)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import prunekit._distributed as distributed
import prunekit._select as select
from prunekit import Pruner
from prunekit._distributed import Layout
from prunekit._masks import zero_pruned_
from prunekit._select import CHUNK, MagnitudeKeys, RandomKeys, ScoreKeys, prune_lowest
from prunekit._select_wide import key_source, select_lowest


def reference_prune(keys: list[torch.Tensor], masks: list[torch.Tensor], k: int) -> list:
    """Sort-based reference: drop the k lowest kept (key, tensor, flat index)."""
    order = sorted(
        (float(v), i, j)
        for i, (key, m) in enumerate(zip(keys, masks, strict=True))
        for j, v in enumerate(key.reshape(-1).tolist())
        if m.reshape(-1)[j]
    )
    out = [m.clone().reshape(-1) for m in masks]
    for _, i, j in order[:k]:
        out[i][j] = False
    return [o.reshape(m.shape) for o, m in zip(out, masks, strict=True)]


def run(source: select.KeySource, masks: list[torch.Tensor], k: int, hist: bool) -> list:
    out = [m.clone() for m in masks]
    old, select._FORCE_HIST = select._FORCE_HIST, hist
    try:
        prune_lowest(source, out, k, [f"t{i}" for i in range(len(out))])
    finally:
        select._FORCE_HIST = old
    return out


CASES = ["random", "ties", "all_equal", "negative_scores"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_histogram_route_equals_cpu_route_and_reference(case: str, with_mask: bool) -> None:
    g = torch.Generator().manual_seed(CASES.index(case) * 2 + with_mask)
    shapes = [(301,), (17, 23), (5,)]
    if case == "random":
        ws = [torch.randn(s, generator=g) for s in shapes]
    elif case == "ties":  # few distinct values: long runs of ties
        ws = [torch.randint(-2, 3, s, generator=g).float() / 2 for s in shapes]
    elif case == "all_equal":
        ws = [torch.full(s, 0.25) for s in shapes]
    else:
        ws = [torch.randn(s, generator=g) * 3 - 1 for s in shapes]
    masks = [
        torch.rand(s, generator=g) > 0.3 if with_mask else torch.ones(s, dtype=torch.bool)
        for s in shapes
    ]
    kept = sum(int(m.sum()) for m in masks)
    for k in (1, kept // 3, kept // 2 + 1, kept):
        if case == "negative_scores":
            source, keys = ScoreKeys(ws), ws
        else:
            source, keys = MagnitudeKeys(ws), [w.abs() for w in ws]
        expected = reference_prune(keys, masks, k)
        cpu = run(source, masks, k, hist=False)
        hist = run(source, masks, k, hist=True)
        for e, c, h in zip(expected, cpu, hist, strict=True):
            assert torch.equal(c, e)
            assert torch.equal(h, e)


def test_histogram_route_ties_across_chunks() -> None:
    """A crowded threshold spanning several chunks and tensors (the positions passes)."""
    ws = [torch.zeros(2 * CHUNK + 7), torch.zeros(300), torch.ones(50)]
    masks = [torch.ones(w.shape, dtype=torch.bool) for w in ws]
    masks[0][5] = False
    k = CHUNK + 1000
    cpu = run(MagnitudeKeys(ws), masks, k, hist=False)
    hist = run(MagnitudeKeys(ws), masks, k, hist=True)
    for c, h in zip(cpu, hist, strict=True):
        assert torch.equal(c, h)
    # by hand: the first k kept zeros of tensor 0 (index 5 was already pruned) go
    dropped = (~hist[0]).nonzero().view(-1)
    assert dropped.tolist() == list(range(k + 1))
    assert hist[1].all() and hist[2].all()


def test_random_keys_same_on_both_routes_and_function_of_global_index() -> None:
    shapes = [(CHUNK + 3,), (11, 13)]
    masks = [torch.ones(s, dtype=torch.bool) for s in shapes]
    k = 1000
    cpu = run(RandomKeys(7), masks, k, hist=False)
    hist = run(RandomKeys(7), masks, k, hist=True)
    assert all(torch.equal(c, h) for c, h in zip(cpu, hist, strict=True))
    assert sum(int((~m).sum()) for m in cpu) == k
    # keys of a block of a tensor (as a shard holds it) are the whole tensor's keys there
    whole = RandomKeys(7)
    buf, tmp = torch.empty(143), torch.empty(143, dtype=torch.int32)
    full = whole.keys(1, 0, 143, buf, tmp).clone().view(11, 13)
    block = RandomKeys(7)
    block.layouts = [Layout.whole((CHUNK + 3,)), Layout((11, 13), (2, 4), (5, 6))]
    keys = block.keys(1, 0, 30, torch.empty(30), torch.empty(30, dtype=torch.int32))
    assert torch.equal(keys.view(5, 6), full[2:7, 4:10])
    assert bool((full >= 0).all()) and bool((full < 2**30).all())


def test_hash_matches_hand_written_integer_hash() -> None:
    def mix(x: int) -> int:  # xor-shift-multiply rounds on unsigned 32-bit integers
        for c in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
            x = ((x ^ (x >> 15)) * c) % 2**32
        return x ^ (x >> 15)

    values = [0, 1, 2, 99991, 2**31 - 1, -1, -(2**31), -12345]
    x = torch.tensor(values, dtype=torch.int32)
    got = select._hash_(x, torch.empty_like(x)).tolist()
    assert [g % 2**32 for g in got] == [mix(v % 2**32) for v in values]


@pytest.mark.parametrize(
    ("shape", "offset", "local"),
    [
        ((7, 13), (4, 0), (2, 13)),
        ((7, 13), (0, 8), (7, 4)),
        ((3, 4, 5), (1, 2, 0), (2, 1, 5)),
        ((6,), (3,), (3,)),
        ((2, 3, 4), (0, 0, 0), (2, 3, 4)),
        ((7, 13), (6, 0), (0, 13)),
    ],
)
def test_layout_index_is_the_global_flat_index(shape, offset, local) -> None:
    layout = Layout(shape, offset, local)
    full = torch.arange(layout.numel).reshape(shape)
    expected = layout.block(full).reshape(-1)
    n = expected.numel()
    assert torch.equal(layout.index(0, n, torch.device("cpu")), expected)
    if n > 3:
        assert torch.equal(layout.index(2, n - 1, torch.device("cpu")), expected[2 : n - 1])


def test_nan_refused_on_histogram_route_before_any_change() -> None:
    ws = [torch.randn(40), torch.tensor([1.0, float("nan"), 2.0])]
    masks = [torch.ones(40, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]
    select._FORCE_HIST = True
    try:
        with pytest.raises(ValueError, match="t1 holds NaN or inf"):
            prune_lowest(MagnitudeKeys(ws), masks, 10, ["t0", "t1"])
    finally:
        select._FORCE_HIST = False
    assert all(bool(m.all()) for m in masks)


# --------------------------------------------------------------- fake CUDA tensors
def fake_host(counts: torch.Tensor) -> list[int]:
    """Fake tensors hold no values: every bin of finite keys claims many entries, so
    that every pass (ties included) runs."""
    finite = range(2**15 - 0x7F80, 2**15 + 0x7F80)
    return [10**9 if j in finite or counts.numel() < 2**15 else 0 for j in range(counts.numel())]


@pytest.mark.parametrize("source", ["magnitude", "score", "random"])
def test_histogram_route_keeps_everything_on_the_tensor_device(monkeypatch, source) -> None:
    monkeypatch.setattr(select, "_host", fake_host)
    monkeypatch.setattr(select, "DEVICE_CHUNK", 64)  # several chunks per tensor
    with FakeTensorMode(allow_non_fake_inputs=False):
        ws = [torch.randn(300, device="cuda"), torch.randn(7, 11, device="cuda")]
        masks = [torch.ones(w.shape, dtype=torch.bool, device="cuda") for w in ws]
        keys = {"magnitude": MagnitudeKeys, "score": ScoreKeys}.get(source)
        prune_lowest(keys(ws) if keys else RandomKeys(3), masks, 5, ["a", "b"])
        assert all(m.device.type == "cuda" for m in masks)


def test_masking_keeps_everything_on_the_tensor_device() -> None:
    """What the step hooks apply (zeroing through the bool mask or its dtype copy) and
    Pruner.apply_masks, on fake CUDA parameters."""
    with FakeTensorMode(allow_non_fake_inputs=False):
        model = nn.Module()  # (layers' init runs copy_, which fake CUDA lacks on a CPU build)
        model.weight = nn.Parameter(torch.randn(4, 8, device="cuda"))
        pruner = Pruner(model, targets="weight")
        pruner.masks["weight"] = torch.rand(4, 8, device="cuda") > 0.5
        pruner.apply_masks()
        grad = torch.randn(4, 8, device="cuda")
        zero_pruned_(grad, pruner.masks["weight"])
        with torch.no_grad():
            model.weight.mul_(pruner.masks["weight"].to(model.weight.dtype))
        assert model.weight.device.type == "cuda" and grad.device.type == "cuda"


def test_gpu_benchmark_runs_on_cpu_at_a_tiny_size(capsys, monkeypatch) -> None:
    """benchmarks/gpu.py (meant for a GPU) checks exactness the same way on the CPU."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # benchmarks/
    from benchmarks import gpu

    args = [
        "--device",
        "cpu",
        "--size",
        "30k",
        "--tensors",
        "3",
        "--repeats",
        "1",
        "--width",
        "32",
        "--layers",
        "1",
        "--steps",
        "2",
        "--rounds",
        "1",
    ]
    results = gpu.main(args)
    g, s = results["global_prune"], results["step"]
    assert g["parameters"] == 30_000 and g["expected"] == 27_000
    assert g["pruned"] == 27_000 and g["exact"]
    assert s["pruned_stay_zero"] and s["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert "exact=True" in capsys.readouterr().out


class HostAnsweringFakeMode(FakeTensorMode):
    """FakeTensorMode whose host reads (``.item()``, ``bool()``) get a fixed answer
    instead of raising: fake tensors hold no values, and the Pruner reads a few (is a
    mask all True? the optimizer's step count). Bool reads answer False (so every mask
    counts as pruned and the step hooks do their work), numbers 1. Everything else is
    FakeTensorMode's, which raises on any op mixing devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_the_fake_mode_catches_device_mixing() -> None:
    """The harness below can fail: a CPU mask on a fake CUDA weight raises."""
    with HostAnsweringFakeMode(allow_non_fake_inputs=False):
        weight = torch.randn(4, 8, device="cuda")
        with pytest.raises(RuntimeError, match="device"):
            zero_pruned_(weight, torch.ones(4, 8, dtype=torch.bool, device="cpu"))


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "fused_adamw"])
@pytest.mark.parametrize("cache_masks", [None, True])
def test_pruner_step_hooks_end_to_end_on_fake_cuda(monkeypatch, optimizer, cache_masks) -> None:
    """A Pruner on fake CUDA parameters (float32 and float64, so both the 32-bit and the
    64-bit selection): prune_to, attach, the gradient hooks the Pruner registered, an
    optimizer step with its post-step remask, the optimizer state cleared on a new
    prune, sparsity() and apply_masks; no op mixes devices, every mask, gradient and
    optimizer state stays on CUDA.

    (Autograd itself cannot run fake CUDA on a CPU build: gradients are set by hand and
    the parameters' post-accumulate-grad hooks called, as backward would.)"""
    monkeypatch.setattr(select, "_host", fake_host)
    monkeypatch.setattr(select, "DEVICE_CHUNK", 16)  # several chunks per tensor
    with HostAnsweringFakeMode(allow_non_fake_inputs=False):
        model = nn.Module()
        model.a = nn.Parameter(torch.randn(4, 8, device="cuda"))
        model.b = nn.Parameter(torch.randn(8, 3, device="cuda", dtype=torch.float64))
        model.c = nn.Parameter(torch.randn(6, 5, device="cuda"))
        pruner = Pruner(model, targets=["a", "b", "c"])
        if optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        elif optimizer == "fused_adamw":  # the GPU step of the issue (one fused kernel)
            opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pruner.attach(opt, cache_masks=cache_masks)
        # global: float32 and float64 ranked together (64-bit keys). (A one-target
        # prune would check the parameter for NaN with the "all finite" read, which this
        # mode answers False.)
        pruner.prune_to(0.5)
        params = [model.a, model.b, model.c]
        for step in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", dtype=p.dtype)
                hooks = list(p._post_accumulate_grad_hooks.values())
                assert len(hooks) == 1  # the Pruner's gradient mask
                hooks[0](p)
            opt.step()  # the Pruner's post-step hook re-masks the weights
            opt.zero_grad(set_to_none=False)
            if step == 0:
                pruner.prune_to(0.6)  # clears the optimizer state of newly pruned entries
        pruner.apply_masks()
        assert len(pruner.sparsity().targets) == 3
        for name, p in zip("abc", params, strict=True):
            assert p.device.type == "cuda" and pruner.masks[name].device.type == "cuda"
            assert p.grad is not None and p.grad.device.type == "cuda"
            for value in opt.state[p].values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    assert value.device.type == "cuda"
        assert opt.state[model.a]  # the optimizer did step


@pytest.mark.parametrize("case", ["random", "ties", "float32_blind", "huge", "negative_scores"])
def test_float64_selection_equals_sorted_reference(case: str) -> None:
    """The 64-bit route (any float64 tensor in the ranking) against a sort in Python
    floats: values only float64 tells apart, magnitudes past float32's range, signed
    scores, ties (tensor order, then index); a float32 tensor ranked with them."""
    g = torch.Generator().manual_seed(len(case))
    shapes = [(301,), (17, 23), (5,)]
    if case == "random":
        ws = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    elif case == "ties":
        ws = [torch.randint(-2, 3, s, generator=g).double() / 2 for s in shapes]
    elif case == "float32_blind":  # 1 + j * 1e-12: one value in float32
        ws = [1 + torch.randint(0, 3, s, generator=g).double() * 1e-12 for s in shapes]
    elif case == "huge":
        ws = [torch.randn(s, generator=g, dtype=torch.float64) * 1e300 for s in shapes]
    else:
        ws = [torch.randn(s, generator=g, dtype=torch.float64) * 3 - 1 for s in shapes]
    ws[2] = ws[2].float().double() if case != "huge" else ws[2]
    mixed = [ws[0], ws[1], ws[2].float()] if case != "huge" else ws  # float32 widened
    masks = [torch.rand(s, generator=g) > 0.3 for s in shapes]
    kept = sum(int(m.sum()) for m in masks)
    magnitude = case != "negative_scores"
    keys = [w.abs() for w in ws] if magnitude else ws
    for k in (1, kept // 3, kept // 2 + 1, kept):
        out = [m.clone() for m in masks]
        select_lowest(key_source(mixed, magnitude=magnitude), out, k, ["a", "b", "c"])
        for got, expected in zip(out, reference_prune(keys, masks, k), strict=True):
            assert torch.equal(got, expected), (case, k)


def test_float64_nan_refused_before_any_change() -> None:
    ws = [torch.randn(40, dtype=torch.float64), torch.tensor([1.0, float("inf"), 2.0])]
    masks = [torch.ones(40, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]
    with pytest.raises(ValueError, match="t1 holds NaN or inf"):
        select_lowest(key_source(ws, magnitude=True), masks, 10, ["t0", "t1"])
    assert all(bool(m.all()) for m in masks)


# ------------------------------------------------------------ exact slice norms
def _f32(x: float) -> np.float32:
    return np.float32(x)


def _nearest_f32(x: Fraction) -> float:
    """x rounded to float32 (nearest, ties to the even significand), by exact comparison
    with the float32 neighbours of a first guess."""
    guess = _f32(float(x))
    below = guess if Fraction(float(guess)) <= x else np.nextafter(guess, _f32(-np.inf))
    above = np.nextafter(below, _f32(np.inf))
    mid = (Fraction(float(below)) + Fraction(float(above))) / 2
    if x < mid:
        return float(below)
    if x > mid:
        return float(above)
    return float(below if int(np.array(below).view(np.int32)) % 2 == 0 else above)


def _nearest_f32_sqrt(s: Fraction) -> float:
    """sqrt(s) rounded to float32: the float32 pair around it, then the midpoint test
    sqrt(s) < mid <=> s < mid**2 (exact)."""
    below = _f32(math.sqrt(float(s)))
    while Fraction(float(below)) ** 2 > s:
        below = np.nextafter(below, _f32(-np.inf))
    while Fraction(float(np.nextafter(below, _f32(np.inf)))) ** 2 <= s:
        below = np.nextafter(below, _f32(np.inf))
    above = np.nextafter(below, _f32(np.inf))
    mid = (Fraction(float(below)) + Fraction(float(above))) / 2
    if s < mid**2:
        return float(below)
    if s > mid**2:
        return float(above)
    return float(below if int(np.array(below).view(np.int32)) % 2 == 0 else above)


@pytest.mark.parametrize("n", [1, 2])
def test_exact_slice_norms_are_correctly_rounded_and_do_not_depend_on_the_split(n) -> None:
    """exact_slice_norms against sums of Python Fractions rounded by hand; rows of
    subnormals, huge values, zeros, mixed scales and float16 input; partial sums of
    column blocks (as ranks hold them), added in any order and chunked, give the same
    bits."""
    g = torch.Generator().manual_seed(n)
    t = torch.randn(8, 150, generator=g)
    t[0] *= 1e-40  # subnormal float32 values
    t[1] *= 1e18  # squares past float32's range: only the norm must fit
    t[2] = 0.0
    t[3, ::2] *= 2.0**-60  # scales 60 binades apart in one sum
    t[4] = 0.0  # n = 1: sums exactly halfway between two float32: ties to even
    t[4, :2] = torch.tensor([1.0, 2.0**-24])  # 1 + ulp/2: down to 1
    t[6] = 0.0
    t[6, :3] = torch.tensor([1.0, 2.0**-23, 2.0**-24])  # 1 + 3 ulp/2: up to 1 + 2 ulp
    t[5, :-1] = 0.0
    expected = []
    for row in t.double().tolist():
        total = sum(Fraction(abs(v)) ** n for v in row)
        expected.append(_nearest_f32(total) if n == 1 else _nearest_f32_sqrt(total))
    got = distributed.exact_slice_norms(t, n, dim=0)
    assert got.dtype == torch.float32
    assert got.tolist() == expected
    assert torch.equal(distributed.exact_slice_norms(t.t().contiguous(), n, dim=1), got)
    blocks = [t[:, :37], t[:, 37:101], t[:, 101:]]
    sums = sum(distributed.power_sums(b, n, 0) for b in reversed(blocks))
    assert torch.equal(distributed.norms_from_sums(sums, n), got)
    half = t.half()
    wide = distributed.exact_slice_norms(half.float(), n, dim=0)
    assert torch.equal(distributed.exact_slice_norms(half, n, dim=0), wide)


def test_power_sums_are_chunk_free(monkeypatch) -> None:
    t = torch.randn(5, 301, generator=torch.Generator().manual_seed(9))
    whole = distributed.power_sums(t, 2, 0)
    monkeypatch.setattr(distributed, "_SUM_CHUNK", 64)  # chunks cut through slices
    assert torch.equal(distributed.power_sums(t, 2, 0), whole)
    with pytest.raises(TypeError, match="float32 or narrower"):
        distributed.power_sums(t.double(), 2, 0)
