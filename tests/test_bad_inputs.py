"""The catalogue of bad inputs: every one fails early, clearly, and without side effects.

``CATALOGUE`` is the single documented list: docs/bad-inputs.md is generated from it
(``.venv/bin/python tests/test_bad_inputs.py`` rewrites the file) and the test checks
that every row there is what the case really gives today, so the two cannot drift.

For each case, ONE parametrised test checks that

- the error has the documented type and its message names the argument or value
  (a regex per case);
- the error is raised by our code (the innermost traceback frame is in prunekit,
  schedules, callbacks or experiments), not a bare error from deep inside torch or
  Lightning; CLI cases exit with status 2 and print one ``error:`` line instead;
- the model (and any input tensor) is bit-for-bit unchanged, and the output folder holds
  exactly the files it held before the call (nothing partial was written).
"""

from __future__ import annotations

import contextlib
import io
import math
import pickle
import re
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"
OURS = tuple(REPO / d for d in ("prunekit", "schedules", "callbacks", "experiments"))
QUICK = REPO / "experiments" / "configs" / "quick_gradual.yaml"

if __name__ == "__main__":  # run as a script: make the repository importable as in pytest
    sys.path.insert(0, str(REPO))

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from prunekit.callbacks import Pruning, RewindPoint  # noqa: E402
from prunekit.experiments import cli  # noqa: E402
from prunekit.experiments.config import ConfigError, GradualConfig, load_config  # noqa: E402
from prunekit.experiments.data import (  # noqa: E402
    DEFAULT_DATA_DIR,
    FashionMNISTDataModule,
    build_datamodule,
    data_shape,
    load_fashion_mnist,
    register_dataset,
)
from prunekit.experiments.paths import check_writable  # noqa: E402
from prunekit.experiments.training import fit as run_fit  # noqa: E402
from prunekit.schedules import (  # noqa: E402
    Constant,
    Exponential,
    FromCallable,
    LotteryTicketPlan,
    Polynomial,
    Steps,
    from_dict,
)

import prunekit  # noqa: E402
from prunekit import ActivationPruning, Pruner  # noqa: E402
from tests.lit_helpers import TinyNet, loader, trainer  # noqa: E402


class CliError(Exception):
    """A ``prunekit`` command that exited with a non-zero status (the message: its stderr)."""

    def __init__(self, status: int, stderr: str) -> None:
        lines = [line for line in stderr.splitlines() if line.strip()]
        super().__init__(lines[-1] if lines else "")
        self.status = status


@dataclass
class Ctx:
    """What one case may touch: a temp root, the watched output folder, the watched model
    and input tensors."""

    root: Path
    out: Path
    model: nn.Module
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        """Every byte of the model's state, of the input tensors and of the output folder."""
        state = {f"model.{k}": _fingerprint(v) for k, v in self.model.state_dict().items()}
        state.update({f"tensor.{k}": _fingerprint(v) for k, v in self.tensors.items()})
        for path in sorted(self.out.rglob("*")):
            content = path.read_bytes() if path.is_file() else "dir"
            state[f"file.{path.relative_to(self.out)}"] = content
        return state


def _fingerprint(t: torch.Tensor) -> tuple[torch.dtype, tuple[int, ...], bytes]:
    raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)  # NaN-safe: bytes
    return t.dtype, tuple(t.shape), raw.numpy().tobytes()


Prepare = Callable[[Ctx], Callable[[], object]]


@dataclass(frozen=True)
class Bad:
    id: str
    input: str  # what is wrong, in words
    where: str  # the entry point
    error: type[BaseException]
    match: str  # regex: the message names the argument or value
    prepare: Prepare  # sets up (before the snapshot) and returns the failing call
    #: Lightning loads a checkpoint's weights into the model before any callback runs;
    #: for these cases the model must then hold exactly the checkpoint's weights.
    loads_checkpoint: str | None = None


# --------------------------------------------------------------------- helpers
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))


def weights(ctx: Ctx) -> torch.Tensor:
    t = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    ctx.tensors["t"] = t
    return t


def call(fn: Callable[..., object], *args: Any, **kwargs: Any) -> Prepare:
    """A case calling ``fn(*args, **kwargs)``; an argument ``T`` becomes the watched tensor."""

    def prepare(ctx: Ctx) -> Callable[[], object]:
        real = [weights(ctx) if a is T else a for a in args]
        return lambda: fn(*real, **kwargs)

    return prepare


T = object()  # placeholder for the watched input tensor


def on_mlp(action: Callable[[nn.Module], object]) -> Prepare:
    def prepare(ctx: Ctx) -> Callable[[], object]:
        return lambda: action(ctx.model)

    return prepare


def on_pruner(
    action: Callable[[Pruner], object],
    setup: Callable[[Pruner], object] | None = None,
    **kwargs: Any,
) -> Prepare:
    """A Pruner on the watched model, optionally set up first (before the snapshot)."""

    def prepare(ctx: Ctx) -> Callable[[], object]:
        pruner = Pruner(ctx.model, **kwargs)
        if setup is not None:
            setup(pruner)
        return lambda: action(pruner)

    return prepare


def with_nan(ctx: Ctx) -> None:
    with torch.no_grad():
        ctx.model[2].weight[1, 3] = math.nan


def fit_tiny(pruning: Callable[[], Pruning], model: Callable[[], nn.Module] = TinyNet) -> Prepare:
    def prepare(ctx: Ctx) -> Callable[[], object]:
        ctx.model = model()
        fit = trainer(max_steps=2, callbacks=[pruning()], default_root_dir=ctx.out)
        return lambda: fit.fit(ctx.model, loader())

    return prepare


def saved_checkpoint(ctx: Ctx, schedule: Any = None) -> Path:
    """A real Lightning checkpoint of TinyNet with a Pruning callback, written under root."""
    folder = ctx.root / "ckpt"
    saver = ModelCheckpoint(folder, filename="last")
    fit = trainer(
        max_steps=2,
        callbacks=[Pruning(schedule or Constant(0.5)), saver],
        enable_checkpointing=True,
        default_root_dir=folder,
    )
    fit.fit(TinyNet(), loader())
    return folder / "last.ckpt"


def ckpt_in(ctx: Ctx, kind: str) -> str:
    path = saved_checkpoint(ctx)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


def fashion_dm(ctx: Ctx) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(batch_size=60, subset=600, val_size=100)


def run_cli(*args: str) -> Prepare:
    """``prunekit ARGS`` in-process; ``{out}`` / ``{root}`` in args are the case's folders."""

    def prepare(ctx: Ctx) -> Callable[[], object]:
        argv = [a.format(out=ctx.out, root=ctx.root) for a in args]

        def invoke() -> None:
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                try:
                    status = cli.main(argv)
                except SystemExit as e:  # argparse
                    status = int(e.code or 0)
            if status:
                raise CliError(status, stderr.getvalue())

        return invoke

    return prepare


def cli_file(name: str, text: str, *args: str) -> Prepare:
    """Write a file under root (not the watched folder), then run the CLI."""

    def prepare(ctx: Ctx) -> Callable[[], object]:
        (ctx.root / name).write_text(text)
        return run_cli(*args)(ctx)

    return prepare


def truncated_dense(ctx: Ctx) -> Callable[[], object]:
    path = ctx.root / "dense.pt"
    torch.save({"fc1.weight": torch.zeros(300, 784)}, path)
    path.write_bytes(path.read_bytes()[:200])
    return run_cli("run", str(QUICK), f"out_dir={ctx.out}", f"dense.checkpoint={path}")(ctx)


def foreign_dense(ctx: Ctx) -> Callable[[], object]:
    path = ctx.root / "other.pt"
    torch.save(mlp().state_dict(), path)
    return run_cli("run", str(QUICK), f"out_dir={ctx.out}", f"dense.checkpoint={path}")(ctx)


def corrupt_data(ctx: Ctx) -> Callable[[], object]:
    folder = ctx.root / "data"
    folder.mkdir()
    for f in Path(DEFAULT_DATA_DIR).iterdir():  # the real files, but one of them cut short
        if f.name == "t10k-labels-idx1-ubyte.gz":
            (folder / f.name).write_bytes(f.read_bytes()[:-100])
        else:
            (folder / f.name).symlink_to(f)
    return lambda: load_fashion_mnist(folder)


def resume_other_schedule(ctx: Ctx) -> Callable[[], object]:
    path = saved_checkpoint(ctx, Constant(0.5))
    ctx.model = TinyNet()
    fit = trainer(max_steps=4, callbacks=[Pruning(Constant(0.7))], default_root_dir=ctx.out)
    return lambda: fit.fit(ctx.model, loader(), ckpt_path=str(path))


def resume_other_targets(ctx: Ctx) -> Callable[[], object]:
    path = saved_checkpoint(ctx, Constant(0.5))
    state = torch.load(path, weights_only=False)
    key = next(k for k in state["callbacks"] if k.startswith("Pruning"))
    state["callbacks"][key]["pruner"]["masks"].pop("net.4.weight")
    torch.save(state, path)
    ctx.model = TinyNet()
    fit = trainer(max_steps=4, callbacks=[Pruning(Constant(0.5))], default_root_dir=ctx.out)
    return lambda: fit.fit(ctx.model, loader(), ckpt_path=str(path))


def resume_with(saved: dict[str, Any], **kwargs: Any) -> Prepare:
    """Resume a checkpoint written by ``Pruning(Constant(0.5), **saved)`` with ``Pruning(Constant(0.5), **kwargs)``."""

    def prepare(ctx: Ctx) -> Callable[[], object]:
        folder = ctx.root / "ckpt"
        fit = trainer(
            max_steps=2,
            callbacks=[*_prunings(saved), ModelCheckpoint(folder, filename="last")],
            enable_checkpointing=True,
            default_root_dir=folder,
        )
        fit.fit(TinyNet(), loader())
        ctx.model = TinyNet()
        fit = trainer(max_steps=4, callbacks=_prunings(kwargs), default_root_dir=ctx.out)
        return lambda: fit.fit(ctx.model, loader(), ckpt_path=str(folder / "last.ckpt"))

    return prepare


