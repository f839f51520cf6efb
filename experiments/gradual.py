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
from prunekit.experiments.data import load_fashion_mnist
from prunekit.experiments.models import build_model
from prunekit.experiments.training import (
    Evaluations,
    classifier,
    datamodule,
    evaluate,
    fit,
    progress,
)
from prunekit.schedules import from_dict


def run_gradual(cfg: DictConfig) -> dict[str, Any]:
    """Run a gradual-pruning experiment; returns (and writes) its summary.

    The run folder holds ``config.yaml``, ``metrics.csv`` (pruning phase), ``dense.pt``
    (reused by a re-run), ``final.pt`` (weights with their zeros), ``masks.pt`` and
    ``summary.json``; plots are added by :mod:`prunekit.experiments.report`.
    """
    paths = P.RunPaths.for_config(cfg)
    load_fashion_mnist(
        cfg.data.root
    )  # a missing data folder fails here, before anything is written
    schedule = from_dict(OmegaConf.to_container(cfg.pruning.schedule))
    started = time.perf_counter()
    seed_everything(cfg.seed, workers=True, verbose=False)
    net = build_model(cfg.model)
    given = _load_dense_checkpoint(cfg.dense.checkpoint, net)  # also before anything is written
    P.check_writable(paths.root)
    P.write_config(paths.config, cfg)
    dm = datamodule(cfg, cfg.seed)
    test_loader = dm.test_dataloader()
    progress(f"run {paths.root}")

    dense_acc, dense_s = _dense_phase(cfg, net, dm, paths, given)
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
    )
    evaluations = Evaluations(test_loader, label="pruning ")
    phase_start = time.perf_counter()
    module = classifier(net, cfg.train, cfg.steps)
    fit(
        module,
        dm,
        max_steps=cfg.steps,
        val_every=cfg.train.val_every,
        log_dir=paths.root,
        callbacks=[pruning, evaluations],
    )
    prune_s = time.perf_counter() - phase_start
    assert pruning.pruner is not None
    report = pruning.pruner.sparsity()
    _, final_acc = evaluate(net, test_loader)
    P.save_torch(paths.final_weights, net.state_dict())
    P.save_torch(
        paths.masks, {n.removeprefix("model."): m for n, m in pruning.pruner.masks.items()}
    )
    best = evaluations.best()
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
        "steps": cfg.steps,
        "dense_test_acc": dense_acc,
        "pruned_test_acc": final_acc,
        "pruned_test_acc_early_stop": best.test_acc,
        "early_stop_step": best.step,
        "target_sparsity": schedule(cfg.steps),
        "sparsity": report.fraction,
        "sparsity_per_layer": {n.removeprefix("model."): f for n, f in report.per_target().items()},
        "wall_s": {"dense": dense_s, "pruning": prune_s, "total": time.perf_counter() - started},
        "evaluations": evaluations.as_dicts(),
    }
    P.write_json(paths.summary, summary)
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
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where} is not a state_dict (a dict of tensors)")
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        missing, unexpected = (
            sorted(expected.keys() - got.keys()),
            sorted(got.keys() - expected.keys()),
        )
        shapes = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise ConfigError(
            f"{where} does not fit model={type(net).__name__}: missing {missing}, "
            f"unexpected {unexpected}, other shapes {shapes}"
        )
    return state


def _dense_phase(
    cfg: DictConfig,
    net: torch.nn.Module,
    dm: Any,
    paths: P.RunPaths,
    given: dict[str, Any] | None,
) -> tuple[float | None, float]:
    """Dense weights from a checkpoint, a finished earlier run, or ``dense.steps`` of training."""
    started = time.perf_counter()
    source = cfg.dense.checkpoint or (paths.dense_weights if paths.dense_weights.exists() else None)
    if source is not None:
        net.load_state_dict(given if given is not None else torch.load(source, weights_only=True))
        progress(f"dense weights loaded from {source}")
    elif cfg.dense.steps > 0:
        evaluations = Evaluations(dm.test_dataloader(), label="dense ")
        module = classifier(net, cfg.train, cfg.dense.steps, lr=cfg.dense.lr)
        fit(
            module,
            dm,
            max_steps=cfg.dense.steps,
            val_every=cfg.train.val_every,
            log_dir=paths.root / "dense",
            callbacks=[evaluations],
        )
        P.save_torch(paths.dense_weights, net.state_dict())
    else:
        return None, 0.0
    _, accuracy = evaluate(net, dm.test_dataloader())
    progress(f"dense test accuracy {accuracy:.4f}")
    return accuracy, time.perf_counter() - started
