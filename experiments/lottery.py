"""``prunekit lottery``: iterative magnitude pruning with rewinding (lottery tickets).

Round 0 trains the dense network for ``steps_per_round`` steps. Each later round ``r``
(1..``rounds``) prunes the previous round's *final* lottery weights by magnitude (masks
only shrink) to the sparsity that :class:`~prunekit.schedules.LotteryTicketPlan` gives
after ``r`` rounds, rewinds the surviving weights and trains again:

- ``rewind=init``: the survivors take their initial values (Frankle & Carbin 2019);
  fresh optimizer and LR schedule, ``steps_per_round`` steps.
- ``rewind=step``: late rewinding (Frankle et al. 2020) to the Lightning checkpoint taken
  after ``rewind_step`` = k steps of round 0 (written by
  :class:`prunekit.callbacks.RewindPoint` with ``path``): weights, optimizer state,
  LR-scheduler state and step count; the round trains from step k to
  ``steps_per_round``. Optimizer state of pruned entries is zeroed. (k = 0 is
  rewind=init.)
- ``rewind=lr``: learning-rate rewinding (Renda et al. 2020): keep the final weights,
  fresh optimizer, the LR schedule replayed from its start.
- ``rewind=finetune``: keep the final weights, train at the constant ``finetune_lr``.

``scope=layer`` prunes each target weight to its own plan sparsity (``rate``, or its
``layer_rates`` entry); ``scope=global`` ranks all targets without a ``layer_rates``
entry together at the plan's ``rate`` sparsity, and prunes the ``layer_rates`` layers
separately at their own rates (so the default ``{output: 0.1}`` still holds the output
layer back). ``layer_rates`` keys are ``output`` (the model's output layer weight) or
target parameter names, with or without the LightningModule's ``model.`` prefix.

Every round >= 1 trains under its fixed mask through
:class:`prunekit.callbacks.HoldMasks` (pruned weights, gradients and optimizer state stay
zero).

Controls (``controls``), trained after the lottery variant of each round >= 1 with the
same training settings, reuse that round's mask:

- ``random_reinit``: the same mask on new random weights (a model built with seed
  ``seed + 1000 + r``); always trained from step 0 with a fresh optimizer (random
  weights have no step-k optimizer state), at ``finetune_lr`` for rewind=finetune.
- ``random_prune``: a random mask with exactly the lottery mask's per-layer counts
  (seed ``seed + 2000 + r``), started exactly as the lottery variant is.
- ``snip``: a mask found at initialisation by SNIP (Lee et al. 2019, "SNIP: Single-shot
  Network Pruning based on Connection Sensitivity"): connection sensitivity
  ``|W * dL/dW|`` of the initial weights (``init.pt``) on one training batch
  (``data.batch_size`` images, the first batch of epoch 0 in the seeded order; loss:
  cross-entropy), ranked globally over all pruned weights, keeping exactly as many
  weights as the lottery mask of the round (its per-layer counts are SNIP's own). The
  engine's ``snip`` method computes it (``Pruner.calibrate`` then ``prune_to``). Trained
  from the initial weights at step 0 with a fresh optimizer and the training's own
  learning rate and schedule, whatever ``rewind`` says (that is what SNIP does).

Everything lands in the run folder (:class:`~prunekit.experiments.paths.RunPaths`):
``config.yaml``, ``init.pt``, ``rewind.ckpt`` (rewind=step), per round and variant
``round_RR/VARIANT.json`` (the record) and ``round_RR/VARIANT.pt`` (``{"masks",
"weights"}``: bool masks and final weights, keyed by the network's own parameter names,
so the weights load into a fresh ``build_model(cfg.model)``), Lightning CSV metrics in
``logs/round_RR_VARIANT/metrics.csv``, and ``summary.json``. A finished round (its
``.json`` and ``.pt`` exist) is reused, not retrained, when the run is started again;
``rounds`` is not part of the run folder's hash, so raising it extends a run.

Parallel units (``prunekit lottery CONFIG --jobs N``, :func:`run_lottery` ``jobs=N``):
the lottery variant of round ``r`` needs round ``r - 1``'s, but a control of round ``r``
needs only files already written when round ``r``'s lottery variant is done (its mask
in ``round_RR/lottery.pt``, ``init.pt``, ``rewind.ckpt``, round ``r - 1``'s final
weights). So this process trains the lottery chain (rounds 0, 1, 2, ...) while up to
``N - 1`` worker processes (:class:`prunekit.experiments.jobs.WorkerPool`, each with this
process's torch thread count; forked copies of this process with one thread on Linux,
fresh interpreters otherwise) train the controls of finished rounds, pipelined; once
the chain is done this process trains the controls no worker has started. Every unit
reads what it needs from the run folder and trains exactly as a serial run does, so
every file is bit-identical to ``jobs=1`` with as many threads (only ``wall_s``
differs). From a script of your own, call it under ``if __name__ == "__main__":``
(spawned workers import the main module). Workers run under
this process's run lock (they check that their parent holds it) and never take it; a
second independent run on the folder is still refused. A failing unit fails the run
with :class:`~prunekit.experiments.jobs.UnitError` naming it; Ctrl-C (or SIGTERM) stops
the workers; finished units are reused when the run is started again.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from prunekit.callbacks import HoldMasks, RewindPoint
from prunekit.experiments import jobs as _jobs_module
from prunekit.experiments import training
from prunekit.experiments.config import CONTROLS, ConfigError, check_config
from prunekit.experiments.data import FashionMNISTDataModule
from prunekit.experiments.models import output_layer_name
from prunekit.experiments.module import Classifier
from prunekit.experiments.paths import (
    RunFolderError,
    RunPaths,
    check_locked_by,
    check_writable,
    config_hash,
    load_torch,
    locked,
    read_json,
    save_torch,
    state_dict_mismatch,
    write_config,
    write_json,
)
from prunekit.schedules import LotteryTicketPlan
from torch import Tensor

from prunekit import Pruner

__all__ = ["VARIANTS", "lottery_table", "run_lottery"]

#: What a round trains: the lottery ticket, then the controls.
VARIANTS = ("lottery", *CONTROLS)
_PREFIX = "model."  # the Classifier holds the network as ``self.model``
_REINIT_SEED, _RANDOM_PRUNE_SEED = 1000, 2000  # offsets added to seed + round
_REDO = "delete it (and the rounds after it) to train that round again"
#: With jobs > 1, this process trains the controls no worker has started once the lottery
#: rounds are done (False: it only waits for the workers; the tests use that).
_PARENT_TRAINS_CONTROLS = True

Masks = dict[str, Tensor]
Weights = dict[str, Tensor]


# --------------------------------------------------------------------------- public API
def run_lottery(cfg: DictConfig, jobs: int = 1) -> dict[str, Any]:
    """Run (or continue) a lottery-ticket experiment; returns and writes its summary.

    ``jobs``: processes for this run (default 1: everything here, in order); with N > 1
    the controls of finished rounds train in up to N - 1 worker processes while this
    one trains the lottery chain (module docstring), with bit-identical results.

    Everything is validated before any training: the run folder is writable, the data
    folder exists, ``layer_rates`` keys name pruned parameters, the rewind mode and the
    controls are known. The summary (``summary.json``) holds ``kind`` ("lottery"),
    ``name``, ``config_hash``, ``seed``, ``model``, ``rewind``, ``rewind_step``,
    ``scope``, ``rounds`` (one record per round and variant, without the evaluations
    lists), ``dense_test_acc`` (round 0's ``test_acc_final``), ``wall_s`` (this
    invocation) and ``files`` (paths relative to the run folder).

    A record (``round_RR/VARIANT.json``; in the summary without ``evaluations``):
    ``round``, ``variant`` (lottery, random_reinit, random_prune, snip), ``remaining``
    (fraction of the target weights kept), ``remaining_per_layer`` and
    ``kept_per_layer`` (fraction and count per weight, keyed ``fc1.weight``),
    ``test_acc_early_stop``, ``early_stop_step`` and ``val_loss_min`` (at the lowest
    validation loss), ``test_acc_final`` (after the last step), ``steps`` (the last
    step), ``wall_s`` and ``evaluations`` (``step``, ``val_loss``, ``val_acc``,
    ``test_acc`` at each validation; the last step is always evaluated).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r} must be a whole number >= 1")
    started = time.perf_counter()
    with _Run.prepare(cfg) as run:
        return _run_rounds(cfg, run, started, jobs)


