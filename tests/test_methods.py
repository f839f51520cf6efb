"""Data-aware methods (wanda, taylor, snip, movement, activation) and the method protocol.

Every expected mask is computed here from the papers' formulas on small tensors (input
norms, weight x gradient by autograd on a copy, output activity) and a brute-force
stable sort, never by the code under test.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import prunekit
from prunekit import Pruner
from prunekit._masks import _METHODS, Method


def lowest(scores: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: prune the k lowest scores (stable sort, already pruned entries first)."""
    flat = scores.flatten().double().clone()
    if keep is not None:
        flat[~keep.flatten()] = -math.inf
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, stable=True).indices[:k]] = False
    return mask.view(scores.shape)


def global_lowest(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    mask = lowest(flat, round(fraction * flat.numel()))
    out, start = {}, 0
    for n in names:
        out[n] = mask[start : start + scores[n].numel()].view(scores[n].shape)
        start += scores[n].numel()
    return out


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def batches(seed: int = 1, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)
    ]


def sum_loss(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(out, batch[1], reduction="sum")


WEIGHTS = ["0.weight", "2.weight", "4.weight"]


def inputs_of(model: nn.Sequential, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The input rows of each Linear over all batches (by running the layers by hand)."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in WEIGHTS}
    with torch.no_grad():
        for x in xs:
            h = x
            for i, layer in enumerate(model):
                if isinstance(layer, nn.Linear):
                    rows[f"{i}.weight"].append(h.reshape(-1, h.shape[-1]))
                h = layer(h)
    return {n: torch.cat(r) for n, r in rows.items()}


def weight_grad(
    model: nn.Sequential, data: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """sum over batches of W * dL_b/dW, by autograd on a copy of the model."""
    twin = copy.deepcopy(model)
    total = {n: torch.zeros_like(twin.get_parameter(n)) for n in WEIGHTS}
    for batch in data:
        params = [twin.get_parameter(n) for n in WEIGHTS]
        grads = torch.autograd.grad(sum_loss(twin(batch[0]), batch), params)
        for n, p, g in zip(WEIGHTS, params, grads, strict=True):
            total[n] += p.detach() * g
    return total


# ------------------------------------------------------------------ wanda
def test_wanda_scores_are_weight_times_input_norm_per_layer() -> None:
    model = mlp()
    data = batches()
    xs = [b[0] for b in data]
    rows = inputs_of(model, xs)
    expected = {
        n: model.get_parameter(n).detach().abs() * rows[n].square().sum(0).sqrt().view(1, -1)
        for n in WEIGHTS
    }
    pruner = Pruner(model, method="wanda", scope="layer")
    assert pruner.calibrate(xs) == 3
    pruner.prune_to(0.5)
    for n in WEIGHTS:
        assert torch.equal(
            pruner.masks[n], lowest(expected[n], round(0.5 * expected[n].numel()))
        ), n


def test_wanda_global_ranking_gives_exact_counts_and_the_global_lowest() -> None:
    model = mlp()
    xs = [b[0] for b in batches()]
    rows = inputs_of(model, xs)
    scores = {
        n: model.get_parameter(n).detach().abs() * rows[n].square().sum(0).sqrt().view(1, -1)
        for n in WEIGHTS
    }
    total = sum(s.numel() for s in scores.values())
    pruner = Pruner(model, method="wanda", scope="global")
    pruner.calibrate(xs)
    pruner.prune_to(0.6)
    assert pruner.sparsity().pruned == round(0.6 * total)
    reference = global_lowest(scores, 0.6)
    for n in WEIGHTS:
        assert torch.equal(pruner.masks[n], reference[n]), n


def test_wanda_tokens_of_a_3d_input_all_count() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    x = torch.randn(2, 3, 5)  # (batch, tokens, features)
    norm = x.reshape(6, 5).square().sum(0).sqrt()
    expected = lowest(layer.weight.detach().abs() * norm, 10)
    pruner = Pruner(layer, method="wanda")
    pruner.calibrate([x[:1], x[1:]])
    pruner.prune_to(10)
    assert torch.equal(pruner.masks["weight"], expected)


def test_wanda_per_output_prunes_the_same_count_in_every_row() -> None:
    model = mlp()
    xs = [b[0] for b in batches()]
    rows = inputs_of(model, xs)
    pruner = Pruner(model, method="wanda", scope="layer", per_output=True)
    pruner.calibrate(xs)
    pruner.prune_to(0.5)
    for n in WEIGHTS:
        score = model.get_parameter(n).detach().abs() * rows[n].square().sum(0).sqrt()
        k = round(0.5 * score.shape[1])
        expected = torch.stack([lowest(row, k) for row in score])
        assert torch.equal(pruner.masks[n], expected), n
    with pytest.raises(ValueError, match="per_output=True"):
        Pruner(mlp(), method="wanda", per_output=True)  # scope="global" by default


def test_wanda_conv_uses_im2col_norms_with_groups() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    x = torch.randn(2, 4, 5, 5) * torch.tensor([1.0, 5.0, 0.2, 3.0]).view(1, 4, 1, 1)
    # one norm per input channel and kernel position: the unfolded input's columns
    channel = nn.functional.unfold(x.double(), 3).square().sum(dim=(0, 2)).sqrt().view(4, 3, 3)
    w = conv.weight.detach()
    score = torch.empty_like(w)
    for o in range(6):
        group = o // 3  # 3 outputs per group, 2 input channels per group
        for j in range(2):
            score[o, j] = w[o, j].abs() * channel[group * 2 + j]
    pruner = Pruner(conv, method="wanda")
    pruner.calibrate([x])
    pruner.prune_to(0.5)
    assert torch.equal(pruner.masks["weight"], lowest(score, round(0.5 * w.numel())))


def test_wanda_tensor_api_matches_the_formula() -> None:
    torch.manual_seed(0)
    w, norm = torch.randn(4, 6), torch.rand(6) + 0.1
    assert torch.equal(prunekit.wanda_mask(w, 0.5, input_norm=norm), lowest(w.abs() * norm, 12))
    assert torch.equal(
        prunekit.prune(w, "wanda", 0.5, input_norm=norm), w * lowest(w.abs() * norm, 12)
    )


# ----------------------------------------------------------- taylor / snip
@pytest.mark.parametrize("method", ["taylor", "snip"])
def test_taylor_and_snip_score_the_absolute_summed_weight_times_gradient(method: str) -> None:
    model = mlp()
    data = batches()
    scores = {n: g.abs() for n, g in weight_grad(model, data).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner = Pruner(model, method=method)
    pruner.calibrate(data, sum_loss)
    for n, p in model.named_parameters():  # calibrate trains nothing
        assert torch.equal(p, before[n]) and p.grad is None
    pruner.prune_to(0.7)
    reference = global_lowest(scores, 0.7)
    for n in WEIGHTS:
        assert torch.equal(pruner.masks[n], reference[n]), n


def test_taylor_tensor_api() -> None:
    torch.manual_seed(0)
    w, g = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(prunekit.taylor_mask(w, 5, grad=g), lowest((w * g).abs(), 5))


# --------------------------------------------------------------- movement
def test_movement_scores_accumulate_over_updates_unless_reset() -> None:
    model = mlp()
    first, second = batches(1), batches(2)
    pruner = Pruner(model, method="movement")
    pruner.calibrate(first, sum_loss)
    s1 = {n: -g for n, g in weight_grad(model, first).items()}
    pruner.prune_to(0.3)
    reference = global_lowest(s1, 0.3)
    assert all(torch.equal(pruner.masks[n], reference[n]) for n in WEIGHTS)
    # the weights changed (zeros): the second window's W * g uses the pruned weights
    s2 = {n: s1[n] - g for n, g in weight_grad(model, second).items()}
    pruner.calibrate(second, sum_loss)
    pruner.prune_to(0.6)
    keep = {n: reference[n] for n in WEIGHTS}
    flat = torch.cat([s2[n].flatten() for n in WEIGHTS])
    expected = lowest(
        flat, round(0.6 * flat.numel()), torch.cat([keep[n].flatten() for n in WEIGHTS])
    )
    assert torch.equal(torch.cat([pruner.masks[n].flatten() for n in WEIGHTS]), expected)

    fresh = Pruner(mlp(), method="movement", reset=True)
    fresh.calibrate(first, sum_loss)
    fresh.prune_to(0.3)
    with pytest.raises(RuntimeError, match="calibrate"):  # reset after the update
        fresh.prune_to(0.6)


# ------------------------------------------------------------- activation
@pytest.mark.parametrize("criterion", ["mean_abs", "apoz"])
def test_activation_prunes_the_least_active_output_channels(criterion: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3)
    xs = [torch.randn(2, 3, 6, 6), torch.randn(1, 3, 6, 6)]
    with torch.no_grad():
        y = torch.cat([conv(x) for x in xs])  # (3, 5, 4, 4)
    per_channel = y.transpose(0, 1).reshape(5, -1)
    activity = (
        per_channel.abs().mean(1) if criterion == "mean_abs" else (per_channel > 0).double().mean(1)
    )
    pruner = Pruner(conv, method="activation", scope="layer", criterion=criterion)
    pruner.calibrate(xs)
    pruner.prune_to(2)
    dead = torch.sort(activity.double(), stable=True).indices[:2]
    expected = torch.ones(5, dtype=torch.bool)
    expected[dead] = False
    assert torch.equal(pruner.masks["weight"].flatten(1).all(1), expected)
    assert torch.equal(pruner.masks["weight"].flatten(1).any(1), expected)  # whole slices


def test_activation_based_mask_on_a_module_and_a_sample() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 6)
    x = torch.randn(10, 4)
    with torch.no_grad():
        y = layer(x)
    expected = torch.ones(6, dtype=torch.bool)
    expected[torch.sort(y.abs().mean(0).double(), stable=True).indices[:3]] = False
    mask = prunekit.activation_based_mask(layer, x, 0.5, criterion="mean_abs")
    assert torch.equal(mask.all(1), expected) and torch.equal(mask.any(1), expected)
    positive = (y > 0).double().mean(0)  # the default criterion: 1 - APoZ, by hand
    expected = torch.ones(6, dtype=torch.bool)
    expected[torch.sort(positive, stable=True).indices[:3]] = False
    assert torch.equal(prunekit.activation_based_mask(layer, x, 0.5).any(1), expected)


def test_activation_mean_abs_refuses_global_scope() -> None:
    with pytest.raises(ValueError, match="method='activation' does not"):
        Pruner(mlp(), method="activation", criterion="mean_abs")


# ------------------------------------------------------------- protocol
@pytest.fixture
def registered() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        _METHODS.pop(name, None)


def test_a_method_ignoring_the_mask_cannot_regrow(registered: list[str]) -> None:
    def keep_all(t: torch.Tensor, amount: float, **kw: object) -> torch.Tensor:
        return torch.ones(t.shape, dtype=torch.bool)

    prunekit.register_method("keep_all_demo")(keep_all)
    registered.append("keep_all_demo")
    layer = nn.Linear(4, 4, bias=False)
    pruner = Pruner(layer, method="keep_all_demo", scope="layer")
    pruner.set_masks({"weight": torch.zeros(4, 4, dtype=torch.bool)})
    pruner.prune_to(0.5)
    assert int(pruner.masks["weight"].sum()) == 0 and int((layer.weight != 0).sum()) == 0


def test_a_protocol_method_ranks_globally_and_is_checked(registered: list[str]) -> None:
    def fn(t: torch.Tensor, amount: float, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise AssertionError("the engine ranks scores, it does not call fn")

    # scores: minus the absolute weight (prune the largest first)
    spec = Method("neg_demo", fn, ranks="entries", needs=(), score=None)
    prunekit.register_method("neg_demo")(spec)
    registered.append("neg_demo")
    model = mlp()
    pruner = Pruner(model, method="neg_demo")
    pruner.prune_to(0.5)  # score=None: ranks |w| like magnitude
    magnitude = Pruner(mlp(), method="magnitude")
    magnitude.prune_to(0.5)
    assert all(torch.equal(pruner.masks[n], magnitude.masks[n]) for n in WEIGHTS)


@pytest.mark.parametrize(
    ("scores", "error", "match"),
    [
        (
            lambda w, s: torch.ones(3),
            ValueError,
            r"method='bad_demo' returned scores of shape \(3,\) for 0\.weight",
        ),
        (
            lambda w, s: torch.ones(w.shape, dtype=torch.int64),
            TypeError,
            r"method='bad_demo' returned scores of torch\.int64",
        ),
        (
            lambda w, s: torch.full(w.shape, math.nan),
            ValueError,
            r"method='bad_demo': the scores of 0\.weight holds \d+ NaN",
        ),
    ],
)
def test_bad_scores_name_the_method(registered: list[str], scores, error, match) -> None:
    spec = Method(
        "bad_demo",
        prunekit.taylor_mask,
        ranks="entries",
        needs=("grads",),
        score=scores,
        fed=("grad",),
    )
    prunekit.register_method("bad_demo")(spec)
    registered.append("bad_demo")
    model = mlp()
    pruner = Pruner(model, method="bad_demo")
    pruner.calibrate(batches(), sum_loss)
    before = {n: m.clone() for n, m in pruner.masks.items()}
    with pytest.raises(error, match=match):
        pruner.prune_to(0.5)
    assert all(torch.equal(pruner.masks[n], before[n]) for n in before)  # nothing changed


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        (
            lambda t: torch.ones(t.shape),
            TypeError,
            r"method='mask_demo' returned torch\.float32 for weight",
        ),
        (
            lambda t: torch.ones(2, dtype=torch.bool),
            ValueError,
            r"method='mask_demo' returned a mask of shape \(2,\) for weight",
        ),
    ],
)
def test_bad_masks_name_the_method(registered: list[str], result, error, match) -> None:
    prunekit.register_method("mask_demo")(lambda t, amount, **kw: result(t))
    registered.append("mask_demo")
    pruner = Pruner(nn.Linear(3, 3), method="mask_demo", scope="layer")
    with pytest.raises(error, match=match):
        pruner.prune_to(0.5)


def test_unknown_statistic_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"method 'x_demo': needs statistic 'hessian'"):
        Method(
            "x_demo",
            prunekit.taylor_mask,
            ranks="entries",
            needs=("hessian",),
            score=lambda w, s: w,
        )


def test_nan_statistics_are_refused_naming_the_method() -> None:
    model = mlp()
    pruner = Pruner(model, method="wanda")
    pruner.calibrate([torch.full((2, 6), math.inf)])
    with pytest.raises(ValueError, match=r"method='wanda': the scores of 0\.weight holds"):
        pruner.prune_to(0.5)


def test_prune_to_without_statistics_says_to_calibrate() -> None:
    for method, hint in (
        ("wanda", r"calibrate\(batches\)"),
        ("taylor", r"calibrate\(batches, loss_fn\)"),
    ):
        pruner = Pruner(mlp(), method=method)
        with pytest.raises(RuntimeError, match=rf"method='{method}' ranks 0\.weight .*{hint}"):
            pruner.prune_to(0.5)
        assert pruner.sparsity().pruned == 0


def test_calibrate_needs_a_loss_for_gradients_and_iterable_batches() -> None:
    pruner = Pruner(mlp(), method="taylor")
    with pytest.raises(
        ValueError, match=r"\['taylor'\] rank by gradients: give calibrate a loss_fn"
    ):
        pruner.calibrate(batches())
    with pytest.raises(TypeError, match=r"wrap one tensor as \[x\]"):
        Pruner(mlp(), method="wanda").calibrate(torch.randn(3, 6))
    with pytest.raises(ValueError, match="batches is empty"):
        Pruner(mlp(), method="wanda").calibrate([])
    assert Pruner(mlp()).calibrate(iter(())) == 0  # magnitude needs nothing


def test_activation_statistics_refuse_unsupported_modules() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 2))
    with pytest.raises(
        NotImplementedError, match=r"method='wanda': 0\.weight belongs to a Embedding"
    ):
        Pruner(model, method="wanda", targets=["0.weight"])


