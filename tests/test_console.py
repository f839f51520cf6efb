"""What the ``prunekit`` command prints: progress, not Lightning's adverts or its misleading
"previous log files will be deleted" warning; a progress bar only on a terminal."""

from __future__ import annotations

import os
import pty
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "experiments" / "configs" / "quick_gradual.yaml"
TINY = [
    "steps=20",
    "dense.steps=20",
    "train.val_every=10",
    "pruning.schedule.end=20",
    "pruning.schedule.frequency=10",
]
COMMAND = [sys.executable, "-m", "prunekit.experiments.cli", "run", str(QUICK), *TINY]


def test_cli_prints_progress_lines_without_adverts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from prunekit.experiments import cli

    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["run", str(QUICK), *TINY]) == 0
    assert not [w for w in caught if "Previous log files" in str(w.message)]
    out, err = capfd.readouterr()  # file-descriptor level: Lightning's handlers included
    assert "💡" not in err and "litlogger" not in err and "litmodels" not in err
    assert "Previous log files" not in err
    # one progress line per validation, dense and pruning phases
    for line in (
        "dense step 10/20",
        "dense step 20/20",
        "pruning step 10/20",
        "pruning step 20/20",
    ):
        assert line in err
    assert "it/s" not in err  # no progress bar when stderr is not a terminal
    assert "global sparsity" in out


@pytest.mark.slow
def test_cli_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdout and stderr are the terminal
        os.chdir(tmp_path)
        os.execv(sys.executable, COMMAND)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, out[-3000:]
    assert "it/s" in out  # Lightning's progress bar
    assert "pruning step 20/20" in out
    assert "💡" not in out and "Previous log files" not in out
