"""Model-level Pruner: targets, exact counts, training invariants, state, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunekit import ActivationPruning, Pruner


class Zoo(nn.Module):
    """One of each default target kind, plus parameters that must not be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.rnn = nn.LSTM(8, 4)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 3)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def zeros(pruner: Pruner) -> int:
    return sum(int((p == 0).sum()) for p in (pruner._targets[n].param for n in pruner.names))


def test_default_targets_are_weights_of_standard_layers() -> None:
    pruner = Pruner(Zoo())
    assert pruner.names == [  # embeddings stay dense by default (docs/targets.md)
        "conv.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    ]


def test_target_selection_by_glob_type_exclude_and_mapping() -> None:
    model = Zoo()
    assert Pruner(model, targets="rnn.*").names == [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.bias_ih_l0",
        "rnn.bias_hh_l0",
    ]
    assert Pruner(model, targets=[nn.Linear]).names == ["attn.out_proj.weight", "head.weight"]
    assert Pruner(model, exclude=["attn.*", "embed.weight"]).names == [
        "conv.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "head.weight",
    ]
    pruner = Pruner(
        model,
        scope="layer",
        targets={"conv.weight": {"method": "ln_structured", "n": 1, "dim": 0}, "head.weight": None},
    )
    assert pruner.names == ["conv.weight", "head.weight"]
    pruner.prune_to(0.5)
    conv_mask = pruner.masks["conv.weight"]
    assert int((~conv_mask).all(dim=(1, 2)).sum()) == 4  # 4 of 8 output channels
    assert int((~pruner.masks["head.weight"]).sum()) == 12


def test_global_count_is_exact_and_matches_reference() -> None:
    model = mlp()
    pruner = Pruner(model)
    weights = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    pruner.prune_to(0.7)
    n = sum(w.numel() for w in weights)
    k = round(0.7 * n)
    threshold = torch.cat([w.abs().flatten() for w in weights]).kthvalue(k).values
    for i, w in zip((0, 2, 4), weights, strict=True):
        assert torch.equal(pruner.masks[f"{i}.weight"], w.abs() > threshold)
        assert torch.equal(model[i].weight, w * (w.abs() > threshold))
    assert pruner.sparsity().pruned == k == zeros(pruner)
    assert model[0].bias.count_nonzero() == 30  # biases untouched


def test_global_versus_layer_on_hand_example() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))
        model[1].weight.copy_(torch.tensor([[5.0, 6.0]]))
    glob = Pruner(copy.deepcopy(model), scope="global")
    glob.prune_to(0.5)  # 3 of 6: the three smallest are all in layer 0
    assert glob.masks["0.weight"].tolist() == [[False, False], [False, True]]
    assert glob.masks["1.weight"].tolist() == [[True, True]]
    layer = Pruner(copy.deepcopy(model), scope="layer")
    layer.prune_to(0.5)  # 2 of 4 in layer 0, 1 of 2 in layer 1
    assert layer.masks["0.weight"].tolist() == [[False, False], [True, True]]
    assert layer.masks["1.weight"].tolist() == [[False, True]]


def test_masks_only_shrink_across_repeated_calls() -> None:
    model = mlp()
    pruner = Pruner(model)
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    for s in (0.2, 0.5, 0.5, 0.8, 0.95):
        pruner.prune_to(s)
        for name, mask in pruner.masks.items():
            assert bool((mask <= previous[name]).all())
        assert pruner.sparsity().pruned == round(s * pruner.sparsity().total)
        previous = {n: m.clone() for n, m in pruner.masks.items()}


def test_lower_sparsity_or_nan_weights_fail_without_changes() -> None:
    model = mlp()
    pruner = Pruner(model)
    pruner.prune_to(0.5)
    snapshot = copy.deepcopy(model.state_dict())
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    with pytest.raises(ValueError, match="masks only shrink"):
        pruner.prune_to(0.3)
    largest = int(model[4].weight.abs().argmax())  # surely kept: it is ranked, not excluded
    with torch.no_grad():
        model[4].weight.view(-1)[largest] = float("nan")
    snapshot["4.weight"].view(-1)[largest] = float("nan")
    for scope in ("global", "layer"):
        pruner.scope = scope
        with pytest.raises(ValueError, match=r"4\.weight holds .*NaN or inf"):
            pruner.prune_to(0.9)
        for name, value in model.state_dict().items():
            assert torch.equal(value.nan_to_num(), snapshot[name].nan_to_num()), name
        assert all(torch.equal(pruner.masks[n], masks[n]) for n in masks)


def test_per_target_sparsity_mapping_and_fixed_override() -> None:
    model = mlp()
    pruner = Pruner(
        model, targets={"0.weight": None, "2.weight": None, "4.weight": {"sparsity": 0.1}}
    )
    pruner.prune_to(0.8)
    per = pruner.sparsity().per_target()
    assert per["4.weight"] == pytest.approx(round(0.1 * 30) / 30)
    assert pruner.sparsity().targets[0].pruned + pruner.sparsity().targets[1].pruned == round(
        0.8 * 900
    )
    pruner.prune_to({"4.weight": 0.5})
    assert pruner.sparsity().per_target()["4.weight"] == 0.5


