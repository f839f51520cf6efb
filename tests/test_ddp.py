"""DDP on CPU (gloo, 2 processes): identical masks on every rank after every update."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_worker(out: Path, method: str, scope: str, devices: int) -> list[list[dict]]:
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out), method, scope, str(devices)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.parametrize(
    ("method", "scope"),
    [("magnitude", "global"), ("random", "global"), ("structured", "layer")],
)
def test_masks_identical_across_ranks(tmp_path: Path, method: str, scope: str) -> None:
    rank0, rank1 = run_worker(tmp_path / "ddp", method, scope, devices=2)
    assert [r["step"] for r in rank0] == [4, 6, 8, 10, 12]
    assert rank0 == rank1  # same steps, targets, actual sparsity and bit-identical masks
    if method != "magnitude":
        return
    single = run_worker(tmp_path / "single", method, scope, devices=1)[0]
    assert [(r["step"], r["target"], r["actual"]) for r in single] == [
        (r["step"], r["target"], r["actual"]) for r in rank0
    ]