def test_option_checks() -> None:
    with pytest.raises(TypeError, match=r"per_output for 0\.weight .* must be True or False"):
        Pruner(mlp(), method="wanda", scope="layer", per_output=1)
    with pytest.raises(
        ValueError, match=r"criterion for 0\.weight .* must be one of \('mean_abs', 'apoz'\)"
    ):
        Pruner(mlp(), method="activation", scope="layer", criterion="max")
    with pytest.raises(
        ValueError, match=r"option\(s\) \['input_norm'\] are not options of method='wanda'"
    ):
        Pruner(mlp(), method="wanda", input_norm=torch.ones(6))


def test_per_target_methods_mix_with_a_global_ranking() -> None:
    model = mlp()
    data = batches()
    pruner = Pruner(
        model, method="taylor", targets={"0.weight": None, "2.weight": None, "4.weight": "wanda"}
    )
    pruner.calibrate(data, sum_loss)
    pruner.prune_to(0.5)
    grads = weight_grad(model, data)
    reference = global_lowest({n: grads[n].abs() for n in WEIGHTS[:2]}, 0.5)
    assert all(torch.equal(pruner.masks[n], reference[n]) for n in WEIGHTS[:2])
    assert int((~pruner.masks["4.weight"]).sum()) == 6  # its own ranking: round(0.5 * 12)