def _prunings(kwargs: dict[str, Any]) -> list[Pruning]:
    """One Pruning callback, or one per entry of ``kwargs['names']``."""
    names = kwargs.pop("names", None)
    if names is None:
        return [Pruning(Constant(0.5), **kwargs)]
    return [Pruning(Constant(0.5), name=n, targets=t, **kwargs) for n, t in names]


def pair_target(module: Callable[[TinyNet], nn.Module], pname: str) -> Prepare:
    """Fit TinyNet with ``Pruning(targets=[(module(model), pname)])``."""

    def prepare(ctx: Ctx) -> Callable[[], object]:
        ctx.model = TinyNet()
        pruning = Pruning(Constant(0.5), targets=[(module(ctx.model), pname)])
        fit = trainer(max_steps=2, callbacks=[pruning], default_root_dir=ctx.out)
        return lambda: fit.fit(ctx.model, loader())

    return prepare


def two_on_one_weight(ctx: Ctx) -> Callable[[], object]:
    ctx.model = TinyNet()
    both = [
        Pruning(Constant(0.5), name="a"),
        Pruning(Constant(0.2), targets="net.2.weight", name="b"),
    ]
    fit = trainer(max_steps=2, callbacks=both, default_root_dir=ctx.out)
    return lambda: fit.fit(ctx.model, loader())


def rewind_other(ctx: Ctx) -> Callable[[], object]:
    point = RewindPoint(step=0)
    trainer(max_steps=1, callbacks=[point], default_root_dir=ctx.root).fit(TinyNet(), loader())
    return lambda: point.rewind(ctx.model)  # ctx.model: a plain MLP, not TinyNet


def no_validation(ctx: Ctx) -> Callable[[], object]:
    ctx.model = TinyNet()
    fit = trainer(
        max_steps=2,
        limit_val_batches=0,
        callbacks=[Pruning(Constant(0.5), after_validation=True)],
        default_root_dir=ctx.out,
    )
    return lambda: fit.fit(ctx.model, loader(), loader(length=2))


def two_unnamed(ctx: Ctx) -> Callable[[], object]:
    ctx.model = TinyNet()
    fit = trainer(
        max_steps=2,
        callbacks=[Pruning(Constant(0.5), targets="net.0.weight")],
        default_root_dir=ctx.out,
    )
    fit.callbacks.append(
        Pruning(Constant(0.5), targets="net.2.weight")
    )  # after the Trainer's own check
    return lambda: fit.fit(ctx.model, loader())


def fit_helper_truncated(ctx: Ctx) -> Callable[[], object]:
    from prunekit.experiments.module import Classifier

    path = ckpt_in(ctx, "truncated")
    ctx.model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), optimizer="sgd", lr=0.1)
    return lambda: run_fit(
        ctx.model, fashion_dm(ctx), max_steps=2, val_every=1, log_dir=ctx.out, ckpt_path=path
    )


def unwritable(ctx: Ctx) -> Callable[[], object]:
    blocker = ctx.root / "a-file"
    blocker.write_text("")
    return lambda: check_writable(blocker / "run")


def yaml_typo(ctx: Ctx) -> Callable[[], object]:
    path = ctx.root / "typo.yaml"
    path.write_text("name: x\nsteps: 5\ndata:\n  bath_size: 3\n")
    return lambda: load_config(GradualConfig, path)


def config(*overrides: str) -> Prepare:
    return lambda ctx: lambda: load_config(GradualConfig, QUICK, list(overrides))


def bad_packed(pruner: Pruner) -> None:
    state = pruner.state_dict()
    state["masks"]["0.weight"]["packed"] = state["masks"]["0.weight"]["packed"][:-1]
    pruner.load_state_dict(state)


def other_model_state(pruner: Pruner) -> None:
    pruner.load_state_dict(
        Pruner(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))).state_dict()
    )


def corrupt_state(how: str) -> Callable[[Pruner], object]:
    """load_state_dict of this Pruner's own state (pruned to 0.5 first), corrupted ``how``."""

    def load(pruner: Pruner) -> None:
        state = pruner.state_dict()
        entry = state["masks"]["2.weight"]  # 24 entries: three bytes
        if how == "updates":
            state["updates"] = "3"
        elif how == "updates-negative":
            state["updates"] = -2
        elif how == "format":
            state["format"] = 2
        elif how == "list":
            entry["packed"] = entry["packed"].tolist()
        elif how == "dtype":
            entry["packed"] = entry["packed"].to(torch.int32)
        elif how == "shape-strings":
            entry["shape"] = ["4", "6"]
        elif how == "entry":
            state["masks"]["2.weight"] = entry["packed"]
        elif how == "masks-list":
            state["masks"] = list(state["masks"].values())
        pruner.load_state_dict(state)

    return load


def padding_bits(ctx: Ctx) -> Callable[[], object]:
    """A state whose last packed byte has a bit set past the mask's 15 entries."""
    ctx.model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    pruner = Pruner(ctx.model)
    pruner.prune_to(0.5)
    state = pruner.state_dict()
    state["masks"]["0.weight"]["packed"][-1] |= 0x80
    return lambda: pruner.load_state_dict(state)


def tied_model(ctx: Ctx) -> nn.Module:
    ctx.model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    ctx.model[1].weight = ctx.model[0].weight
    return ctx.model


def parametrized(ctx: Ctx, kind: str) -> nn.Module:
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    ctx.model = nn.Sequential(getattr(parametrizations, kind)(nn.Linear(8, 6)), nn.Linear(6, 2))
    return ctx.model


def replaced(ctx: Ctx, how: str) -> Callable[[], object]:
    """A Pruner built, then the model's 2.weight replaced (``how``) before its next use."""
    pruner = Pruner(ctx.model)
    pruner.prune_to(0.5)
    if how == "shape":
        ctx.model[2].weight = nn.Parameter(torch.ones(3, 6))
    else:
        del ctx.model[2].weight
    return lambda: pruner.prune_to(0.6)


class NotAnOptimizer:
    optimizer = "sgd"  # an object wrapping something that is not an optimizer


# ---------------------------------------------- helpers: run folders (configs, data, CLI)
import errno  # noqa: E402
import fcntl  # noqa: E402
import os  # noqa: E402
from unittest import mock  # noqa: E402

from prunekit.experiments.config import LotteryConfig  # noqa: E402
from prunekit.experiments.models import build_model  # noqa: E402
from prunekit.experiments.paths import (  # noqa: E402
    RunFolderError,
    RunPaths,
    atomic_write,
    save_torch,
    write_config,
)

QUICK_LOTTERY = REPO / "experiments" / "configs" / "quick_lottery.yaml"
HOLDER = "pid 4242 on host elsewhere since 2026-01-01T00:00:00+00:00"


def earlier_run(command: str, make: Callable[[Path], object], *overrides: str) -> Prepare:
    """``prunekit COMMAND <quick config> out_dir=<out> OVERRIDES`` on the run folder an
    earlier run left (``config.yaml``, an emptied ``run.lock``), where ``make`` writes
    the damaged or foreign files."""

    def prepare(ctx: Ctx) -> Callable[[], object]:
        schema, path = (
            (GradualConfig, QUICK) if command == "run" else (LotteryConfig, QUICK_LOTTERY)
        )
        cfg = load_config(schema, path, [f"out_dir={ctx.out}", *overrides])
        paths = RunPaths.for_config(cfg)
        paths.root.mkdir(parents=True)
        write_config(paths.config, cfg)
        paths.lock.write_text("")
        make(paths.root)
        invoke = run_cli(command, str(path), "out_dir={out}", *overrides)(ctx)

        def call() -> None:
            try:
                invoke()
            finally:
                release_locks()

        return call

    return prepare


