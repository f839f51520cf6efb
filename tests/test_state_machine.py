"""A stateful property test of the engine: a small model, its optimizers and a Pruner
under random sequences of everything a training script may do to them.

Rules: prune_to, set_masks, attach (new optimizers over parts of the model),
add_param_group, optimizer steps with random gradients (inf included), state_dict /
load_state_dict round trips, deep copies of the whole (model, optimizers, pruner),
replacing the parameters (load_state_dict(assign=True)) and bad inputs. After every
rule: the counts are exact (sparsity() equals the masks' False entries), pruned weights
are exactly 0, masks only shrink, optimizer state is 0 where pruned, and a raised error
changed nothing.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

from prunekit import Pruner

SHAPES = {"0.weight": (5, 6), "2.weight": (3, 5)}


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def snapshot(model: nn.Module, pruner: Pruner) -> dict[str, Any]:
    """Everything a failing call must leave as it was (bytes, so NaN compares equal)."""
    state = {
        f"w.{k}": v.detach().clone().view(-1).view(torch.uint8)
        for k, v in model.state_dict().items()
    }
    state.update({f"m.{k}": v.clone() for k, v in pruner.masks.items()})
    state.update({f"s.{k}": v.clone() for k, v in pruner._step_masks.items() if v is not None})
    state["updates"] = pruner.updates
    return state


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


class PrunerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Sequential
        self.pruner: Pruner
        self.optimizers: list[torch.optim.Optimizer] = []
        self.previous: dict[str, torch.Tensor] = {}

    @initialize(
        scope=st.sampled_from(["global", "layer"]),
        method=st.sampled_from(["magnitude", "random"]),
        seed=st.integers(0, 3),
    )
    def build(self, scope: str, method: str, seed: int) -> None:
        self.model = make_model(seed)
        self.pruner = Pruner(self.model, scope=scope, method=method, seed=seed)
        self.previous = {n: m.clone() for n, m in self.pruner.masks.items()}

    def expect_failure(self, call: Any, error: type[BaseException]) -> None:
        before = snapshot(self.model, self.pruner)
        with pytest.raises(error):
            call()
        assert same(before, snapshot(self.model, self.pruner))

    # ---------------------------------------------------------------- pruning
    @rule(amount=st.one_of(st.floats(0, 1), st.integers(0, 45)))
    def prune_to(self, amount: float | int) -> None:
        total = sum(m.numel() for m in self.pruner.masks.values())
        pruned = total - sum(int(m.sum()) for m in self.pruner.masks.values())
        try:
            before = snapshot(self.model, self.pruner)
            self.pruner.prune_to(amount)
        except ValueError as e:  # a lower target, a count too large, or NaN/inf weights
            assert same(before, snapshot(self.model, self.pruner)), str(e)
            return
        if self.pruner.scope == "global":
            want = amount if isinstance(amount, int) else round(amount * total)
            assert self.pruner.sparsity().pruned == want
        else:
            assert self.pruner.sparsity().pruned >= pruned

    @rule(name=st.sampled_from(sorted(SHAPES)), seed=st.integers(0, 2**16))
    def set_masks(self, name: str, seed: int) -> None:
        mask = torch.rand(SHAPES[name], generator=torch.Generator().manual_seed(seed)) > 0.2
        expected = self.pruner.masks[name] & mask
        self.pruner.set_masks({name: mask})
        assert torch.equal(self.pruner.masks[name], expected)

    # --------------------------------------------------------------- training
    @rule(kind=st.sampled_from(["sgd", "adam"]), part=st.sampled_from(["all", "0", "2"]))
    def attach_new_optimizer(self, kind: str, part: str) -> None:
        params = list((self.model if part == "all" else self.model[int(part)]).parameters())
        if kind == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        else:
            optimizer = torch.optim.Adam(params, lr=0.05)
        self.pruner.attach(optimizer)
        self.optimizers.append(optimizer)

    @rule(layer=st.sampled_from([0, 2]), trainable=st.booleans())
    def freeze_or_unfreeze(self, layer: int, trainable: bool) -> None:
        self.model[layer].requires_grad_(trainable)

    @precondition(lambda self: bool(self.optimizers))
    @rule(data=st.data())
    def add_param_group(self, data: st.DataObject) -> None:
        optimizer = data.draw(st.sampled_from(self.optimizers))
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        free = [p for p in self.model.parameters() if id(p) not in held]
        if free:
            optimizer.add_param_group({"params": free})

    @precondition(lambda self: bool(self.optimizers))
    @rule(data=st.data(), inf=st.booleans(), seed=st.integers(0, 2**16))
    def step(self, data: st.DataObject, inf: bool, seed: int) -> None:
        optimizer = data.draw(st.sampled_from(self.optimizers))
        g = torch.Generator().manual_seed(seed)
        optimizer.zero_grad()
        loss = torch.zeros(())
        for name, param in self.model.named_parameters():
            scale = torch.randn(param.shape, generator=g, dtype=param.dtype)
            if inf and name in SHAPES:
                scale.view(-1)[int(torch.randint(param.numel(), (1,), generator=g))] = math.inf
            loss = loss + (param * scale).sum()
        if loss.requires_grad:  # not when every layer is frozen
            loss.backward()
        for name, param, _ in self.pruner._grad_hooks:  # gradients masked as accumulated
            if param is self.model.get_parameter(name) and param.grad is not None:
                assert bool((param.grad[~self.pruner.masks[name]] == 0).all()), name
        optimizer.step()

    # ------------------------------------------------------------------ state
    @rule()
    def state_round_trip(self) -> None:
        state = self.pruner.state_dict()
        fresh = Pruner(copy.deepcopy(self.model), scope=self.pruner.scope)
        fresh.load_state_dict(state)
        assert all(torch.equal(fresh.masks[n], m) for n, m in self.pruner.masks.items())
        updates = self.pruner.updates
        self.pruner.load_state_dict(state)
        assert self.pruner.updates == updates

    @rule()
    def deep_copy(self) -> None:
        model, optimizers, pruner = copy.deepcopy((self.model, self.optimizers, self.pruner))
        assert pruner.model is model
        assert len(pruner.optimizers) == len(self.pruner.optimizers)
        assert all(any(o is c for c in optimizers) for o in pruner.optimizers)
        self.model, self.optimizers, self.pruner = model, optimizers, pruner

    @precondition(lambda self: bool(self.optimizers))
    @rule(data=st.data())
    def optimizer_state_round_trip(self, data: st.DataObject) -> None:
        optimizer = data.draw(st.sampled_from(self.optimizers))
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    # (before any optimizer: torch's optimizers keep their state in the old dtype)
    @precondition(lambda self: not self.optimizers)
    @rule(dtype=st.sampled_from([torch.float32, torch.float64]))
    def change_dtype(self, dtype: torch.dtype) -> None:
        self.model.to(dtype)  # same parameter objects, new values: followed by the hooks

    @rule(seed=st.integers(0, 3))
    def replace_parameters(self, seed: int) -> None:
        dtype = self.model[0].weight.dtype
        dense = {k: v.to(dtype) + 0.5 for k, v in make_model(seed).state_dict().items()}
        self.model.load_state_dict(dense, assign=True)

    # ------------------------------------------------------------- bad inputs
    @rule(
        bad=st.sampled_from(
            [1.5, -0.1, math.nan, True, "0.5", -1, 10**6, {"9.weight": 0.5}, {"0.weight": 2.0}]
        )
    )
    def bad_prune_to(self, bad: Any) -> None:
        self.expect_failure(lambda: self.pruner.prune_to(bad), (TypeError, ValueError))

    @rule(how=st.sampled_from(["shape", "dtype", "name"]))
    def bad_set_masks(self, how: str) -> None:
        masks = {
            "shape": {"0.weight": torch.ones(6, 5, dtype=torch.bool)},
            "dtype": {"0.weight": torch.ones(5, 6)},
            "name": {"1.weight": torch.ones(5, 6, dtype=torch.bool)},
        }[how]
        self.expect_failure(lambda: self.pruner.set_masks(masks), ValueError)

    @rule(how=st.sampled_from(["updates", "format", "list", "padding", "shape", "missing"]))
    def bad_load_state_dict(self, how: str) -> None:
        state = self.pruner.state_dict()
        entry = state["masks"]["2.weight"]  # 15 entries: the last byte has 1 padding bit
        if how == "updates":
            state["updates"] = "x"
        elif how == "format":
            state["format"] = 0
        elif how == "list":
            entry["packed"] = entry["packed"].tolist()
        elif how == "padding":
            entry["packed"][-1] |= 0x80
        elif how == "shape":
            entry["shape"] = [5, 3]
        else:
            del state["masks"]["0.weight"]
        self.expect_failure(lambda: self.pruner.load_state_dict(state), (TypeError, ValueError))

    # ------------------------------------------------------------- invariants
    @invariant()
    def contract_holds(self) -> None:
        if not hasattr(self, "pruner"):
            return
        report = self.pruner.sparsity()  # a public entry: follows replaced parameters
        masks = self.pruner.masks
        assert report.pruned == sum(m.numel() - int(m.sum()) for m in masks.values())
        for t in report.targets:
            assert t.pruned == masks[t.name].numel() - int(masks[t.name].sum())
        for name, mask in masks.items():
            param = self.model.get_parameter(name).detach()
            assert bool((param[~mask] == 0).all()), name  # exactly 0, not NaN
            assert bool((mask <= self.previous[name]).all()), name  # masks only shrink
            for optimizer in self.optimizers:
                for value in optimizer.state.get(self.model.get_parameter(name), {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        assert bool((value[~mask] == 0).all()), name
        self.previous = {n: m.clone() for n, m in masks.items()}


TestPrunerMachine = PrunerMachine.TestCase
TestPrunerMachine.settings = settings(
    max_examples=12,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class LongPrunerMachine(PrunerMachine):
    pass


TestLongPrunerMachine = pytest.mark.slow(LongPrunerMachine.TestCase)
TestLongPrunerMachine.settings = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
