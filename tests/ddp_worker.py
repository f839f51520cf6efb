"""Run by tests/test_ddp.py: a 2-process CPU DDP fit that records mask checksums per rank.

Usage: python tests/ddp_worker.py OUT_DIR METHOD SCOPE [DEVICES]
(METHOD "structured": random_structured on the first layer, ln_structured on the others)
Each rank feeds different data (so only DDP's gradient averaging keeps weights equal)
and writes OUT_DIR/rank<r>.json: the logged target sparsity and a checksum of every
mask after every update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunekit.callbacks import Pruning
from prunekit.schedules import Polynomial

from prunekit import pack_mask
from tests.lit_helpers import TinyNet, loader, make_batch, trainer


class RankData(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = make_batch(self.global_rank * 100_000 + self.current_epoch * 1000 + batch_idx)
        return torch.nn.functional.cross_entropy(self(x), y)


class Recorder(Pruning):
    records: list[dict[str, Any]]

    def _log_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._log_update(trainer, pl_module)
        masks = self.pruner.masks
        self.records.append(
            {
                "step": trainer.global_step,
                "target": self._target,
                "actual": self.pruner.sparsity().fraction,
                "masks": {n: pack_mask(m).tolist() for n, m in masks.items()},
            }
        )


def main() -> None:
    torch.set_num_threads(1)  # two ranks on a small machine: no oversubscription
    out, method, scope = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    devices = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    options = {"dim": 0} if method in ("ln_structured", "random_structured") else {}
    targets = None
    if method == "structured":  # both structured methods in one run: random on the first layer
        method, options = "ln_structured", {"dim": 0}
        targets = {"net.0.weight": {"method": "random_structured"}, "net.[24].weight": None}
    pruning = Recorder(
        Polynomial(0.0, 0.8, begin=2, end=12, frequency=2),
        targets=targets,
        method=method,
        scope=scope,
        seed=5,
        options=options,
    )
    pruning.records = []
    strategy = "ddp" if devices > 1 else "auto"
    fit = trainer(max_steps=14, devices=devices, strategy=strategy, callbacks=[pruning])
    fit.fit(RankData(), loader())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{fit.global_rank}.json").write_text(json.dumps(pruning.records))


if __name__ == "__main__":
    main()