def cut(path: Path, data: object = None) -> None:
    """A torch file (or JSON text) cut in half, as a full disk or a copy interrupted leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data[: len(data) // 2])
        return
    torch.save(data if data is not None else {"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def lenet_weights(path: Path) -> None:
    torch.save(build_model("lenet_300_100").state_dict(), path)


def finished_round(root: Path) -> None:
    """Round 0 of a quick lottery run: init.pt, round_00/lottery.{json,pt} (valid)."""
    lenet_weights(root / "init.pt")
    (root / "round_00").mkdir()
    (root / "round_00" / "lottery.json").write_text('{"round": 0, "variant": "lottery"}')
    weights = build_model("lenet_300_100").state_dict()
    masks = {
        k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items() if k.endswith("weight")
    }
    torch.save({"masks": masks, "weights": weights}, root / "round_00" / "lottery.pt")


def locked_by_another(root: Path) -> None:
    """Hold ``run.lock`` as another process would (a separate open file: flock conflicts)."""
    fd = os.open(RunPaths(root).lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{HOLDER}\n".encode())
    _HELD.append(fd)  # released after the call (earlier_run)


_HELD: list[int] = []


def release_locks() -> None:
    while _HELD:
        os.close(_HELD.pop())


def symlinked_run_folder(ctx: Ctx) -> Callable[[], object]:
    cfg = load_config(GradualConfig, QUICK, [f"out_dir={ctx.out}"])
    elsewhere = ctx.root / "elsewhere"
    elsewhere.mkdir()
    RunPaths.for_config(cfg).root.symlink_to(elsewhere, target_is_directory=True)
    return lambda: RunPaths.for_config(cfg)


def disk_full(ctx: Ctx) -> Callable[[], object]:
    def write(tmp: Path) -> None:
        tmp.write_text("{...")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    return lambda: atomic_write(ctx.out / "summary.json", write)


def torch_save_fails(ctx: Ctx) -> Callable[[], object]:
    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] basic_ios::clear: iostream error"
        )

    def call() -> None:
        with mock.patch.object(torch, "save", full):
            save_torch(ctx.out / "final.pt", {"w": torch.zeros(3)})

    return call


# ------------------------------------------------------------------ catalogue
V, Ty = ValueError, TypeError
# fmt: off
CATALOGUE: list[Bad] = [
    # ---- engine: tensor-level functions
    Bad("amount-above-one", "amount=1.5", "magnitude_mask", V, r"amount=1\.5 must be a fraction in \[0, 1\]", call(prunekit.magnitude_mask, T, 1.5)),
    Bad("amount-nan", "amount=nan", "magnitude_mask", V, r"amount=nan", call(prunekit.magnitude_mask, T, math.nan)),
    Bad("amount-negative-count", "amount=-1 (an int count)", "magnitude_mask", V, r"amount=-1 must be a count in \[0, 48\]", call(prunekit.magnitude_mask, T, -1)),
    Bad("amount-count-too-large", "amount=49 for 48 entries", "magnitude_mask", V, r"amount=49 must be a count in \[0, 48\]", call(prunekit.magnitude_mask, T, 49)),
    Bad("amount-string", "amount='0.5'", "magnitude_mask", Ty, r"amount='0\.5' must be a float", call(prunekit.magnitude_mask, T, "0.5")),
    Bad("amount-bool", "amount=True", "random_mask", Ty, r"amount=True", call(prunekit.random_mask, T, True)),
    Bad("tensor-int", "an int64 tensor", "magnitude_mask", Ty, r"t must be a floating-point tensor, got dtype torch\.int64", call(prunekit.magnitude_mask, torch.arange(6), 0.5)),
    Bad("tensor-list", "a list instead of a tensor", "magnitude_mask", Ty, r"t must be a torch\.Tensor, got list", call(prunekit.magnitude_mask, [1.0, 2.0], 0.5)),
    Bad("tensor-nan", "a NaN in the tensor", "magnitude_mask", V, r"t holds NaN or inf", lambda ctx: (lambda t: lambda: prunekit.magnitude_mask(t, 0.5))(_nan_tensor(ctx))),
    Bad("scores-inf", "an inf in scores", "magnitude_mask(scores=...)", V, r"scores holds 1 NaN or inf", call(prunekit.magnitude_mask, T, 0.5, scores=torch.tensor([math.inf] + [1.0] * 47).view(6, 8))),
    Bad("scores-shape", "scores of another shape", "magnitude_mask(scores=...)", V, r"scores has shape \(8, 6\), expected \(6, 8\)", call(prunekit.magnitude_mask, T, 0.5, scores=torch.ones(8, 6))),
    Bad("mask-float", "a float mask", "magnitude_mask(mask=...)", Ty, r"mask must be a torch\.bool tensor .* got torch\.float32", call(prunekit.magnitude_mask, T, 0.5, mask=torch.ones(6, 8))),
    Bad("mask-shape", "a mask of another shape", "magnitude_mask(mask=...)", V, r"mask has shape \(8, 6\), expected \(6, 8\)", call(prunekit.magnitude_mask, T, 0.5, mask=torch.ones(8, 6, dtype=torch.bool))),
    Bad("mask-shrinks-only", "amount below what the given mask already prunes", "magnitude_mask(mask=...)", V, r"amount=0\.1 asks for 5 pruned of 48, but the given mask already prunes 24; masks only shrink", call(prunekit.magnitude_mask, T, 0.1, mask=torch.arange(48).view(6, 8) % 2 == 0)),
    Bad("ln-order", "n=3 (not 0, 1, 2, inf)", "ln_structured_mask", V, r"n=3 must be one of 0, 1, 2, inf", call(prunekit.ln_structured_mask, T, 0.5, n=3)),
    Bad("dim-out-of-range", "dim=5 for a 2-d tensor", "ln_structured_mask", V, r"dim=5 is out of range for a tensor with 2 dimensions", call(prunekit.ln_structured_mask, T, 0.5, dim=5)),
    Bad("dim-float", "dim=0.0", "random_structured_mask", Ty, r"dim=0\.0 must be an int", call(prunekit.random_structured_mask, T, 0.5, dim=0.0)),
    Bad("nm-n-above-m", "n=3, m=2", "nm_mask", V, r"n=3, m=2: need 0 < n <= m", call(prunekit.nm_mask, T, 3, 2)),
    Bad("nm-m-not-dividing", "m=3 for rows of 8", "nm_mask", V, r"m=3 does not divide the size 8 of dim=1", call(prunekit.nm_mask, T, 2, 3)),
    Bad("nm-n-float", "n=2.0", "nm_mask", Ty, r"n=2\.0 must be an int", call(prunekit.nm_mask, T, 2.0, 4)),
    Bad("nm-nan", "a NaN in the tensor", "nm_mask", V, r"t holds 1 NaN or inf", lambda ctx: (lambda t: lambda: prunekit.nm_mask(t, 2, 4))(_nan_tensor(ctx))),
    Bad("method-unknown", "method='l1'", "prune", V, r"method='l1' is not a pruning method; choose one of \[", call(prunekit.prune, T, "l1", 0.5)),
    Bad("method-no-amount", "no amount for magnitude", "prune", Ty, r"method='magnitude' needs an amount", call(prunekit.prune, T, "magnitude")),
    Bad("method-duplicate", "registering 'magnitude' again", "register_method", V, r"'magnitude' is already registered", lambda ctx: lambda: prunekit.register_method("magnitude")(lambda t, a: t > 0)),
    Bad("global-empty", "no tensors", "global_magnitude_masks", V, r"named_tensors is empty", call(prunekit.global_magnitude_masks, {}, 0.5)),
    # ---- engine: Pruner
    Bad("pruner-not-module", "a state_dict instead of a module", "Pruner", Ty, r"model must be a torch\.nn\.Module, got OrderedDict", lambda ctx: lambda: Pruner(ctx.model.state_dict())),
    Bad("pruner-scope", "scope='model'", "Pruner", V, r"scope='model' must be one of \('global', 'layer'\)", on_mlp(lambda m: Pruner(m, scope="model"))),
    Bad("pruner-method", "method='l3'", "Pruner", V, r"method='l3' is not a pruning method", on_mlp(lambda m: Pruner(m, method="l3"))),
    Bad("pruner-global-structured", "scope='global' with ln_structured", "Pruner", V, r"scope='global' ranks single weights across layers; method='ln_structured'", on_mlp(lambda m: Pruner(m, method="ln_structured"))),
    Bad("pruner-target-typo", "targets='0.wieght'", "Pruner", V, r"targets entry '0\.wieght' matches no parameter of Sequential \(did you mean '0\.weight'", on_mlp(lambda m: Pruner(m, targets="0.wieght"))),
    Bad("pruner-target-type", "targets=[nn.Conv2d] in an MLP", "Pruner", V, r"targets entry Conv2d matches no module", on_mlp(lambda m: Pruner(m, targets=[nn.Conv2d]))),
    Bad("pruner-exclude-all", "exclude='*'", "Pruner", V, r"no parameter of Sequential is left to prune .*exclude='\*'", on_mlp(lambda m: Pruner(m, exclude="*"))),
    Bad("pruner-no-prunable", "a model with no prunable parameters", "Pruner", V, r"no parameter of Sequential is left to prune", lambda ctx: lambda: Pruner(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))),
    Bad("pruner-option", "an unknown method option foo=1", "Pruner", V, r"option\(s\) \['foo'\] are not options of method='magnitude'", on_mlp(lambda m: Pruner(m, foo=1))),
    Bad("pruner-seed", "seed='x'", "Pruner", Ty, r"seed='x' must be an int", on_mlp(lambda m: Pruner(m, seed="x"))),
    Bad("pruner-nm-m", "nm with m=3 for 8 inputs", "Pruner", V, r"m=3 does not divide size 8 of dim=-1 of 0\.weight", on_mlp(lambda m: Pruner(m, method="nm", scope="layer", m=3))),
    Bad("pruner-override-sparsity", "a target's own sparsity=2.0", "Pruner(targets={...})", V, r"targets\['0\.weight'\]\['sparsity'\]=2\.0", on_mlp(lambda m: Pruner(m, targets={"0.weight": {"sparsity": 2.0}}))),
    Bad("prune-to-above-one", "sparsity=1.5", "Pruner.prune_to", V, r"sparsity=1\.5 must be a fraction", on_pruner(lambda p: p.prune_to(1.5))),
    Bad("prune-to-nan", "sparsity=nan", "Pruner.prune_to", V, r"sparsity=nan", on_pruner(lambda p: p.prune_to(math.nan))),
    Bad("prune-to-typo", "sparsity={'4.wieght': 0.5}", "Pruner.prune_to", V, r"sparsity names '4\.wieght', not a target \(did you mean '4\.weight'", on_pruner(lambda p: p.prune_to({"4.wieght": 0.5}))),
    Bad("prune-to-lower", "a lower sparsity than already reached", "Pruner.prune_to", V, r"sparsity=0\.2 asks for .* but .* already are; masks only shrink", on_pruner(lambda p: p.prune_to(0.2), setup=lambda p: p.prune_to(0.5))),
    Bad("prune-to-nan-weights", "NaN weights at prune time (global)", "Pruner.prune_to", V, r"2\.weight holds NaN or inf values", lambda ctx: (with_nan(ctx), on_pruner(lambda p: p.prune_to(0.5))(ctx))[1]),
    Bad("prune-to-nan-weights-layer", "NaN weights at prune time (layer)", "Pruner.prune_to", V, r"2\.weight holds 1 NaN or inf values", lambda ctx: (with_nan(ctx), on_pruner(lambda p: p.prune_to(0.5), scope="layer"))[1](ctx)),
    Bad("prune-to-scores-dtype", "integer scores", "Pruner.prune_to(scores=...)", Ty, r"scores\['0\.weight'\] must be a floating-point tensor", on_pruner(lambda p: p.prune_to(0.5, scores={"0.weight": torch.ones(6, 8, dtype=torch.long)}))),
    Bad("prune-to-scores-partial", "scores for one of the globally ranked targets", "Pruner.prune_to(scores=...)", V, r"scores must cover all of the 3 globally ranked targets or none", on_pruner(lambda p: p.prune_to(0.5, scores={"0.weight": torch.rand(6, 8)}))),
    Bad("set-masks-float", "a float custom mask", "Pruner.set_masks", V, r"masks\['0\.weight'\] must be a bool tensor of shape \(6, 8\)", on_pruner(lambda p: p.set_masks({"0.weight": torch.ones(6, 8)}))),
    Bad("attach-not-optimizer", "attach('sgd')", "Pruner.attach", Ty, r"optimizer must be a torch\.optim\.Optimizer, got str", on_pruner(lambda p: p.attach("sgd"))),
    Bad("attach-cache-masks", "attach(optimizer, cache_masks='yes')", "Pruner.attach", Ty, r"cache_masks='yes' must be None, True or False", on_pruner(lambda p: p.attach(torch.optim.SGD(p.model.parameters(), lr=0.1), cache_masks="yes"))),
    Bad("attach-foreign-optimizer", "an optimizer over another model", "Pruner.attach", V, r"optimizer holds none of the pruned parameters", on_pruner(lambda p: p.attach(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)))),
    Bad("state-other-model", "a Pruner state_dict from another model", "Pruner.load_state_dict", V, r"state_dict belongs to another model or target set: missing \['4\.weight'\]", on_pruner(other_model_state)),
    Bad("state-not-a-state", "a dict without masks", "Pruner.load_state_dict", V, r"state is not a Pruner state_dict \(no 'masks' entry\)", on_pruner(lambda p: p.load_state_dict({"weights": {}}))),
    Bad("state-corrupt-packed", "a packed mask one byte short", "Pruner.load_state_dict", V, r"packed mask has 5 torch\.uint8 bytes; shape \(6, 8\) needs 6", on_pruner(bad_packed)),
    Bad("pruner-removed", "prune_to after remove()", "Pruner.prune_to", RuntimeError, r"this Pruner was removed; create a new one", on_pruner(lambda p: p.prune_to(0.5), setup=lambda p: p.remove())),
    Bad("prune-to-count-too-large", "sparsity=81 for 80 target weights", "Pruner.prune_to", V, r"sparsity=81 must be a count in \[0, 80\]", on_pruner(lambda p: p.prune_to(81))),
    Bad("prune-to-negative-count", "sparsity=-3", "Pruner.prune_to", V, r"sparsity=-3 must be a count >= 0", on_pruner(lambda p: p.prune_to(-3))),
    Bad("prune-to-numpy-bool", "sparsity=np.bool_(True)", "Pruner.prune_to", Ty, r"sparsity=np\.True_ must be a float in \[0, 1\] or an int count", on_pruner(lambda p: p.prune_to(np.bool_(True)))),
    Bad("prune-to-numpy-nan", "sparsity=np.float64(nan)", "Pruner.prune_to", V, r"sparsity=nan must be a fraction", on_pruner(lambda p: p.prune_to(np.float64("nan")))),
    Bad("prune-to-tensor", "sparsity=torch.ones(2) (not a 0-d tensor)", "Pruner.prune_to", Ty, r"sparsity=tensor\(\[1\., 1\.\]\) must be a float in \[0, 1\] or an int count", on_pruner(lambda p: p.prune_to(torch.ones(2)))),
    Bad("prune-to-scores-inf", "an inf in a target's scores", "Pruner.prune_to(scores=...)", V, r"scores\['0\.weight'\] holds 1 NaN or inf", on_pruner(lambda p: p.prune_to(0.5, scores={"0.weight": torch.tensor([math.inf] + [1.0] * 47).view(6, 8)}), scope="layer")),
    Bad("prune-to-scores-shape", "scores of another shape", "Pruner.prune_to(scores=...)", V, r"scores\['0\.weight'\] has shape \(8, 6\), expected \(6, 8\)", on_pruner(lambda p: p.prune_to(0.5, scores={"0.weight": torch.ones(8, 6)}), scope="layer")),
    Bad("prune-to-no-statistics", "method='taylor', prune_to before any backward", "Pruner.prune_to", RuntimeError, r"method='taylor' ranks 0\.weight by its gradients .*call pruner\.calibrate\(batches, loss_fn\)", on_pruner(lambda p: p.prune_to(0.5), method="taylor")),
    Bad("prune-to-nan-statistics", "inf inputs seen by calibrate (wanda)", "Pruner.prune_to", V, r"method='wanda': the scores of 0\.weight holds \d+ NaN or inf", on_pruner(lambda p: p.prune_to(0.5), setup=lambda p: p.calibrate([torch.full((2, 8), math.inf)]), method="wanda")),
    Bad("calibrate-no-loss", "calibrate(batches) for method='taylor'", "Pruner.calibrate", V, r"\['taylor'\] rank by gradients: give calibrate a loss_fn", on_pruner(lambda p: p.calibrate([torch.randn(2, 8)]), method="taylor")),
    Bad("calibrate-tensor", "calibrate(x): one tensor, not an iterable of batches", "Pruner.calibrate", Ty, r"batches must be an iterable of batches, got Tensor \(wrap one tensor as \[x\]\)", on_pruner(lambda p: p.calibrate(torch.randn(2, 8)), method="wanda")),
    Bad("pruner-wanda-per-output-global", "wanda with per_output=True and scope='global'", "Pruner", V, r"method='wanda' does not with per_output=True", on_mlp(lambda m: Pruner(m, method="wanda", per_output=True))),
    Bad("method-unknown-statistic", "Method(..., needs=('hessian',))", "Method", V, r"method 'x': needs statistic 'hessian'", lambda ctx: lambda: prunekit.Method("x", prunekit.taylor_mask, ranks="entries", needs=("hessian",), score=lambda w, s: w)),
    Bad("pruner-spec-type", "targets={'0.weight': 3}", "Pruner(targets={...})", Ty, r"targets\['0\.weight'\]=3 must be None, a method name or a dict", on_mlp(lambda m: Pruner(m, targets={"0.weight": 3}))),
    Bad("pruner-spec-option", "a spec with an option its method lacks", "Pruner(targets={...})", V, r"targets\['0\.weight'\]: option\(s\) \['n'\] are not options of method='magnitude'", on_mlp(lambda m: Pruner(m, targets={"0.weight": {"n": 2}}))),
    Bad("pruner-tied-two-specs", "one tied weight given two settings", "Pruner(targets={...})", V, r"'0\.weight' and '1\.weight' are one tied parameter with two different settings: targets\['0\.weight'\]='magnitude' and targets\['1\.weight'\]='random'", lambda ctx: (lambda m: lambda: Pruner(m, scope="layer", targets={"0.weight": "magnitude", "1.weight": "random"}))(tied_model(ctx))),
    Bad("pruner-parametrized", "a spectral_norm layer among the default targets", "Pruner", V, r"0\.weight is computed by the parametrization\(s\) \['_SpectralNorm'\].*exclude='0\.parametrizations\.weight\.original\*'", lambda ctx: (lambda m: lambda: Pruner(m))(parametrized(ctx, "spectral_norm"))),
    Bad("prune-to-weight-norm-row", "a sparsity that would prune a whole row of a weight_norm direction", "Pruner.prune_to", V, r"0\.parametrizations\.weight\.original1 is the direction v of weight_norm\(0\.weight\); pruning would zero \d+ whole slice", lambda ctx: (lambda m: lambda: Pruner(m).prune_to(0.99))(parametrized(ctx, "weight_norm"))),
    Bad("set-masks-weight-norm-row", "a custom mask pruning a whole row of a weight_norm direction", "Pruner.set_masks", V, r"direction v of weight_norm\(0\.weight\); pruning would zero 1 whole slice", lambda ctx: (lambda m: lambda: Pruner(m).set_masks({"0.parametrizations.weight.original1": torch.arange(48).view(6, 8) >= 8}))(parametrized(ctx, "weight_norm"))),
    Bad("set-masks-not-mapping", "a list of masks", "Pruner.set_masks", Ty, r"masks must be a mapping from target name to bool mask, got list", on_pruner(lambda p: p.set_masks([torch.ones(6, 8, dtype=torch.bool)]))),
    Bad("set-masks-typo", "masks={'0.wieght': ...}", "Pruner.set_masks", V, r"masks names '0\.wieght', not a target \(did you mean '0\.weight'", on_pruner(lambda p: p.set_masks({"0.wieght": torch.ones(6, 8, dtype=torch.bool)}))),
    Bad("attach-wrapper-not-optimizer", "an object whose .optimizer is not an optimizer", "Pruner.attach", Ty, r"optimizer must be a torch\.optim\.Optimizer, got NotAnOptimizer", on_pruner(lambda p: p.attach(NotAnOptimizer()))),
    Bad("replaced-other-shape", "2.weight replaced by a parameter of another shape", "Pruner.prune_to", RuntimeError, r"parameter '2\.weight' was replaced by one of shape \(3, 6\); its mask has shape \(4, 6\)", lambda ctx: replaced(ctx, "shape")),
    Bad("replaced-removed", "2.weight deleted from the model", "Pruner.prune_to", RuntimeError, r"target '2\.weight' is no longer a parameter of the model", lambda ctx: replaced(ctx, "removed")),
    Bad("state-updates-type", "updates='3'", "Pruner.load_state_dict", Ty, r"state_dict updates='3' must be an int", on_pruner(corrupt_state("updates"), setup=lambda p: p.prune_to(0.5))),
    Bad("state-updates-negative", "updates=-2", "Pruner.load_state_dict", V, r"state_dict updates=-2 must be >= 0", on_pruner(corrupt_state("updates-negative"), setup=lambda p: p.prune_to(0.5))),
    Bad("state-format", "format=2", "Pruner.load_state_dict", V, r"state_dict format=2 is not 1", on_pruner(corrupt_state("format"), setup=lambda p: p.prune_to(0.5))),
    Bad("state-packed-list", "a packed mask given as a list", "Pruner.load_state_dict", Ty, r"state_dict mask '2\.weight': packed mask must be a torch\.uint8 tensor, got list", on_pruner(corrupt_state("list"), setup=lambda p: p.prune_to(0.5))),
    Bad("state-packed-dtype", "a packed mask of int32", "Pruner.load_state_dict", V, r"state_dict mask '2\.weight': packed mask has 3 torch\.int32 bytes", on_pruner(corrupt_state("dtype"), setup=lambda p: p.prune_to(0.5))),
    Bad("state-padding-bits", "a bit set past the mask's entries in its last packed byte", "Pruner.load_state_dict", V, r"state_dict mask '0\.weight': packed mask has bits set past its 15 entries", padding_bits),
    Bad("state-shape-strings", "shape=['4', '6']", "Pruner.load_state_dict", Ty, r"state_dict mask '2\.weight' has shape=\['4', '6'\]; need a list of ints", on_pruner(corrupt_state("shape-strings"), setup=lambda p: p.prune_to(0.5))),
    Bad("state-entry", "a mask entry that is not a dict", "Pruner.load_state_dict", V, r"state_dict mask '2\.weight' must be a dict with 'shape' and 'packed'", on_pruner(corrupt_state("entry"), setup=lambda p: p.prune_to(0.5))),
    Bad("state-masks-list", "masks given as a list", "Pruner.load_state_dict", Ty, r"state_dict masks must be a mapping, got list", on_pruner(corrupt_state("masks-list"), setup=lambda p: p.prune_to(0.5))),
    Bad("pickle-attached", "pickle.dumps of an attached Pruner", "Pruner (pickle, copy.copy)", Ty, r"an attached Pruner cannot be pickled or shallow-copied .* save pruner\.state_dict\(\), or copy\.deepcopy it", on_pruner(lambda p: pickle.dumps(p), setup=lambda p: p.attach(torch.optim.SGD(p.model.parameters(), lr=0.1)))),
    Bad("attach-cache-masks-int", "attach(optimizer, cache_masks=1)", "Pruner.attach", Ty, r"cache_masks=1 must be None, True or False", on_pruner(lambda p: p.attach(torch.optim.SGD(p.model.parameters(), lr=0.1), cache_masks=1))),
    Bad("pruner-exclude-type", "exclude=5", "Pruner", Ty, r"exclude=5 must be a name, a glob or a list of them", on_mlp(lambda m: Pruner(m, exclude=5))),
    Bad("pruner-targets-type", "targets=5", "Pruner", Ty, r"targets=5 must be None, a name or glob, a module type, a list of those or a mapping", on_mlp(lambda m: Pruner(m, targets=5))),
    Bad("pruner-seed-range", "seed=2**80", "Pruner", V, r"seed=1208925819614629174706176 must be in \[-2\*\*40, 2\*\*40\)", on_mlp(lambda m: Pruner(m, seed=2**80))),
    Bad("prune-to-scores-type", "scores given as a list", "Pruner.prune_to(scores=...)", Ty, r"scores must be a mapping from target name to tensor, got list", on_pruner(lambda p: p.prune_to(0.5, scores=[torch.ones(6, 8)]))),
    Bad("prune-to-mapping-value", "sparsity={'0.weight': 'x'}", "Pruner.prune_to", Ty, r"sparsity\['0\.weight'\]='x' must be a float in \[0, 1\] or an int count", on_pruner(lambda p: p.prune_to({"0.weight": "x"}))),
    Bad("activation-amount", "amount=2.0", "ActivationPruning", V, r"amount=2\.0 must be in \[0, 1\]", on_mlp(lambda m: ActivationPruning(m[0], amount=2.0))),
    Bad("activation-method", "method='random'", "ActivationPruning", V, r"method='random' must be one of \('topk', 'channel'\)", on_mlp(lambda m: ActivationPruning(m[0], 0.5, method="random"))),
    # ---- engine: dependency groups, compaction, sparse checkpoints
    Bad("compact-no-masks", "neither masks nor pruner", "compact", V, r"compact needs exactly one of masks=\.\.\. or pruner=\.\.\.", on_mlp(lambda m: prunekit.compact(m, torch.zeros(1, 8)))),
    Bad("compact-incomplete-masks", "masks pruning 0.weight's row 0 but not its bias", "compact", V, r"0\.bias \(aux slice\) is still non-zero", on_mlp(lambda m: prunekit.compact(m, torch.zeros(1, 8), masks={"0.weight": torch.arange(48).view(6, 8) >= 8}))),
    Bad("compact-mask-shape", "a mask of another shape", "compact", V, r"masks\['0\.weight'\] must be a bool tensor of shape \(6, 8\)", on_mlp(lambda m: prunekit.compact(m, torch.zeros(1, 8), masks={"0.weight": torch.ones(8, 6, dtype=torch.bool)}))),
    Bad("groups-example-input", "example_input='x'", "DependencyGraph", Ty, r"example_input must be a tensor or a tuple of tensors, got str", on_mlp(lambda m: prunekit.DependencyGraph(m, "x"))),
    Bad("groups-scope", "scope='net'", "DependencyGraph.group_masks", V, r"scope='net' must be one of \('layer', 'global'\)", on_mlp(lambda m: prunekit.DependencyGraph(m, torch.zeros(1, 8)).group_masks(0.5, scope="net"))),
    Bad("groups-amount-all", "amount=1.0 (every group of a layer)", "DependencyGraph.group_masks", V, r"amount=1\.0 would remove every group \(6\) of layer '0'", on_mlp(lambda m: prunekit.DependencyGraph(m, torch.zeros(1, 8)).group_masks(1.0))),
    Bad("groups-reduce", "reduce='max'", "DependencyGraph.scores", V, r"reduce='max' must be 'normalized', 'mean' or 'sum'", on_mlp(lambda m: prunekit.DependencyGraph(m, torch.zeros(1, 8)).scores("max"))),
    Bad("groups-unknown-module", "a GRU reading a Linear's channels", "DependencyGraph", V, r"node '_1' \(call_module 1\): module type GRU is not supported on channels", lambda ctx: lambda: prunekit.DependencyGraph(nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 2)), torch.zeros(2, 1, 3))),
    Bad("sparse-not-packed", "a plain state_dict", "decompress_state_dict", V, r"not a prunekit-sparse checkpoint", on_mlp(lambda m: prunekit.decompress_state_dict(m.state_dict()))),
    Bad("semi-structured-dense", "targets=['0'] whose weight is dense", "to_semi_structured", V, r"targets entry '0': weight is not 2:4 sparse", on_mlp(lambda m: prunekit.to_semi_structured(m, targets=["0"]))),
    Bad("cli-export-not-a-run", "prunekit export <folder without config.yaml>", "prunekit export", CliError, r"prunekit export: error: .* is not a run folder \(no config\.yaml\)", run_cli("export", "{out}", "--compact")),
    # ---- schedules
    Bad("schedule-final-below-initial", "final < initial", "Polynomial", V, r"final=0\.2 must be >= initial=0\.5", lambda ctx: lambda: Polynomial(0.5, 0.2, begin=0, end=10)),
    Bad("schedule-final-one", "final=1.0 (everything pruned)", "Polynomial", V, r"final=1\.0 must be in \[0, 1\)", lambda ctx: lambda: Polynomial(0.0, 1.0, begin=0, end=10)),
    Bad("schedule-end-before-begin", "end <= begin", "Linear via from_dict", V, r"end=5 must be > begin=10", lambda ctx: (lambda: from_dict({"kind": "linear", "initial": 0.0, "final": 0.5, "begin": 10, "end": 5}))),
    Bad("schedule-frequency-zero", "frequency=0", "Polynomial", V, r"frequency=0 must be >= 1", lambda ctx: lambda: Polynomial(0.0, 0.9, begin=0, end=10, frequency=0)),
    Bad("schedule-power-nan", "power=nan", "Polynomial", V, r"power=nan must be a finite number > 0", lambda ctx: lambda: Polynomial(0.0, 0.9, begin=0, end=10, power=math.nan)),
    Bad("schedule-sparsity-nan", "sparsity=nan", "Constant", V, r"sparsity=nan must be in \[0, 1\)", lambda ctx: lambda: Constant(math.nan)),
    Bad("schedule-begin-str", "begin='10'", "Constant", Ty, r"begin='10' must be an int, got str", lambda ctx: lambda: Constant(0.5, begin="10")),
    Bad("schedule-steps-duplicate", "two points at the same time", "Steps", V, r"points\[1\] time=5 must be > the previous time 5", lambda ctx: lambda: Steps([(5, 0.5), (5, 0.6)])),
    Bad("schedule-rate-one", "rate=1.0", "Exponential", V, r"rate=1\.0 must be in \(0, 1\)", lambda ctx: lambda: Exponential(1.0)),
    Bad("schedule-kind-typo", "kind='polynomal'", "from_dict", V, r"unknown schedule kind='polynomal' \(did you mean 'polynomial'", lambda ctx: lambda: from_dict({"kind": "polynomal"})),
    Bad("schedule-key-typo", "key 'ned' instead of 'end'", "from_dict", V, r"unknown key 'ned' for schedule kind 'linear' \(did you mean 'end'\?\)", lambda ctx: (lambda: from_dict({"kind": "linear", "initial": 0.0, "final": 0.5, "begin": 0, "ned": 10}))),
    Bad("schedule-time-negative", "t=-1", "Schedule.__call__", V, r"t=-1 must be >= 0", lambda ctx: lambda: Constant(0.5)(-1)),
    Bad("schedule-time-float", "t=1.5", "Schedule.is_update", Ty, r"t=1\.5 must be an int, got float", lambda ctx: lambda: Constant(0.5).is_update(1.5)),
    Bad("schedule-callable-range", "a user function returning 1.5", "FromCallable", V, r"returned 1\.5; a sparsity must be in \[0, 1\)", lambda ctx: lambda: FromCallable(_too_much)(3)),
    Bad("lottery-plan-rate", "layer_rates={'output': 0}", "LotteryTicketPlan", V, r"layer_rates\['output'\]=0 must be in \(0, 1\)", lambda ctx: lambda: LotteryTicketPlan(rounds=3, rate=0.2, layer_rates={"output": 0})),
    # ---- callbacks
    Bad("callback-schedule-float", "schedule=0.5", "Pruning", Ty, r"schedule=0\.5 must be a Schedule or a callable", lambda ctx: lambda: Pruning(0.5)),
    Bad("callback-unit", "unit='batch'", "Pruning", V, r"unit='batch' must be one of \('step', 'epoch'\)", lambda ctx: lambda: Pruning(Constant(0.5), unit="batch")),
    Bad("callback-method", "method='l9'", "Pruning", V, r"method='l9' is not a pruning method", lambda ctx: lambda: Pruning(Constant(0.5), method="l9")),
    Bad("callback-rewind-step", "step=-1", "RewindPoint", V, r"step=-1 must be an int >= 0", lambda ctx: lambda: RewindPoint(step=-1)),
    Bad("callback-target-typo", "targets='net.1.weight' (a ReLU)", "Trainer.fit with Pruning", V, r"targets entry 'net\.1\.weight' matches no parameter of TinyNet \(did you mean", fit_tiny(lambda: Pruning(Constant(0.5), targets="net.1.weight"))),
    Bad("callback-no-prunable", "a LightningModule with nothing to prune", "Trainer.fit with Pruning", V, r"no parameter of .* is left to prune", fit_tiny(lambda: Pruning(Constant(0.5), exclude="net.*"))),
    Bad("callback-nan-weights", "NaN weights when the first update comes", "Trainer.fit with Pruning", V, r"net\.2\.weight holds NaN or inf values", fit_tiny(lambda: Pruning(Constant(0.5)), model=lambda: _nan_tinynet())),
    Bad("resume-other-schedule", "resuming with another schedule", "Trainer.fit(ckpt_path=...)", V, r"the checkpoint was written with schedule=.* resume with the same schedule", resume_other_schedule, loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-other-method", "resuming with method='random' a run pruned by magnitude", "Trainer.fit(ckpt_path=...)", V, r"written with method='magnitude'; this Pruning callback has method='random'; resume with the same method", resume_with({}, method="random"), loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-other-scope", "resuming with scope='layer' a globally pruned run", "Trainer.fit(ckpt_path=...)", V, r"written with scope='global'; this Pruning callback has scope='layer'; resume with the same scope", resume_with({}, scope="layer"), loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-other-targets-argument", "resuming with targets=['net.0.weight']", "Trainer.fit(ckpt_path=...)", V, r"written with targets=\['net\.0\.weight', 'net\.2\.weight', 'net\.4\.weight'\]; this Pruning callback has targets=\['net\.0\.weight'\]; resume with the same targets", resume_with({}, targets=["net.0.weight"]), loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-other-unit", "resuming with unit='epoch' a step-level run", "Trainer.fit(ckpt_path=...)", V, r"written with unit='step'; this Pruning callback has unit='epoch'; resume with the same unit", resume_with({}, unit="epoch"), loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-other-seed", "resuming with seed=1 a run seeded 0", "Trainer.fit(ckpt_path=...)", V, r"written with seed=0; this Pruning callback has seed=1; resume with the same seed", resume_with({"method": "random"}, method="random", seed=1), loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-other-options", "resuming ln_structured with dim=1 a run pruned along dim=0", "Trainer.fit(ckpt_path=...)", V, r"written with options=\{'dim': 0\}; this Pruning callback has options=\{'dim': 1\}; resume with the same options", resume_with({"method": "ln_structured", "scope": "layer", "options": {"dim": 0}}, method="ln_structured", scope="layer", options={"dim": 1}), loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-ambiguous-entries", "two named Pruning entries, resumed by one unnamed callback", "Trainer.fit(ckpt_path=...)", V, r"the checkpoint holds 2 Pruning entries .* none under this callback's state_key='Pruning'; give each callback the name= it was saved with", resume_with({"names": [("a", "net.0.weight"), ("b", "net.2.weight")]}), loads_checkpoint="ckpt/last.ckpt"),
    Bad("callback-two-unnamed", "two unnamed Pruning callbacks (the second added after the Trainer was built)", "Trainer.fit with Pruning", V, r"two Pruning callbacks in one Trainer share state_key='Pruning'.*give each a distinct name=", two_unnamed),
    Bad("callback-name-empty", "name=''", "Pruning", Ty, r"name='' must be a non-empty str or None", lambda ctx: lambda: Pruning(Constant(0.5), name="")),
    Bad("callback-scope", "scope='net'", "Pruning", V, r"scope='net' must be one of \('global', 'layer'\)", lambda ctx: lambda: Pruning(Constant(0.5), scope="net")),
    Bad("callback-schedule-and-amount", "a schedule and an amount", "Pruning", Ty, r"give a schedule or an amount, exactly one \(schedule=Constant\(.*\), amount=0\.3\)", lambda ctx: lambda: Pruning(Constant(0.5), amount=0.3)),
    Bad("callback-neither", "no schedule and no amount", "Pruning", Ty, r"give a schedule or an amount, exactly one \(schedule=None, amount=None\)", lambda ctx: lambda: Pruning()),
    Bad("callback-amount-one", "amount=1.0 (everything that remains)", "Pruning", V, r"amount=1\.0 must be a fraction of what remains, in \[0, 1\)", lambda ctx: lambda: Pruning(amount=1.0)),
    Bad("callback-amount-negative", "amount=-3", "Pruning", V, r"amount=-3 must be a count >= 0", lambda ctx: lambda: Pruning(amount=-3)),
    Bad("callback-amount-str", "amount='0.3'", "Pruning", Ty, r"amount='0\.3' must be a fraction in \[0, 1\), an int count or a callable", lambda ctx: lambda: Pruning(amount="0.3")),
    Bad("callback-after-validation", "after_validation='yes'", "Pruning", Ty, r"after_validation='yes' must be True or False", lambda ctx: lambda: Pruning(Constant(0.5), after_validation="yes")),
    Bad("callback-on-update", "on_update=5", "Pruning", Ty, r"on_update=5 must be a callable \(pruner, t\) or None", lambda ctx: lambda: Pruning(Constant(0.5), on_update=5)),
    Bad("callback-pair-foreign-module", "targets=[(a Linear of another model, 'weight')]", "Trainer.fit with Pruning", V, r"targets entry \(Linear, 'weight'\): the module is not part of TinyNet", pair_target(lambda m: nn.Linear(2, 2), "weight")),
    Bad("callback-pair-no-parameter", "targets=[(model.net[1] (a ReLU), 'weight')]", "Trainer.fit with Pruning", V, r"targets entry \(ReLU, 'weight'\): the module has no parameter 'weight'", pair_target(lambda m: m.net[1], "weight")),
    Bad("callback-two-on-one-weight", "two Pruning callbacks pruning net.2.weight", "Trainer.fit with Pruning", V, r"\['net\.2\.weight'\] are targets of two Pruning callbacks .*each weight follows one schedule", two_on_one_weight),
    Bad("callback-after-validation-no-val", "after_validation=True in a fit that validates nothing", "Trainer.fit with Pruning", V, r"after_validation=True prunes when a validation run ends, but this fit validates nothing \(limit_val_batches=0", no_validation),
    Bad("callback-rewind-other-model", "RewindPoint.rewind into a model of another architecture", "RewindPoint.rewind", V, r"the weights captured at step 0 belong to another model than Sequential: missing \['0\.bias', '0\.weight'", rewind_other),
    Bad("resume-other-targets", "a checkpoint whose masks are for other targets", "Trainer.fit(ckpt_path=...)", V, r"state_dict belongs to another model or target set: missing \['net\.4\.weight'\]", resume_other_targets, loads_checkpoint="ckpt/last.ckpt"),
    Bad("resume-truncated", "a truncated .ckpt file as ckpt_path", "experiments.training.fit", V, r"ckpt_path='.*last\.ckpt' is not a complete checkpoint \(truncated or corrupt", fit_helper_truncated),
    # ---- configs
    Bad("config-key-typo", "trian.lr=0.1", "load_config", ConfigError, r"unknown key 'trian' \(from the command line\); did you mean 'train'\?", config("trian.lr=0.1")),
    Bad("config-nested-typo", "train.lrr=0.1", "load_config", ConfigError, r"unknown key 'train\.lrr' .*did you mean 'lr'\?", config("train.lrr=0.1")),
    Bad("config-yaml-typo", "data: {bath_size: 3} in a YAML file", "load_config", ConfigError, r"unknown key 'data\.bath_size' \(in .*typo\.yaml\); did you mean 'batch_size'\?", yaml_typo),
    Bad("config-type", "steps=ten", "load_config", ConfigError, r"bad value for 'steps' \(from the command line\)", config("steps=ten")),
    Bad("config-missing-file", "a config file that does not exist", "load_config", ConfigError, r"config file '.*nope\.yaml' does not exist", lambda ctx: lambda: load_config(GradualConfig, ctx.root / "nope.yaml")),
    Bad("config-missing-value", "no steps", "load_config", ConfigError, r"missing required value\(s\): steps", lambda ctx: lambda: load_config(GradualConfig, None, ["name=x"])),
    Bad("config-lr-nan", "train.lr=nan", "load_config", ConfigError, r"train\.lr=nan must be > 0", config("train.lr=nan")),
    Bad("config-model", "model=lenet", "load_config", ConfigError, r"model='lenet' is not one of \[", config("model=lenet")),
    Bad("config-schedule", "pruning.schedule.final=1.5", "load_config", ConfigError, r"pruning\.schedule: final=1\.5 must be in \[0, 1\)", config("pruning.schedule.final=1.5")),
    Bad("config-method", "pruning.method=l9", "load_config", ConfigError, r"pruning: method='l9' is not a pruning method", config("pruning.method=l9")),
    Bad("config-targets", "pruning.targets=[fc9.weight]", "load_config", ConfigError, r"pruning: targets entry 'fc9\.weight' matches no parameter of LeNet300100 \(did you mean", config("pruning.targets=[fc9.weight]")),
    Bad("config-options", "pruning.options={foo: 1}", "load_config", ConfigError, r"pruning: Pruner: option\(s\) \['foo'\]", config("pruning.options={foo: 1}")),
    Bad("config-lr-schedule", "train.lr_schedule=cosin", "load_config", ConfigError, r"train: lr_schedule='cosin' must be one of", config("train.lr_schedule=cosin")),
    Bad("config-subset", "data.subset=60000", "load_config", ConfigError, r"data: subset=60000 must be at most the 55000 training images", config("data.subset=60000")),
    Bad("config-name-parent", "name=../../x", "load_config", ConfigError, r"name='\.\./\.\./x' must be a plain folder name", config("name=../../x")),
    Bad("config-name-absolute", "name=/tmp/x", "load_config", ConfigError, r"name='/tmp/x' must be a plain folder name", config("name=/tmp/x")),
    Bad("config-name-interpolated", "name=${oc.env:...} resolving to an absolute path", "load_config", ConfigError, r"name='/etc' must be a plain folder name", config("name=${oc.env:PRUNEKIT_NO_SUCH_VARIABLE,/etc}")),
    Bad("config-name-hidden", "name=.hidden (starts with a dot)", "load_config", ConfigError, r"name='\.hidden' must be a plain folder name", config("name=.hidden")),
    Bad("config-interpolation-missing", "name=${oc.env:<unset variable>}", "load_config", ConfigError, r"cannot resolve 'name': .*PRUNEKIT_NO_SUCH_VARIABLE' not found", config("name=${oc.env:PRUNEKIT_NO_SUCH_VARIABLE}")),
    Bad("config-interpolation-type", "steps=${name} (a string for an int)", "load_config", ConfigError, r"cannot resolve 'steps': .*could not be converted to Integer", config("steps=${name}")),
    Bad("config-checkpoint-every", "checkpoint_every=-1", "load_config", ConfigError, r"checkpoint_every=-1 must be >= 0", config("checkpoint_every=-1")),
    # ---- data
    Bad("data-missing-dir", "a data folder that does not exist", "load_fashion_mnist", FileNotFoundError, r"Fashion-MNIST folder not found: .*no-data\. Install the data with", lambda ctx: lambda: load_fashion_mnist(ctx.root / "no-data")),
    Bad("data-truncated-file", "a truncated gzip IDX file", "load_fashion_mnist", V, r"corrupt or truncated gzip file .*t10k-labels-idx1-ubyte\.gz", corrupt_data),
    Bad("data-batch-size", "batch_size=0", "FashionMNISTDataModule", V, r"batch_size=0 must be >= 1", lambda ctx: lambda: FashionMNISTDataModule(batch_size=0)),
    Bad("data-eval-batch-size", "eval_batch_size=0", "FashionMNISTDataModule", V, r"eval_batch_size=0 must be >= 1", lambda ctx: lambda: FashionMNISTDataModule(eval_batch_size=0)),
    Bad("data-name", "data.name=fashion", "load_config", ConfigError, r"data\.name='fashion' is not one of \['fashion_mnist'\]", config("data.name=fashion")),
    Bad("data-target-import", "data._target_=no_such_package.Data", "load_config", ConfigError, r"data\._target_='no_such_package\.Data': cannot import 'no_such_package'", config("data._target_=no_such_package.Data")),
    Bad("data-target-not-datamodule", "data._target_=collections.OrderedDict", "load_config", ConfigError, r"data\._target_='collections\.OrderedDict' made a OrderedDict, not a LightningDataModule", config("data._target_=collections.OrderedDict")),
    Bad("data-unknown-dataset", "build_datamodule('fashion')", "build_datamodule", V, r"unknown dataset name='fashion'; did you mean 'fashion_mnist'\?", lambda ctx: lambda: build_datamodule("fashion")),
    Bad("data-duplicate-dataset", "register_dataset('fashion_mnist') a second time", "register_dataset", V, r"dataset name='fashion_mnist' is already registered", lambda ctx: lambda: register_dataset("fashion_mnist")(FashionMNISTDataModule)),
    Bad("data-no-input-shape", "a data module without input_shape", "data_shape", Ty, r"object\.input_shape=None must be a tuple of positive ints", lambda ctx: lambda: data_shape(object())),
    Bad("model-import-path", "model=no_such_package.Net", "load_config", ConfigError, r"model='no_such_package\.Net': cannot import 'no_such_package'", config("model=no_such_package.Net")),
    Bad("model-input-too-small", "conv6 on 1x4x4 inputs", "build_model", V, r"input_shape=\(1, 4, 4\): height and width must be >= 8", lambda ctx: lambda: build_model("conv6", num_classes=10, input_shape=(1, 4, 4))),
    Bad("model-input-shape-form", "input_shape=(28, 28)", "build_model", V, r"input_shape=\(28, 28\) must be \(channels, height, width\)", lambda ctx: lambda: build_model("conv6", num_classes=10, input_shape=(28, 28))),
    Bad("paths-unwritable", "an output folder below a regular file", "check_writable", PermissionError, r"cannot write the run folder .*a-file/run", unwritable),
    Bad("paths-run-folder-symlink", "a run folder that is a symbolic link out of out_dir", "RunPaths.for_config", ConfigError, r"the run folder .*quick-gradual-\w+ resolves to .*elsewhere, outside out_dir=.*a run writes only inside out_dir", symlinked_run_folder),
    Bad("paths-disk-full", "OSError ENOSPC while writing", "atomic_write", RunFolderError, r"cannot write .*summary\.json: No space left on device \(is the disk full", disk_full),
    Bad("paths-torch-save-iostream", "torch.save failing with 'basic_ios::clear: iostream error'", "save_torch", RunFolderError, r"cannot write .*final\.pt: .*basic_ios::clear: iostream error \(is the disk full", torch_save_fails),
    # ---- the prunekit command
    Bad("cli-command", "prunekit frobnicate", "prunekit (argparse)", CliError, r"invalid choice: 'frobnicate'", run_cli("frobnicate")),
    Bad("cli-config-missing", "prunekit run nope.yaml", "prunekit run", CliError, r"prunekit run: error: config file '.*nope\.yaml' does not exist", run_cli("run", "{root}/nope.yaml")),
    Bad("cli-key-typo", "prunekit run quick.yaml trian.lr=0.1", "prunekit run", CliError, r"prunekit run: error: unknown key 'trian'", run_cli("run", str(QUICK), "out_dir={out}", "trian.lr=0.1")),
    Bad("cli-override-form", "an override without '='", "prunekit run", CliError, r"override 'steps' must look like key=value", run_cli("run", str(QUICK), "steps")),
    Bad("cli-missing-data", "data.root=<missing folder>", "prunekit run", CliError, r"prunekit run: error: Fashion-MNIST folder not found: .*no-data", run_cli("run", str(QUICK), "out_dir={out}", "data.root={root}/no-data")),
    Bad("cli-unwritable", "out_dir below a regular file", "prunekit run", CliError, r"prunekit run: error: cannot write the run folder", cli_file("blocker", "", "run", str(QUICK), "out_dir={root}/blocker")),
    Bad("cli-dense-truncated", "dense.checkpoint=<truncated file>", "prunekit run", CliError, r"prunekit run: error: dense\.checkpoint='.*dense\.pt' cannot be loaded", truncated_dense),
    Bad("cli-dense-foreign", "dense.checkpoint=<another model's weights>", "prunekit run", CliError, r"prunekit run: error: dense\.checkpoint='.*other\.pt' does not fit model=LeNet300100: missing \['fc1\.bias'", foreign_dense),
    Bad("cli-report-missing", "prunekit report <folder without summary.json>", "prunekit report", CliError, r"prunekit report: error: .*no summary\.json", run_cli("report", "{out}")),
    Bad("cli-override-after-option", "prunekit run quick.yaml --threads 1 trian.lr=0.1", "prunekit run", CliError, r"prunekit run: error: unknown key 'trian'", run_cli("run", str(QUICK), "--threads", "1", "trian.lr=0.1")),
    Bad("cli-lottery-override-after-option", "prunekit lottery quick.yaml --threads 1 rewind=late", "prunekit lottery", CliError, r"prunekit lottery: error: rewind='late' must be one of", run_cli("lottery", str(QUICK_LOTTERY), "--threads", "1", "rewind=late")),
    Bad("cli-unknown-option", "prunekit run quick.yaml --thread-count 2", "prunekit (argparse)", CliError, r"unrecognized arguments: --thread-count", run_cli("run", str(QUICK), "--thread-count", "2", "steps=3")),
    Bad("cli-threads-zero", "--threads 0", "prunekit run", CliError, r"prunekit run: error: --threads=0 must be >= 1", run_cli("run", str(QUICK), "--threads", "0")),
    Bad("cli-name-outside", "prunekit run quick.yaml name=../escape", "prunekit run", CliError, r"prunekit run: error: name='\.\./escape' must be a plain folder name", run_cli("run", str(QUICK), "out_dir={out}", "name=../escape")),
    Bad("cli-run-folder-locked", "a run folder another process is running in", "prunekit run", CliError, r"prunekit run: error: the run folder .*quick-gradual-\w+ is in use by pid 4242 on host elsewhere since 2026-01-01", earlier_run("run", locked_by_another)),
    Bad("cli-lottery-folder-locked", "a lottery run folder another process is running in", "prunekit lottery", CliError, r"prunekit lottery: error: the run folder .*quick-lottery-\w+ is in use by pid 4242", earlier_run("lottery", locked_by_another)),
    Bad("cli-summary-corrupt", "a truncated summary.json in the run folder", "prunekit run", CliError, r"prunekit run: error: .*quick-gradual-\w+/summary\.json is truncated or corrupt \(not JSON", earlier_run("run", lambda root: cut(root / "summary.json", '{"kind": "gradual", "name": "quick-gradual"}'))),
    Bad("cli-run-dense-truncated", "a truncated dense.pt in the run folder", "prunekit run", CliError, r"prunekit run: error: .*quick-gradual-\w+/dense\.pt is truncated or corrupt", earlier_run("run", lambda root: cut(root / "dense.pt"))),
    Bad("cli-run-dense-foreign", "another model's weights as the run folder's dense.pt", "prunekit run", CliError, r"prunekit run: error: .*/dense\.pt does not fit model=LeNet300100: missing \['fc1\.bias'", earlier_run("run", lambda root: torch.save(mlp().state_dict(), root / "dense.pt"))),
    Bad("cli-run-resume-truncated", "a truncated resume_pruning.ckpt in the run folder", "prunekit run", CliError, r"prunekit run: error: ckpt_path='.*resume_pruning\.ckpt' is not a complete checkpoint .*delete it to start this phase", earlier_run("run", lambda root: (lenet_weights(root / "dense.pt"), cut(root / "resume_pruning.ckpt")))),
    Bad("cli-lottery-init-truncated", "a truncated init.pt in a lottery run folder", "prunekit lottery", CliError, r"prunekit lottery: error: .*quick-lottery-\w+/init\.pt is truncated or corrupt", earlier_run("lottery", lambda root: cut(root / "init.pt"))),
    Bad("cli-lottery-init-foreign", "another model's weights as init.pt", "prunekit lottery", CliError, r"prunekit lottery: error: .*/init\.pt does not fit model=lenet_300_100", earlier_run("lottery", lambda root: torch.save(mlp().state_dict(), root / "init.pt"))),
    Bad("cli-lottery-round-json-truncated", "a truncated round_00/lottery.json", "prunekit lottery", CliError, r"prunekit lottery: error: .*round_00/lottery\.json is truncated or corrupt", earlier_run("lottery", lambda root: (finished_round(root), cut(root / "round_00" / "lottery.json", '{"round": 0, "variant": "lottery"}')))),
    Bad("cli-lottery-round-state-truncated", "a truncated round_00/lottery.pt", "prunekit lottery", CliError, r"prunekit lottery: error: .*round_00/lottery\.pt is truncated or corrupt", earlier_run("lottery", lambda root: (finished_round(root), cut(root / "round_00" / "lottery.pt")))),
    Bad("cli-lottery-rewind-truncated", "a truncated rewind.ckpt (rewind=step)", "prunekit lottery", CliError, r"prunekit lottery: error: ckpt_path='.*rewind\.ckpt' is not a complete checkpoint", earlier_run("lottery", lambda root: (finished_round(root), cut(root / "rewind.ckpt")), "rewind=step", "rewind_step=100")),
    Bad("cli-report-summary-corrupt", "prunekit report <folder with a truncated summary.json>", "prunekit report", CliError, r"prunekit report: error: .*/summary\.json is truncated or corrupt", cli_file("out/summary.json", '{"kind": "lottery", "na', "report", "{out}")),
]
# fmt: on


def _nan_tensor(ctx: Ctx) -> torch.Tensor:
    t = weights(ctx)
    t[2, 5] = math.nan
    return t


def _nan_tinynet() -> TinyNet:
    model = TinyNet()
    with torch.no_grad():
        model.net[2].weight[0, 0] = math.nan
    return model


def _too_much(t: int) -> float:
    return 1.5


# ------------------------------------------------------------------ running
@dataclass
class Outcome:
    error: BaseException
    message: str  # one line, temp paths replaced by TMP
    before: dict[str, Any]
    after: dict[str, Any]
    ctx: Ctx


def run_case(case: Bad, root: Path) -> Outcome:
    out = root / "out"
    out.mkdir()
    (out / "existing.txt").write_text("written before the call\n")
    ctx = Ctx(root=root, out=out, model=mlp())
    thunk = case.prepare(ctx)
    before = ctx.snapshot()
    try:
        thunk()
    except BaseException as e:
        message = " ".join(str(e).split("\n"))
        for path, name in ((root.resolve(), "TMP"), (root, "TMP"), (REPO, "REPO")):
            message = message.replace(str(path), name)
        message = re.sub(r"(TMP/\S*-)[0-9a-f]{8}\b", r"\1HASH", message)  # run folder names
        return Outcome(e, message, before, ctx.snapshot(), ctx)
    raise AssertionError(f"{case.id}: no error was raised")


def error_name(error: type[BaseException]) -> str:
    return "exit status 2 (stderr)" if error is CliError else error.__name__


def row(case: Bad, message: str) -> str:
    cells = [case.id, _text(case.input), _code(case.where), error_name(case.error), _code(message)]
    return "| " + " | ".join(cells) + " |"


def _text(text: str) -> str:
    for char in "\\|*_<>`[]":
        text = text.replace(char, "\\" + char)
    return text


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


HEADER = """# Bad inputs

