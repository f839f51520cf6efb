"""Invariant checks shared by the reliability tests (compile, invariants)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from prunekit.callbacks import Pruning

from prunekit import Pruner


class MaskHistory:
    """Checks, each time it is called, that pruned weights are exactly zero, that no mask
    regrew since the last call, and (given a target) that exactly ``round(s·N)`` of the
    ``N`` targeted weights are pruned (global scope)."""

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] | None = None
        self.calls = 0

    def __call__(self, pruner: Pruner, target: float | None = None, where: Any = None) -> None:
        for name in pruner.names:
            mask, param = pruner.masks[name], pruner.model.get_parameter(name)
            assert bool((param.detach()[~mask] == 0).all()), (where, name, "pruned weight != 0")
            if self.previous is not None:
                assert bool((mask <= self.previous[name]).all()), (where, name, "mask regrew")
        if target is not None:
            report = pruner.sparsity()
            assert report.pruned == round(target * report.total), (where, target, report.pruned)
        self.previous = {n: m.clone() for n, m in pruner.masks.items()}
        self.calls += 1


class StepChecker(Callback):
    """After every optimizer step of a fit: the :class:`MaskHistory` checks, with the target
    the callback's schedule gives for the trainer's ``global_step``."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning, self.history = pruning, MaskHistory()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        assert self.pruning.pruner is not None
        step = trainer.global_step
        self.history(self.pruning.pruner, self.pruning.schedule(step), where=f"step {step}")

    @property
    def steps(self) -> int:
        return self.history.calls


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run with one torch thread (tiny models on a shared 2-core machine run ~30x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
