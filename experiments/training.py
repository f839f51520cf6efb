"""What both runners share: a Trainer set up for a run folder, evaluation, progress lines."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from prunekit.experiments.data import data_shape, datamodule_from_config
from prunekit.experiments.models import build_model
from prunekit.experiments.module import Classifier
from prunekit.experiments.paths import RunFolderError, atomic_write
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
    run reports the test accuracy at its early-stopping point (minimum validation loss).

    ``resumable``: the records go into the fit's checkpoints and a resumed fit continues
    them (off for fits that start from another fit's checkpoint, as lottery rewinding).
    """

    def __init__(self, test_loader: DataLoader, label: str = "", resumable: bool = False) -> None:
        self.test_loader, self.label, self.resumable = test_loader, label, resumable
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

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.as_dicts()} if self.resumable else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.resumable:
            self.records = [Evaluation(**r) for r in state_dict.get("records", [])]


class Checkpoints(Callback):
    """Resumable checkpoints of one fit, so an interrupted run continues where it stopped.

    At the first validation at least ``every`` optimizer steps after the last checkpoint
    (never at the last step), the full Lightning state (weights, optimizer, LR schedule,
    loop position, every callback's state: the pruning masks and schedule position, the
    evaluations so far) is written to ``path``, atomically, replacing the previous one.
    Saving after validation means everything of that step is done and logged, so the
    resumed fit neither repeats nor skips anything. The checkpoint also holds the
    fit's wall time so far, torch's random state and how many rows of
    ``log_dir/metrics.csv`` were written; :func:`fit` resumes from ``path`` when it
    exists and keeps exactly those rows.
    """

    def __init__(self, path: Path, every: int) -> None:
        if every < 0:
            raise ValueError(f"{every=} must be >= 0")
        self.path, self.every = Path(path), every
        self.resumed_from: int | None = None  # the step a resumed fit started from
        self._saved_step = 0
        self._before = 0.0  # wall time of the fit before this process resumed it
        self._started = time.perf_counter()
        self._metrics_rows = 0
        self._earlier_rows: list[dict[str, Any]] = []  # metrics.csv rows read before fit
        self._rng: torch.Tensor | None = None

    @property
    def wall_s(self) -> float:
        """Seconds this fit has trained, across the processes that ran it."""
        return self._before + time.perf_counter() - self._started

    @property
    def wall_s_before(self) -> float:
        """Seconds of :attr:`wall_s` spent by interrupted processes (up to the checkpoint)."""
        return self._before

    @property
    def state_key(self) -> str:
        return "prunekit.Checkpoints"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.resumed_from is None:
            return
        note = ""
        per_epoch = trainer.num_training_batches
        if per_epoch != float("inf") and self.resumed_from % int(per_epoch):
            note = " (the interrupted epoch's data order restarts from its first batch)"
        progress(f"resuming from step {self.resumed_from} ({self.path}){note}")
        if self._rng is not None:
            torch.set_rng_state(self._rng)
        if len(self._earlier_rows) < self._metrics_rows:
            progress(
                f"warning: metrics.csv holds {len(self._earlier_rows)} rows, the checkpoint "
                f"was saved after {self._metrics_rows}: the missing rows are lost"
            )
        logger = trainer.logger
        if isinstance(logger, CSVLogger):  # its writer deleted the file: write the rows back
            for row in self._earlier_rows[: self._metrics_rows]:
                logger.experiment.log_metrics(row, step=row.pop("step", None))
            logger.save()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if (
            self.every == 0
            or trainer.sanity_checking
            or step - self._saved_step < self.every
            or step >= trainer.max_steps
        ):
            return
        for logger in trainer.loggers:
            logger.save()  # flush, so that the rows written so far are on disk
        self._metrics_rows = _count_rows(trainer.logger)
        self._saved_step = step
        self._rng = torch.get_rng_state()
        atomic_write(self.path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._saved_step,
            "wall_s": self.wall_s,
            "metrics_rows": self._metrics_rows,
            "rng": self._rng,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_step = self.resumed_from = int(state_dict["step"])
        self._before = float(state_dict["wall_s"])
        self._started = time.perf_counter()
        self._metrics_rows = int(state_dict["metrics_rows"])
        self._rng = state_dict.get("rng")

    def read_metrics(self, log_dir: Path | None) -> None:
        """Keep the rows of ``log_dir/metrics.csv`` (Lightning's CSV writer deletes the
        file when it starts); the checkpoint says how many belong to the resumed fit."""
        path = None if log_dir is None else Path(log_dir) / "metrics.csv"
        if path is None or not path.is_file():
            return
        with open(path, newline="") as f:
            self._earlier_rows = [
                {k: _number(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)
            ]


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _count_rows(logger: Any) -> int:
    if not isinstance(logger, CSVLogger):
        return 0
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


class _NoAdverts(logging.Filter):
    """Drops Lightning's adverts for its cloud services ("💡 Tip: ... litlogger/litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's adverts and its CSVLogger warning that "previous log files in this
    directory will be deleted": the run folder holds our files, which it never deletes
    (it only rewrites metrics.csv, whose rows :class:`Checkpoints` keeps). Nothing else."""
    loggers = [
        logging.getLogger(f"lightning.{part}.utilities.rank_zero") for part in ("pytorch", "fabric")
    ]
    adverts = _NoAdverts()
    for logger in loggers:
        logger.addFilter(adverts)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", ".*Previous log files in this directory will be deleted.*"
            )
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(adverts)


def progress(line: str) -> None:
    """A progress line on stderr (stdout keeps the result tables)."""
    print(line, file=sys.stderr, flush=True)


def datamodule(cfg: DictConfig, seed: int) -> pl.LightningDataModule:
    """The config's data module (a registered dataset or ``data._target_``), set up."""
    dm = datamodule_from_config(OmegaConf.to_container(cfg.data, resolve=True), seed)
    dm.setup("fit")
    dm.setup("test")
    return dm


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """What ``cfg.model`` is built with: the data's ``num_classes`` and ``input_shape``
    (the data module is only constructed, not loaded, to read them).

    >>> from prunekit.experiments.config import ExperimentConfig
    >>> model_kwargs(OmegaConf.structured(ExperimentConfig(name="demo")))
    {'num_classes': 10, 'input_shape': (1, 28, 28)}
    """
    with torch.random.fork_rng(devices=[]):  # a _target_ data module may draw numbers
        dm = datamodule_from_config(OmegaConf.to_container(cfg.data, resolve=True), cfg.seed)
    input_shape, num_classes = data_shape(dm)
    return {"num_classes": num_classes, "input_shape": input_shape}


def network(cfg: DictConfig) -> nn.Module:
    """``cfg.model`` built for the data's ``input_shape`` and ``num_classes``
    (:func:`model_kwargs`); seed before calling."""
    return build_model(cfg.model, **model_kwargs(cfg))


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
        log_every_step=False,  # train metrics only at the steps the loggers write
    )


