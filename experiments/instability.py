"""``prunekit instability``: linear mode connectivity and instability analysis.

Frankle, Dziugaite, Roy & Carbin (2020), "Linear Mode Connectivity and the Lottery
Ticket Hypothesis" (ICML). For each rewind step k in ``rewind_steps``:

1. The *trunk*, one training of the network from its initialisation, is stopped after k
   optimizer steps: weights, optimizer state, LR-scheduler state and step count are
   saved by :class:`prunekit.callbacks.RewindPoint` (k = 0: the initial weights and a
   fresh optimizer).
2. Two *copies* train on from there to ``steps``, identical in everything but the order
   of the training data: copy i reshuffles the same training images every epoch from
   ``data_seeds[i] + epoch`` (same train/validation split, same initialisation, same
   optimizer; the trunk's own order comes from ``seed``).
3. The error (1 − accuracy, on ``eval_on``) is evaluated along the linear path
   ``θ(α) = (1 − α)·θ1 + α·θ2`` between the copies' final weights at ``alphas`` evenly
   spaced α in [0, 1]. The instability (error barrier) is

   ``instability(k) = max_α error(θ(α)) − (error(θ1) + error(θ2)) / 2``.

   About 0: the copies end in one linearly connected minimum, the network is *stable*
   to SGD noise from step k on. Frankle et al. find that iterative-magnitude-pruning
   subnetworks reach the dense accuracy when, and only when, they are stable, which for
   larger networks (and sparse ones) happens only from some k > 0: the reason for late
   rewinding (``prunekit lottery ... rewind=step rewind_step=k``).

With ``masks`` (a lottery run's ``round_RR/lottery.pt``, or a ``{name: bool mask}``
file), the copies train that sparse network: :class:`prunekit.callbacks.HoldMasks`
zeroes the pruned weights and their optimizer state at step k and keeps them at zero,
the survivors keep their step-k values, as in late rewinding; the trunk is dense. (The
paper finds each k's mask by IMP rewinding to that k; a fixed mask from one lottery run
is the cheaper variant this runner offers: say which mask you used.)

BatchNorm: an interpolated network needs its BatchNorm running statistics recomputed
before it is evaluated (the average of two networks' statistics is not the statistics
of the averaged network). This runner does not recompute them and refuses models with
BatchNorm layers; LeNet-300-100, LeNet-5 and Conv-2/4/6 have none.

Run folder (:class:`~prunekit.experiments.paths.RunPaths` root): ``config.yaml``,
``init.pt`` (initial weights), ``rewind_kK.ckpt`` (trunk checkpoints, k > 0),
``k_K/copy_I.pt`` (final weights of copy I, network names), ``k_K/result.json`` (the
path errors of k; its presence means k is finished and reused when the run is started
again), ``logs/`` (Lightning CSV metrics of the trunk and of every copy),
``summary.json`` and ``instability.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from prunekit.callbacks import HoldMasks, RewindPoint
from prunekit.experiments import training
from prunekit.experiments.config import ConfigError, InstabilityConfig, load_config
from prunekit.experiments.data import EpochShuffleSampler
from prunekit.experiments.module import Classifier
from prunekit.experiments.paths import (
    RunFolderError,
    RunPaths,
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
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DataOrder",
    "barrier_above_line",
    "combine",
    "combined_table",
    "instability",
    "instability_table",
    "interpolate",
    "path_errors",
    "plot_instability",
    "run_instability",
]

_PREFIX = "model."  # the Classifier holds the network as ``self.model``
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_RESUME_WARNING = ".*resuming from a checkpoint that ended before.*"


# --------------------------------------------------------------------------- the analysis
def interpolate(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """The state_dict ``(1 − alpha)·a + alpha·b`` (exactly ``a`` at 0 and ``b`` at 1).

    Computed with :func:`torch.lerp`, which is exact at both ends and where ``a`` equals
    ``b``. Both must have the same keys and shapes; integer entries (counters) must be
    equal.

    >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([1.0, 4.0])}
    >>> interpolate(a, b, 0.25)["w"].tolist()
    [0.25, 2.5]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1]")
    problem = state_dict_mismatch(dict(b), dict(a))
    if problem is not None:
        raise ValueError(f"the two state_dicts do not match: {problem}")
    out = {}
    for name, x in a.items():
        y = b[name]
        if x.is_floating_point():
            out[name] = torch.lerp(x, y.to(x.dtype), alpha)
        elif torch.equal(x, y):
            out[name] = x.clone()
        else:
            raise ValueError(f"{name!r} is an integer tensor that differs: cannot interpolate it")
    return out