def _unit_name(unit: tuple[int, str]) -> str:
    return f"round {unit[0]} {unit[1]}"


def _run_rounds(cfg: DictConfig, run: _Run, started: float, jobs: int = 1) -> dict[str, Any]:
    done: dict[tuple[int, str], dict[str, Any]] = {}
    controls = [(r, c) for r in range(1, cfg.rounds + 1) for c in cfg.controls]
    todo = [u for u in controls if not run.is_finished(*u)]
    workers = min(jobs - 1, len(todo))
    with contextlib.ExitStack() as stack:
        pool: _jobs_module.WorkerPool | None = None
        if workers > 0:
            threads = torch.get_num_threads()
            pool = stack.enter_context(
                _jobs_module.WorkerPool(
                    _worker,
                    (cfg, str(run.paths.root), threads, os.getpid()),
                    workers,
                    name=_unit_name,
                    start=_jobs_module.start_method(threads),
                )
            )
            training.progress(
                f"lottery run {run.paths.root}: the lottery rounds here (pid {os.getpid()}), "
                f"{len(todo)} control trainings in {workers} worker process(es) "
                f"(pid {', '.join(map(str, pool.pids))}, {pool.start}ed; {threads} torch "
                "thread(s) each) and here once the rounds are done"
            )
        previous: _Finished | None = None
        for r in range(cfg.rounds + 1):
            lottery = run.round(r, "lottery", previous, None)
            done[(r, "lottery")] = lottery.record
            for control in cfg.controls if r else ():
                if pool is None:
                    done[(r, control)] = run.round(r, control, previous, lottery).record
                    continue
                reused = run.reuse(r, control)
                if reused is not None:
                    done[(r, control)] = reused.record
                else:
                    pool.submit((r, control))
            if pool is not None:
                pool.check()
            previous = lottery
        if pool is not None:
            pool.finish((lambda unit: run.control(*unit)) if _PARENT_TRAINS_CONTROLS else None)
            for unit in controls:  # read back what the workers wrote (checked, files listed)
                if unit not in done:
                    finished = run.reuse(*unit, quiet=True)
                    if finished is None:
                        raise _jobs_module.UnitError(f"{_unit_name(unit)}: no result was written")
                    done[unit] = finished.record
    order = [
        (r, v) for r in range(cfg.rounds + 1) for v in ("lottery", *(cfg.controls if r else ()))
    ]
    records = [done[unit] for unit in order]
    summary = {
        "kind": "lottery",
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "seed": cfg.seed,
        "model": cfg.model,
        "rewind": cfg.rewind,
        "rewind_step": cfg.rewind_step,
        "scope": cfg.scope,
        "rounds": [{k: v for k, v in rec.items() if k != "evaluations"} for rec in records],
        "dense_test_acc": records[0]["test_acc_final"],
        "wall_s": time.perf_counter() - started,
        "files": sorted({*run.files, "summary.json"}),
    }
    if run.paths.summary.is_file():  # every round reused: report it, keep its wall_s
        before = read_json(run.paths.summary)
        if {k: v for k, v in before.items() if k != "wall_s"} == {
            k: v for k, v in summary.items() if k != "wall_s"
        }:
            training.progress(f"lottery run {run.paths.root}: already finished, reporting it")
            return before
    write_json(run.paths.summary, summary)
    return summary


