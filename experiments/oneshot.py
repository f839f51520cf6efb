"""``prunekit oneshot``: prune a trained dense model once, without retraining.

For one model and seed, the dense network is trained (``dense.steps``), loaded from
``dense.checkpoint``, or reused from an earlier run in the same folder (``dense.pt``).
Then, for every method x scope x sparsity of the config, the dense weights are loaded
afresh, a :class:`~prunekit.Pruner` with that method and scope is built, the data-aware
methods calibrate on the first ``calibration_batches`` training batches (the same
batches for every method, drawn once), the model is pruned to the sparsity in one call
and its test loss and accuracy are measured. Nothing is retrained.

The run folder (:class:`~prunekit.experiments.paths.RunPaths`) holds ``config.yaml``,
``dense.pt`` and ``dense.json`` (dense weights and their training time, reused by a
re-run and usable as another run's ``dense.checkpoint``), ``dense/metrics.csv`` (the
dense training's Lightning metrics), ``metrics.csv`` (one row per one-shot point) and
``summary.json`` (``kind`` "oneshot"). A finished run is reported, not redone.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf
from prunekit.experiments import paths as P
from prunekit.experiments import report
from prunekit.experiments.config import ConfigError, OneShotConfig, load_config
from prunekit.experiments.training import (
    Checkpoints,
    Evaluations,
    classifier,
    datamodule,
    evaluate,
    fit,
    network,
    progress,
)
from torch import nn

from prunekit import Pruner, get_method

__all__ = ["COLUMNS", "main", "oneshot_table", "prune_once", "run_oneshot"]

#: Columns of ``metrics.csv``, one row per one-shot point.
COLUMNS = (
    "method",
    "scope",
    "target_sparsity",
    "sparsity",
    "test_loss",
    "test_acc",
    "calibration_s",
    "prune_s",
)


def run_oneshot(cfg: DictConfig) -> dict[str, Any]:
    """Run (or report) a one-shot pruning experiment; returns its summary.

    The summary (``summary.json``): ``kind`` ("oneshot"), ``name``, ``config_hash``,
    ``seed``, ``model``, ``dense_test_acc``, ``dense_test_loss``, ``calibration_batches``
    and ``calibration_samples``, ``results`` (one record per method label, scope and
    target sparsity, with the keys of :data:`COLUMNS` and the method's ``options``:
    ``method`` is the label of ``methods`` and ``pruner_method`` the registered method it
    runs, ``sparsity`` the measured fraction of zeros
    among the targeted weights) and ``wall_s``. A ``variants`` label with a ``scope``
    runs in that scope only.
    """
    paths = P.RunPaths.for_config(cfg)
    if paths.summary.is_file():
        with P.locked(paths.root):
            progress(f"run {paths.root}: already finished, reporting it (not run again)")
            return P.read_json(paths.summary)
    datamodule(cfg, cfg.seed)  # a missing data folder fails here, before anything is written
    started = time.perf_counter()
    seed_everything(cfg.seed, workers=True, verbose=False)
    net = network(cfg)
    given = _load_state(Path(cfg.dense.checkpoint), net) if cfg.dense.checkpoint else None
    P.check_writable(paths.root)
    with P.locked(paths.root):
        if paths.summary.is_file():
            return P.read_json(paths.summary)
        P.write_config(paths.config, cfg)
        return _run(cfg, net, given, paths, started)


def _load_state(path: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict file checked against ``net``; a missing or mismatched one raises
    ``ConfigError`` naming it."""
    where = f"dense.checkpoint={str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where} does not exist")
    state = P.load_torch(path)
    problem = P.state_dict_mismatch(state, net.state_dict())
    if problem is not None:
        raise ConfigError(f"{where} does not fit model={type(net).__name__}: {problem}")
    return state


def _run(
    cfg: DictConfig,
    net: nn.Module,
    given: dict[str, torch.Tensor] | None,
    paths: P.RunPaths,
    started: float,
) -> dict[str, Any]:
    dm = datamodule(cfg, cfg.seed)
    test_loader = dm.test_dataloader()
    progress(f"run {paths.root}")
    dense = _dense_weights(cfg, net, dm, paths, given)
    net.load_state_dict(dense)
    dense_loss, dense_acc = evaluate(net, test_loader)
    progress(f"dense test accuracy {dense_acc:.4f}")
    batches = list(itertools.islice(iter(dm.train_dataloader()), cfg.calibration_batches))
    if len(batches) < cfg.calibration_batches:
        raise ConfigError(
            f"calibration_batches={cfg.calibration_batches} but the training data has "
            f"only {len(batches)} batches"
        )
    results = []
    variants = OmegaConf.to_container(cfg.variants, resolve=True)
    for scope, label, sparsity in itertools.product(cfg.scopes, cfg.methods, cfg.sparsities):
        options = dict(variants.get(label, {"method": label}))
        method, only = options.pop("method"), options.pop("scope", None)
        if only is not None and only != scope:
            continue
        net.load_state_dict(dense)
        record = prune_once(
            net,
            method=method,
            scope=scope,
            sparsity=sparsity,
            batches=batches,
            seed=cfg.seed,
            exclude=list(cfg.exclude),
            options=options,
        )
        record["pruner_method"], record["method"] = method, label
        record["test_loss"], record["test_acc"] = evaluate(net, test_loader)
        progress(
            f"{scope:6} {method:10} {sparsity:.2f}: sparsity {record['sparsity']:.4f} "
            f"test acc {record['test_acc']:.4f}"
        )
        results.append(record)
    net.load_state_dict(dense)
    _write_metrics(paths.metrics, results)
    summary = {
        "kind": "oneshot",
        "name": cfg.name,
        "config_hash": P.config_hash(cfg),
        "seed": cfg.seed,
        "model": cfg.model,
        "dense_test_acc": dense_acc,
        "dense_test_loss": dense_loss,
        "calibration_batches": cfg.calibration_batches,
        "calibration_samples": sum(len(b[1]) for b in batches),
        "results": results,
        "wall_s": time.perf_counter() - started,
    }
    P.write_json(paths.summary, summary)  # last: its presence means "finished"
    return summary