@pytest.mark.parametrize("cache_masks", [None, True, False])
@pytest.mark.parametrize("make_optimizer", ["sgd", "adam", "adam_fused", "adamw"])
def test_pruned_weights_stay_zero_through_training(
    make_optimizer: str, cache_masks: bool | None
) -> None:
    model = mlp()
    optimizers = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
        "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    }
    optimizer = optimizers[make_optimizer](model.parameters())
    pruner = Pruner(model).attach(optimizer, cache_masks=cache_masks)
    # what the per-step hooks apply: an int32 copy of the masks on CPU unless told not to
    dtype = torch.bool if cache_masks is False else torch.int32
    assert all(m is None for m in pruner._step_masks.values())  # nothing pruned: no work
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g)
    for step in range(200):
        if step in (20, 80, 140):
            pruner.prune_to({20: 0.5, 80: 0.8, 140: 0.9}[step])
            assert {m.dtype for m in pruner._step_masks.values()} == {dtype}
        for micro in range(2):  # gradient accumulation
            loss = nn.functional.cross_entropy(model(x[micro::2]), y[micro::2]) / 2
            loss.backward()
        for name, mask in pruner.masks.items():  # gradients masked before clipping/the step
            grad = dict(model.named_parameters())[name].grad
            assert bool((grad[~mask] == 0).all())
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
        for name, mask in pruner.masks.items():
            param = dict(model.named_parameters())[name]
            assert bool((param[~mask] == 0).all()), (step, name)
            for value in optimizer.state[param].values():
                if value.shape == mask.shape:
                    assert bool((value[~mask] == 0).all())
    assert pruner.sparsity().fraction == pytest.approx(0.9, abs=1e-3)
    assert loss.item() < 1.2  # it still learns


def test_state_dict_keys_unchanged_and_load_into_unpruned_model() -> None:
    model = mlp()
    keys = list(model.state_dict())
    pruner = Pruner(model)
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    pruner.prune_to(0.6)
    assert list(model.state_dict()) == keys
    fresh = mlp(seed=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert int((fresh[0].weight == 0).sum()) == int((~pruner.masks["0.weight"]).sum())


def test_masks_round_trip_through_state_dict() -> None:
    model = mlp()
    pruner = Pruner(model, method="random", seed=7)
    pruner.prune_to(0.4)
    state = pruner.state_dict()
    other = mlp(seed=3)  # other weights: the restored masks must reproduce the same zeros
    restored = Pruner(other, method="random", seed=7)
    restored.load_state_dict(state)
    for name, mask in pruner.masks.items():
        assert torch.equal(restored.masks[name], mask)
        assert torch.equal(
            dict(other.named_parameters())[name] == 0,
            ~mask | (dict(other.named_parameters())[name] == 0),
        )
    assert restored.updates == 1
    # continuing from the restored state draws the same random masks as the original
    pruner.prune_to(0.7)
    restored.prune_to(0.7)
    assert all(torch.equal(restored.masks[n], pruner.masks[n]) for n in pruner.masks)


def test_state_dict_from_another_model_is_refused() -> None:
    pruner = Pruner(mlp())
    other = Pruner(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 3)))
    with pytest.raises(ValueError, match="another model"):
        pruner.load_state_dict(other.state_dict())
    wrong_shape = Pruner(
        nn.Sequential(nn.Linear(21, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3))
    )
    with pytest.raises(ValueError, match=r"shape \(30, 21\)"):
        pruner.load_state_dict(wrong_shape.state_dict())
    assert pruner.sparsity().pruned == 0


def test_random_method_is_seeded() -> None:
    a, b, c = (Pruner(mlp(), method="random", seed=s) for s in (1, 1, 2))
    for p in (a, b, c):
        p.prune_to(0.5)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert not all(torch.equal(a.masks[n], c.masks[n]) for n in a.masks)
    assert a.sparsity().pruned == round(0.5 * a.sparsity().total)


def test_tied_weights_are_pruned_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    pruner = Pruner(model, targets=[nn.Linear])  # tied to an embedding: dense unless asked
    assert pruner.names == ["0.weight"]
    pruner.prune_to(0.5)
    assert int((model[1].weight == 0).sum()) == 20
    assert Pruner(model, targets="1.weight").names == ["0.weight"]


def test_remove_detaches_hooks_and_keeps_zeros() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.5)
    pruner.remove()
    assert int((model[0].weight == 0).sum()) == int((~pruner.masks["0.weight"]).sum())
    model(torch.randn(4, 20)).sum().backward()
    optimizer.step()
    assert int((model[0].weight == 0).sum()) < int((~pruner.masks["0.weight"]).sum())  # free again
    with pytest.raises(RuntimeError, match="removed"):
        pruner.prune_to(0.9)


