"""An epoch-like Lightning run of LeNet-300-100: no pruning, Lightning's ModelPruning,
prunekit's ``Pruning`` callback, and that callback idle (attached, nothing to prune).

300 steps of batch 60 on random data (6 epochs of 50 batches, ``max_steps=300``). Both
pruning callbacks prune the Linear weights globally at the first three epoch boundaries
to 50 %, 75 % and 90 % absolute sparsity. ModelPruning's ``amount`` is a fraction of the
weights that remain, so it is given 0.5, 0.5 and 0.6 (0.5 -> 0.75 -> 0.9 of all). The
idle callback checks its schedule at every step (``unit="step"``) but its first update
lies beyond the run. Everything runs twice: with PyTorch's default Adam and with
``Adam(fused=True)`` (on CPU the default one is much slower on exactly-zero moments).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import log, median, rotated, wait_for_quiet
from benchmarks.step_overhead import lenet

STEPS = 300
BATCH = 60
BATCHES_PER_EPOCH = 50
ABSOLUTE = (0.5, 0.75, 0.9)  # sparsity after epoch boundaries 1, 2, 3
VARIANTS = ("none", "model_pruning", "prunekit", "prunekit_idle")
OPTIMIZERS = {"adam": {}, "adam_fused": {"fused": True}}


def _relative(absolute: tuple[float, ...]) -> list[float]:
    """Fractions of the remaining weights that reach the ``absolute`` sparsities in turn.

    >>> [round(a, 6) for a in _relative((0.5, 0.75, 0.9))]
    [0.5, 0.5, 0.6]
    """
    out, previous = [], 0.0
    for target in absolute:
        out.append((target - previous) / (1.0 - previous))
        previous = target
    return out


def _module_class() -> type:
    import lightning.pytorch as pl

    class LitLeNet(pl.LightningModule):
        def __init__(self, optimizer: str) -> None:
            super().__init__()
            self.net = lenet()
            self.optimizer_options = OPTIMIZERS[optimizer]

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3, **self.optimizer_options)

    return LitLeNet


def _model_pruning(module: nn.Module) -> Any:
    from lightning.pytorch.callbacks import ModelPruning

    rates = _relative(ABSOLUTE)

    def amount(epoch: int) -> float:
        return rates[epoch] if epoch < len(rates) else 0.0

    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=[(m, "weight") for m in module.modules() if isinstance(m, nn.Linear)],
        amount=amount,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False,
        verbose=0,
    )


def _prunekit_callback(module: nn.Module) -> Any:
    from prunekit.callbacks import Pruning
    from prunekit.schedules import Steps

    points = [(epoch + 1, s) for epoch, s in enumerate(ABSOLUTE)]
    return Pruning(Steps(points), unit="epoch", scope="global")


def _prunekit_idle(module: nn.Module) -> Any:
    from prunekit.callbacks import Pruning
    from prunekit.schedules import Steps

    return Pruning(Steps([(10 * STEPS, 0.5)]), unit="step", scope="global")


def _sparsity(module: nn.Module) -> float:
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def _fit(
    callback: Callable[[nn.Module], Any] | None,
    data: DataLoader,
    seed: int,
    optimizer: str,
    steps: int = STEPS,
) -> dict:
    import lightning.pytorch as pl

    torch.manual_seed(seed)
    module = _module_class()(optimizer)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[callback(module)] if callback else [],
    )
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    return {"fit_s": seconds, "steps": trainer.global_step, "sparsity": _sparsity(module)}


def run(*, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Alternate the variants over several rounds; median fit time and final sparsity."""
    import lightning.pytorch  # noqa: F401  # configures its loggers, which are quietened next

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*but have no logger configured.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    generator = torch.Generator().manual_seed(seed)
    n = BATCH * BATCHES_PER_EPOCH
    data = DataLoader(
        TensorDataset(torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,))),
        batch_size=BATCH,
    )
    callbacks: dict[str, Callable[[nn.Module], Any] | None] = {
        "none": None,
        "model_pruning": _model_pruning,
        "prunekit": _prunekit_callback,
        "prunekit_idle": _prunekit_idle,
    }
    rounds = 2 if quick else 5
    summary: dict[str, Any] = {}
    for optimizer in OPTIMIZERS:
        # One short untimed fit first: one-time initialisation is no variant's overhead.
        _fit(None, data, seed, optimizer, steps=BATCHES_PER_EPOCH)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            for variant in rotated(VARIANTS, r):
                wait_for_quiet()
                result = _fit(callbacks[variant], data, seed, optimizer)
                runs[variant].append(result)
                log(
                    f"lightning {optimizer} {variant} round {r + 1}/{rounds}: "
                    f"{result['fit_s']:.2f} s, {result['steps']} steps, "
                    f"final sparsity {result['sparsity']:.4f}"
                )
        base = median([x["fit_s"] for x in runs["none"]]) or float("nan")
        summary[optimizer] = {}
        for variant in VARIANTS:
            fit = median([x["fit_s"] for x in runs[variant]]) or 0.0
            summary[optimizer][variant] = {
                "median_fit_s": fit,
                "ratio_to_none": fit / base,
                "sparsity": runs[variant][-1]["sparsity"],
                "steps": runs[variant][-1]["steps"],
                "runs": runs[variant],
            }
    return {
        "setup": (
            f"LeNet-300-100, Adam, batch {BATCH}, {STEPS} steps ({STEPS // BATCHES_PER_EPOCH} "
            f"epochs of {BATCHES_PER_EPOCH} batches), prune at epoch boundaries to "
            f"{', '.join(f'{s:.0%}' for s in ABSOLUTE)}"
        ),
        "rounds": rounds,
        "optimizers": summary,
    }
