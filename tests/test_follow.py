"""The engine follows changes under it (or raises naming them): added parameter groups,
replaced or moved parameters, copies, frozen targets, wrapped optimizers; and the
engine-side reliability fixes of issue 12 (global rule, tied specs, NaN-safe step masks,
weight_norm, state checks, non-contiguous weights, numeric amounts, float64 ranking)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from prunekit import ActivationPruning, Pruner, global_magnitude_masks, pack_mask


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 20, generator=g), torch.randint(0, 3, (32,), generator=g)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    x, y = batch(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_pruned_zero(pruner: Pruner, model: nn.Module | None = None) -> None:
    """Every False mask entry is exactly 0 in the model's current parameter of that name."""
    model = model if model is not None else pruner.model
    for name, mask in pruner.masks.items():
        param = model.get_parameter(name)
        assert bool((param.detach()[~mask] == 0).all()), name


def assert_state_zero(pruner: Pruner, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    for name, mask in pruner.masks.items():
        for value in optimizer.state.get(model.get_parameter(name), {}).values():
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                assert bool((value[~mask] == 0).all()), name


# ------------------------------------------------------------ 1: added groups
def test_param_group_added_after_attach_is_followed() -> None:
    model = mlp()
    rest = [p for i in (2, 4) for p in model[i].parameters()]
    optimizer = torch.optim.SGD(rest, lr=0.1, momentum=0.9)
    pruner = Pruner(model).attach(optimizer)
    optimizer.add_param_group({"params": list(model[0].parameters())})  # unfreezing
    train(model, optimizer, 5)  # momentum builds up on 0.weight
    pruner.prune_to(0.8)
    train(model, optimizer, 5)
    assert_pruned_zero(pruner)
    assert_state_zero(pruner, optimizer, model)


def test_attach_again_picks_up_new_groups() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model[4].parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model).attach(optimizer)
    optimizer.add_param_group({"params": list(model[0].parameters())})
    train(model, optimizer, 3)
    assert pruner.attach(optimizer) is pruner and pruner.optimizers == [optimizer]
    pruner.prune_to(0.8)  # clears the momentum of 0.weight's pruned entries at once
    assert_state_zero(pruner, optimizer, model)


def test_loaded_optimizer_state_is_cleared_where_pruned() -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, optimizer, 3)
    dense_state = copy.deepcopy(optimizer.state_dict())  # moments everywhere
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.7)
    optimizer.load_state_dict(dense_state)
    assert_state_zero(pruner, optimizer, model)


# ----------------------------------------------------- 13: frozen targets
def test_frozen_target_attaches_and_is_followed_when_unfrozen() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pruner = Pruner(model).attach(optimizer)
    hooked = {name for name, _, _ in pruner._grad_hooks}
    assert hooked == {"2.weight", "4.weight"}
    pruner.prune_to(0.8)
    assert_pruned_zero(pruner)  # frozen targets are masked too
    train(model, optimizer, 2)
    model[0].requires_grad_(True)  # what BackboneFinetuning does
    optimizer.add_param_group({"params": list(model[0].parameters()), "lr": 1e-2})
    x, y = batch()
    for step in range(6):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step:  # from the second step on, its gradients are masked as they accumulate
            assert bool((model[0].weight.grad[~pruner.masks["0.weight"]] == 0).all())
        optimizer.step()
        assert_pruned_zero(pruner)
        assert_state_zero(pruner, optimizer, model)


# ------------------------------------------------- 5: replaced parameters
def test_parameters_replaced_by_load_state_dict_assign_are_followed() -> None:
    model = mlp()
    pruner = Pruner(model)
    pruner.prune_to(0.5)
    dense = {k: v + 1.0 for k, v in mlp(1).state_dict().items()}  # no zero anywhere
    model.load_state_dict(dense, assign=True)
    report = pruner.sparsity()  # the new parameters are re-masked with the same masks
    assert_pruned_zero(pruner)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in pruner.names)
    assert zeros == report.pruned == round(0.5 * report.total)
    pruner.prune_to(0.8)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in pruner.names)
    assert zeros == pruner.sparsity().pruned == round(0.8 * report.total)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)  # an optimizer over the new parameters: hooks on them
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    assert bool((model[0].weight.grad[~pruner.masks["0.weight"]] == 0).all())
    optimizer.step()
    assert_pruned_zero(pruner)


