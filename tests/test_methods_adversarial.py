"""Adversarial tests of the data-aware methods (wanda, taylor, movement, snip, activation)
and of the statistics behind them: replaced modules, failing calibrations, non-finite
activations, shared layers, grouped / dilated convolutions, odd batches and dtypes.

Every expected value is computed here from the formulas (sums of squared inputs, counts
of positive outputs, ``|W| * norm`` ranked by brute force), never by the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit import Pruner


def _stats(pruner: Pruner, name: str) -> dict:
    return pruner.state_dict()["stats"]["targets"][name]


def _lowest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force: keep all but the k lowest scores (ties by position)."""
    flat = scores.flatten().tolist()
    order = sorted(range(len(flat)), key=lambda i: (flat[i], i))
    keep = torch.ones(len(flat), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view(scores.shape)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


# ------------------------------------------------------------ replaced modules
def test_wanda_follows_a_replaced_module_in_calibrate() -> None:
    model = _mlp()
    pruner = Pruner(model, method="wanda", scope="layer")
    model[0] = nn.Linear(4, 3)  # a new module, a new weight of the same shape
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 1.0, 0.0, 0.0]])
    pruner.calibrate([x])
    squares = [10.0, 1.0, 4.0, 0.0]  # column sums of squares, by hand
    got = _stats(pruner, "0.weight")
    assert got["counts"]["rows"] == 2
    assert got["values"]["inputs_sq"].tolist() == squares
    norms = torch.tensor(squares).sqrt()
    w = model[0].weight.detach().clone()
    pruner.prune_to({"0.weight": 6})
    assert torch.equal(model[0].weight != 0, _lowest_mask(w.abs() * norms, 6))


def test_attached_stats_follow_a_replaced_module() -> None:
    model = _mlp()
    pruner = Pruner(model, method="wanda")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.attach(opt)
    x1 = torch.ones(2, 4)
    model(x1).sum().backward()
    opt.step()
    model[0] = nn.Linear(4, 3)
    x2 = torch.tensor([[0.0, 5.0, 0.0, 1.0]])
    pruner.calibrate([x2])  # the Pruner follows the model here: the new module is observed
    model(x2).sum().backward()  # and in training afterwards
    got = _stats(pruner, "0.weight")
    assert got["counts"]["rows"] == 4
    expected = torch.tensor([2.0, 2 + 2 * 25.0, 2.0, 2 + 2 * 1.0], dtype=torch.float64)
    assert torch.equal(got["values"]["inputs_sq"], expected)


def test_activation_follows_a_replaced_module() -> None:
    model = _mlp()
    pruner = Pruner(model, method="activation", scope="layer", targets=["0.weight"])
    model[0] = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[1.0, 1.0, 0, 0], [2.0, -1.0, 0, 0], [1.0, 1.0, 0, 0]])
    pruner.calibrate([x])
    # outputs: channel 0 = x0 > 0 3/3, channel 1 = -x0 > 0 0/3, channel 2 = x1 > 0 2/3
    got = _stats(pruner, "0.weight")
    assert got["values"]["out_pos"].tolist() == [3.0, 0.0, 2.0]
    pruner.prune_to({"0.weight": 1})
    assert (model[0].weight != 0).any(1).tolist() == [True, False, True]


# --------------------------------------------------------- failing calibration
def test_calibrate_that_fails_part_way_adds_nothing() -> None:
    model = _mlp()
    pruner = Pruner(model, targets={"0.weight": "wanda", "2.weight": "taylor"}, scope="layer")
    before = pruner.state_dict()["stats"]

    def batches():
        yield torch.randn(5, 4)
        raise RuntimeError("the data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        pruner.calibrate(batches(), loss_fn=lambda out, batch: out.sum())
    with pytest.raises(ValueError, match="scalar"):  # forward ran (wanda's rows) before this
        pruner.calibrate([torch.randn(5, 4)], loss_fn=lambda out, batch: out)
    after = pruner.state_dict()["stats"]
    for name in ("0.weight", "2.weight"):
        assert after["targets"][name]["counts"] == before["targets"][name]["counts"]
        for key, value in before["targets"][name]["values"].items():
            assert torch.equal(after["targets"][name]["values"][key], value)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------ non-finite data
def test_apoz_refuses_nan_activations() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    pruner = Pruner(model, method="activation")  # apoz: a NaN output is not "> 0"
    x = torch.randn(5, 4)
    x[0, 0] = float("nan")
    pruner.calibrate([x])
    w = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"method='activation'.*0\.weight.*NaN or inf"):
        pruner.prune_to(1)
    assert torch.equal(model[0].weight, w)
    assert bool(pruner.masks["0.weight"].all())


