"""Run by tests/test_resume_kill.py: processes that the test kills with SIGKILL.

Usage:
    python tests/resume_worker.py train OUT MAX_STEPS [--resume CKPT] [--delay SECONDS]
    python tests/resume_worker.py save OUT

``train`` fits ``TinyNet`` under step-level ``Pruning`` (a polynomial ramp) with a
``ModelCheckpoint`` every ``EVERY`` steps into ``OUT/ckpt``. Every pruning update the
callback sends to the trainer's loggers is appended to ``OUT/events.jsonl`` (one line per
update, flushed at once, so a killed process keeps what it logged). A finished run writes
``OUT/final.pt``: weights, masks, the pruner's update counter and the global step.
``--delay`` sleeps after every batch so that the test can kill the run mid-ramp.

``save`` imports torch once, then, for every line read from stdin, forks a child that
rewrites a run folder's files (``save_torch`` / ``write_json``, self-checking payloads) in a
loop. The parent prints ``child PID`` once the child has written everything once, and
``dead SIGNAL`` when the child is gone (the test SIGKILLs it in between).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: The pruning schedule of ``train``: a ramp from step 2 to step 30, an update every 2 steps.
SCHEDULE = {
    "kind": "polynomial",
    "initial": 0.0,
    "final": 0.8,
    "begin": 2,
    "end": 30,
    "frequency": 2,
}
EVERY = 5  # checkpoint every this many optimizer steps

VARIANT = "x"  # the lottery-style round files the ``save`` children rewrite
JSON_VALUES = 2000


def train(out: Path, max_steps: int, resume: str | None = None, delay: float = 0.0) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import Logger
    from lightning.pytorch.utilities import rank_zero_only
    from prunekit.callbacks import Pruning
    from prunekit.experiments.paths import save_torch
    from prunekit.schedules import from_dict

    from tests.lit_helpers import TinyNet, loader, trainer

    class JsonlLogger(Logger):
        """Appends every pruning update it receives to a JSONL file, flushed per line."""

        def __init__(self, path: Path) -> None:
            super().__init__()
            self.path = path

        @property
        def name(self) -> str:
            return "jsonl"

        @property
        def version(self) -> int:
            return 0

        @rank_zero_only
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        @rank_zero_only
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "sparsity/target" not in metrics:
                return
            row = {
                "step": step,
                "target": float(metrics["sparsity/target"]),
                "actual": float(metrics["sparsity/actual"]),
                "pid": os.getpid(),
            }
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()

    class Sleep(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            time.sleep(delay)

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    pruning = Pruning(from_dict(SCHEDULE), unit="step")
    saver = ModelCheckpoint(
        out / "ckpt", filename="{step}", every_n_train_steps=EVERY, save_top_k=-1
    )
    callbacks: list[Callback] = [pruning, saver]
    if delay:
        callbacks.append(Sleep())
    model = TinyNet(scheduler=True)
    fit: pl.Trainer = trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        enable_checkpointing=True,
        logger=JsonlLogger(out / "events.jsonl"),
        log_every_n_steps=1,
    )
    fit.fit(model, loader(), ckpt_path=resume)
    assert pruning.pruner is not None
    save_torch(
        out / "final.pt",
        {
            "state_dict": model.state_dict(),
            "masks": dict(pruning.pruner.masks),
            "updates": pruning.pruner.updates,
            "global_step": fit.global_step,
        },
    )


def payload(index: int) -> dict[str, Any]:
    """A self-checking value: a tensor of a length derived from ``index``, filled with it."""
    import torch

    n = 200_000 + (index % 7) * 100_000  # 1.6 to 6.4 MB: most of the time goes to writing
    return {"index": index, "n": n, "data": torch.full((n,), index, dtype=torch.int64)}


def _rewrite_forever(out: Path, start: int, ready: int) -> None:
    from prunekit.experiments.paths import RunPaths, save_torch, write_json

    paths = RunPaths(out)
    index = start
    while True:
        # a lottery round's protocol: state first, the result record last ("finished")
        save_torch(paths.round_state(0, VARIANT), payload(index))
        write_json(
            paths.round_result(0, VARIANT), {"index": index, "values": [index] * JSON_VALUES}
        )
        if index == start:
            os.write(ready, b"r")
            os.close(ready)
        index += 1


def save(out: Path) -> None:
    import torch  # noqa: F401  (imported once, before forking)

    for line in sys.stdin:
        rep = int(line)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: rewrite until killed
            os.close(read)
            try:
                _rewrite_forever(out, rep * 1_000_000, write)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write)
        got = os.read(read, 1)
        os.close(read)
        print(f"child {pid if got else 0}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"dead {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("train")
    run.add_argument("out", type=Path)
    run.add_argument("max_steps", type=int)
    run.add_argument("--resume", default=None)
    run.add_argument("--delay", type=float, default=0.0)
    keep = sub.add_parser("save")
    keep.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.mode == "train":
        train(args.out, args.max_steps, args.resume, args.delay)
    else:
        save(args.out)


if __name__ == "__main__":
    main()