def lottery_table(summary: Mapping[str, Any]) -> str:
    """The per-round results of a lottery summary as a plain-text table.

    >>> record = {"round": 1, "variant": "lottery", "remaining": 0.8004,
    ...           "test_acc_early_stop": 0.8812, "early_stop_step": 4500,
    ...           "val_loss_min": 0.3312, "test_acc_final": 0.879, "wall_s": 41.2}
    >>> summary = {"name": "demo", "model": "lenet_300_100", "rewind": "init",
    ...            "scope": "layer", "rounds": [record]}
    >>> print(lottery_table(summary))
    demo: lenet_300_100, rewind=init, scope=layer
    round  variant  remaining  acc (early stop)  at step  val loss  acc (end)  time (s)
    -----  -------  ---------  ----------------  -------  --------  ---------  --------
        1  lottery     80.04%            0.8812     4500    0.3312     0.8790      41.2
    """
    headers = (
        "round",
        "variant",
        "remaining",
        "acc (early stop)",
        "at step",
        "val loss",
        "acc (end)",
        "time (s)",
    )
    rows = [
        (
            str(rec["round"]),
            rec["variant"],
            f"{100 * rec['remaining']:.2f}%",
            f"{rec['test_acc_early_stop']:.4f}",
            str(rec["early_stop_step"]),
            f"{rec['val_loss_min']:.4f}",
            f"{rec['test_acc_final']:.4f}",
            f"{rec['wall_s']:.1f}",
        )
        for rec in summary["rounds"]
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    title = f"{summary['name']}: {summary['model']}, rewind={summary['rewind']}"
    title += f", scope={summary['scope']}"
    return "\n".join(
        [title, line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    )


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class _Start:
    """How a round's training starts."""

    weights: Weights | None  # loaded before training (module names); None: the checkpoint's
    checkpoint: Path | None = None  # resume weights, optimizer, LR schedule and step count
    lr: float | None = None  # a constant learning rate instead of train.lr and its schedule
    what: str = ""  # for the progress line


@dataclass(frozen=True)
class _Finished:
    """What later rounds need from a finished round: its record, masks and final weights."""

    record: dict[str, Any]
    masks: Masks  # module names ("model.fc1.weight")
    weights: Weights  # the module's state_dict


class _Run:
    """One lottery run: config, paths, data, plan and the template model, all validated."""

    def __init__(
        self,
        cfg: DictConfig,
        paths: RunPaths,
        dm: FashionMNISTDataModule,
        template: Classifier,
        names: list[str],
        rates: dict[str, float],
        write: bool = True,
    ) -> None:
        self.cfg, self.paths, self.dm = cfg, paths, dm
        self.template, self.names, self.rates = template, names, rates
        self.plan = LotteryTicketPlan(cfg.rounds, cfg.rate, rates)
        self.sizes = {n: template.get_parameter(n).numel() for n in names}
        self.files: set[str] = set()
        self.fits = 1 + cfg.rounds * (1 + len(cfg.controls))
        self.where = ""  # a worker process: " (worker pid N)" in its progress lines
        self.initial = self._initial_weights(write=write)

    @classmethod
    @contextlib.contextmanager
    def prepare(cls, cfg: DictConfig) -> Iterator[_Run]:
        """Validate everything a run needs, before any training; take the run folder's
        lock (held while the block runs); write ``config.yaml``."""
        check_config(cfg)
        template = _module(cfg, seed=cfg.seed)
        names = Pruner(template).names
        rates = _resolve_layer_rates(cfg, template, names)
        paths = RunPaths.for_config(cfg)
        dm = training.datamodule(cfg, cfg.seed)  # a missing data folder fails here
        check_writable(paths.root)
        with locked(paths.root):
            write_config(paths.config, cfg)
            run = cls(cfg, paths, dm, template, names, rates)
            run.files.add(paths.config.name)
            training.progress(f"lottery run {paths.root}: {run.fits} trainings")
            yield run

    @classmethod
    def attach(cls, cfg: DictConfig, root: Path, parent: int) -> _Run:
        """The run of a worker process: the parent ``parent`` prepared ``root`` (the run
        folder of ``cfg``, with its ``init.pt``) and holds its lock, which is checked."""
        check_config(cfg)
        paths = RunPaths.for_config(cfg)
        if paths.root.resolve() != Path(root).resolve():
            raise RunFolderError(f"the config's run folder {paths.root} is not {root}")
        check_locked_by(paths.root, parent)
        template = _module(cfg, seed=cfg.seed)
        names = Pruner(template).names
        rates = _resolve_layer_rates(cfg, template, names)
        dm = training.datamodule(cfg, cfg.seed)
        run = cls(cfg, paths, dm, template, names, rates, write=False)
        run.where = f" (worker pid {os.getpid()})"
        return run

    def _initial_weights(self, write: bool = True) -> Weights:
        path = self.paths.initial_weights
        if path.is_file() or not write:
            weights = _net_to_module(self._checked(path, load_torch(path), self.template))
        else:
            weights = _clone(self.template.state_dict())
            save_torch(path, _module_to_net(weights))
        self.files.add(path.name)
        return weights

    # ------------------------------------------------------------------ rounds
    def round(
        self, r: int, variant: str, previous: _Finished | None, lottery: _Finished | None
    ) -> _Finished:
        """Round ``r`` of ``variant``: reused if finished, else masks, start and training.

        ``previous`` is round ``r - 1``'s lottery result (None in round 0), ``lottery``
        this round's (for the controls, which reuse its mask).
        """
        label = self._label(r, variant)
        done = self.reuse(r, variant)
        if done is not None:
            return done
        masks = self._masks(r, variant, previous, lottery)
        start = self._start(r, variant, previous)
        kept = sum(int(m.count_nonzero()) for m in masks.values())
        total = sum(self.sizes.values())
        training.progress(
            f"{label}: remaining {100 * kept / total:.1f}% ({kept}/{total} weights), "
            f"from {start.what}"
        )
        finished = self._train(r, variant, masks, start, label)
        rec = finished.record
        training.progress(
            f"{label}: test acc {rec['test_acc_early_stop']:.4f} at early stop "
            f"(step {rec['early_stop_step']}), {rec['test_acc_final']:.4f} at the end "
            f"({rec['wall_s']:.0f}s)"
        )
        return finished

    def _label(self, r: int, variant: str) -> str:
        """``[i/n] round r/R variant``: i counts trainings in the serial order."""
        i = 1 if r == 0 else 2 + (r - 1) * (1 + len(self.cfg.controls))
        if variant != "lottery":
            i += 1 + list(self.cfg.controls).index(variant)
        return f"[{i}/{self.fits}] round {r}/{self.cfg.rounds} {variant}{self.where}"

    def is_finished(self, r: int, variant: str) -> bool:
        """Whether round ``r`` of ``variant`` has its record and state (not checked)."""
        return self._json(r, variant).is_file() and self.paths.round_state(r, variant).is_file()

    def reuse(self, r: int, variant: str, quiet: bool = False) -> _Finished | None:
        """Round ``r`` of ``variant`` if it finished before (checked; files listed)."""
        done = self._load(r, variant)
        if done is not None and not quiet:
            training.progress(
                f"{self._label(r, variant)}: finished before, reusing "
                f"{self._rel(self._json(r, variant))}"
            )
        return done

    def control(self, r: int, variant: str) -> _Finished:
        """A control of round ``r`` >= 1 from the run folder alone (the lottery results of
        rounds ``r - 1`` and ``r``): what a worker process trains."""
        previous, lottery = self._load(r - 1, "lottery"), self._load(r, "lottery")
        if previous is None or lottery is None or variant == "lottery" or r < 1:
            raise RuntimeError(
                f"round {r} {variant} is not a control whose lottery rounds are done"
            )
        return self.round(r, variant, previous, lottery)

    def _masks(
        self, r: int, variant: str, previous: _Finished | None, lottery: _Finished | None
    ) -> Masks:
        if r == 0:
            return {n: torch.ones(size, dtype=torch.bool) for n, size in self._shapes().items()}
        if variant == "lottery":
            assert previous is not None
            return self.magnitude_masks(r, previous.weights, previous.masks)
        assert lottery is not None
        if variant == "random_reinit":
            return lottery.masks
        if variant == "snip":
            return self.snip_masks(lottery.masks)
        return self.random_masks(r, lottery.masks)

    def magnitude_masks(self, r: int, weights: Weights, previous: Masks) -> Masks:
        """Masks after ``r`` rounds from ``weights`` (final weights of round ``r - 1``)."""
        module = _module(self.cfg, seed=self.cfg.seed)
        module.load_state_dict(weights)
        if self.cfg.scope == "layer":
            pruner = Pruner(module, targets=self.names, scope="layer")
            amount: float | dict[str, float] = self.plan.layer_sparsities(r, self.names)
        else:  # one ranking over the targets without a rate of their own
            pruner = Pruner(
                module,
                targets={
                    n: {"sparsity": self.plan.sparsity(r, n)} if n in self.rates else None
                    for n in self.names
                },
                scope="global",
            )
            amount = self.plan.sparsity(r)
        pruner.set_masks(previous)
        pruner.prune_to(amount)
        return _clone(pruner.masks)

    def random_masks(self, r: int, like: Masks) -> Masks:
        """Random masks with exactly the per-layer pruned counts of ``like``."""
        pruner = Pruner(
            _module(self.cfg, seed=self.cfg.seed),
            targets=self.names,
            method="random",
            scope="layer",
            seed=self.cfg.seed + _RANDOM_PRUNE_SEED + r,
        )
        pruner.prune_to({n: int(m.numel() - m.count_nonzero()) for n, m in like.items()})
        return _clone(pruner.masks)

    def snip_masks(self, like: Masks) -> Masks:
        """SNIP masks at initialisation keeping as many weights (in all) as ``like``."""
        module = _module(self.cfg, seed=self.cfg.seed)
        module.load_state_dict(self.initial)
        pruner = Pruner(module, targets=self.names, method="snip", scope="global")
        x, y = next(iter(self.dm.train_dataloader()))  # epoch 0's first batch (seeded order)
        pruner.calibrate([(x, y)], loss_fn=lambda logits, batch: F.cross_entropy(logits, batch[1]))
        pruner.prune_to(sum(int(m.numel() - m.count_nonzero()) for m in like.values()))
        return _clone(pruner.masks)

    def _start(self, r: int, variant: str, previous: _Finished | None) -> _Start:
        cfg = self.cfg
        finetune_lr = cfg.finetune_lr if cfg.rewind == "finetune" else None
        if r == 0 or variant == "snip":
            return _Start(self.initial, what="the initial weights")
        assert previous is not None
        if variant == "random_reinit":
            seed = cfg.seed + _REINIT_SEED + r
            weights = _module(cfg, seed=seed).state_dict()
            return _Start(weights, lr=finetune_lr, what=f"new random weights (seed {seed})")
        if cfg.rewind == "init" or (cfg.rewind == "step" and cfg.rewind_step == 0):
            return _Start(self.initial, what="the initial weights")
        if cfg.rewind == "step":
            return _Start(
                None,
                checkpoint=self.paths.rewind_checkpoint,
                what=f"the step-{cfg.rewind_step} checkpoint of round 0",
            )
        # lr / finetune (random_prune too: the lottery variant's start, another mask)
        what = f"the final weights of round {r - 1}"
        if finetune_lr is not None:
            what += f", constant lr {finetune_lr}"
        return _Start(previous.weights, lr=finetune_lr, what=what)

    def _train(self, r: int, variant: str, masks: Masks, start: _Start, label: str) -> _Finished:
        cfg, steps = self.cfg, self.cfg.steps_per_round
        started = time.perf_counter()
        seed_everything(cfg.seed + r, verbose=False)
        train_cfg = cfg.train
        if start.lr is not None:
            train_cfg = OmegaConf.merge(
                cfg.train, {"lr": start.lr, "lr_schedule": None, "milestones": []}
            )
        module = _module(cfg, seed=cfg.seed, train=train_cfg)
        if start.weights is not None:
            module.load_state_dict(start.weights)
        test_loader = self.dm.test_dataloader()
        evaluations = training.Evaluations(test_loader, label=f"{label} ")
        callbacks: list[Callback] = [evaluations]
        if r > 0:
            callbacks.insert(0, HoldMasks(masks))
        late = cfg.rewind == "step" and cfg.rewind_step > 0
        if r == 0 and late:
            callbacks.append(RewindPoint(cfg.rewind_step, path=self.paths.rewind_checkpoint))
        log_dir = self.paths.logs / f"round_{r:02d}_{variant}"
        shutil.rmtree(log_dir, ignore_errors=True)  # a retrained round starts a fresh log
        with warnings.catch_warnings():
            # resuming from the step-k checkpoint restarts the epoch's data order; only
            # weights, optimizer and LR-schedule state matter for rewinding
            warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before.*")
            trainer = training.fit(
                module,
                self.dm,
                max_steps=steps,
                val_every=cfg.train.val_every,
                log_dir=log_dir,
                callbacks=callbacks,
                ckpt_path=None if start.checkpoint is None else str(start.checkpoint),
            )
        if r == 0 and late and not self.paths.rewind_checkpoint.is_file():
            raise RuntimeError(f"no checkpoint was saved at step {cfg.rewind_step} of round 0")
        _check_masked(module, masks)
        if not evaluations.records or evaluations.records[-1].step != trainer.global_step:
            evaluations.records.append(_evaluate(module, self.dm, trainer.global_step))
        best = evaluations.best()
        kept = {n.removeprefix(_PREFIX): int(m.count_nonzero()) for n, m in masks.items()}
        sizes = {n.removeprefix(_PREFIX): s for n, s in self.sizes.items()}
        record = {
            "round": r,
            "variant": variant,
            "remaining": sum(kept.values()) / sum(sizes.values()),
            "remaining_per_layer": {n: kept[n] / sizes[n] for n in sizes},
            "kept_per_layer": kept,
            "test_acc_early_stop": best.test_acc,
            "early_stop_step": best.step,
            "val_loss_min": best.val_loss,
            "test_acc_final": evaluations.records[-1].test_acc,
            "steps": trainer.global_step,
            "wall_s": time.perf_counter() - started,
            "evaluations": evaluations.as_dicts(),
        }
        weights = _clone(module.state_dict())
        state = {"masks": _module_to_net(masks), "weights": _module_to_net(weights)}
        save_torch(self.paths.round_state(r, variant), state)
        write_json(self._json(r, variant), record)  # last: its presence means "finished"
        self._add_files(r, variant)
        return _Finished(record, masks, weights)

    # ------------------------------------------------------------------ reuse
    def _json(self, r: int, variant: str) -> Path:
        return self.paths.round_result(r, variant)

    def _load(self, r: int, variant: str) -> _Finished | None:
        """A finished round's result, or None when it must be (re)trained."""
        result, state = self.paths.round_result(r, variant), self.paths.round_state(r, variant)
        needs_checkpoint = r == 0 and self.cfg.rewind == "step" and self.cfg.rewind_step > 0
        if not (result.is_file() and state.is_file()):
            return None
        if needs_checkpoint:
            if not self.paths.rewind_checkpoint.is_file():
                return None  # retraining round 0 writes it again
            try:
                training.check_checkpoint(self.paths.rewind_checkpoint)
            except ValueError as e:
                raise RunFolderError(f"{e}; delete it and round_00 to redo round 0") from None
        record = read_json(result)
        saved = load_torch(state)
        if not (isinstance(saved, dict) and {"masks", "weights"} <= saved.keys()):
            raise RunFolderError(f"{state} is not a round's state (masks and weights); {_REDO}")
        weights = self._checked(state, saved["weights"], self.template)
        masks = _net_to_module(self._checked(state, saved["masks"], self._shapes()))
        if not all(m.dtype == torch.bool for m in masks.values()):
            raise RunFolderError(f"{state} holds masks that are not torch.bool; {_REDO}")
        self._add_files(r, variant)
        return _Finished(record, masks, _net_to_module(weights))

    def _checked(
        self, path: Path, state: Any, like: Classifier | Mapping[str, torch.Size]
    ) -> dict[str, Tensor]:
        """``state`` (network names) if it fits ``like`` (the module, or masks' shapes)."""
        expected = (
            _module_to_net(like.state_dict())
            if isinstance(like, Classifier)
            else {n.removeprefix(_PREFIX): torch.empty(s) for n, s in like.items()}
        )
        problem = state_dict_mismatch(state, expected)
        if problem is not None:
            raise RunFolderError(f"{path} does not fit model={self.cfg.model}: {problem}; {_REDO}")
        return state

    def _add_files(self, r: int, variant: str) -> None:
        paths = [self.paths.round_result(r, variant), self.paths.round_state(r, variant)]
        metrics = self.paths.logs / f"round_{r:02d}_{variant}" / "metrics.csv"
        if metrics.is_file():
            paths.append(metrics)
        if r == 0 and self.paths.rewind_checkpoint.is_file() and self.cfg.rewind == "step":
            paths.append(self.paths.rewind_checkpoint)
        self.files.update(self._rel(p) for p in paths)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.paths.root).as_posix()

    def _shapes(self) -> dict[str, torch.Size]:
        return {n: self.template.get_parameter(n).shape for n in self.names}


# --------------------------------------------------------------------------- workers
class _NotATerminal:
    """stderr of a worker: the same stream, never a terminal (no progress bar fighting
    the parent's)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _worker(cfg: DictConfig, root: str, threads: int, parent: int) -> Any:
    """Set up a worker process of a run (:class:`prunekit.experiments.jobs.WorkerPool`):
    the callable that trains one control ``(round, variant)``."""
    torch.set_num_threads(threads)
    sys.stderr = _NotATerminal(sys.stderr)
    run = _Run.attach(cfg, Path(root), parent)

    def train(unit: tuple[int, str]) -> None:
        run.control(*unit)

    return train


# --------------------------------------------------------------------------- helpers
def _resolve_layer_rates(
    cfg: DictConfig, template: Classifier, names: list[str]
) -> dict[str, float]:
    """``layer_rates`` keyed by target names; "output" is the output layer's weight."""
    output = f"{_PREFIX}{output_layer_name(template.model)}.weight"
    rates: dict[str, float] = {}
    for key, rate in cfg.layer_rates.items():
        name = output if key == "output" else key
        if name not in names and f"{_PREFIX}{name}" in names:
            name = f"{_PREFIX}{name}"
        if name not in names:
            plain = [n.removeprefix(_PREFIX) for n in names]
            close = difflib.get_close_matches(str(key).removeprefix(_PREFIX), plain, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"layer_rates.{key}: {key!r} is not a pruned parameter of {cfg.model}{hint} "
                f"Valid keys: output, {', '.join(plain)}"
            )
        if name in rates:
            raise ConfigError(f"layer_rates gives {name!r} twice (as {key!r} and before)")
        rates[name] = float(rate)
    return rates


def _module(cfg: DictConfig, *, seed: int, train: DictConfig | None = None) -> Classifier:
    """A fresh Classifier around ``cfg.model`` initialised from ``seed``."""
    torch.manual_seed(seed)
    net = training.network(cfg)  # for the data's input shape and classes
    return training.classifier(net, train if train is not None else cfg.train, cfg.steps_per_round)


def _evaluate(module: Classifier, dm: FashionMNISTDataModule, step: int) -> training.Evaluation:
    """An evaluation at the last step, when validation did not fall on it."""
    val_loss, val_acc = training.evaluate(module, dm.val_dataloader())
    _, test_acc = training.evaluate(module, dm.test_dataloader())
    return training.Evaluation(step, val_loss, val_acc, test_acc)


def _check_masked(module: Classifier, masks: Masks) -> None:
    for name, mask in masks.items():
        if bool(module.get_parameter(name).detach()[~mask].any()):
            raise RuntimeError(f"pruned weights of {name} became non-zero during training")


def _clone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _module_to_net(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix(_PREFIX): v for k, v in tensors.items()}


def _net_to_module(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {f"{_PREFIX}{k}": v for k, v in tensors.items()}
