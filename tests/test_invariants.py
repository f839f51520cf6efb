"""Training invariants under every optimizer and precision setting we support.

After every optimizer step: pruned weights are exactly 0 and their optimizer state is 0;
at every update the number of pruned weights is exactly ``round(s·N)``; masks never
regrow. tests/test_pruner.py covers SGD / Adam / AdamW with accumulation and clipping in
a plain loop and tests/test_callbacks.py bf16-mixed, clipping and two manual optimizers
in Lightning; this file adds what they leave out: amsgrad, nesterov, fused and foreach
optimizers, bf16 autocast and bf16 weights, value clipping with accumulation, two
optimizers in a plain loop (one of them over two parameter groups), and tied weights,
in a plain loop and in Lightning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from prunekit.callbacks import Pruning
from prunekit.schedules import Polynomial
from torch import nn

from prunekit import Pruner
from tests.checks import MaskHistory, StepChecker, one_thread
from tests.lit_helpers import TinyNet, loader, make_batch, trainer

UPDATES = {3: 0.3, 9: 0.6, 15: 0.85}  # plain loop: absolute sparsity at these steps
STEPS = 20


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )


class TiedLM(nn.Module):
    """Embedding and output head share one weight (as language models tie them)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (x[:, :4].abs() * 3).long().clamp(max=9)
        return self.head(torch.relu(self.mix(self.embed(tokens).mean(dim=1))))


class SharedBlock(nn.Module):
    """One square layer applied twice under two module names (ALBERT-style sharing)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(12, 16)
        self.block1 = nn.Linear(16, 16)
        self.block2 = nn.Linear(16, 16, bias=False)
        self.block2.weight = self.block1.weight
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.block2(torch.relu(self.block1(h)))))


Optimizers = Callable[[nn.Module], list[torch.optim.Optimizer]]


def one(make: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]) -> Optimizers:
    return lambda model: [make(model.parameters())]


def split(model: nn.Module) -> list[torch.optim.Optimizer]:
    """Two optimizers; the second holds two parameter groups with their own settings."""
    first, *rest = list(model.children())[::2]
    sgd = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    groups = [{"params": rest[0].parameters()}, {"params": rest[1].parameters(), "lr": 3e-3}]
    return [sgd, torch.optim.Adam(groups, lr=1e-2)]


@dataclass(frozen=True)
class Case:
    optimizers: Optimizers
    model: Callable[[], nn.Module] = mlp
    autocast: bool = False  # forward under torch.autocast("cpu", dtype=torch.bfloat16)
    dtype: torch.dtype = torch.float32  # the weights' dtype
    micro_batches: int = 1  # gradient accumulation
    clip: Callable[[Iterable[nn.Parameter]], Any] | None = None
    targets: Any = None  # the Pruner's targets


PLAIN = {
    "sgd-nesterov-wd": Case(
        one(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2))
    ),
    "adam-amsgrad": Case(one(lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True))),
    "adamw-fused": Case(one(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True))),
    "adamw-foreach": Case(
        one(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=True))
    ),
    "bf16-autocast": Case(
        one(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3)), autocast=True
    ),
    "bf16-weights": Case(one(lambda p: torch.optim.Adam(p, lr=1e-2)), dtype=torch.bfloat16),
    "accumulate-clip-value": Case(
        one(lambda p: torch.optim.Adam(p, lr=1e-2)),
        micro_batches=3,
        clip=lambda p: nn.utils.clip_grad_value_(p, 0.01),
    ),
    "two-optimizers": Case(split, clip=lambda p: nn.utils.clip_grad_norm_(p, 0.5)),
    "tied-embedding-head": Case(  # embeddings are dense by default: ask for the tied head
        one(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
        model=TiedLM,
        targets=[nn.Linear],
    ),
    "tied-shared-block": Case(
        one(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)), model=SharedBlock, autocast=True
    ),
}


def check_optimizer_state(pruner: Pruner, optimizers: list[torch.optim.Optimizer]) -> None:
    for name, mask in pruner.masks.items():
        param = pruner.model.get_parameter(name)
        for optimizer in optimizers:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    assert bool((value[~mask] == 0).all()), (name, key)


@pytest.mark.parametrize("case", list(PLAIN.values()), ids=list(PLAIN))
def test_plain_loop_invariants(case: Case) -> None:
    model = case.model().to(case.dtype)
    optimizers = case.optimizers(model)
    pruner = Pruner(model, targets=case.targets)
    for optimizer in optimizers:
        pruner.attach(optimizer)
    history, target = MaskHistory(), 0.0
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if case.autocast else contextlib.nullcontext()
    )
    for step in range(STEPS):
        if step in UPDATES:
            target = UPDATES[step]
            pruner.prune_to(target)
            history(pruner, target, where=f"update at {step}")
        for micro in range(case.micro_batches):
            x, y = make_batch(step * 10 + micro)
            with autocast:
                logits = model(x.to(case.dtype))
            loss = nn.functional.cross_entropy(logits.float(), y) / case.micro_batches
            loss.backward()
        if case.clip is not None:
            case.clip(model.parameters())
        for optimizer in optimizers:
            optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad()
        history(pruner, target, where=f"step {step}")
        check_optimizer_state(pruner, optimizers)
    assert history.calls == STEPS + len(UPDATES)
    tied = {}
    for name in pruner.names:
        param = model.get_parameter(name)
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]
        if len(names) > 1:
            tied[name] = names
    assert len(tied) == (case.model is not mlp)
    for name, names in tied.items():  # pruned once, under its first name; zeros under every name
        assert names[0] == name and not set(names[1:]) & set(pruner.names)
        for alias in names:
            assert bool((model.get_parameter(alias)[~pruner.masks[name]] == 0).all())
    assert pruner.sparsity().pruned == round(0.85 * pruner.sparsity().total)


class LitTied(TinyNet):
    """TinyNet's data and training step, a network with one weight shared by two layers."""

    def __init__(self, optimizer: str = "adam") -> None:
        super().__init__(optimizer=optimizer)
        self.net = SharedBlock()

    def configure_optimizers(self) -> Any:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return super().configure_optimizers()


