"""A crash cannot silently change results: SIGKILL mid-ramp, resume, compare; atomic saves.

Both tests kill real processes with SIGKILL (no cleanup handlers run), as a crash, an
out-of-memory kill or a pre-empted cluster job would.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prunekit.schedules import from_dict

from tests import resume_worker
from tests.resume_worker import EVERY, JSON_VALUES, SCHEDULE, VARIANT

WORKER = Path(__file__).with_name("resume_worker.py")
MAX_STEPS = 40
KILL_AFTER = 10  # kill once a checkpoint at step >= this exists (the ramp runs from 2 to 30)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork are POSIX")


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def checkpoints(folder: Path) -> dict[int, Path]:
    found = {}
    for path in folder.glob("*.ckpt"):
        match = re.fullmatch(r"step=(\d+)\.ckpt", path.name)
        assert match, f"unexpected file {path.name} in the checkpoint folder"
        found[int(match.group(1))] = path
    return found


def pruning_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("Pruning"))


def test_sigkill_mid_ramp_then_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    worker = [sys.executable, str(WORKER), "train", str(out), str(MAX_STEPS)]
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([*worker, "--delay", "0.05"], stderr=stderr)
    try:
        deadline = time.monotonic() + 240
        while not any(s >= KILL_AFTER for s in checkpoints(out / "ckpt")):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never reached the kill point"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.15))  # anywhere in the next steps, saves included
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final.pt").exists()

    # Every checkpoint on disk loads (Lightning saves through a temp file and a move).
    saved = {s: torch.load(p, weights_only=False) for s, p in checkpoints(out / "ckpt").items()}
    last = max(saved)
    assert last % EVERY == 0 and saved[last]["global_step"] == last
    state = pruning_state(saved[last])
    schedule = from_dict(SCHEDULE)
    assert state["last_t"] == last
    assert 0 < state["target"] == schedule(last) < schedule(MAX_STEPS)  # mid-ramp
    killed_events = read_events(out / "events.jsonl")

    # Resume in a new process; meanwhile, the uninterrupted reference runs in this one.
    with open(tmp_path / "resumed.log", "w") as stderr:
        resume = subprocess.Popen(
            [*worker, "--resume", str(checkpoints(out / "ckpt")[last])], stderr=stderr
        )
    try:
        threads = torch.get_num_threads()
        try:
            resume_worker.train(tmp_path / "reference", MAX_STEPS)
        finally:
            torch.set_num_threads(threads)
        assert resume.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        resume.kill()
        resume.wait()
    reference = torch.load(tmp_path / "reference" / "final.pt", weights_only=True)
    reference_events = read_events(tmp_path / "reference" / "events.jsonl")
    resumed = torch.load(out / "final.pt", weights_only=True)
    events = read_events(out / "events.jsonl")
    resumed_events = events[len(killed_events) :]
    assert {e["pid"] for e in killed_events}.isdisjoint(e["pid"] for e in resumed_events)

    # No update skipped or applied twice: the updates up to the checkpoint, then the
    # resumed run's, are exactly the uninterrupted run's (steps, targets, actual sparsity).
    def key(e: dict[str, Any]) -> tuple[int, float, float]:
        return e["step"], e["target"], e["actual"]

    assert all(e["step"] > last for e in resumed_events)
    replayed = [key(e) for e in killed_events if e["step"] <= last]
    assert replayed + [key(e) for e in resumed_events] == [key(e) for e in reference_events]
    update_steps = [e["step"] for e in reference_events if schedule.is_update(e["step"])]
    assert update_steps == list(range(4, 31, 2))  # step 2's target is 0: nothing to do
    assert resumed["updates"] == reference["updates"] == len(update_steps)
    assert resumed["global_step"] == reference["global_step"] == MAX_STEPS

    # The final masks and weights are bit for bit the uninterrupted run's.
    assert resumed["masks"].keys() == reference["masks"].keys()
    for name, mask in reference["masks"].items():
        assert torch.equal(resumed["masks"][name], mask), name
    for name, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def test_sigkill_during_atomic_saves_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """``save_torch`` / ``write_json`` (run and lottery-round files) under random SIGKILLs."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "save", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    state_file, result_file = (
        out / "round_00" / f"{VARIANT}.pt",
        out / "round_00" / f"{VARIANT}.json",
    )
    temp_name = re.compile(rf"\.{re.escape(VARIANT)}\.(pt|json)\.\w+\.tmp")
    rng = random.Random(7)
    leftovers_seen, previous, child = 0, -1, 0
    try:
        for rep in range(1, 41):  # at least 8 kills, and on until one lands inside a save
            proc.stdin.write(f"{rep}\n")
            proc.stdin.flush()
            child = int(proc.stdout.readline().split()[1])
            assert child > 0, "the writer failed before its first complete save"
            time.sleep(rng.uniform(0.0, 0.2))
            os.kill(child, signal.SIGKILL)
            child = 0  # killed; the worker reaps it
            assert proc.stdout.readline().split() == ["dead", str(int(signal.SIGKILL))]

            # Each target is complete and self-consistent: it loads, and holds one index.
            state = torch.load(state_file, weights_only=True)
            index = state["index"]
            assert (
                state["data"].shape == (state["n"],) == resume_worker.payload(index)["data"].shape
            )
            assert bool((state["data"] == index).all())
            result = json.loads(result_file.read_text())
            assert result["values"] == [result["index"]] * JSON_VALUES
            # The result record is written after the state: it is never ahead of it, and
            # never more than one write behind. Nothing rolls back across kills.
            assert result["index"] <= index <= result["index"] + 1
            assert result["index"] >= rep * 1_000_000 > previous
            previous = index

            # Leftover temp files (the kill landed inside a save) are hidden ``.tmp`` files
            # that no path of the run folder, and no ``*.pt`` / ``*.json`` glob, can pick up.
            files = {p.name for p in (out / "round_00").iterdir()}
            others = files - {state_file.name, result_file.name}
            assert all(temp_name.fullmatch(name) for name in others), others
            assert {p.name for p in (out / "round_00").glob("*.pt")} == {state_file.name}
            assert {p.name for p in (out / "round_00").glob("*.json")} == {result_file.name}
            leftovers_seen = len(others)
            if rep >= 8 and leftovers_seen:
                break
    finally:
        if child > 0:  # a failure left our child running (not reaped yet: the pid is ours)
            os.kill(child, signal.SIGKILL)
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert leftovers_seen > 0  # at least one kill interrupted a save in progress