Every bad input below fails before anything changes: the model's weights and the output
folder are left as they were, and the error names the argument or value at fault.
`tests/test_bad_inputs.py` runs every row (one parametrised test) and checks the error
type, the message, that our code (not torch or Lightning internals) raised it, and that
nothing was modified or half-written. This file is generated from that test's
catalogue; regenerate it with

    .venv/bin/python tests/test_bad_inputs.py

`TMP` stands for the test's temporary folder, `HASH` for a run folder's config hash.
Errors of the `prunekit` command are printed as one `prunekit <command>: error: ...` line
on stderr, with exit status 2.

Two rows resume a Lightning run from a checkpoint: there Lightning loads the
checkpoint's weights into the model before any callback runs, so after the error the
model holds exactly the checkpoint's weights (the test checks that, not a mixture).
A truncated checkpoint passed straight to `Trainer.fit(ckpt_path=...)` fails inside
`torch.load` before any of our code runs ("PytorchStreamReader failed reading zip
archive"); `prunekit.experiments.training.fit` checks the file first (the row
`resume-truncated`).

| case | input | where | error | message |
|---|---|---|---|---|
"""


def render(outcomes: dict[str, str]) -> str:
    lines = [row(case, outcomes[case.id]) for case in CATALOGUE]
    return HEADER + "\n".join(lines) + f"\n\n{len(CATALOGUE)} cases.\n"


def documented_rows() -> dict[str, str]:
    if not DOC.exists():
        return {}
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| case"):
            rows[line.split(" | ")[0].removeprefix("| ")] = line
    return rows


def test_catalogue_is_documented() -> None:
    ids = [case.id for case in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert list(documented_rows()) == ids, "regenerate: .venv/bin/python tests/test_bad_inputs.py"


@pytest.fixture(scope="module")
def documented() -> dict[str, str]:
    return documented_rows()


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input(case: Bad, tmp_path: Path, documented: dict[str, str]) -> None:
    outcome = run_case(case, tmp_path)
    error = outcome.error
    assert isinstance(error, case.error), "".join(traceback.format_exception(error))
    assert re.search(case.match, outcome.message), outcome.message
    if isinstance(error, CliError):
        assert error.status == 2
    else:
        origin = Path(traceback.extract_tb(error.__traceback__)[-1].filename).resolve()
        assert any(origin.is_relative_to(d) for d in OURS), f"raised in {origin}"
    before, after = outcome.before, outcome.after
    if case.loads_checkpoint is not None:  # Lightning restored the checkpoint's weights first
        saved = torch.load(tmp_path / case.loads_checkpoint, weights_only=False)["state_dict"]
        model = {k: v for k, v in after.items() if k.startswith("model.")}
        expected = Ctx(tmp_path, tmp_path, TinyNet())
        expected.model.load_state_dict(saved)
        assert model == {k: v for k, v in expected.snapshot().items() if k.startswith("model.")}
        before = {k: v for k, v in before.items() if not k.startswith("model.")}
        after = {k: v for k, v in after.items() if not k.startswith("model.")}
    assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, changed
    assert documented.get(case.id) == row(case, outcome.message), (
        "docs/bad-inputs.md is stale: regenerate with .venv/bin/python tests/test_bad_inputs.py"
    )


def main() -> None:
    torch.set_num_threads(1)
    messages = {}
    for case in CATALOGUE:
        with tempfile.TemporaryDirectory() as folder:
            messages[case.id] = run_case(case, Path(folder)).message
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(messages))
    print(f"wrote {DOC} ({len(CATALOGUE)} cases)")


if __name__ == "__main__":
    main()