def test_step_hook_follows_an_optimizer_given_the_new_parameters() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.6)
    model.load_state_dict({k: v + 1.0 for k, v in model.state_dict().items()}, assign=True)
    optimizer.param_groups[0]["params"] = list(model.parameters())  # a user re-pointing it
    train(model, optimizer, 3)
    assert_pruned_zero(pruner)


def test_to_empty_then_init_is_remasked() -> None:
    model = mlp()
    pruner = Pruner(model)
    pruner.prune_to(0.5)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    assert pruner.sparsity().pruned == sum(
        int((model.get_parameter(n) == 0).sum()) for n in pruner.names
    )


def test_pruner_built_on_the_meta_device_follows_to_empty() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    pruner = Pruner(model)
    with pytest.raises(RuntimeError, match=r"prune_to: target '0\.weight' is on the meta device"):
        pruner.prune_to(0.5)
    assert pruner.sparsity().pruned == 0
    assert pruner.state_dict()["masks"]["0.weight"]["packed"].tolist() == [255] * 75
    model.to_empty(device="cpu")  # new parameter objects
    torch.manual_seed(0)
    for layer in (model[0], model[2]):
        layer.reset_parameters()
    pruner.prune_to(0.5)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in pruner.names)
    assert zeros == pruner.sparsity().pruned == 450


def test_replaced_parameter_of_another_shape_or_gone_raises_naming_it() -> None:
    model = mlp()
    pruner = Pruner(model)
    pruner.prune_to(0.5)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    model[2].weight = nn.Parameter(torch.ones(5, 30))
    with pytest.raises(RuntimeError, match=r"'2\.weight' was replaced by one of shape \(5, 30\)"):
        pruner.prune_to(0.7)
    assert all(torch.equal(pruner.masks[n], masks[n]) for n in masks)
    assert bool((model[0].weight != 0).sum() == masks["0.weight"].sum())
    del model[4].weight
    model[2].weight = nn.Parameter(torch.ones(10, 30))
    with pytest.raises(RuntimeError, match=r"'4\.weight' is no longer a parameter"):
        pruner.sparsity()


# ------------------------------------------------------------ 6: deep copies
def test_deepcopy_of_model_optimizer_and_pruner_is_bound_to_the_copies() -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.8)
    train(model, optimizer, 2)
    before = copy.deepcopy(model.state_dict())
    model2, optimizer2, pruner2 = copy.deepcopy((model, optimizer, pruner))
    assert pruner2.model is model2 and pruner2.optimizers == [optimizer2]
    train(model2, optimizer2, 5, seed=1)
    assert_pruned_zero(pruner2)
    assert_state_zero(pruner2, optimizer2, model2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the original still works on its own
    train(model, optimizer, 2)
    assert_pruned_zero(pruner)


def test_deepcopy_of_pruner_alone_copies_what_it_manages() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.7)
    copied = copy.deepcopy(pruner)
    assert copied.model is not model and copied.optimizers[0] is not optimizer
    train(copied.model, copied.optimizers[0], 5)
    assert_pruned_zero(copied)
    unattached = copy.deepcopy(Pruner(mlp()))
    unattached.prune_to(0.5)
    assert_pruned_zero(unattached)


def test_attached_pruner_refuses_pickle_and_shallow_copy() -> None:
    import pickle

    model = mlp()
    pruner = Pruner(model).attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="an attached Pruner cannot be pickled or shallow-copied"):
        pickle.dumps(pruner)
    with pytest.raises(TypeError, match="an attached Pruner cannot be pickled or shallow-copied"):
        copy.copy(pruner)
    unattached = Pruner(mlp())
    unattached.prune_to(0.5)
    assert pickle.loads(pickle.dumps(unattached)).sparsity() == unattached.sparsity()


# ------------------------------------------------ 4, 7: the targets mapping
@pytest.mark.parametrize(
    "targets",
    [
        {"0.weight": "magnitude", "2.weight": "magnitude", "4.weight": "magnitude"},
        {"*.weight": {}},
        {"*.weight": None},
    ],
)
def test_default_method_specs_stay_in_the_global_ranking(targets: dict) -> None:
    model = mlp()
    pruner = Pruner(model, targets=targets)
    expected = global_magnitude_masks(
        {n: model.get_parameter(n).detach().clone() for n in pruner.names}, 0.7
    )
    pruner.prune_to(0.7)
    assert all(torch.equal(pruner.masks[n], expected[n]) for n in expected)