def instability(errors: Sequence[float]) -> float:
    """The error barrier: the highest error on the path minus the mean of its ends.

    >>> instability([0.10, 0.12, 0.30, 0.14])
    0.18
    """
    if len(errors) < 2:
        raise ValueError(f"errors={list(errors)!r}: need the path's two ends at least")
    return round(max(errors) - (errors[0] + errors[-1]) / 2, 12)


def barrier_above_line(alphas: Sequence[float], errors: Sequence[float]) -> float:
    """The largest rise of the path's error above the straight line between its ends,
    ``max_α error(α) − ((1 − α)·error(0) + α·error(1))`` (0 when the path never rises
    above it). Unlike :func:`instability` it does not count half the gap between the two
    ends, which is what the instability of a convex (barrier-free) path measures.

    >>> barrier_above_line([0.0, 0.5, 1.0], [0.10, 0.12, 0.30])
    0.0
    >>> barrier_above_line([0.0, 0.5, 1.0], [0.10, 0.25, 0.20])
    0.1
    """
    if len(alphas) != len(errors) or len(errors) < 2:
        raise ValueError("alphas and errors must have the same length, at least 2")
    e0, e1 = errors[0], errors[-1]
    rise = max(e - ((1 - a) * e0 + a * e1) for a, e in zip(alphas, errors, strict=True))
    return round(max(rise, 0.0), 12)


@torch.no_grad()
def path_errors(
    net: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    alphas: Sequence[float],
    loader: DataLoader,
) -> tuple[list[float], list[float]]:
    """Error (1 − accuracy) and mean cross-entropy over ``loader`` of ``net`` loaded with
    :func:`interpolate` ``(a, b, α)``, for each α (``net`` keeps the last α's weights).

    Networks with BatchNorm layers are refused (their statistics would need recomputing
    at every α)."""
    norms = [n for n, m in net.named_modules() if isinstance(m, _NORMS)]
    if norms:
        raise ValueError(
            f"{type(net).__name__} has BatchNorm layers {norms[:3]}: an interpolated network "
            "needs its BatchNorm statistics recomputed, which this analysis does not do"
        )
    errors, losses = [], []
    for alpha in alphas:
        net.load_state_dict(interpolate(a, b, float(alpha)))
        loss, accuracy = training.evaluate(net, loader)
        errors.append(1.0 - accuracy)
        losses.append(loss)
    return errors, losses


class DataOrder(L.LightningDataModule):
    """``data`` with its training images in another order: every epoch a permutation drawn
    from ``seed + epoch``; batch size, collation, validation and test loaders unchanged.

    ``data`` must be set up and its training loader must read a map-style dataset.

    >>> from torch.utils.data import TensorDataset
    >>> class Tiny(L.LightningDataModule):
    ...     def train_dataloader(self):
    ...         return DataLoader(TensorDataset(torch.arange(6)), batch_size=6)
    >>> [batch[0].tolist() for batch in DataOrder(Tiny(), seed=0).train_dataloader()]
    [[2, 5, 3, 0, 1, 4]]
    """

    def __init__(self, data: L.LightningDataModule, seed: int) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        self.data, self.seed = data, seed

    def setup(self, stage: str) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> DataLoader:
        loader = self.data.train_dataloader()
        dataset = loader.dataset
        if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"{type(self.data).__name__}'s training loader reads a "
                f"{type(dataset).__name__}, not a map-style dataset: its order cannot be set"
            )
        return DataLoader(
            dataset,
            batch_size=loader.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed),
            drop_last=loader.drop_last,
            collate_fn=loader.collate_fn,
            num_workers=0,
        )

    def val_dataloader(self) -> Any:
        return self.data.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.data.test_dataloader()


