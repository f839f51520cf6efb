"""Run by tests/test_sharded.py: a Lightning fit with the Pruning callback, sharded with
ModelParallelStrategy (FSDP2) over DEVICES gloo CPU processes, or on one process.

Usage: python tests/sharded_lightning_worker.py OUT DEVICES [CKPT]
DEVICES is 1 (one process, no strategy), 2 or 4 (ModelParallelStrategy, FSDP2 over that
many ranks), or 1mp (ModelParallelStrategy on one rank: loads the distributed
checkpoints the others write). Every rank trains on the same batches (so the averaged
gradients equal one process's) and rank 0 writes OUT/result.pt: per update the step, the
logged target and actual sparsity and the whole masks; OUT/ckpt holds checkpoints
written every 4 steps. With CKPT, the fit resumes from it. With the environment variable
KILL_AT_STEP=N, the first rank to start step N SIGKILLs the whole process group (every
rank), as a crash or a pre-empted job would end it. With RELATIVE_METHOD=METHOD, the
callback prunes 10 % of what remains at every step (``amount=0.1``) with that method
(global scope; structured methods: layer scope, rows) instead of following a schedule.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunekit.callbacks import Pruning
from prunekit.schedules import Polynomial

from tests.lit_helpers import TinyNet, loader, trainer


class Sharded(TinyNet):
    def configure_model(self) -> None:
        if self.device_mesh is None:  # one process, no ModelParallelStrategy
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class Recorder(Pruning):
    records: list[dict[str, Any]]

    def _log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._log_update(trainer, pl_module)
        masks = {}  # copies: on one rank full_tensor() is the mask itself, not a copy
        for name, mask in self.pruner.masks.items():
            masks[name] = (mask.full_tensor() if hasattr(mask, "full_tensor") else mask).clone()
        self.records.append({"step": trainer.global_step, "masks": masks})


class Killer(pl.Callback):
    """SIGKILLs every process of the run's process group when step ``at`` starts."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            sys.stdout.flush()
            os.killpg(os.getpgid(0), signal.SIGKILL)


class Metrics(Logger):
    """Keeps what reaches the loggers (on rank 0 only, as Lightning's own loggers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append({"step": step, **metrics})

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def main() -> None:
    torch.set_num_threads(1)
    out, mode = Path(sys.argv[1]), sys.argv[2]
    devices = int(mode.removesuffix("mp"))
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    out.mkdir(parents=True, exist_ok=True)
    relative = os.environ.get("RELATIVE_METHOD")  # prune 10 % of what remains each step
    if relative:
        kwargs: dict[str, Any] = {"method": relative, "scope": "global"}
        if relative != "magnitude":
            kwargs.update(scope="layer", options={"dim": 0})
        pruning = Recorder(amount=0.1, unit="step", seed=5, **kwargs)
    else:
        pruning = Recorder(Polynomial(0.0, 0.8, begin=2, end=12, frequency=2), seed=5)
    pruning.records = []
    metrics = Metrics()
    save = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=4, save_top_k=-1)
    callbacks: list[pl.Callback] = [pruning, save]
    if "KILL_AT_STEP" in os.environ:
        callbacks.append(Killer(int(os.environ["KILL_AT_STEP"])))
    strategy: Any = "auto"
    if devices > 1 or mode.endswith("mp"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    fit = trainer(
        max_steps=14,
        devices=devices,
        strategy=strategy,
        callbacks=callbacks,
        logger=metrics,
        enable_checkpointing=True,
        log_every_n_steps=1,
    )
    fit.fit(Sharded(), loader(), ckpt_path=ckpt)
    final = {}
    for name, mask in pruning.pruner.masks.items():
        final[name] = (mask.full_tensor() if hasattr(mask, "full_tensor") else mask).clone()
    if fit.global_rank == 0:
        rows = [r for r in metrics.rows if "sparsity/actual" in r]
        torch.save({"records": pruning.records, "logged": rows, "final": final}, out / "result.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads can race them at
    # interpreter exit and abort a finished rank ("terminate called without an active
    # exception", exit status -6); the result is already written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