def test_own_sparsity_or_method_takes_a_target_out_of_the_global_ranking() -> None:
    model = mlp()
    pruner = Pruner(model, targets={"*.weight": {}, "4.weight": {"sparsity": 0.5}})
    pruner.prune_to(0.7)
    assert int((~pruner.masks["4.weight"]).sum()) == 15
    first = [n for n in pruner.names if n != "4.weight"]
    expected = global_magnitude_masks({n: model.get_parameter(n).detach() for n in first}, 0.7)
    assert all(torch.equal(pruner.masks[n], expected[n]) for n in first)


def tied() -> nn.Sequential:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    return model


def test_tied_weight_with_two_specs_raises_naming_both() -> None:
    with pytest.raises(
        ValueError,
        match=r"'0\.weight' and '1\.weight' are one tied parameter with two different settings: "
        r"targets\['0\.weight'\]='magnitude' and targets\['1\.weight'\]='random'",
    ):
        Pruner(tied(), scope="layer", targets={"0.weight": "magnitude", "1.weight": "random"})
    same = Pruner(tied(), scope="layer", targets={"0.weight": "random", "1.weight": "random"})
    assert same.names == ["0.weight"]


def test_gradients_already_accumulated_are_masked_when_masks_change() -> None:
    model = mlp()
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    pruner = Pruner(model)
    pruner.prune_to(0.6)  # e.g. a callback pruning between backward and the step
    for name, mask in pruner.masks.items():
        assert bool((model.get_parameter(name).grad[~mask] == 0).all()), name


# ------------------------------------------------------ 9: NaN-safe masking
@pytest.mark.parametrize("public_call", [False, True])
def test_unfrozen_target_keeps_optimizer_state_zero(public_call: bool) -> None:
    model = mlp()
    model[0].requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.8)
    model[0].requires_grad_(True)
    optimizer.add_param_group({"params": list(model[0].parameters())})
    if public_call:  # e.g. a callback logging sparsity between unfreezing and the step
        pruner.sparsity()
    for step in range(3):
        train(model, optimizer, 1, seed=step)
        assert_pruned_zero(pruner)
        assert_state_zero(pruner, optimizer, model)


@pytest.mark.parametrize("cache_masks", [None, True, False])
def test_inf_gradient_at_a_pruned_entry_never_makes_a_nan_weight(cache_masks: bool | None) -> None:
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model).attach(optimizer, cache_masks=cache_masks)
    pruner.prune_to(0.5)
    mask = pruner.masks["weight"]
    scale = torch.ones(4, 8)
    scale[~mask] = float("inf")  # d loss / d w = inf at every pruned entry
    (model.weight * scale).sum().backward()
    assert bool((model.weight.grad[~mask] == 0).all())
    optimizer.step()
    assert bool((model.weight[~mask] == 0).all())
    assert bool(torch.isfinite(model.weight).all())


def test_clip_grad_norm_with_inf_elsewhere_keeps_pruned_weights_zero() -> None:
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.5)
    mask = pruner.masks["weight"]
    scale = torch.ones(4, 8)
    scale[tuple(mask.nonzero()[0].tolist())] = float("inf")  # inf at one kept entry only
    (model.weight * scale).sum().backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # total norm inf: kept grads NaN
    optimizer.step()
    assert bool(torch.isnan(model.weight[mask]).any())  # the kept entries did go NaN
    assert bool((model.weight[~mask] == 0).all())  # pruned ones are exactly 0, not NaN


# ---------------------------------------------------------- 10: weight_norm
def test_weight_norm_direction_is_a_default_target_and_keeps_zeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 2))
    pruner = Pruner(model)
    assert pruner.names == ["0.parametrizations.weight.original1", "2.weight"]
    pruner.prune_to(0.5)
    v_mask = pruner.masks["0.parametrizations.weight.original1"]
    assert torch.equal(model[0].weight.detach() == 0, ~v_mask)  # zeros of v are the weight's
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    with pytest.raises(ValueError, match=r"direction v of weight_norm\(0\.weight\).*whole slice"):
        pruner.prune_to(0.97)
    assert all(torch.equal(pruner.masks[n], masks[n]) for n in masks)
    assert bool(torch.isfinite(model[0].weight).all())


def test_other_parametrizations_raise_unless_excluded() -> None:
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(8, 6)), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"0\.weight is computed by the parametrization"):
        Pruner(model)
    assert Pruner(model, exclude="0.*").names == ["1.weight"]


