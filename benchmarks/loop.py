"""One training round in prunekit's runner machinery against a plain PyTorch loop.

Both sides do the same work, in the same process, alternating which runs first:

- **prunekit**: what ``prunekit lottery`` does for a round: the config's data module, a
  ``Classifier`` from ``training.classifier``, ``training.fit`` (Lightning Trainer with the
  CSV logger writing to a temporary run folder) and the ``Evaluations`` callback, which
  records validation loss / accuracy and the test accuracy at every validation.
- **plain**: a hand-written loop over the same tensors in the same order (the data
  module's per-epoch permutation, batches cut from it), the same model initialisation,
  Adam, and at every ``val_every`` steps the validation loss / accuracy and the test
  accuracy, in batches of ``eval_batch_size`` under ``torch.inference_mode``.

Defaults: LeNet-300-100 exactly as a ``quick_lottery.yaml`` round (batch 60, 300 steps,
10,000 training images, validation on 5,000 and test on 10,000 images every 100 steps);
Conv-4 with the same batch and data but 12 steps, validating every 6 on 250 / 500 images
(on one CPU thread a Conv-4 step costs ~0.5 s, ~200x LeNet's; the ratio, not the size, is
the point). The two
sides' evaluations are compared at the end: they train on the same batches from the same
weights, so they must agree (printed as the largest validation-loss difference).

    .venv/bin/python benchmarks/loop.py                 # both models, 5 alternating pairs
    .venv/bin/python benchmarks/loop.py --models lenet_300_100 --repeats 3 --steps 30

Timings are wall-clock medians; run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

if __package__ in (None, ""):  # run as a script: import prunekit and benchmarks from this tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import log

#: Per model: steps, val_every, val_size, test_size (training: batch 60 from 10,000 images).
SIZES: dict[str, tuple[int, int, int, int]] = {
    "lenet_300_100": (300, 100, 5000, 10000),
    "conv4": (12, 6, 250, 500),
}


@dataclass(frozen=True)
class Setting:
    model: str
    steps: int
    val_every: int
    val_size: int
    test_size: int
    batch_size: int = 60
    subset: int = 10000
    lr: float = 1.2e-3
    seed: int = 0


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's banners and warnings off (stderr kept for our own lines)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stderr(io.StringIO()):
            yield


def config(s: Setting) -> Any:
    from prunekit.experiments.config import LotteryConfig, load_config

    return load_config(
        LotteryConfig,
        None,
        [
            "name=loop-benchmark",
            f"seed={s.seed}",
            f"model={s.model}",
            "rounds=1",
            f"steps_per_round={s.steps}",
            f"data.batch_size={s.batch_size}",
            f"data.subset={s.subset}",
            f"data.val_size={s.val_size}",
            "train.optimizer=adam",
            f"train.lr={s.lr}",
            f"train.val_every={s.val_every}",
        ],
    )


def data(s: Setting) -> Any:
    """The data module both sides read (set up once; its tensors are shared)."""
    from prunekit.experiments import training

    dm = training.datamodule(config(s), s.seed)
    dm.test_set = Subset(dm.test_set, range(s.test_size))
    return dm


def run_prunekit(s: Setting, dm: Any) -> tuple[float, list[tuple[int, float, float, float]]]:
    """One round as the lottery runner trains it; returns (seconds, evaluations)."""
    from lightning.pytorch import seed_everything
    from prunekit.experiments import training

    cfg = config(s)
    with quiet(), tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        seed_everything(s.seed, verbose=False)
        module = training.classifier(training.network(cfg), cfg.train, s.steps)
        evaluations = training.Evaluations(dm.test_dataloader())
        training.fit(
            module,
            dm,
            max_steps=s.steps,
            val_every=s.val_every,
            log_dir=Path(folder),
            callbacks=[evaluations],
        )
        seconds = time.perf_counter() - started
    records = [(r.step, r.val_loss, r.val_acc, r.test_acc) for r in evaluations.records]
    return seconds, records


def _evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int
) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            logits = model(x[i : i + batch])
            loss += float(F.cross_entropy(logits, y[i : i + batch], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def run_plain(s: Setting, dm: Any) -> tuple[float, list[tuple[int, float, float, float]]]:
    """The same round as a plain PyTorch loop; returns (seconds, evaluations)."""
    from prunekit.experiments.models import build_model

    x, y = dm.train_set.tensors
    xv, yv = dm.val_set.tensors
    xt, yt = (t[: s.test_size] for t in dm.test_set.dataset.tensors)
    batch_eval = dm.eval_batch_size
    started = time.perf_counter()
    torch.manual_seed(s.seed)
    model = build_model(s.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    records: list[tuple[int, float, float, float]] = []
    step, epoch = 0, 0
    while step < s.steps:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(s.seed + epoch))
        epoch += 1
        for i in range(0, len(order), s.batch_size):
            index = order[i : i + s.batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % s.val_every == 0 or step == s.steps:
                val_loss, val_acc = _evaluate(model, xv, yv, batch_eval)
                _, test_acc = _evaluate(model, xt, yt, batch_eval)
                records.append((step, val_loss, val_acc, test_acc))
            if step == s.steps:
                break
    return time.perf_counter() - started, records


def measure(s: Setting, repeats: int) -> dict[str, Any]:
    dm = data(s)
    sides = {"prunekit": run_prunekit, "plain": run_plain}
    for run in sides.values():  # warm-up: imports, allocator, first Trainer
        run(s, dm)
    times: dict[str, list[float]] = {name: [] for name in sides}
    results: dict[str, list[tuple[int, float, float, float]]] = {}
    for r in range(repeats):
        for name in ["prunekit", "plain"] if r % 2 == 0 else ["plain", "prunekit"]:
            seconds, results[name] = sides[name](s, dm)
            times[name].append(seconds)
        log(
            f"{s.model} pair {r + 1}/{repeats}: prunekit {times['prunekit'][-1]:.2f}s, "
            f"plain {times['plain'][-1]:.2f}s, load {os.getloadavg()[0]:.2f}"
        )
    a, b = results["prunekit"], results["plain"]
    if [e[0] for e in a] != [e[0] for e in b]:
        raise RuntimeError(f"the two sides evaluated at different steps: {a} vs {b}")
    return {
        "setting": s,
        "prunekit": statistics.median(times["prunekit"]),
        "plain": statistics.median(times["plain"]),
        "all": times,
        "max_val_loss_diff": max(abs(p[1] - q[1]) for p, q in zip(a, b, strict=True)),
        "test_acc_equal": all(p[3] == q[3] for p, q in zip(a, b, strict=True)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="alternating pairs (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=None, help="override the steps per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for name in args.models:
        steps, val_every, val_size, test_size = SIZES[name]
        if args.steps is not None:
            steps, val_every = args.steps, min(val_every, args.steps)
        rows.append(measure(Setting(name, steps, val_every, val_size, test_size), args.repeats))
    load_after = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} alternating pairs; "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print()
    print(
        "| model | steps | evaluations (val / test images) | prunekit (s) | plain (s) | ratio | runs agree |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        s = row["setting"]
        agree = (
            f"yes (val loss within {row['max_val_loss_diff']:.1e})"
            if row["test_acc_equal"] and row["max_val_loss_diff"] < 1e-4
            else f"NO (val loss off by {row['max_val_loss_diff']:.1e})"
        )
        print(
            f"| {s.model} | {s.steps} | {-(-s.steps // s.val_every)} x ({s.val_size:,} / "
            f"{s.test_size:,}) | {row['prunekit']:.2f} | {row['plain']:.2f} | "
            f"{row['prunekit'] / row['plain']:.2f} | {agree} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