@pytest.mark.parametrize("method", ["wanda", "taylor", "activation"])
def test_inf_activations_are_refused(method: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    pruner = Pruner(model, method=method, scope="layer")
    x = torch.randn(5, 4)
    x[1, 2] = float("inf")
    pruner.calibrate([x], loss_fn=lambda out, batch: out.sum())
    with pytest.raises(ValueError, match=f"method='{method}'"):
        pruner.prune_to(1 if method == "activation" else 0.5)
    assert all(bool(m.all()) for m in pruner.masks.values())


# -------------------------------------------------------------- shapes of use
def test_shared_linear_called_twice_sums_both_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 3, bias=False)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(torch.relu(self.layer(x)))

    model = Twice()
    pruner = Pruner(model, method="wanda")
    x = torch.randn(4, 3)
    pruner.calibrate([x])
    with torch.no_grad():
        h = torch.relu(layer(x))
    got = _stats(pruner, "layer.weight")
    assert got["counts"]["rows"] == 8
    expected = (x.double().square().sum(0) + h.double().square().sum(0)).float().double()
    torch.testing.assert_close(got["values"]["inputs_sq"], expected, rtol=1e-6, atol=0)


def test_dict_tuple_and_ragged_batches() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, input_ids: torch.Tensor, attention_mask: object = None) -> torch.Tensor:
            return self.fc(input_ids)

    model = Keyword()
    pruner = Pruner(model, method="wanda")
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    n = pruner.calibrate(
        iter([{"input_ids": a, "attention_mask": None}, (b, torch.zeros(3)), torch.ones(2, 2)])
    )
    assert n == 3
    got = _stats(pruner, "fc.weight")
    assert got["counts"]["rows"] == 6
    assert got["values"]["inputs_sq"].tolist() == [1 + 9 + 1 + 2, 4 + 0 + 1 + 4 + 2]


def test_taylor_target_without_gradient_is_refused_before_any_change() -> None:
    model = _mlp()
    model[2].weight.requires_grad_(False)
    pruner = Pruner(model, method="taylor")
    pruner.calibrate([torch.randn(3, 4)], loss_fn=lambda out, batch: out.sum())
    with pytest.raises(
        RuntimeError, match=r"ranks 2\.weight by its gradients.*requires_grad=False"
    ):
        pruner.prune_to(0.5)
    assert all(bool(m.all()) for m in pruner.masks.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_taylor_scores_in_other_dtypes(dtype: torch.dtype) -> None:
    model = _mlp().to(dtype)
    pruner = Pruner(model, method="taylor", scope="layer")
    x = torch.randn(6, 4, dtype=dtype)
    model(x).float().square().sum().backward()  # the reference gradient, by autograd
    w = model[0].weight.detach().clone()
    expected = (w.double() * model[0].weight.grad.double()).abs()
    model.zero_grad(set_to_none=True)
    pruner.calibrate([x], loss_fn=lambda out, batch: out.float().square().sum())
    pruner.prune_to({"0.weight": 6})
    assert torch.equal(model[0].weight != 0, _lowest_mask(expected, 6))


# --------------------------------------------- wanda on convolutions, by im2col
def _im2col_norms(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """||X_col||_2 per (input channel, kernel position): the norm of the column of the
    unfolded input that the weight entry multiplies, over every sample and output
    position (brute force: the padded input unfolded with the conv's geometry; checked to
    reproduce the conv's own output, so the padding convention is the conv's)."""
    if conv.padding == "same":  # total d * (k - 1): the smaller half before, the rest after
        halves = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                  for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]  # fmt: skip
        pad = [p for pair in reversed(halves) for p in pair]
    else:
        pad = [p for p in reversed(conv.padding) for _ in range(2)]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = nn.functional.pad(x.double(), pad, mode=mode)
    cols = nn.functional.unfold(
        padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride
    )  # (batch, C * kh * kw, positions)
    per_group = conv.in_channels // conv.groups
    w = conv.weight.detach().double()
    outs = []
    for g in range(conv.groups):  # the conv's output from these columns, group by group
        rows = w[g * (w.shape[0] // conv.groups) : (g + 1) * (w.shape[0] // conv.groups)]
        block = cols.view(x.shape[0], conv.in_channels, -1, cols.shape[-1])[
            :, g * per_group : (g + 1) * per_group
        ].reshape(x.shape[0], -1, cols.shape[-1])
        outs.append(rows.reshape(rows.shape[0], -1) @ block)
    with torch.no_grad():
        y = conv(x).double()
    torch.testing.assert_close(torch.cat(outs, 1).view(y.shape), y, rtol=1e-5, atol=1e-5)
    return cols.square().sum((0, 2)).sqrt().view(conv.in_channels, *conv.kernel_size)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 2, "padding": 1},
        {"stride": 1, "padding": 2, "dilation": 2, "groups": 2},
        {"stride": (2, 1), "padding": (0, 1), "dilation": (1, 2)},
        {"stride": 1, "padding": "same", "dilation": 2},
        {"stride": 2, "padding": 1, "padding_mode": "reflect"},
        {"stride": 1, "padding": 1, "padding_mode": "circular", "groups": 4},
        {"stride": 1, "padding": "same", "kernel_size": 4, "padding_mode": "replicate"},
    ],
)
def test_wanda_conv2d_norms_per_input_channel_and_kernel_position(kwargs: dict) -> None:
    torch.manual_seed(0)
    kwargs = {"kernel_size": 3, **kwargs}
    conv = nn.Conv2d(4, 8, bias=False, **kwargs)
    pruner = Pruner(nn.Sequential(conv), method="wanda", scope="layer")
    x = torch.randn(3, 4, 9, 8) + torch.linspace(0, 3, 8)  # not uniform over positions
    pruner.calibrate([x[:2], x[2:]])
    norms = _im2col_norms(conv, x)  # (in_channels, *kernel)
    w = conv.weight.detach().clone()
    per_group = conv.in_channels // conv.groups
    scores = torch.empty_like(w, dtype=torch.float64)
    for o in range(w.shape[0]):
        g = o // (w.shape[0] // conv.groups)
        for i in range(per_group):
            scores[o, i] = w[o, i].double().abs() * norms[g * per_group + i]
    pruner.prune_to(0.5)
    assert torch.equal(conv.weight != 0, _lowest_mask(scores, round(0.5 * w.numel())))


