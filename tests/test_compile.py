"""torch.compile: pruning keeps working on a compiled model and never causes a recompile.

Masks are applied in place to the parameters between steps; the forward pass does not
change, so a compiled graph stays valid. A counting backend records every graph dynamo
hands to the compiler; a run with pruning updates must compile exactly as often as the
same run without them. The default backend here is ``aot_eager`` (dynamo capture and
AOTAutograd, no C++ code generation: seconds on CPU); ``inductor`` runs in the slow suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from prunekit.callbacks import Pruning
from prunekit.schedules import Polynomial
from torch import nn

from prunekit import Pruner
from tests.checks import MaskHistory, StepChecker, one_thread
from tests.lit_helpers import TinyNet, loader, make_batch, trainer

SCHEDULE = Polynomial(0.0, 0.8, begin=2, end=12, frequency=2)
STEPS = 16


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


class CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile."""

    def __init__(self, backend: str) -> None:
        self.backend, self.compiles = backend, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        from torch._dynamo.backends.registry import lookup_backend

        self.compiles += 1
        return lookup_backend(self.backend)(gm, example_inputs)


class CompiledTinyNet(TinyNet):
    """TinyNet whose forward pass runs compiled; its state_dict keys stay plain."""

    def __init__(self, backend: CountingBackend) -> None:
        super().__init__(optimizer="sgd", lr=0.05)
        self.compiled = torch.compile(self.eager, backend=backend)

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.compiled(x)


def fit(backend_name: str, prune: bool) -> tuple[int, CompiledTinyNet, StepChecker | None]:
    torch._dynamo.reset()
    backend = CountingBackend(backend_name)
    model = CompiledTinyNet(backend)
    callbacks: list[Any] = []
    checker = None
    if prune:
        pruning = Pruning(SCHEDULE)
        checker = StepChecker(pruning)
        callbacks = [pruning, checker]
    trainer(max_steps=STEPS, callbacks=callbacks).fit(model, loader())
    return backend.compiles, model, checker


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_under_pruning_callback_never_recompiles(backend: str) -> None:
    pruned_compiles, model, checker = fit(backend, prune=True)
    dense_compiles, _, _ = fit(backend, prune=False)
    assert checker is not None and checker.steps == STEPS  # zeros, no regrowth, exact counts
    updates = [t for t in range(STEPS) if SCHEDULE.is_update(t) and SCHEDULE(t) > 0]
    assert len(updates) == 5  # pruning really changed the masks five times mid-training
    n = sum(model.get_parameter(f"net.{i}.weight").numel() for i in (0, 2, 4))
    zeros = sum(int((model.get_parameter(f"net.{i}.weight") == 0).sum()) for i in (0, 2, 4))
    assert zeros >= round(0.8 * n)
    assert pruned_compiles == dense_compiles >= 1


def test_compiled_model_in_a_plain_loop_never_recompiles() -> None:
    def run(prune: bool) -> tuple[int, MaskHistory]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
        backend = CountingBackend("aot_eager")
        compiled = torch.compile(model, backend=backend)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        pruner = Pruner(model).attach(optimizer)
        history = MaskHistory()
        for step in range(12):
            if prune and step in (2, 5, 8):
                pruner.prune_to(step / 10)
            x, y = make_batch(step)
            nn.functional.cross_entropy(compiled(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            target = max((s / 10 for s in (2, 5, 8) if s <= step), default=0.0) if prune else 0.0
            history(pruner, target, where=step)
        return backend.compiles, history

    pruned, history = run(prune=True)
    dense, _ = run(prune=False)
    assert history.calls == 12
    assert pruned == dense >= 1