def test_scores_and_custom_masks() -> None:
    model = nn.Linear(4, 1, bias=False)
    pruner = Pruner(model)
    pruner.prune_to(0.5, scores={"weight": torch.tensor([[4.0, 3.0, 2.0, 1.0]])})
    assert pruner.masks["weight"].tolist() == [[True, True, False, False]]
    pruner.set_masks({"weight": torch.tensor([[False, True, True, True]])})
    assert pruner.masks["weight"].tolist() == [[False, True, False, False]]
    assert model.weight[0, 0].item() == 0


def test_nm_method_in_pruner() -> None:
    model = nn.Linear(8, 4, bias=False)
    pruner = Pruner(model, method="nm", scope="layer", n=2, m=4)
    pruner.prune_to(0.5)
    assert bool((pruner.masks["weight"].view(4, 2, 4).sum(-1) == 2).all())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scope": "model"}, ValueError, r"scope='model'"),
        ({"method": "l3"}, ValueError, r"method='l3'"),
        ({"method": "ln_structured"}, ValueError, r"scope='global' ranks single weights"),
        (
            {"targets": "fc.weight"},
            ValueError,
            r"'fc.weight' matches no parameter.*did you mean.*'0.weight'",
        ),
        ({"targets": "0.wieght"}, ValueError, r"did you mean '0.weight'"),
        ({"targets": [nn.Conv2d]}, ValueError, r"Conv2d matches no module"),
        ({"targets": [3]}, TypeError, r"targets entry 3"),
        ({"exclude": "*"}, ValueError, r"no parameter .* is left to prune"),
        (
            {"scope": "layer", "method": "ln_structured", "dim": 2},
            ValueError,
            r"dim=2 for 0.weight .* is out of range",
        ),
        ({"scope": "layer", "method": "nm", "m": 7}, ValueError, r"m=7 does not divide"),
        ({"foo": 1}, ValueError, r"\['foo'\] are not options of method='magnitude'"),
        ({"targets": {"0.weight": {"sparsity": 2.0}}}, ValueError, r"sparsity'\]=2.0"),
        ({"targets": {"0.weight": 5}}, TypeError, r"targets\['0.weight'\]=5"),
        ({"seed": "x"}, TypeError, r"seed='x'"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        Pruner(model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("sparsity", "error", "match"),
    [
        (1.5, ValueError, r"sparsity=1.5"),
        (float("nan"), ValueError, r"sparsity=nan"),
        (-0.2, ValueError, r"sparsity=-0.2"),
        ("0.5", TypeError, r"sparsity='0.5'"),
        ({"4.wieght": 0.5}, ValueError, r"did you mean '4.weight'"),
    ],
)
def test_bad_prune_to_arguments(sparsity, error: type[Exception], match: str) -> None:
    pruner = Pruner(mlp())
    with pytest.raises(error, match=match):
        pruner.prune_to(sparsity)
    assert pruner.sparsity().pruned == 0 and pruner.updates == 0


def test_model_without_prunable_parameters() -> None:
    with pytest.raises(ValueError, match="no parameter of Sequential is left to prune"):
        Pruner(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_activation_pruning_topk_channel_and_gradients() -> None:
    layer = nn.Linear(5, 10)
    handle = ActivationPruning(layer, amount=0.3)
    x = torch.randn(4, 5, requires_grad=True)
    out = layer(x)
    plain = nn.functional.linear(x, layer.weight, layer.bias)
    kept = out != 0
    assert kept.sum(dim=1).tolist() == [7, 7, 7, 7]
    for row in range(4):  # the kept entries are the 7 largest magnitudes of that sample
        assert set(plain[row].abs().topk(7).indices.tolist()) == set(
            kept[row].nonzero().flatten().tolist()
        )
    out.sum().backward()
    expected_grad = kept.float() @ layer.weight  # d(sum of kept outputs)/dx
    assert torch.allclose(x.grad, expected_grad)
    handle.amount = 0.9
    assert (layer(x) != 0).sum(dim=1).tolist() == [1, 1, 1, 1]
    layer.eval()
    handle.eval_amount = 0.0
    assert torch.equal(layer(x), plain)
    handle.remove()
    layer.train()
    assert torch.equal(layer(x), plain)

    conv = nn.Conv2d(1, 6, 3)
    ActivationPruning(conv, amount=0.5, method="channel")
    maps = conv(torch.randn(2, 1, 8, 8))
    alive = maps.abs().sum(dim=(2, 3)) > 0
    assert alive.sum(dim=1).tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"amount=1.2"):
        handle.amount = 1.2
    with pytest.raises(ValueError, match=r"method='x'"):
        ActivationPruning(conv, 0.5, method="x")
