"""What both runners share: a Trainer set up for a run folder, evaluation, progress lines."""

from __future__ import annotations

import os
import sys
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig
from prunekit.experiments.data import FashionMNISTDataModule
from prunekit.experiments.module import Classifier
from torch import nn
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


@dataclass(frozen=True)
class Evaluation:
    """One validation point, with the test accuracy at that moment."""

    step: int
    val_loss: float
    val_acc: float
    test_acc: float


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        count += y.numel()
    model.train(was_training)
    return loss / count, correct / count


class Evaluations(Callback):
    """Records validation loss/accuracy and the test accuracy at every validation, so a
    run reports the test accuracy at its early-stopping point (minimum validation loss)."""

    def __init__(self, test_loader: DataLoader, label: str = "") -> None:
        self.test_loader, self.label = test_loader, label
        self.records: list[Evaluation] = []
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        _, test_acc = evaluate(pl_module, self.test_loader)
        record = Evaluation(
            trainer.global_step, float(metrics["val/loss"]), float(metrics["val/acc"]), test_acc
        )
        self.records.append(record)
        sparsity = metrics.get("sparsity/actual")
        extra = f" sparsity {float(sparsity):.3f}" if sparsity is not None else ""
        total = trainer.max_steps if trainer.max_steps > 0 else "?"
        progress(
            f"{self.label}step {record.step}/{total}: val loss {record.val_loss:.4f} "
            f"val acc {record.val_acc:.4f} test acc {record.test_acc:.4f}{extra} "
            f"({time.perf_counter() - self._started:.0f}s)"
        )

    def best(self) -> Evaluation:
        """The evaluation with the lowest validation loss (the early-stopping point)."""
        if not self.records:
            raise RuntimeError("no validation ran; lower train.val_every")
        return min(self.records, key=lambda r: r.val_loss)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


def progress(line: str) -> None:
    """A progress line on stderr (stdout keeps the result tables)."""
    print(line, file=sys.stderr, flush=True)


def datamodule(cfg: DictConfig, seed: int) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        root=cfg.data.root,
        batch_size=cfg.data.batch_size,
        val_size=cfg.data.val_size,
        seed=seed,
        subset=cfg.data.subset,
    )
    dm.setup("fit")
    dm.setup("test")
    return dm


def classifier(
    model: nn.Module, train: DictConfig, max_steps: int, lr: float | None = None
) -> Classifier:
    return Classifier(
        model,
        optimizer=train.optimizer,
        lr=lr if lr is not None else train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        lr_schedule=train.lr_schedule,
        milestones=list(train.milestones),
        gamma=train.gamma,
        max_steps=max_steps,
    )


def fit(
    module: Classifier,
    dm: FashionMNISTDataModule,
    *,
    max_steps: int,
    val_every: int,
    log_dir: Path | None,
    callbacks: Sequence[Callback] = (),
    ckpt_path: str | None = None,
) -> pl.Trainer:
    """Train ``module`` for ``max_steps`` optimizer steps, validating every ``val_every``;
    metrics go to ``log_dir/metrics.csv`` (Lightning's CSVLogger) when given. A
    ``ckpt_path`` to resume from is checked first (see :func:`check_checkpoint`)."""
    if ckpt_path is not None:
        check_checkpoint(ckpt_path)
    logger = CSVLogger(log_dir, name="", version="") if log_dir is not None else False
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        val_check_interval=min(val_every, max_steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=max(1, min(50, val_every)),
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),
        deterministic=True,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def check_checkpoint(path: str | os.PathLike[str]) -> None:
    """Fail, naming the file, unless ``path`` is a complete checkpoint file.

    ``torch.save`` (and so Lightning) writes a zip archive; a missing file raises
    ``FileNotFoundError``, a truncated or corrupted one (no central directory, a member
    failing its CRC) ``ValueError``, before the Trainer touches the model.

    >>> check_checkpoint("/no/such.ckpt")
    Traceback (most recent call last):
    FileNotFoundError: ckpt_path='/no/such.ckpt' does not exist
    """
    where = f"ckpt_path={os.fspath(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(
            f"{where} is not a complete checkpoint (truncated or corrupt: {e})"
        ) from None
    if broken is not None:
        raise ValueError(f"{where} is corrupt: {broken!r} fails its CRC check")