def prune_once(
    model: nn.Module,
    *,
    method: str,
    scope: str,
    sparsity: float,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    seed: int = 0,
    exclude: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place to ``sparsity`` in one call (data-aware methods calibrate
    on ``batches`` of ``(inputs, labels)`` first, with cross-entropy as the loss, in eval
    mode: batch-norm running statistics are not updated and dropout is off, as in the
    evaluation; ``options`` go to the method); the pruning is made permanent. Returns ``method``,
    ``options``, ``scope``, ``target_sparsity``,
    ``sparsity`` (zeros among the targeted weights, counted on the weights themselves),
    ``calibration_s`` and ``prune_s``.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> prune_once(net, method="magnitude", scope="global", sparsity=0.5)["sparsity"]
    0.5
    """
    options = dict(options or {})
    pruner = Pruner(model, method=method, scope=scope, seed=seed, exclude=list(exclude), **options)
    try:
        calibration_s = 0.0
        if get_method(method).needs:  # statistics (activations, gradients) from data
            if not batches:
                raise ValueError(f"method={method!r} needs calibration batches, got none")
            began = time.perf_counter()
            modes = [(m, m.training) for m in model.modules()]
            model.eval()  # batch-norm running statistics and dropout as the evaluation sees them
            try:
                pruner.calibrate(batches, loss_fn=_cross_entropy)
            finally:
                for module, training in modes:
                    module.training = training
            calibration_s = time.perf_counter() - began
        began = time.perf_counter()
        pruner.prune_to(sparsity)
        prune_s = time.perf_counter() - began
        weights = dict(model.named_parameters())
        names = list(pruner.names)
    finally:
        pruner.remove()
    zeros = sum(int((weights[n] == 0).sum()) for n in names)
    total = sum(weights[n].numel() for n in names)
    return {
        "method": method,
        "options": options,
        "scope": scope,
        "target_sparsity": sparsity,
        "sparsity": zeros / total,
        "calibration_s": calibration_s,
        "prune_s": prune_s,
    }


def _cross_entropy(outputs: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, batch[1])


def _dense_weights(
    cfg: DictConfig,
    net: nn.Module,
    dm: Any,
    paths: P.RunPaths,
    given: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """The dense state_dict: ``dense.checkpoint``, this folder's ``dense.pt``, or
    ``dense.steps`` of training (resumable; ``dense.pt`` written when done)."""
    if given is not None:
        progress(f"dense weights loaded from {cfg.dense.checkpoint}")
        return given
    if paths.dense_weights.is_file():
        progress(f"dense weights loaded from {paths.dense_weights}")
        return _load_state(paths.dense_weights, net)
    checkpoints = Checkpoints(paths.resume_checkpoint("dense"), cfg.checkpoint_every)
    fit(
        classifier(net, cfg.train, cfg.dense.steps, lr=cfg.dense.lr),
        dm,
        max_steps=cfg.dense.steps,
        val_every=cfg.train.val_every,
        log_dir=paths.root / "dense",
        callbacks=[Evaluations(dm.test_dataloader(), label="dense ", resumable=True)],
        checkpoints=checkpoints,
    )
    P.write_json(paths.dense_record, {"wall_s": checkpoints.wall_s})
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    P.save_torch(paths.dense_weights, state)
    paths.resume_checkpoint("dense").unlink(missing_ok=True)
    return state


def _write_metrics(path: Path, results: Sequence[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: r[k] for k in COLUMNS} for r in results)

    P.atomic_write(path, write)


def oneshot_table(summary: dict[str, Any]) -> str:
    """The results of one one-shot run as a plain-text table.

    >>> print(oneshot_table({"name": "x", "dense_test_acc": 0.9, "results": [
    ...     {"method": "magnitude", "scope": "global", "target_sparsity": 0.5,
    ...      "sparsity": 0.5, "test_acc": 0.8}]}))
    x          scope   target  sparsity  test acc
    ---------  ------  ------  --------  --------
    dense      -       0.0000  0.0000    0.9000
    magnitude  global  0.5000  0.5000    0.8000
    """
    rows: list[list[Any]] = [["dense", None, 0.0, 0.0, summary["dense_test_acc"]]]
    rows += [
        [r["method"], r["scope"], r["target_sparsity"], r["sparsity"], r["test_acc"]]
        for r in summary["results"]
    ]
    return report.table([summary["name"], "scope", "target", "sparsity", "test acc"], rows)


def main(args: argparse.Namespace) -> int:
    """``prunekit oneshot CONFIG [key=value ...]`` (called by the ``prunekit`` command)."""
    cfg = load_config(OneShotConfig, args.config, args.overrides)
    if args.print_config:
        print(report.config_help(OneShotConfig, cfg))
        return 0
    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    summary = run_oneshot(cfg)
    run = P.RunPaths.for_config(cfg).root
    plot = P.RunPaths(run).accuracy_plot
    if not plot.is_file():
        report.plot_oneshot([summary], plot)
    print(oneshot_table(summary))
    print(f"\nrun folder: {run}")
    return 0