# --------------------------------------------------------------------------- the run
def run_instability(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) an instability analysis; returns and writes its summary.

    Everything is checked before any training (config, data folder, ``masks`` file,
    model without BatchNorm, writable run folder). The summary (``summary.json``) holds
    ``kind`` ("instability"), ``name``, ``config_hash``, ``seed``, ``model``, ``steps``,
    ``data_seeds``, ``eval_on``, ``masks`` (the file, or None), ``remaining`` (fraction of
    the masked weights kept; 1.0 when dense), ``results`` (one per k, ascending:
    ``k``, ``alphas``, ``errors``, ``losses``, ``endpoint_errors``, ``max_error``,
    ``instability``), ``wall_s`` (this invocation) and ``files``.
    """
    started = time.perf_counter()
    with _Run.prepare(cfg) as run:
        results = [run.result(k) for k in sorted(cfg.rewind_steps)]
        summary = {
            "kind": "instability",
            "name": cfg.name,
            "config_hash": config_hash(cfg),
            "seed": cfg.seed,
            "model": cfg.model,
            "steps": cfg.steps,
            "data_seeds": list(cfg.data_seeds),
            "eval_on": cfg.eval_on,
            "masks": cfg.masks,
            "remaining": run.remaining,
            "results": results,
            "wall_s": time.perf_counter() - started,
            "files": sorted({*run.files, "summary.json"}),
        }
        write_json(run.paths.summary, summary)
        return summary


class _Run:
    """One instability run: config, paths, data, masks and initial weights, all checked."""

    def __init__(
        self,
        cfg: DictConfig,
        paths: RunPaths,
        dm: L.LightningDataModule,
        masks: dict[str, Tensor] | None,
    ) -> None:
        self.cfg, self.paths, self.dm, self.masks = cfg, paths, dm, masks
        self.files: set[str] = set()
        if masks is None:
            self.remaining = 1.0
        else:
            kept = sum(int(m.count_nonzero()) for m in masks.values())
            self.remaining = kept / sum(m.numel() for m in masks.values())
        self.initial = self._initial_weights()
        self.alphas = [i / (cfg.alphas - 1) for i in range(cfg.alphas)]

    @classmethod
    @contextlib.contextmanager
    def prepare(cls, cfg: DictConfig) -> Iterator[_Run]:
        from prunekit.experiments.config import check_config

        check_config(cfg)
        template = _module(cfg)
        norms = [n for n, m in template.named_modules() if isinstance(m, _NORMS)]
        if norms:
            raise ConfigError(
                f"model={cfg.model!r} has BatchNorm layers ({', '.join(norms[:3])}...): "
                "interpolated networks need their BatchNorm statistics recomputed, which "
                "this runner does not do; use a model without BatchNorm (lenet_300_100, "
                "lenet5, conv2, conv4, conv6)"
            )
        masks = None if cfg.masks is None else _load_masks(cfg.masks, template)
        paths = RunPaths.for_config(cfg)
        dm = training.datamodule(cfg, cfg.seed)  # a missing data folder fails here
        check_writable(paths.root)
        with locked(paths.root):
            write_config(paths.config, cfg)
            run = cls(cfg, paths, dm, masks)
            run.files.add(paths.config.name)
            ks = ", ".join(map(str, sorted(cfg.rewind_steps)))
            training.progress(
                f"instability run {paths.root}: k = {ks}, 2 copies of {cfg.steps} steps each"
            )
            yield run

    # ------------------------------------------------------------------ files
    def _rewind_file(self, k: int) -> Path:
        return self.paths.root / f"rewind_k{k}.ckpt"

    def _copy_file(self, k: int, i: int) -> Path:
        return self.paths.root / f"k_{k}" / f"copy_{i}.pt"

    def _result_file(self, k: int) -> Path:
        return self.paths.root / f"k_{k}" / "result.json"

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.paths.root).as_posix()

    def _initial_weights(self) -> dict[str, Tensor]:
        path = self.paths.root / "init.pt"
        template = _module(self.cfg)
        if path.is_file():
            weights = _checked(path, load_torch(path), template)
        else:
            weights = {k.removeprefix(_PREFIX): v for k, v in template.state_dict().items()}
            save_torch(path, weights)
        self.files.add(path.name)
        return weights

    # ------------------------------------------------------------------ stages
    def result(self, k: int) -> dict[str, Any]:
        """k's path errors: reused when finished, else computed (training what is missing)."""
        path = self._result_file(k)
        if path.is_file() and all(self._copy_file(k, i).is_file() for i in (0, 1)):
            training.progress(f"k={k}: finished before, reusing {self._rel(path)}")
            self.files.update(self._rel(p) for p in (path, *self._copies(k)))
            return read_json(path)
        finals = [self._copy(k, i) for i in (0, 1)]
        net = training.network(self.cfg)
        loader = (
            self.dm.test_dataloader() if self.cfg.eval_on == "test" else self.dm.val_dataloader()
        )
        errors, losses = path_errors(net, finals[0], finals[1], self.alphas, loader)
        result = {
            "k": k,
            "alphas": self.alphas,
            "errors": errors,
            "losses": losses,
            "endpoint_errors": [errors[0], errors[-1]],
            "max_error": max(errors),
            "instability": instability(errors),
        }
        write_json(path, result)
        self.files.update(self._rel(p) for p in (path, *self._copies(k)))
        training.progress(
            f"k={k}: {self.cfg.eval_on} error {100 * errors[0]:.2f}% and "
            f"{100 * errors[-1]:.2f}% at the ends, max {100 * max(errors):.2f}% on the path: "
            f"instability {100 * result['instability']:.2f} points"
        )
        return result

    def _copies(self, k: int) -> list[Path]:
        return [self._copy_file(k, i) for i in (0, 1)]

    def _copy(self, k: int, i: int) -> dict[str, Tensor]:
        """Final weights (network names) of copy ``i`` from step ``k``: loaded or trained."""
        path = self._copy_file(k, i)
        if path.is_file():
            return _checked(path, load_torch(path), _module(self.cfg))
        cfg = self.cfg
        checkpoint = None if k == 0 else self._trunk(k)
        seed_everything(cfg.seed, verbose=False)
        module = _module(cfg)
        if checkpoint is None:
            module.load_state_dict({f"{_PREFIX}{n}": v for n, v in self.initial.items()})
        callbacks: list[Callback] = [] if self.masks is None else [HoldMasks(self.masks)]
        training.progress(
            f"k={k} copy {i + 1}/2: steps {k}..{cfg.steps}, data order seed {cfg.data_seeds[i]}"
            + ("" if self.masks is None else f", {100 * self.remaining:.1f}% of weights kept")
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _RESUME_WARNING)  # copies restart the epoch
            training.fit(
                module,
                DataOrder(self.dm, cfg.data_seeds[i]),
                max_steps=cfg.steps,
                val_every=cfg.train.val_every,
                log_dir=self.paths.logs / f"k_{k}_copy_{i}",
                callbacks=callbacks,
                ckpt_path=None if checkpoint is None else str(checkpoint),
            )
        if self.masks is not None:
            for name, mask in self.masks.items():
                if bool(module.get_parameter(name).detach()[~mask].any()):
                    raise RuntimeError(f"pruned weights of {name} became non-zero in training")
        weights = {
            n.removeprefix(_PREFIX): v.detach().clone() for n, v in module.state_dict().items()
        }
        save_torch(path, weights)
        return weights

    def _trunk(self, k: int) -> Path:
        """The step-k checkpoint of the trunk; trains the trunk when any is missing (one
        training to the largest missing k, saving every missing k on the way)."""
        path = self._rewind_file(k)
        if path.is_file():
            try:
                training.check_checkpoint(path)
            except ValueError as e:
                raise RunFolderError(f"{e}; delete it to train the trunk again") from None
            self.files.add(self._rel(path))
            return path
        cfg = self.cfg
        missing = [
            j for j in sorted(cfg.rewind_steps) if j > 0 and not self._rewind_file(j).is_file()
        ]
        seed_everything(cfg.seed, verbose=False)
        module = _module(cfg)
        module.load_state_dict({f"{_PREFIX}{n}": v for n, v in self.initial.items()})
        points = [RewindPoint(j, path=self._rewind_file(j)) for j in missing]
        training.progress(f"trunk: {max(missing)} steps, saving the state at k = {missing}")
        training.fit(
            module,
            self.dm,
            max_steps=max(missing),
            val_every=cfg.train.val_every,
            log_dir=self.paths.logs / "trunk",
            callbacks=points,
        )
        for j in missing:
            if not self._rewind_file(j).is_file():
                raise RuntimeError(f"the trunk saved no checkpoint at step {j}")
            self.files.add(self._rel(self._rewind_file(j)))
        return path