# ------------------------------------------------------- Lightning callback
@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("wanda", "global"),
        ("taylor", "global"),
        ("movement", "global"),
        ("snip", "layer"),
        ("activation", "layer"),
    ],
)
def test_the_pruning_callback_collects_statistics_while_training(method: str, scope: str) -> None:
    from prunekit.callbacks import Pruning
    from prunekit.schedules import Polynomial

    from tests.lit_helpers import TinyNet, loader, trainer

    seen: list[tuple[int, int]] = []
    pruning = Pruning(
        Polynomial(0.0, 0.5, begin=2, end=6, frequency=2),
        method=method,
        scope=scope,
        on_update=lambda pruner, t: seen.append((t, pruner.sparsity().pruned)),
    )
    model = TinyNet()
    trainer(max_steps=8, accumulate_grad_batches=2, callbacks=[pruning]).fit(model, loader())
    assert pruning.pruner is not None
    weights = [model.net[i].weight for i in (0, 2, 4)]
    if method == "activation":  # whole output neurons, half of each layer's (round(0.5 * rows))
        assert [int((~w.ne(0).any(1)).sum()) for w in weights] == [16, 8, 2]
    else:
        total = sum(w.numel() for w in weights)
        assert sum(int((w == 0).sum()) for w in weights) == round(0.5 * total)
    assert [t for t, _ in seen] == [4, 6]  # (at t=2 the schedule is still at 0)


