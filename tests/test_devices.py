"""The engine on any device: the histogram route (accelerators, shards) equals the CPU
route bit for bit, random keys do not depend on the route or the chunking, and no
temporary lands on another device than its tensor (checked on fake CUDA tensors under
FakeTensorMode, which raises on any cross-device op, so no GPU is needed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import prunekit._select as select
from prunekit import Pruner
from prunekit._distributed import Layout
from prunekit._masks import zero_pruned_
from prunekit._select import CHUNK, MagnitudeKeys, RandomKeys, ScoreKeys, prune_lowest


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


def test_gpu_benchmark_runs_on_cpu_at_a_tiny_size(capsys) -> None:
    """benchmarks/gpu.py (meant for a GPU) checks exactness the same way on the CPU."""
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
