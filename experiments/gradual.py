"""``prunekit run``: optional dense training, then training under a sparsity schedule."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf
from prunekit.callbacks import Pruning
from prunekit.experiments import paths as P
from prunekit.experiments.config import ConfigError
from prunekit.experiments.data import data_shape
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
from prunekit.schedules import Schedule, from_dict


def run_gradual(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue, or report) a gradual-pruning experiment; returns its summary.

    The run folder holds ``config.yaml``, ``metrics.csv`` (pruning phase), ``dense.pt``
    and ``dense.json`` (dense weights and their training time, reused by a re-run),
    ``final.pt`` (weights with their zeros), ``masks.pt`` and ``summary.json``; plots
    are added by :mod:`prunekit.experiments.report`. One process at a time works in a
    run folder (``run.lock``). While a phase trains, ``resume_<phase>.ckpt`` is saved
    every ``checkpoint_every`` steps; a run started again continues from it (and says
    so). A finished run (its ``summary.json`` exists) is reported, not redone.
    """
    paths = P.RunPaths.for_config(cfg)
    if paths.summary.is_file():  # finished: nothing else is needed (data, dense.checkpoint)
        with P.locked(paths.root):
            return _finished(paths)
    datamodule(cfg, cfg.seed)  # a missing data folder fails here, before anything is written
    schedule = from_dict(OmegaConf.to_container(cfg.pruning.schedule))
    started = time.perf_counter()
    seed_everything(cfg.seed, workers=True, verbose=False)
    net = network(cfg)  # for the data's input shape and classes
    given = _load_dense_checkpoint(cfg.dense.checkpoint, net)  # also before anything is written
    P.check_writable(paths.root)
    with P.locked(paths.root):
        if paths.summary.is_file():  # another process finished it meanwhile
            return _finished(paths)
        P.write_config(paths.config, cfg)
        return _run(cfg, schedule, net, given, paths, started)


def _finished(paths: P.RunPaths) -> dict[str, Any]:
    summary = P.read_json(paths.summary)
    progress(f"run {paths.root}: already finished, reporting it (not run again)")
    return summary


def _run(
    cfg: DictConfig,
    schedule: Schedule,
    net: torch.nn.Module,
    given: dict[str, Any] | None,
    paths: P.RunPaths,
    started: float,
) -> dict[str, Any]:
    dm = datamodule(cfg, cfg.seed)
    test_loader = dm.test_dataloader()
    progress(f"run {paths.root}")

    dense_acc, dense_s, dense_earlier = _dense_phase(cfg, net, dm, paths, given)
    groups = cfg.pruning.structure == "groups"  # channel groups: compactable afterwards
    pruning = Pruning(
        schedule,
        unit=cfg.pruning.unit,
        targets=None
        if cfg.pruning.targets is None
        else [f"model.{t}" for t in cfg.pruning.targets],
        exclude=[f"model.{e}" for e in cfg.pruning.exclude],
        method=cfg.pruning.method,
        scope=cfg.pruning.scope,
        seed=cfg.seed,
        options=OmegaConf.to_container(cfg.pruning.options),
        make_permanent=True,
        structure=cfg.pruning.structure,
        example_input=torch.zeros(1, *data_shape(dm)[0]) if groups else None,
    )
    evaluations = Evaluations(test_loader, label="pruning ", resumable=True)
    checkpoints = Checkpoints(paths.resume_checkpoint("pruning"), cfg.checkpoint_every)
    module = classifier(net, cfg.train, cfg.steps)
    trainer = fit(
        module,
        dm,
        max_steps=cfg.steps,
        val_every=cfg.train.val_every,
        log_dir=paths.root,
        callbacks=[pruning, evaluations],
        checkpoints=checkpoints,
    )
    prune_s = checkpoints.wall_s
    assert pruning.pruner is not None
    # the schedule's time at the end, in its unit: the target the masks were last brought to
    final_t = trainer.global_step if cfg.pruning.unit == "step" else trainer.current_epoch
    report = pruning.pruner.sparsity()
    _, final_acc = evaluate(net, test_loader)
    P.save_torch(paths.final_weights, net.state_dict())
    P.save_torch(
        paths.masks, {n.removeprefix("model."): m for n, m in pruning.pruner.masks.items()}
    )
    best = evaluations.best()
    earlier = dense_earlier + checkpoints.wall_s_before  # spent by interrupted processes
    summary = {
        "kind": "gradual",
        "name": cfg.name,
        "config_hash": P.config_hash(cfg),
        "seed": cfg.seed,
        "model": cfg.model,
        "schedule": schedule.to_dict(),
        "unit": cfg.pruning.unit,
        "method": cfg.pruning.method,
        "scope": cfg.pruning.scope,
        "structure": cfg.pruning.structure,
        "steps": cfg.steps,
        "dense_test_acc": dense_acc,
        "pruned_test_acc": final_acc,
        "pruned_test_acc_early_stop": best.test_acc,
        "early_stop_step": best.step,
        "target_sparsity": schedule(final_t),
        "sparsity": report.fraction,
        "sparsity_per_layer": {n.removeprefix("model."): f for n, f in report.per_target().items()},
        **({"weight_sparsity": pruning.pruner.weight_sparsity().fraction} if groups else {}),
        "wall_s": {
            "dense": dense_s,
            "pruning": prune_s,
            "total": time.perf_counter() - started + earlier,
        },
        "evaluations": evaluations.as_dicts(),
    }
    P.write_json(paths.summary, summary)  # last: its presence means "finished"
    paths.resume_checkpoint("pruning").unlink(missing_ok=True)
    return summary