def test_relative_amounts_of_activation_count_whole_neurons() -> None:
    """``Pruning(amount=0.5, method="activation")`` prunes half of the remaining rows of
    each layer at each epoch end (rows, not entries): 32, 16, 3 -> 16, 8, 1 -> 8, 4, 1
    (Python's round: 1.5 -> 2 and 0.5 -> 0)."""
    from prunekit.callbacks import Pruning

    from tests.lit_helpers import TinyNet, loader, trainer

    seen: list[list[int]] = []

    def record(pruner: Pruner, t: int) -> None:
        seen.append([int(m.any(1).sum()) for m in pruner.masks.values()])

    pruning = Pruning(
        amount=0.5, unit="epoch", method="activation", scope="layer", on_update=record
    )
    trainer(max_epochs=2, callbacks=[pruning]).fit(TinyNet(), loader())
    kept, expected = [32, 16, 3], []
    for _ in range(2):
        kept = [k - round(0.5 * k) for k in kept]
        expected.append(list(kept))
    assert seen == expected


def test_wanda_on_hugging_face_conv1d_uses_its_in_out_layout() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(4, 6)  # weight (in=6, out=4): x @ W
    x = torch.randn(3, 5, 6) * torch.linspace(0.1, 3.0, 6)
    norm = x.reshape(-1, 6).square().sum(0).sqrt()
    score = layer.weight.detach().abs() * norm.view(6, 1)
    pruner = Pruner(copy.deepcopy(layer), method="wanda", targets=["weight"])
    pruner.calibrate([x])
    pruner.prune_to(0.5)
    assert torch.equal(pruner.masks["weight"], lowest(score, 12))
    per_output = Pruner(layer, method="wanda", targets=["weight"], scope="layer", per_output=True)
    per_output.calibrate([x])
    per_output.prune_to(0.5)
    expected = torch.stack([lowest(score[:, o], 3) for o in range(4)], dim=1)  # per output column
    assert torch.equal(per_output.masks["weight"], expected)
    assert per_output.masks["weight"].is_contiguous()
    with pytest.raises(NotImplementedError, match="Conv1D"):
        Pruner(layer, method="activation", targets=["weight"], scope="layer")