def test_wanda_conv1d_and_unbatched_input_by_im2col() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1, bias=False)
    pruner = Pruner(nn.Sequential(conv), method="wanda", scope="layer")
    x = torch.randn(3, 11) + torch.linspace(0, 2, 11)  # unbatched: (channels, length)
    pruner.calibrate([x])
    conv2d = nn.Conv2d(3, 4, (1, 3), stride=(1, 2), padding=(0, 1), bias=False)
    norms = _im2col_norms(conv2d, x[None, :, None, :]).view(3, 3)
    w = conv.weight.detach().clone()
    scores = w.double().abs() * norms
    pruner.prune_to(0.5)
    assert torch.equal(conv.weight != 0, _lowest_mask(scores, 18))


def test_conv_wanda_state_with_channel_norms_is_refused_by_name() -> None:
    conv = nn.Conv2d(2, 3, 3)
    pruner = Pruner(nn.Sequential(conv), method="wanda")
    pruner.calibrate([torch.randn(1, 2, 5, 5)])
    state = pruner.state_dict()
    before = state["stats"]["targets"]["0.weight"]["values"]["inputs_sq"].clone()
    old = {**state, "stats": {"format": 1, "targets": {"0.weight": {
        "method": "wanda", "values": {"inputs_sq": torch.ones(2, dtype=torch.float64)},
        "counts": {"rows": 9, "backwards": 0, "positions": 0}}}}}  # fmt: skip
    with pytest.raises(ValueError, match=r"inputs_sq.*shape \(2, 3, 3\).*kernel position"):
        pruner.load_state_dict(old)
    after = pruner.state_dict()["stats"]["targets"]["0.weight"]["values"]["inputs_sq"]
    assert torch.equal(after, before)


# ------------------------------------------------------------- prunekit oneshot
@pytest.mark.parametrize("method", ["wanda", "taylor", "activation"])
def test_oneshot_calibration_leaves_batchnorm_buffers_and_mode_alone(method: str) -> None:
    from prunekit.experiments.oneshot import prune_once

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model.train()  # as a freshly built or trained network is
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    batches = [(torch.randn(8, 4) + 3, torch.randint(0, 3, (8,))) for _ in range(2)]
    prune_once(model, method=method, scope="layer", sparsity=0.5 if method != "activation" else 1,
               batches=batches)  # fmt: skip
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    for key, value in before.items():  # magnitude never touches them: neither may calibration
        assert torch.equal(after[key], value), key
    assert model.training