LIGHTNING: dict[str, tuple[Callable[[], pl.LightningModule], dict[str, Any]]] = {
    "tied-adam": (lambda: LitTied("adam"), {}),
    "tied-sgd-bf16-mixed-accumulate": (
        lambda: LitTied("sgd"),
        {"precision": "bf16-mixed", "accumulate_grad_batches": 2},
    ),
    "adamw-accumulate-clip": (
        lambda: LitTied("adamw"),
        {"accumulate_grad_batches": 3, "gradient_clip_val": 0.05},
    ),
    "adam-clip-value-bf16-mixed": (
        lambda: TinyNet(optimizer="adam"),
        {"precision": "bf16-mixed", "gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"},
    ),
}


@pytest.mark.parametrize("name", list(LIGHTNING))
def test_lightning_invariants(name: str) -> None:
    make, options = LIGHTNING[name]
    schedule = Polynomial(0.0, 0.85, begin=1, end=9, frequency=2)
    pruning = Pruning(schedule)
    checker = StepChecker(pruning)  # zeros, no regrowth, exactly round(s(t)·N) at every step
    model = make()
    fit = trainer(max_steps=12, callbacks=[pruning, checker], **options)
    fit.fit(model, loader())
    assert fit.global_step == 12
    assert checker.steps == 12 * options.get("accumulate_grad_batches", 1)
    pruner = pruning.pruner
    check_optimizer_state(pruner, fit.optimizers)
    assert pruner.sparsity().pruned == round(0.85 * pruner.sparsity().total)
    if isinstance(model, LitTied):
        assert "net.block1.weight" in pruner.names and "net.block2.weight" not in pruner.names
        mask = pruner.masks["net.block1.weight"]
        assert bool((model.net.block2.weight[~mask] == 0).all())