# --------------------------------------------------- 11: load_state_dict
def _corrupt(state: dict, how: str) -> dict:
    state = copy.deepcopy(state)
    entry = state["masks"]["2.weight"]
    if how == "updates":
        state["updates"] = "3"
    elif how == "updates-negative":
        state["updates"] = -1
    elif how == "format":
        state["format"] = 2
    elif how == "list":
        entry["packed"] = entry["packed"].tolist()
    elif how == "dtype":
        entry["packed"] = entry["packed"].to(torch.int64)
    elif how == "padding":
        entry["packed"][-1] |= 0x80  # bit 7 of the last byte: past the 300 entries
    elif how == "shape":
        entry["shape"] = [30, 10]
    elif how == "entry":
        state["masks"]["2.weight"] = "packed"
    return state


@pytest.mark.parametrize(
    "how, error, match",
    [
        ("updates", TypeError, r"updates='3' must be an int"),
        ("updates-negative", ValueError, r"updates=-1 must be >= 0"),
        ("format", ValueError, r"format=2 is not 1"),
        (
            "list",
            TypeError,
            r"mask '2\.weight': packed mask must be a torch\.uint8 tensor, got list",
        ),
        ("dtype", ValueError, r"mask '2\.weight': packed mask has 38 torch\.int64 bytes"),
        ("padding", ValueError, r"mask '2\.weight': packed mask has bits set past its 300 entries"),
        (
            "shape",
            ValueError,
            r"mask '2\.weight' has shape \(30, 10\), the parameter has \(10, 30\)",
        ),
        ("entry", ValueError, r"mask '2\.weight' must be a dict with 'shape' and 'packed'"),
    ],
)
def test_bad_state_changes_nothing(how: str, error: type, match: str) -> None:
    source = Pruner(mlp(1))
    source.prune_to(0.9)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model).attach(optimizer)
    pruner.prune_to(0.3)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    steps = {n: None if m is None else m.clone() for n, m in pruner._step_masks.items()}
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        pruner.load_state_dict(_corrupt(source.state_dict(), how))
    assert all(torch.equal(pruner.masks[n], masks[n]) for n in masks)
    assert all(
        (steps[n] is None and m is None) or torch.equal(m, steps[n])
        for n, m in pruner._step_masks.items()
    )
    assert pruner.updates == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_padding_bits_of_a_good_state_are_zero() -> None:
    mask = torch.rand(300, generator=torch.Generator().manual_seed(0)) > 0.5
    assert int(pack_mask(mask)[-1]) >> 4 == 0  # 300 = 37 * 8 + 4 entries in the last byte


# -------------------------------------------------- 12: non-contiguous weights
def conv_net(channels_last: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    return model.to(memory_format=torch.channels_last) if channels_last else model


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"method": "random", "scope": "layer"},
        {"method": "ln_structured", "scope": "layer", "n": 1, "dim": 0},
        {"method": "random_structured", "scope": "layer", "dim": 1},
    ],
)
def test_channels_last_weights_give_the_contiguous_masks(kwargs: dict) -> None:
    strided, plain = conv_net(True), conv_net(False)
    assert not strided[0].weight.is_contiguous()
    a, b = Pruner(strided, **kwargs), Pruner(plain, **kwargs)
    for s in (0.5, 0.75):
        a.prune_to(s)
        b.prune_to(s)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.names)
    assert_pruned_zero(a)


def test_transposed_weight_is_pruned_like_its_contiguous_copy() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    strided, plain = nn.Linear(6, 8), nn.Linear(6, 8)
    strided.weight = nn.Parameter(w.t())  # a non-contiguous view
    plain.weight = nn.Parameter(w.t().contiguous())
    a, b = Pruner(strided), Pruner(plain)
    a.prune_to(0.4)
    b.prune_to(0.4)
    assert torch.equal(a.masks["weight"], b.masks["weight"])


