"""`prunekit run` / `lottery` / `report` as a user drives them: options and overrides in any
order, interrupted and finished runs, one process per run folder, nothing written outside
``out_dir``, damaged files and full disks named in the error.

Every run is tiny (LeNet-300-100, a few dozen steps) on a fake Fashion-MNIST folder. The
gradual runs use "step-pure" data: 60 training images in batches of 60, so every epoch is
one batch and the data a step sees depends only on the step (a run resumed anywhere then
sees exactly the data of an uninterrupted one).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from prunekit.experiments import cli, gradual, training
from prunekit.experiments.config import GradualConfig, LotteryConfig, load_config
from prunekit.experiments.paths import RunFolderError, RunPaths, atomic_write, save_torch

from tests.test_lottery import write_fake_fashion_mnist

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "experiments" / "configs" / "quick_gradual.yaml"
QUICK_LOTTERY = REPO / "experiments" / "configs" / "quick_lottery.yaml"
SCHEDULE = (
    "pruning.schedule={kind: polynomial, initial: 0.0, final: 0.8, begin: 0, end: 30, frequency: 3}"
)
N_WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def tiny(out: Path, data: Path, *extra: str) -> list[str]:
    """Overrides of a tiny gradual run: 20 dense steps, 40 pruning steps, step-pure data,
    validation every 5 steps, a resumable checkpoint every 10."""
    return [
        f"out_dir={out}",
        f"data.root={data}",
        "data.val_size=100",
        "data.subset=60",
        "data.batch_size=60",
        "steps=40",
        "dense.steps=20",
        "train.val_every=5",
        "checkpoint_every=10",
        SCHEDULE,
        *extra,
    ]


def run(out: Path, data: Path, *extra: str) -> int:
    return cli.main(["run", str(QUICK), *tiny(out, data, *extra)])


def folder(out: Path) -> Path:
    (only,) = [p for p in out.iterdir() if p.is_dir()]
    return only


def results(run_dir: Path) -> dict[str, Any]:
    """Everything a finished run produced, but its wall times."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_s")
    return {
        "summary": summary,
        "final": torch.load(run_dir / "final.pt", weights_only=True),
        "masks": torch.load(run_dir / "masks.pt", weights_only=True),
        "metrics": (run_dir / "metrics.csv").read_text(),
        "dense_metrics": (run_dir / "dense" / "metrics.csv").read_text(),
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["summary"] == b["summary"]
    for key in ("final", "masks"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert a["metrics"] == b["metrics"]
    assert a["dense_metrics"] == b["dense_metrics"]


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    """Content and modification time of every file (the lock file: content only)."""
    return {
        str(p.relative_to(root)): (
            p.read_bytes(),
            0 if p.name == "run.lock" else p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny run."""
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    assert run(out, data) == 0
    return folder(out)


# --------------------------------------------------------------------------- resuming
class Interrupt(Exception):
    pass


class InterruptAt(Callback):
    """Raise (as a crash would stop the process) once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Interrupt(f"interrupted at step {self.step}")


@pytest.mark.parametrize(
    ("phase", "step", "resumed_from"),
    [("pruning", 23, 20), ("pruning", 30, 20), ("dense", 13, 10)],
)
def test_interrupted_run_resumes_from_its_checkpoint_and_equals_an_uninterrupted_one(
    data: Path,
    reference: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    phase: str,
    step: int,
    resumed_from: int,
) -> None:
    fit = training.fit

    def interrupted_fit(*args: Any, **kwargs: Any) -> pl.Trainer:
        if (Path(kwargs["log_dir"]).name == "dense") == (phase == "dense"):
            kwargs["callbacks"] = [*kwargs["callbacks"], InterruptAt(step)]
        return fit(*args, **kwargs)

    monkeypatch.setattr(gradual, "fit", interrupted_fit)
    with pytest.raises(Interrupt):
        run(tmp_path, data)
    run_dir = folder(tmp_path)
    checkpoint = RunPaths(run_dir).resume_checkpoint(phase)
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == resumed_from  # the last one before the interruption
    assert not (run_dir / "summary.json").exists()
    capsys.readouterr()

    monkeypatch.setattr(gradual, "fit", fit)
    assert run(tmp_path, data) == 0
    err = capsys.readouterr().err
    assert f"resuming from step {resumed_from} ({checkpoint})" in err
    assert_same(results(run_dir), results(reference))
    assert not list(run_dir.glob("resume_*.ckpt"))  # deleted once the phase is written


def test_finished_run_is_reported_not_redone(
    data: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = reference.parent
    before = files(out)
    summary = json.loads((reference / "summary.json").read_text())
    capsys.readouterr()
    assert run(out, data) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.err
    assert f"target sparsity                      {summary['target_sparsity']:.4f}" in (
        captured.out
    )
    assert f"run folder: {reference}" in captured.out
    assert files(out) == before  # nothing rewritten: not the summary, not its wall times


def test_finished_lottery_run_is_reported_not_rewritten(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "lottery",
        str(QUICK_LOTTERY),
        f"out_dir={tmp_path}",
        f"data.root={data}",
        "data.val_size=100",
        "data.subset=60",
        "rounds=1",
        "steps_per_round=4",
        "train.val_every=2",
    ]
    assert cli.main(args) == 0
    before = files(tmp_path)
    summary = json.loads((folder(tmp_path) / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.err
    assert f"{summary['rounds'][1]['test_acc_final']:.4f}" in captured.out
    assert files(tmp_path) == before  # summary (and its wall_s), plot, config untouched


def test_dense_weights_of_an_interrupted_run_are_reused_with_their_wall_time(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(tmp_path, data, "steps=10") == 0
    run_dir = folder(tmp_path)
    first = json.loads((run_dir / "summary.json").read_text())
    dense = torch.load(run_dir / "dense.pt", weights_only=True)
    (run_dir / "summary.json").unlink()  # as if stopped after the dense phase
    capsys.readouterr()
    assert run(tmp_path, data, "steps=10") == 0
    assert f"dense weights loaded from {run_dir / 'dense.pt'}" in capsys.readouterr().err
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["wall_s"]["dense"] == first["wall_s"]["dense"]  # the training's, not a load's
    assert again["dense_test_acc"] == first["dense_test_acc"]
    assert all(
        torch.equal(v, torch.load(run_dir / "dense.pt", weights_only=True)[k])
        for k, v in dense.items()
    )


# --------------------------------------------------------------------------- item 8
def test_epoch_unit_reports_the_target_the_masks_were_brought_to(
    data: Path, tmp_path: Path
) -> None:
    # 120 images in batches of 60: 2 steps per epoch; 7 steps end in the 4th epoch, whose
    # end (t = 4) was the last update. The schedule counts epochs.
    assert (
        run(
            tmp_path,
            data,
            "data.subset=120",
            "steps=7",
            "dense.steps=0",
            "train.val_every=7",
            "pruning.unit=epoch",
            "pruning.schedule={kind: polynomial, initial: 0.0, final: 0.8, begin: 0, end: 10,"
            " frequency: 1}",
        )
        == 0
    )
    run_dir = folder(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = 0.8 * (1 - (1 - 4 / 10) ** 3)  # Zhu & Gupta at t = 4 epochs: 0.6272
    assert summary["target_sparsity"] == pytest.approx(expected)
    masks = torch.load(run_dir / "masks.pt", weights_only=True)
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros == round(expected * N_WEIGHTS)  # what the masks really hold
    assert summary["sparsity"] == pytest.approx(zeros / N_WEIGHTS)


# --------------------------------------------------------------------------- item 17
def test_overrides_may_follow_options(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = tiny(tmp_path, data, "steps=3", "dense.steps=0", "train.val_every=3")
    assert cli.main(["run", str(QUICK), *args[:3], "--threads", "1", *args[3:]]) == 0
    config = load_config(GradualConfig, folder(tmp_path) / "config.yaml")
    assert (config.steps, config.dense.steps, config.data.subset) == (3, 0, 60)
    capsys.readouterr()
    # lottery: an override after --threads is read (and checked)
    assert cli.main(["lottery", str(QUICK_LOTTERY), "--threads", "1", "rewind=late"]) == 2
    err = capsys.readouterr().err
    assert "rewind='late' must be one of" in err and "unrecognized" not in err
    # report: run folders around --plot
    run_dir = str(folder(tmp_path))
    plot = tmp_path / "cmp.png"
    assert cli.main(["report", run_dir, "--plot", str(plot), run_dir]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("quick")]
    assert row.split()[:2] == ["quick-gradual", "2"]  # both folders counted
    assert plot.stat().st_size > 0
    # an unknown option is still refused
    with pytest.raises(SystemExit):
        cli.main(["run", str(QUICK), "--threads", "1", "--thread", "steps=3"])


# --------------------------------------------------------------------------- item 18
def test_a_run_writes_only_inside_out_dir(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("PRUNEKIT_TEST_NAME", "from-env")
    assert run(out, data, "steps=10", "name=${oc.env:PRUNEKIT_TEST_NAME}") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"]
    assert list(cwd.iterdir()) == []
    assert folder(out).name.startswith("from-env-")


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "${oc.env:HOME}", "a/b", ".."])
def test_a_name_that_is_not_a_folder_name_fails_before_writing(
    name: str, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deep" / "out"
    assert run(out, data, f"name={name}") == 2
    err = capsys.readouterr().err
    assert "name=" in err and "must be a plain folder name" in err
    assert list(tmp_path.iterdir()) == []  # not even out_dir was made


# --------------------------------------------------------------------------- item 19
HOLD = """
import sys, time
from pathlib import Path
from prunekit.experiments.paths import locked
with locked(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("command", ["run", "lottery"])
def test_a_second_process_fails_at_once_naming_the_holder(
    command: str, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if command == "run":
        args = ["run", str(QUICK), *tiny(tmp_path, data, "steps=5", "dense.steps=0")]
        cfg = load_config(GradualConfig, QUICK, args[2:])
    else:
        overrides = [
            f"out_dir={tmp_path}",
            f"data.root={data}",
            "data.val_size=100",
            "data.subset=60",
            "rounds=1",
            "steps_per_round=5",
            "train.val_every=5",
        ]
        args = ["lottery", str(QUICK_LOTTERY), *overrides]
        cfg = load_config(LotteryConfig, QUICK_LOTTERY, overrides)
    root = RunPaths.for_config(cfg).root
    root.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        started = time.monotonic()
        assert cli.main(args) == 2
        assert time.monotonic() - started < 30  # at once, not after training
        err = capsys.readouterr().err
        assert f"the run folder {root} is in use by pid {holder.pid} on host" in err
        assert sorted(p.name for p in root.iterdir()) == ["run.lock"]  # nothing written
    finally:
        holder.kill()  # SIGKILL: no clean-up; the kernel releases the lock
        holder.wait()
    assert cli.main(args) == 0  # the lock of a dead process is free
    assert (root / "summary.json").is_file()
    assert (root / "run.lock").read_text() == ""  # emptied on release


def test_a_full_disk_names_the_file_being_written(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 3584 vs 3478\n"
            "basic_ios::clear: iostream error"
        )

    monkeypatch.setattr(torch, "save", full)
    assert run(tmp_path, data, "steps=5", "checkpoint_every=0") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    dense = folder(tmp_path) / "dense.pt"
    assert err == (
        f"prunekit run: error: cannot write {dense}: [enforce fail at inline_container.cc:626]"
        " . unexpected pos 3584 vs 3478 (is the disk full or the folder read-only?)"
    )
    assert not [p for p in folder(tmp_path).iterdir() if p.name.endswith(".tmp")]

    # and in a checkpoint (Lightning's writer), through atomic_write as well
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", full)
    target = tmp_path / "ckpt" / "x.pt"
    with pytest.raises(RunFolderError, match=f"cannot write {target}: .*disk full"):
        save_torch(target, {"a": 1})
    assert list(target.parent.iterdir()) == []


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old")

    def no_space(tmp: Path) -> None:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(RunFolderError, match=f"cannot write {path}: No space left on device"):
        atomic_write(path, no_space)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    assert path.read_text() == "old"


def test_a_killed_holder_leaves_its_pid_but_not_the_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run.lock").read_text().startswith(f"pid {holder.pid} on host")
    from prunekit.experiments.paths import locked

    with locked(tmp_path):
        assert (tmp_path / "run.lock").read_text().startswith(f"pid {os.getpid()} on host")