@pytest.mark.slow
def test_sigkill_mid_pruning_then_prunekit_run_resumes_and_equals_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``prunekit run`` killed with SIGKILL while it prunes, then started again: it says
    where it resumes, and its results equal an uninterrupted run's (step-pure data)."""
    from prunekit.experiments import cli
    from prunekit.experiments.paths import RunPaths

    from tests.test_lottery import write_fake_fashion_mnist
    from tests.test_runs import QUICK, assert_same, folder, results, tiny

    data = write_fake_fashion_mnist(tmp_path / "data")
    out, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["run", str(QUICK), *tiny(out, data, "steps=300")]
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prunekit.experiments.cli", *args], stderr=stderr
        )
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and list(out.glob("*/resume_pruning.ckpt"))):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never saved a pruning checkpoint"
            time.sleep(0.01)
        time.sleep(random.uniform(0.0, 0.2))  # anywhere in the next steps, saves included
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_dir = folder(out)
    assert not (run_dir / "summary.json").exists()  # killed mid-pruning
    checkpoint = RunPaths(run_dir).resume_checkpoint("pruning")
    step = torch.load(checkpoint, weights_only=False)["global_step"]
    assert 0 < step < 300 and step % 5 == 0  # saved after a validation

    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        assert cli.main(args) == 0  # the dead process's lock is free
        assert f"resuming from step {step} ({checkpoint})" in capsys.readouterr().err
        assert cli.main(["run", str(QUICK), *tiny(reference, data, "steps=300")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert_same(results(run_dir), results(folder(reference)))