# ---------------------------------------------------------- 15: amounts
def test_int_counts_and_numpy_or_tensor_scalars() -> None:
    model = nn.Linear(10, 10, bias=False)
    for amount, pruned in [
        (5, 5),
        (np.float32(0.4), 40),
        (np.int64(45), 45),
        (torch.tensor(0.5), 50),
        (torch.tensor(60), 60),
        (100, 100),
    ]:
        pruner = Pruner(copy.deepcopy(model))
        pruner.prune_to(amount)
        assert pruner.sparsity().pruned == pruned, amount
    pruner = Pruner(model)
    for bad, error in [
        (True, TypeError),
        (np.bool_(True), TypeError),
        (float("nan"), ValueError),
        (101, ValueError),
        (np.float64(1.5), ValueError),
        (torch.ones(2), TypeError),
    ]:
        with pytest.raises(error, match="sparsity="):
            pruner.prune_to(bad)
    assert pruner.sparsity().pruned == 0
    assert ActivationPruning(nn.ReLU(), np.float32(0.5)).amount == 0.5


# ---------------------------------------------------------- 16: float64
def test_float64_weights_are_ranked_in_float64() -> None:
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1 + 1e-12, 1.0, 0.5, 1e300]], dtype=torch.float64))
    pruner = Pruner(model)
    pruner.prune_to(2)  # 0.5, then 1.0 (not 1 + 1e-12, which float32 ties with it)
    assert pruner.masks["weight"].tolist() == [[True, False, False, True]]
    layer = Pruner(copy.deepcopy(model).float().double(), scope="layer")
    with torch.no_grad():
        layer.model.weight.copy_(model.weight)
    layer.prune_to(0.5)
    assert layer.masks["weight"].tolist() == [[True, False, False, True]]


def test_float64_global_ranking_matches_a_sort() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.Linear(40, 30)).double()
    with torch.no_grad():
        model[0].weight.copy_(1 + torch.randint(0, 5, (40, 50), generator=g).double() * 1e-13)
        model[1].weight.copy_(-(1 + torch.randint(0, 5, (30, 40), generator=g).double() * 1e-13))
    flat = torch.cat([model[0].weight.detach().view(-1), model[1].weight.detach().view(-1)])
    pruner = Pruner(model)
    pruner.prune_to(0.6)
    # the reference: a stable sort of |w| in float64 (ties: tensor order, then index)
    expected = torch.ones(flat.numel(), dtype=torch.bool)
    expected[torch.sort(flat.abs(), stable=True).indices[: round(0.6 * flat.numel())]] = False
    got = torch.cat([pruner.masks["0.weight"].view(-1), pruner.masks["1.weight"].view(-1)])
    assert torch.equal(got, expected)
    assert_pruned_zero(pruner)


# ------------------------------------------ issue 13: wrapped optimizers
class Wrapped:
    """Like Lightning's LightningOptimizer or accelerate's AcceleratedOptimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()


def test_attach_unwraps_an_optimizer_wrapper() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    pruner = Pruner(model).attach(Wrapped(optimizer))
    assert pruner.optimizers == [optimizer]
    pruner.prune_to(0.7)
    wrapper = Wrapped(optimizer)
    x, y = batch()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        wrapper.step()
    assert_pruned_zero(pruner)


class HooklessOptimizerWrapper(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer subclass that never calls
    Optimizer.__init__, so it has no step hooks of its own."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        self.optimizer.step()


def test_attach_unwraps_an_optimizer_subclass_without_step_hooks() -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    wrapper = HooklessOptimizerWrapper(optimizer)
    pruner = Pruner(model).attach(wrapper)
    assert pruner.optimizers == [optimizer]
    pruner.prune_to(0.7)
    x, y = batch()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        wrapper.step()
    assert_pruned_zero(pruner)


# ------------------------------- issue 11 item 4: built before fully_shard
FSDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from prunekit import Pruner
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
pruner = Pruner(model)
pruner.prune_to(0.5)
before = {n: m.clone() for n, m in pruner.masks.items()}
for layer in (model[0], model[2], model):
    fully_shard(layer)  # replaces every parameter by a DTensor
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
pruner.attach(optimizer)  # follows the new parameters by name
x = torch.randn(8, 20)
for _ in range(3):
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
pruner.prune_to(0.7)
zeros = 0
for n in pruner.names:
    w, m = model.get_parameter(n).full_tensor(), pruner.masks[n].full_tensor()
    assert bool((w[~m] == 0).all()), n
    assert bool((m <= before[n]).all()), n
    zeros += int((w == 0).sum())
assert zeros == pruner.sparsity().pruned == round(0.7 * 900), zeros
dist.destroy_process_group()
print("ok")
"""


def test_pruner_built_before_fully_shard_follows_the_sharded_parameters() -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    done = subprocess.run(
        [sys.executable, "-c", FSDP_SCRIPT, port], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