def test_caller_scores_need_no_statistics() -> None:
    model = mlp()
    scores = {
        n: torch.rand(model.get_parameter(n).shape, generator=torch.Generator().manual_seed(i))
        for i, n in enumerate(WEIGHTS)
    }
    pruner = Pruner(model, method="taylor")
    pruner.prune_to(0.5, scores=scores)  # nothing collected: the given scores rank
    reference = global_lowest(scores, 0.5)
    assert all(torch.equal(pruner.masks[n], reference[n]) for n in WEIGHTS)


def test_activation_apoz_ranks_channels_of_all_layers_together() -> None:
    model = mlp()
    xs = [b[0] for b in batches(n=2)]
    with torch.no_grad():  # outputs of each Linear, by hand
        outs, h = {}, torch.cat(xs)
        for i, layer in enumerate(model):
            h = layer(h)
            if isinstance(layer, nn.Linear):
                outs[f"{i}.weight"] = h
    positive = {n: (y > 0).double().mean(0) for n, y in outs.items()}  # 1 - APoZ
    pruner = Pruner(model, method="activation")  # scope="global", criterion="apoz"
    pruner.calibrate(xs)
    pruner.prune_to(0.5)  # round(0.5 * 12 channels) = 6, each layer keeps its best
    key = []
    for n in WEIGHTS:
        k = positive[n].clone()
        k[int(torch.argmax(k))] = math.inf
        key.append(k)
    flat = torch.cat(key)
    expected = torch.ones(12, dtype=torch.bool)
    expected[torch.sort(flat, stable=True).indices[:6]] = False
    got = torch.cat([pruner.masks[n].any(1) for n in WEIGHTS])
    assert torch.equal(got, expected)
    assert int((~got).sum()) == 6
    assert all(bool(pruner.masks[n].any()) for n in WEIGHTS)
    with pytest.raises(ValueError, match=r"method='activation' does not with options \{'crit"):
        Pruner(mlp(), method="activation", criterion="mean_abs")  # not comparable across layers