def _load_dense_checkpoint(path: str | None, net: torch.nn.Module) -> dict[str, Any] | None:
    """The state_dict at ``dense.checkpoint``, checked against ``net`` (changed in nothing);
    a missing, unreadable or mismatched file raises ``ConfigError`` naming it."""
    if path is None:
        return None
    where = f"dense.checkpoint={path!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist")
    try:
        state = torch.load(path, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{where} cannot be loaded (truncated or not a state_dict?): {reason}"
        ) from None
    problem = P.state_dict_mismatch(state, net.state_dict())
    if problem is not None:
        raise ConfigError(f"{where} does not fit model={type(net).__name__}: {problem}")
    return state


def _own_dense_weights(paths: P.RunPaths, net: torch.nn.Module) -> dict[str, Any]:
    """``dense.pt`` of this run folder, checked against ``net``."""
    state = P.load_torch(paths.dense_weights)
    problem = P.state_dict_mismatch(state, net.state_dict())
    if problem is not None:
        raise P.RunFolderError(
            f"{paths.dense_weights} does not fit model={type(net).__name__}: {problem}; "
            "delete it to train the dense phase again"
        )
    return state


def _dense_phase(
    cfg: DictConfig,
    net: torch.nn.Module,
    dm: Any,
    paths: P.RunPaths,
    given: dict[str, Any] | None,
) -> tuple[float | None, float | None, float]:
    """Dense weights from ``dense.checkpoint``, a finished earlier run in this folder, or
    ``dense.steps`` of training (resumed if interrupted). Returns the dense test accuracy,
    the seconds of dense training (None: trained elsewhere or not recorded) and how many
    of those seconds earlier processes spent."""
    if given is not None or paths.dense_weights.is_file():
        source = cfg.dense.checkpoint or paths.dense_weights
        net.load_state_dict(given if given is not None else _own_dense_weights(paths, net))
        progress(f"dense weights loaded from {source}")
        wall = None
        if given is None and paths.dense_record.is_file():
            wall = P.read_json(paths.dense_record).get("wall_s")
        earlier = wall or 0.0
    elif cfg.dense.steps > 0:
        evaluations = Evaluations(dm.test_dataloader(), label="dense ", resumable=True)
        checkpoints = Checkpoints(paths.resume_checkpoint("dense"), cfg.checkpoint_every)
        module = classifier(net, cfg.train, cfg.dense.steps, lr=cfg.dense.lr)
        fit(
            module,
            dm,
            max_steps=cfg.dense.steps,
            val_every=cfg.train.val_every,
            log_dir=paths.root / "dense",
            callbacks=[evaluations],
            checkpoints=checkpoints,
        )
        wall, earlier = checkpoints.wall_s, checkpoints.wall_s_before
        P.write_json(paths.dense_record, {"wall_s": wall})  # before dense.pt, which says "done"
        P.save_torch(paths.dense_weights, net.state_dict())
        paths.resume_checkpoint("dense").unlink(missing_ok=True)
    else:
        return None, 0.0, 0.0
    _, accuracy = evaluate(net, dm.test_dataloader())
    progress(f"dense test accuracy {accuracy:.4f}")
    return accuracy, wall, earlier