# ------------------------------------------------- resuming with other options
def _movement_state(reset: bool) -> dict:
    pruner = Pruner(_mlp(), method="movement", reset=reset)
    pruner.calibrate([torch.randn(3, 4)], loss_fn=lambda out, batch: out.sum())
    return pruner.state_dict()


@pytest.mark.parametrize(("saved", "loading"), [(False, True), (True, False)])
def test_movement_stats_with_other_reset_are_refused_by_name(saved: bool, loading: bool) -> None:
    state = _movement_state(saved)
    pruner = Pruner(_mlp(1), method="movement", reset=loading)
    before = pruner.state_dict()
    with pytest.raises(ValueError, match=rf"0\.weight.*reset={saved}.*reset={loading}"):
        pruner.load_state_dict(state)
    after = pruner.state_dict()  # nothing changed: still no statistics, no update
    assert after["updates"] == 0
    for name in ("0.weight", "2.weight"):
        assert (
            after["stats"]["targets"][name]["counts"]
            == before["stats"]["targets"][name]["counts"]
            == {"rows": 0, "backwards": 0, "positions": 0}
        )


def test_movement_stats_with_same_reset_or_without_a_record_load() -> None:
    state = _movement_state(False)
    Pruner(_mlp(1), method="movement", reset=False).load_state_dict(state)
    for entry in state["stats"]["targets"].values():  # a state saved before the record
        entry.pop("options", None)
    pruner = Pruner(_mlp(1), method="movement", reset=True)
    pruner.load_state_dict(state)
    assert _stats(pruner, "0.weight")["counts"]["backwards"] == 1


# ------------------------------------- unfreezing during gradient accumulation
def test_global_taylor_refuses_targets_with_different_backward_counts() -> None:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    pruner = Pruner(model, method="taylor")
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.0)
    pruner.attach(optimizer)
    model(torch.randn(3, 4)).sum().backward()  # 0.weight frozen: 2.weight only
    model[0].weight.requires_grad_(True)
    model(torch.randn(3, 4)).sum().backward()  # unfrozen mid-accumulation
    optimizer.step()
    optimizer.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    # by hand: 2.weight saw 3 backward passes; 0.weight at most 2 (the 1st was frozen)
    counts = {n: _stats(pruner, n)["counts"]["backwards"] for n in ("0.weight", "2.weight")}
    assert counts["2.weight"] == 3 and counts["0.weight"] < 3
    with pytest.raises(
        ValueError,
        match=rf"0\.weight.*{counts['0.weight']}.*2\.weight.*3|2\.weight.*3.*0\.weight.*{counts['0.weight']}",
    ):
        pruner.prune_to(0.5)
    assert all(bool(m.all()) for m in pruner.masks.values())
    # a resumed or deep-copied Pruner still knows 0.weight missed passes
    resumed = Pruner(_mlp(), method="taylor")
    resumed.load_state_dict(pruner.state_dict())
    for other in (resumed, copy.deepcopy(pruner)):
        with pytest.raises(ValueError, match=r"could not be observed"):
            other.prune_to(0.5)
    # scope="layer" ranks each target alone: its own count is no problem
    layer = Pruner(_mlp(), method="taylor", scope="layer")
    layer.calibrate([torch.randn(3, 4)], loss_fn=lambda out, batch: out.sum())
    layer.prune_to(0.5)


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)

    def forward(self, x: torch.Tensor, both: bool = True) -> torch.Tensor:
        return self.a(x) + self.b(x) if both else self.a(x)


def test_global_taylor_ranks_a_target_some_passes_do_not_reach() -> None:
    # a pass that does not reach a weight adds zero to its sum (an unused branch, an MoE
    # expert no token was routed to): different counts, comparable sums, no error
    model = _TwoBranches()
    pruner = Pruner(model, method="taylor")
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.0))
    x1, x2 = torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([[-1.0, 4.0], [2.0, 2.0]])
    model(x1, both=False).sum().backward()
    model(x2).sum().backward()
    # by hand: d(sum of x @ W.T)/dW[i, j] = sum over rows of x[:, j], for every i
    s1, s2 = x1.sum(0).expand(2, 2), x2.sum(0).expand(2, 2)
    wa, wb = model.a.weight.detach().clone(), model.b.weight.detach().clone()
    scores = torch.cat([(wa * (s1 + s2)).abs().flatten(), (wb * s2).abs().flatten()])
    pruner.prune_to(0.5)
    keep = _lowest_mask(scores, 4)
    assert torch.equal(pruner.masks["a.weight"].flatten(), keep[:4])
    assert torch.equal(pruner.masks["b.weight"].flatten(), keep[4:])