def test_global_channel_ranking_keeps_each_layers_best_channel() -> None:
    model = mlp()
    with torch.no_grad():
        model[4].bias.fill_(-100.0)  # the last layer's outputs are all <= 0: APoZ 1
    pruner = Pruner(model, method="activation", criterion="apoz")
    pruner.calibrate([b[0] for b in batches(n=2)])
    pruner.prune_to(0.5)
    assert int(pruner.masks["4.weight"].any(1).sum()) == 1  # its 2 other channels go
    assert sum(int((~pruner.masks[n].any(1)).sum()) for n in WEIGHTS) == 6
    pruner.calibrate([b[0] for b in batches(n=2)])  # (statistics reset at each update)
    pruner.prune_to(9)  # a count may empty a layer
    assert sum(int((~pruner.masks[n].any(1)).sum()) for n in WEIGHTS) == 9


def test_lazy_scores_over_many_chunks_and_threads_equal_a_full_sort() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 500), nn.ReLU(), nn.Linear(500, 700))  # > 1 chunk each
    x = torch.randn(8, 600)
    with torch.no_grad():
        h = torch.relu(model[0](x))
    scores = {
        "0.weight": model[0].weight.detach().abs() * x.square().sum(0).sqrt(),
        "2.weight": model[2].weight.detach().abs() * h.square().sum(0).sqrt(),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pruner = Pruner(model, method="wanda")
        pruner.calibrate([x])
        pruner.prune_to(0.8)
    finally:
        torch.set_num_threads(threads)
    reference = global_lowest(scores, 0.8)
    assert all(torch.equal(pruner.masks[n], reference[n]) for n in scores)


def test_a_registered_data_aware_method_gets_its_statistics(registered: list[str]) -> None:
    spec = Method(
        "largest_demo",
        prunekit.taylor_mask,
        ranks="entries",
        needs=("grads", "inputs"),
        score=lambda w, stats: -stats.grads.abs() * stats.input_norm,
        fed=("grad",),
    )
    prunekit.register_method("largest_demo")(spec)
    registered.append("largest_demo")
    model = mlp()
    data = batches()
    grads = weight_grad(model, data)
    rows = inputs_of(model, [b[0] for b in data])
    scores = {n: -grads[n].abs() * rows[n].square().sum(0).sqrt() for n in WEIGHTS}
    pruner = Pruner(model, method="largest_demo")
    pruner.calibrate(data, sum_loss)
    pruner.prune_to(0.4)
    reference = global_lowest(scores, 0.4)
    assert all(torch.equal(pruner.masks[n], reference[n]) for n in WEIGHTS)


def test_unobservable_weights_are_refused_with_a_way_out() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    with pytest.raises(
        NotImplementedError,
        match=r"1\.self_attn\.in_proj_weight is not the weight of a module.*exclude it",
    ):
        Pruner(model, method="wanda")
    with pytest.raises(NotImplementedError, match=r"out_proj of a MultiheadAttention"):
        Pruner(model, method="wanda", exclude=["1.self_attn.in_proj_weight"])
    pruner = Pruner(model, method="wanda", exclude=["1.self_attn.*"])  # the rest is observed
    pruner.calibrate([torch.randn(2, 3, 8)])
    pruner.prune_to(0.5)
    assert pruner.sparsity().pruned == round(0.5 * pruner.sparsity().total)
    Pruner(model, method="taylor")  # gradients are observed on any parameter
