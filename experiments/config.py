"""Typed experiment configs (omegaconf structured configs), loaded and validated up front.

Every field carries its help text in ``metadata["help"]``. :func:`load_config` merges a
YAML file and ``key=value`` overrides onto a schema; an unknown or misspelled key, a
wrong type or a missing value fails before any training, naming the key and the closest
valid one.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from prunekit.callbacks import Pruning
from prunekit.experiments.data import data_shape, datamodule_from_config, list_datasets
from prunekit.experiments.imports import import_object
from prunekit.experiments.models import build_model, list_models
from prunekit.experiments.module import Classifier
from prunekit.schedules import from_dict
from torch import nn

from prunekit import GroupPruner, Pruner


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what is wrong."""


def _help(default: Any, text: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class DataConfig:
    name: str = _help("fashion_mnist", "a registered dataset (`prunekit datasets` lists them)")
    root: str | None = _help(
        None, "folder of the dataset's files (null: the dataset's default folder)"
    )
    batch_size: int = _help(60, "training batch size")
    val_size: int = _help(5000, "training images held out for validation (seeded split)")
    subset: int | None = _help(None, "use only this many training images (quick runs)")
    _target_: str | None = _help(
        None,
        "import path of your own LightningDataModule class (used instead of name); it is "
        "called with data.options (and seed, when it takes one) and must have "
        "input_shape and num_classes attributes",
    )
    options: dict[str, Any] = _help(
        {}, "more keyword arguments of the data module (e.g. {num_workers: 2})"
    )


@dataclass
class TrainConfig:
    optimizer: str = _help("adam", "sgd, adam or adamw")
    lr: float = _help(1.2e-3, "learning rate")
    momentum: float = _help(0.9, "SGD momentum")
    weight_decay: float = _help(0.0, "weight decay")
    lr_schedule: str | None = _help(None, "null (constant), cosine or step")
    milestones: list[int] = _help(
        [], "optimizer steps at which lr_schedule=step multiplies by gamma"
    )
    gamma: float = _help(0.1, "factor of lr_schedule=step")
    val_every: int = _help(500, "validate every this many optimizer steps")


@dataclass
class PruningConfig:
    schedule: dict[str, Any] = _help(
        {
            "kind": "polynomial",
            "initial": 0.0,
            "final": 0.9,
            "begin": 0,
            "end": 1000,
            "frequency": 100,
        },
        "a prunekit.schedules dict: {kind: polynomial, initial: ..., final: ..., ...}",
    )
    unit: str = _help("step", "the schedule's time counts optimizer steps (step) or epochs (epoch)")
    method: str = _help("magnitude", "a prunekit method: magnitude, random, ln_structured, ...")
    scope: str = _help("global", "global (one ranking over all targets) or layer")
    targets: list[str] | None = _help(None, "parameter names or globs; null = all standard weights")
    exclude: list[str] = _help([], "parameter names or globs left dense")
    options: dict[str, Any] = _help({}, "options of the method, e.g. {n: 2, dim: 0}")
    structure: str = _help(
        "weights",
        "weights (method decides) or groups: whole channel groups (GroupPruner; the schedule "
        "counts channels; method/targets stay default; exclude keeps the groups touching those "
        "parameters dense; options: reduce) for compaction",
    )


@dataclass
class DenseConfig:
    steps: int = _help(0, "dense pre-training steps before pruning (0: none)")
    checkpoint: str | None = _help(None, "a dense model state_dict (.pt) to start from instead")
    lr: float | None = _help(None, "learning rate of dense training (null: train.lr)")


@dataclass
class ExperimentConfig:
    """What every experiment has: a name, a seed, a model, data and training settings."""

    name: str = _help(MISSING, "experiment name; the run folder is named from it and the config")
    seed: int = _help(0, "seed of initialisation, data split and shuffling")
    model: str = _help(
        "lenet_300_100",
        "a registered model (`prunekit models` lists them) or the import path of your own "
        "model class, called with num_classes and input_shape from the data",
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = _help("runs", "where run folders are written")


@dataclass
class GradualConfig(ExperimentConfig):
    """``prunekit run``: (optional dense training, then) training under a sparsity schedule."""

    steps: int = _help(MISSING, "optimizer steps of the pruning phase")
    dense: DenseConfig = field(default_factory=DenseConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    checkpoint_every: int = _help(
        500,
        "save a resumable checkpoint of the running phase (dense or pruning) in the run "
        "folder at the first validation at least this many steps after the last one; an "
        "interrupted run continues from it when started again (0: never; not hashed)",
    )


@dataclass
class OneShotConfig(ExperimentConfig):
    """``prunekit oneshot``: a trained dense model pruned once per method, scope and
    sparsity, without retraining, and evaluated on the test set."""

    dense: DenseConfig = field(default_factory=DenseConfig)
    methods: list[str] = _help(
        ["magnitude", "wanda", "taylor"],
        "pruning methods compared: registered names, or labels defined in variants",
    )
    variants: dict[str, dict[str, Any]] = _help(
        {},
        "labelled method settings, e.g. {wanda_row: {method: wanda, per_output: true, "
        "scope: layer}}: the method, its options and optionally the one scope it runs in",
    )
    scopes: list[str] = _help(["global", "layer"], "scopes compared: global and/or layer")
    sparsities: list[float] = _help(
        [0.0, 0.5, 0.7, 0.9], "target sparsities, each pruned from the dense weights"
    )
    calibration_batches: int = _help(
        8, "training batches (of data.batch_size) the data-aware methods calibrate on"
    )
    exclude: list[str] = _help([], "parameter names or globs left dense")
    checkpoint_every: int = _help(
        500, "save a resumable checkpoint of the dense training this often (0: never; not hashed)"
    )


REWIND_MODES = ("init", "step", "lr", "finetune")
CONTROLS = ("random_reinit", "random_prune", "snip")


@dataclass
class LotteryConfig(ExperimentConfig):
    """``prunekit lottery``: iterative magnitude pruning with rewinding."""

    rounds: int = _help(MISSING, "pruning rounds after the dense round 0")
    steps_per_round: int = _help(MISSING, "optimizer steps of training in each round")
    rate: float = _help(0.2, "fraction of the remaining weights pruned per round")
    layer_rates: dict[str, float] = _help(
        {"output": 0.1}, "per-layer rates; 'output' names the output layer's weight"
    )
    scope: str = _help("layer", "layer (each layer at its rate, as Frankle & Carbin) or global")
    rewind: str = _help("init", "init, step (late rewinding to rewind_step), lr or finetune")
    rewind_step: int = _help(0, "k for rewind=step: rewind to the weights after k steps")
    finetune_lr: float = _help(1e-4, "constant learning rate of rewind=finetune")
    controls: list[str] = _help(
        [], "also train each round's controls: random_reinit, random_prune, snip (SNIP at init)"
    )


EVAL_SETS = ("test", "val")


@dataclass
class InstabilityConfig(ExperimentConfig):
    """``prunekit instability``: linear mode connectivity (Frankle et al. 2020)."""

    steps: int = _help(MISSING, "optimizer steps of the trunk and of each copy (counted from 0)")
    rewind_steps: list[int] = _help(
        [0, 100, 500, 2000],
        "the k's: two copies train on from the state after k steps of one shared training",
    )
    data_seeds: list[int] = _help(
        [1, 2], "data-order seeds of the two copies (equal seeds give identical copies)"
    )
    alphas: int = _help(11, "evenly spaced alpha in [0, 1] where the path's error is evaluated")
    eval_on: str = _help("test", "the path's error on the test or the val(idation) images")
    masks: str | None = _help(
        None,
        "null (dense) or a lottery round's state (round_RR/lottery.pt) or {name: bool mask} "
        ".pt file: the copies train that sparse network from step k",
    )


def _closest(key: str, node: Any) -> str:
    valid = [f.name for f in fields(node)] if is_dataclass(node) else []
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys here: {', '.join(valid)}"


def _schema_at(schema: type, dotted: str) -> Any:
    node: Any = schema
    for part in dotted.split(".")[:-1]:
        types = {f.name: f for f in fields(node)} if is_dataclass(node) else {}
        if part not in types or not is_dataclass(types[part].default_factory()):  # type: ignore[misc]
            return None
        node = types[part].default_factory()  # type: ignore[misc]
    return node


def load_config(
    schema: type, path: str | os.PathLike[str] | None, overrides: list[str] = ()
) -> DictConfig:
    """Load ``path`` (YAML) and ``key=value`` overrides onto ``schema``, validated.

    >>> cfg = load_config(GradualConfig, None, ["name=demo", "steps=100", "train.lr=0.01"])
    >>> cfg.train.lr, cfg.pruning.scope
    (0.01, 'global')
    >>> try:
    ...     load_config(GradualConfig, None, ["name=demo", "steps=100", "train.lrr=0.01"])
    ... except ValueError as e:
    ...     print(str(e)[:67])
    unknown key 'train.lrr' (from the command line); did you mean 'lr'?
    """
    merged = OmegaConf.structured(schema)
    sources: list[tuple[str, Any]] = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {os.fspath(path)!r} does not exist")
        sources.append((f"in {os.fspath(path)}", lambda: OmegaConf.load(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
    sources.append(("from the command line", lambda: OmegaConf.from_dotlist(list(overrides))))
    for where, load in sources:
        try:
            merged = OmegaConf.merge(merged, load())
        except ConfigKeyError as e:
            key = str(e.full_key)
            node = _schema_at(schema, key)
            raise ConfigError(
                f"unknown key {key!r} ({where}){_closest(key.split('.')[-1], node)}"
            ) from None
        except OmegaConfBaseException as e:
            message = str(e).splitlines()[0]
            raise ConfigError(f"bad value for {e.full_key!r} ({where}): {message}") from None
    try:  # every ${...} interpolation must resolve, to a value of the key's type
        OmegaConf.to_container(merged, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as e:
        message = str(e).splitlines()[0]
        raise ConfigError(f"cannot resolve {e.full_key!r}: {message}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"missing required value(s): {', '.join(missing)} (set them in the YAML or as key=value)"
        )
    check_config(merged)
    return merged


def check_config(cfg: DictConfig) -> None:
    """The checks a typed schema cannot express (ranges, choices, the schedule)."""

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r} {why}")

    from prunekit.experiments.paths import check_name  # paths imports this module

    try:
        check_name(cfg.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_model_and_data(cfg)
    check(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "must be >= 1")
    check(cfg.train.lr > 0, "train.lr", cfg.train.lr, "must be > 0")
    check(cfg.train.val_every >= 1, "train.val_every", cfg.train.val_every, "must be >= 1")
    check(
        cfg.train.optimizer in ("sgd", "adam", "adamw"),
        "train.optimizer",
        cfg.train.optimizer,
        "must be sgd, adam or adamw",
    )
    _check_sections(cfg)
    if "sparsities" in cfg:  # prunekit oneshot
        _check_oneshot(cfg)
        return
    if "rewind_steps" in cfg:  # prunekit instability
        _check_instability(cfg, check)
        return
    if "pruning" in cfg:
        check(cfg.steps >= 1, "steps", cfg.steps, "must be >= 1")
        check(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be >= 0")
        check(cfg.dense.steps >= 0, "dense.steps", cfg.dense.steps, "must be >= 0")
        check(
            cfg.pruning.unit in ("step", "epoch"),
            "pruning.unit",
            cfg.pruning.unit,
            "must be step or epoch",
        )
        check(
            cfg.pruning.scope in ("global", "layer"),
            "pruning.scope",
            cfg.pruning.scope,
            "must be global or layer",
        )
        check(
            cfg.pruning.structure in ("weights", "groups"),
            "pruning.structure",
            cfg.pruning.structure,
            "must be weights or groups",
        )
        try:
            from_dict(OmegaConf.to_container(cfg.pruning.schedule))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"pruning.schedule: {e}") from None
        _check_pruning(cfg)
    else:
        check(cfg.rounds >= 1, "rounds", cfg.rounds, "must be >= 1")
        check(cfg.steps_per_round >= 1, "steps_per_round", cfg.steps_per_round, "must be >= 1")
        check(0 < cfg.rate < 1, "rate", cfg.rate, "must be in (0, 1)")
        for layer, rate in cfg.layer_rates.items():
            check(0 < rate < 1, f"layer_rates.{layer}", rate, "must be in (0, 1)")
        check(cfg.rewind in REWIND_MODES, "rewind", cfg.rewind, f"must be one of {REWIND_MODES}")
        check(
            0 <= cfg.rewind_step < cfg.steps_per_round,
            "rewind_step",
            cfg.rewind_step,
            f"must be in [0, steps_per_round={cfg.steps_per_round})",
        )
        check(cfg.scope in ("global", "layer"), "scope", cfg.scope, "must be global or layer")
        for control in cfg.controls:
            check(control in CONTROLS, "controls", control, f"is not one of {CONTROLS}")
        check(
            len(set(cfg.controls)) == len(cfg.controls),
            "controls",
            list(cfg.controls),
            "lists a control twice",
        )
        check(
            cfg.data.val_size > 0,
            "data.val_size",
            cfg.data.val_size,
            "must be > 0: rounds early-stop on validation loss",
        )


def _check_instability(cfg: DictConfig, check: Any) -> None:
    check(cfg.steps >= 1, "steps", cfg.steps, "must be >= 1")
    ks = list(cfg.rewind_steps)
    check(bool(ks), "rewind_steps", ks, "must list at least one step k")
    for k in ks:
        check(0 <= k < cfg.steps, "rewind_steps", ks, f"must lie in [0, steps={cfg.steps})")
    check(len(set(ks)) == len(ks), "rewind_steps", ks, "lists a step twice")
    seeds = list(cfg.data_seeds)
    check(len(seeds) == 2, "data_seeds", seeds, "must hold two seeds (one per copy)")
    check(min(seeds) >= 0, "data_seeds", seeds, "must be >= 0")
    check(2 <= cfg.alphas <= 1001, "alphas", cfg.alphas, "must be in [2, 1001]")
    check(cfg.eval_on in EVAL_SETS, "eval_on", cfg.eval_on, f"must be one of {EVAL_SETS}")
    check(
        cfg.eval_on != "val" or cfg.data.val_size > 0,
        "eval_on",
        cfg.eval_on,
        "needs data.val_size > 0",
    )


def _check_sections(cfg: DictConfig) -> None:
    """The data and train sections, checked by the constructors that will use them (they
    touch no file), so that a bad value fails here and not after the run folder is written."""
    train, data = cfg.train, cfg.data
    for section, build in (
        (
            "train",
            lambda: Classifier(
                nn.Identity(),
                optimizer=train.optimizer,
                lr=train.lr,
                momentum=train.momentum,
                weight_decay=train.weight_decay,
                lr_schedule=train.lr_schedule,
                milestones=list(train.milestones),
                gamma=train.gamma,
                max_steps=1,
            ),
        ),
        (
            "data",
            lambda: datamodule_from_config(OmegaConf.to_container(data, resolve=True), cfg.seed),
        ),
    ):
        try:
            build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{section}: {e}") from None


def _check_model_and_data(cfg: DictConfig) -> None:
    """``model`` is registered or importable; ``data.name`` is registered (or ``_target_``
    importable)."""
    if cfg.model not in list_models():
        if "." not in cfg.model:
            raise ConfigError(
                f"model={cfg.model!r} is not one of {list_models()} nor an import path "
                "(package.module.Class)"
            )
        try:
            import_object(cfg.model, "model")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.data._target_ is not None:
        try:
            import_object(cfg.data._target_, "data._target_")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif cfg.data.name not in list_datasets():
        raise ConfigError(f"data.name={cfg.data.name!r} is not one of {list_datasets()}")


def _check_pruning(cfg: DictConfig) -> None:
    """Targets, method, scope and options, checked by building a Pruner on the model
    (the global random state is left as it was)."""
    pruning = cfg.pruning
    targets = None if pruning.targets is None else list(pruning.targets)
    try:
        with torch.random.fork_rng(devices=[]):
            data = OmegaConf.to_container(cfg.data, resolve=True)
            shape, classes = data_shape(datamodule_from_config(data, cfg.seed))
            if pruning.structure == "groups":  # (the Pruning callback's own checks, then the trace)
                Pruning(
                    lambda t: 0.0,
                    structure="groups",
                    targets=targets,
                    exclude=list(pruning.exclude),
                    method=pruning.method,
                    options=OmegaConf.to_container(pruning.options),
                )
                GroupPruner(
                    build_model(cfg.model, num_classes=classes, input_shape=shape),
                    torch.zeros(1, *shape),
                    scope=pruning.scope,
                    exclude=list(pruning.exclude),
                    **OmegaConf.to_container(pruning.options),
                )
                return
            Pruner(
                build_model(cfg.model, num_classes=classes, input_shape=shape),
                targets=targets,
                exclude=list(pruning.exclude),
                method=pruning.method,
                scope=pruning.scope,
                seed=cfg.seed,
                **OmegaConf.to_container(pruning.options),
            )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pruning: {e}") from None


def _check_oneshot(cfg: DictConfig) -> None:
    """Dense source, sparsities, calibration, and every (method, scope) pair, checked by
    building a Pruner on the model (the global random state is left as it was)."""

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value!r} {why}")

    check(cfg.dense.steps >= 0, "dense.steps", cfg.dense.steps, "must be >= 0")
    check(
        cfg.dense.steps > 0 or cfg.dense.checkpoint is not None,
        "dense.steps",
        cfg.dense.steps,
        "must be > 0 unless dense.checkpoint gives trained weights (one-shot needs them)",
    )
    check(cfg.checkpoint_every >= 0, "checkpoint_every", cfg.checkpoint_every, "must be >= 0")
    check(
        cfg.calibration_batches >= 1,
        "calibration_batches",
        cfg.calibration_batches,
        "must be >= 1",
    )
    for key in ("methods", "scopes", "sparsities"):
        values = list(cfg[key])
        check(len(values) > 0, key, values, "must not be empty")
        check(len(set(values)) == len(values), key, values, "lists a value twice")
    for s in cfg.sparsities:
        check(0.0 <= s < 1.0, "sparsities", s, "must be in [0, 1)")
    for scope in cfg.scopes:
        check(scope in ("global", "layer"), "scopes", scope, "must be global or layer")
    variants = OmegaConf.to_container(cfg.variants, resolve=True)
    for label, spec in variants.items():
        check("method" in spec, f"variants.{label}", spec, "needs a method")
        scope = spec.get("scope", cfg.scopes[0])
        check(
            scope in cfg.scopes, f"variants.{label}.scope", scope, f"is not in {list(cfg.scopes)}"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            data = OmegaConf.to_container(cfg.data, resolve=True)
            shape, classes = data_shape(datamodule_from_config(data, cfg.seed))
            model = build_model(cfg.model, num_classes=classes, input_shape=shape)
            for label in cfg.methods:
                spec = dict(variants.get(label, {"method": label}))
                method, only = spec.pop("method"), spec.pop("scope", None)
                for scope in cfg.scopes if only is None else [only]:
                    Pruner(
                        model, method=method, scope=scope, exclude=list(cfg.exclude), **spec
                    ).remove()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"methods/variants/scopes/exclude: {e}") from None
