"""A tiny LightningModule and trainer factory shared by callback tests and worker scripts.

Lightning restarts a plain DataLoader from its first batch when a run resumes mid-epoch
(while ``batch_idx`` continues), so ``TinyNet`` rebuilds each training batch from
``(epoch, batch_idx)``: a resumed run then sees exactly the data of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class StepSeededData(Dataset):
    """Batch ``i`` is a pure function of ``i``: runs resumed mid-epoch see the same data."""

    def __init__(self, length: int = 64, batch: int = 16) -> None:
        self.length, self.batch = length, batch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(index, self.batch)


def make_batch(index: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(index)
    x = torch.randn(size, 12, generator=g)
    return x, (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()


def loader(length: int = 64) -> DataLoader:
    return DataLoader(StepSeededData(length), batch_size=None, shuffle=False)


class TinyNet(pl.LightningModule):
    def __init__(self, optimizer: str = "adam", lr: float = 1e-2, scheduler: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
        )
        self.optimizer, self.lr, self.scheduler = optimizer, lr, scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = make_batch(self.current_epoch * 1000 + batch_idx)
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-3)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(**options)