# --------------------------------------------------------------------------- helpers
def _module(cfg: DictConfig) -> Classifier:
    """A fresh Classifier around ``cfg.model`` initialised from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return training.classifier(training.network(cfg), cfg.train, cfg.steps)


def _checked(path: Path, state: Any, template: Classifier) -> dict[str, Tensor]:
    expected = {k.removeprefix(_PREFIX): v for k, v in template.state_dict().items()}
    problem = state_dict_mismatch(state, expected)
    if problem is not None:
        raise RunFolderError(f"{path} does not fit the model: {problem}; delete it to redo it")
    return state


def _load_masks(path: str, template: Classifier) -> dict[str, Tensor]:
    """``{module name: bool mask}`` from a lottery round state or a mask file; every
    problem raises ConfigError naming the ``masks`` key."""
    try:
        saved = load_torch(Path(path))
    except (FileNotFoundError, RunFolderError) as e:
        raise ConfigError(f"masks={path!r}: {e}") from None
    if isinstance(saved, dict) and "masks" in saved:
        saved = saved["masks"]
    if not isinstance(saved, dict) or not saved:
        raise ConfigError(f"masks={path!r} holds no {{parameter name: bool mask}} dict")
    params = dict(template.named_parameters())
    masks = {}
    for name, mask in saved.items():
        full = name if name in params else f"{_PREFIX}{name}"
        if full not in params:
            raise ConfigError(
                f"masks={path!r} names {name!r}, not a parameter of model={template.model.__class__.__name__}"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ConfigError(f"masks={path!r}: {name!r} is not a torch.bool mask")
        if mask.shape != params[full].shape:
            raise ConfigError(
                f"masks={path!r}: {name!r} has shape {tuple(mask.shape)}, the parameter "
                f"{tuple(params[full].shape)}"
            )
        masks[full] = mask
    return masks


# --------------------------------------------------------------------------- reporting
def instability_table(summary: Mapping[str, Any]) -> str:
    """The per-k results of an instability summary as a plain-text table.

    >>> result = {"k": 500, "endpoint_errors": [0.105, 0.11], "max_error": 0.112,
    ...           "instability": 0.0045}
    >>> summary = {"name": "demo", "model": "lenet_300_100", "steps": 3000,
    ...            "data_seeds": [1, 2], "eval_on": "test", "remaining": 1.0,
    ...            "results": [result]}
    >>> print(instability_table(summary))
    demo: lenet_300_100, dense, 3000 steps, copies' data orders from seeds 1 and 2, test error
      k  copy 1 error  copy 2 error  max error on path  instability
    ---  ------------  ------------  -----------------  -----------
    500        10.50%        11.00%             11.20%     0.45 pts
    """
    headers = ("k", "copy 1 error", "copy 2 error", "max error on path", "instability")
    rows = [
        (
            str(r["k"]),
            f"{100 * r['endpoint_errors'][0]:.2f}%",
            f"{100 * r['endpoint_errors'][1]:.2f}%",
            f"{100 * r['max_error']:.2f}%",
            f"{100 * r['instability']:.2f} pts",
        )
        for r in summary["results"]
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    kept = summary["remaining"]
    sparsity = "dense" if kept == 1.0 else f"sparse ({100 * kept:.1f}% of weights kept)"
    seeds = summary["data_seeds"]
    title = (
        f"{summary['name']}: {summary['model']}, {sparsity}, {summary['steps']} steps, "
        f"copies' data orders from seeds {seeds[0]} and {seeds[1]}, {summary['eval_on']} error"
    )

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join(
        [title, line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    )


def plot_instability(summaries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Error along the linear path for each k (left) and instability vs k (right).

    Several summaries (the same analysis with other seeds) are drawn as their mean, with
    a band / error bars of ± one sample standard deviation (n − 1) when there are at
    least two. Needs matplotlib (the ``plot`` extra).
    """
    from matplotlib.figure import Figure  # optional dependency, imported when plotting

    if not summaries:
        raise ValueError("summaries is empty: nothing to plot")
    ks = [r["k"] for r in summaries[0]["results"]]
    for s in summaries[1:]:
        if [r["k"] for r in s["results"]] != ks or s["results"][0]["alphas"] != summaries[0][
            "results"
        ][0]["alphas"]:
            raise ValueError("the summaries have other k's or alphas: plot them apart")
    names = sorted({s["name"] for s in summaries})
    n = len(summaries)
    fig = Figure(figsize=(10, 4.2), dpi=110)
    left, right = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(len(ks))]
    for index, (k, color) in enumerate(zip(ks, colors, strict=True)):
        alphas = summaries[0]["results"][index]["alphas"]
        per_alpha = list(zip(*(s["results"][index]["errors"] for s in summaries), strict=True))
        mean = [100 * statistics.fmean(v) for v in per_alpha]
        left.plot(alphas, mean, marker="o", markersize=3, color=color, label=f"k = {k}")
        if n >= 2:
            std = [100 * statistics.stdev(v) for v in per_alpha]
            left.fill_between(
                alphas,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=color,
                alpha=0.15,
                linewidth=0,
            )
    eval_on = summaries[0]["eval_on"]
    left.set_xlabel("α  (θ = (1 − α)·θ₁ + α·θ₂)")
    left.set_ylabel(f"{eval_on} error (%)")
    left.set_title("error along the linear path between the copies")
    left.legend(title="rewind step", fontsize=8)
    values = [[100 * s["results"][i]["instability"] for s in summaries] for i in range(len(ks))]
    means = [statistics.fmean(v) for v in values]
    errs = [statistics.stdev(v) if n >= 2 else 0.0 for v in values]
    positions = [max(k, 1) for k in ks]
    label = f"instability, mean ± sample std of {n} seeds" if n >= 2 else "instability"
    right.errorbar(
        positions, means, yerr=errs if n >= 2 else None, marker="o", capsize=3, label=label
    )
    above = [
        [
            100 * barrier_above_line(r["alphas"], r["errors"])
            for r in (s["results"][i] for s in summaries)
        ]
        for i in range(len(ks))
    ]
    right.errorbar(
        positions,
        [statistics.fmean(v) for v in above],
        yerr=[statistics.stdev(v) for v in above] if n >= 2 else None,
        marker="s",
        capsize=3,
        linestyle="--",
        label="rise above the chord between the ends" + (" (same)" if n >= 2 else ""),
    )
    right.set_xscale("log")
    right.set_xticks(positions, [str(k) for k in ks])
    right.minorticks_off()
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set_xlabel("rewind step k (k = 0 drawn at 1)")
    right.set_ylabel("instability (percentage points)")
    right.set_title("instability = max error − mean of the ends")
    right.legend(fontsize=8)
    kept = summaries[0]["remaining"]
    what = "dense" if kept == 1.0 else f"{100 * kept:.1f}% of weights kept"
    fig.suptitle(
        f"{', '.join(names)}: {summaries[0]['model']}, {what}, {summaries[0]['steps']} steps"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def combined_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Instability per k over several runs (seeds): mean ± sample std (n − 1) and each
    run's value, in percentage points; the error at the path's ends averaged, and
    :func:`barrier_above_line` (mean ± sample std) too.

    >>> def run(seed, errors):
    ...     result = {"k": 0, "alphas": [0.0, 0.5, 1.0], "errors": errors,
    ...               "endpoint_errors": [errors[0], errors[-1]],
    ...               "instability": instability(errors)}
    ...     return {"name": "d", "seed": seed, "results": [result]}
    >>> print(combined_table([run(0, [0.1, 0.11, 0.12]), run(1, [0.1, 0.14, 0.12])]))
    d: 2 runs (seeds 0, 1); instability in points, mean ± sample std (n - 1)
    k  ends' error  instability     per run  above the line
    -  -----------  -----------  ----------  --------------
    0       11.00%  2.00 ± 1.41  1.00, 3.00     1.50 ± 2.12
    """
    if not summaries:
        raise ValueError("summaries is empty")
    ks = [r["k"] for r in summaries[0]["results"]]
    if any([r["k"] for r in s["results"]] != ks for s in summaries[1:]):
        raise ValueError("the runs have other k's: combine runs of one config (other seeds)")
    headers = ("k", "ends' error", "instability", "per run", "above the line")
    rows = []
    for i, k in enumerate(ks):
        results = [s["results"][i] for s in summaries]
        values = [100 * r["instability"] for r in results]
        ends = [100 * e for r in results for e in r["endpoint_errors"]]
        above = [100 * barrier_above_line(r["alphas"], r["errors"]) for r in results]
        rows.append(
            (
                str(k),
                f"{statistics.fmean(ends):.2f}%",
                _mean_std(values),
                ", ".join(f"{v:.2f}" for v in values),
                _mean_std(above),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    names = ", ".join(sorted({s["name"] for s in summaries}))
    seeds = ", ".join(str(s["seed"]) for s in summaries)
    title = (
        f"{names}: {len(summaries)} runs (seeds {seeds}); instability in points, "
        "mean ± sample std (n - 1)"
    )

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join(
        [title, line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    )


def _mean_std(values: Sequence[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{spread}"


def combine(run_dirs: Sequence[str | Path], plot: Path | None = None) -> str:
    """The combined table of finished instability runs (the seeds of one config), and
    with ``plot`` their mean path errors and instabilities drawn there.

    From the shell: ``python -m prunekit.experiments.instability --plot out.png RUN...``.
    """
    summaries = []
    for run in run_dirs:
        path = RunPaths(Path(run)).summary
        if not path.is_file():
            raise FileNotFoundError(
                f"{run} has no summary.json (not an instability run, or not finished)"
            )
        summary = read_json(path)
        if summary.get("kind") != "instability":
            raise ValueError(f"{run} is not an instability run (kind={summary.get('kind')!r})")
        summaries.append(summary)
    summaries.sort(key=lambda summary: summary["seed"])
    text = combined_table(summaries)
    if plot is not None:
        text += f"\n\nplot: {plot_instability(summaries, Path(plot))}"
    return text


# --------------------------------------------------------------------------- the command
def main(args: argparse.Namespace) -> int:
    """``prunekit instability CONFIG [key=value ...]`` (called by the ``prunekit`` command)."""
    from prunekit.experiments import report

    cfg = load_config(InstabilityConfig, args.config, args.overrides)
    if args.print_config:
        print(report.config_help(InstabilityConfig, cfg))
        return 0
    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    summary = run_instability(cfg)
    run = RunPaths.for_config(cfg).root
    plot = plot_instability([summary], run / "instability.png")
    print(instability_table(summary))
    print(f"\nplot: {plot}")
    print(f"run folder: {run}")
    return 0


if __name__ == "__main__":  # python -m prunekit.experiments.instability [--plot P] RUN...
    parser = argparse.ArgumentParser(
        prog="python -m prunekit.experiments.instability",
        description="combine finished instability runs (seeds): table and plot",
    )
    parser.add_argument("runs", nargs="+", help="run folders of one config")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    cli_args = parser.parse_args()
    print(combine(cli_args.runs, cli_args.plot))