def fit(
    module: Classifier,
    dm: pl.LightningDataModule,
    *,
    max_steps: int,
    val_every: int,
    log_dir: Path | None,
    callbacks: Sequence[Callback] = (),
    ckpt_path: str | None = None,
    checkpoints: Checkpoints | None = None,
) -> pl.Trainer:
    """Train ``module`` for ``max_steps`` optimizer steps, validating every ``val_every``;
    metrics go to ``log_dir/metrics.csv`` (Lightning's CSVLogger) when given. A
    ``ckpt_path`` to resume from is checked first (see :func:`check_checkpoint`).

    With ``checkpoints``, the fit saves resumable checkpoints and, when its file exists
    (an earlier process was interrupted), resumes from it, saying so; a truncated or
    corrupt one raises :class:`~prunekit.experiments.paths.RunFolderError` naming it.
    """
    resuming = checkpoints is not None and checkpoints.path.is_file()
    if resuming:
        assert checkpoints is not None and ckpt_path is None
        try:
            check_checkpoint(checkpoints.path)
        except ValueError as e:
            raise RunFolderError(
                f"{e}; delete it to start this phase of the run from its beginning"
            ) from None
        ckpt_path = str(checkpoints.path)
        checkpoints.read_metrics(log_dir)
    elif ckpt_path is not None:
        check_checkpoint(ckpt_path)
    logger = CSVLogger(log_dir, name="", version="") if log_dir is not None else False
    if checkpoints is not None:
        callbacks = [*callbacks, checkpoints]  # last: saves after the others' hooks ran
    with _quiet_lightning():
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
            default_root_dir=log_dir,  # nothing is written outside the run folder
        )
    with _quiet_lightning(), warnings.catch_warnings():
        if resuming:  # said below in our words
            warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before.*")
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
