"""Many runs at once (``prunekit run|lottery`` with several configs, sweeps, ``--jobs`` and
``--cluster``): the plan of runs, bad input refused before anything starts, the process
pool (limits, failures, Ctrl-C), and results identical to serial runs.

The process-pool tests use stand-in children (``python -c ...``) so they take well under
a second; the end-to-end tests train tiny LeNet-300-100 runs on a fake Fashion-MNIST.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from prunekit.experiments import cli, jobs, report
from prunekit.experiments.config import ConfigError

from tests.test_lottery import write_fake_fashion_mnist

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "experiments" / "configs" / "quick_gradual.yaml")
QUICK_LOTTERY = str(REPO / "experiments" / "configs" / "quick_lottery.yaml")
DEVNULL = open(os.devnull, "w")  # noqa: SIM115 (module-long sink for progress lines)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"), n_train=200, n_test=50)


def tiny(out: Path, data: Path) -> list[str]:
    """A gradual run of 6 dense and 12 pruning steps on 60 images (a few seconds)."""
    return [
        f"out_dir={out}",
        f"data.root={data}",
        "data.val_size=50",
        "data.subset=60",
        "data.batch_size=30",
        "steps=12",
        "dense.steps=6",
        "train.val_every=4",
        "checkpoint_every=0",
        "pruning.schedule={kind: polynomial, initial: 0.0, final: 0.8, begin: 0, end: 9, frequency: 3}",
    ]


def folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir())


def results(run: Path) -> dict[str, Any]:
    """What a finished gradual run produced, less its wall times."""
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("wall_s")
    return {
        "summary": summary,
        "final": torch.load(run / "final.pt", weights_only=True),
        "masks": torch.load(run / "masks.pt", weights_only=True),
        "metrics": (run / "metrics.csv").read_text(),
    }


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["summary"] == b["summary"]
    assert a["metrics"] == b["metrics"]
    for key in ("final", "masks"):
        assert a[key].keys() == b[key].keys()
        for name, value in a[key].items():
            assert value.dtype == b[key][name].dtype
            assert torch.equal(value, b[key][name]), (key, name)


# ------------------------------------------------------------------ sweeps and the plan
@pytest.mark.parametrize(
    ("override", "key", "values"),
    [
        ("seed=0,1,2", "seed", ["0", "1", "2"]),
        ("train.lr=0.1", "train.lr", ["0.1"]),
        ("controls=[random_reinit,random_prune]", "controls", ["[random_reinit,random_prune]"]),
        ("controls=[random_reinit],[]", "controls", ["[random_reinit]", "[]"]),
        ("pruning.options={n: 2, m: 4},{}", "pruning.options", ["{n: 2, m: 4}", "{}"]),
        ('data.root="/a,b",/c', "data.root", ['"/a,b"', "/c"]),
        ("name=a=b", "name", ["a=b"]),
    ],
)
def test_split_values_splits_only_top_level_commas(
    override: str, key: str, values: list[str]
) -> None:
    assert jobs.split_values(override) == (key, values)


def test_plan_is_the_product_with_swept_values_in_the_name_but_seeds(tmp_path: Path) -> None:
    specs = jobs.plan(
        "run",
        [QUICK],
        [f"out_dir={tmp_path}", "seed=0,1,2", "pruning.method=magnitude,random", "train.lr=0.01"],
    )
    assert len(specs) == 3 * 2  # the product, seeds outermost as written
    expected = [
        (f"quick-gradual_pruning.method-{method}", seed)
        for seed in (0, 1, 2)
        for method in ("magnitude", "random")
    ]
    assert [(s.name, s.seed) for s in specs] == expected
    assert [s.swept for s in specs][:2] == [
        ("seed=0", "pruning.method=magnitude"),
        ("seed=0", "pruning.method=random"),
    ]
    assert len({s.folder for s in specs}) == 6
    assert all(s.folder.parent == tmp_path for s in specs)
    assert all(s.folder.name.startswith(s.name + "-") for s in specs)
    # the child runs exactly this command line: its overrides carry the name
    assert specs[1].argv(3) == [
        "run",
        QUICK,
        f"out_dir={tmp_path}",
        "seed=0",
        "pruning.method=random",
        "train.lr=0.01",
        "name=quick-gradual_pruning.method-random",
        "--threads",
        "3",
    ]


def test_several_configs_are_several_runs(tmp_path: Path) -> None:
    specs = jobs.plan(
        "run", [QUICK, QUICK.replace("quick_gradual", "gmp_lenet300_90")], [f"out_dir={tmp_path}"]
    )
    assert [s.name for s in specs] == ["quick-gradual", "gmp-lenet300-90"]
    assert [s.swept[0] for s in specs] == [specs[0].config, specs[1].config]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jobs", "0"], "--jobs='0' must be a whole number >= 1"),
        (["--jobs", "-1"], "--jobs='-1' must be a whole number >= 1"),
        (["--jobs", "abc"], "--jobs='abc' must be a whole number >= 1"),
        (["--jobs", "1.5"], "--jobs='1.5' must be a whole number >= 1"),
        (["seed="], "override 'seed=' has no value"),
        (["seed=0,"], "override 'seed=0,' sweeps over an empty value (value number 2 of 2)"),
        (["seed=0,,1"], "sweeps over an empty value (value number 2 of 3)"),
        (["seed=0,0"], "override 'seed=0,0' lists 0 twice"),
        (["seed=0,x"], "run 2 of 2 (seed=x): bad value for 'seed'"),
        (["checkpoint_every=5,10"], "resolve to the same run folder"),
        (["out_dir=a,a"], "override 'out_dir=a,a' lists a twice"),
        ([QUICK], "follows a key=value override: config files come first"),
        (["--partition", "gpu"], "--partition only apply with --cluster"),
        (["--jobs", "2", "--cluster", "local"], "--jobs='2' is for this machine"),
        (["--cluster", "slurm"], "sbatch is not on PATH"),
        (["--cluster", "local", "--time", "0"], "--time='0' must be a whole number >= 1"),
        (["--cluster", "local", "--cluster-option", "bogus=1"], "bogus"),
        (["--cluster", "local", "--cluster-option", "slurm_qos"], "must look like KEY=VALUE"),
        (["--threads", "0", "seed=0,1"], "--threads=0 must be >= 1"),
    ],
)
def test_bad_input_is_refused_naming_it_before_anything_starts(
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    message: str,
) -> None:
    if "slurm" in extra:
        monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here, whatever the machine
    out = tmp_path / "runs"
    assert cli.main(["run", QUICK, *tiny(out, data), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit run: error: ")
    assert message in err
    assert not out.exists()  # nothing written, nothing started


def test_same_name_different_settings_would_be_pooled_so_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(Path(QUICK).read_text().replace("lr: 1.2e-3", "lr: 3.0e-3"))
    with pytest.raises(ConfigError, match=r"share name='quick-gradual' but differ in train\.lr"):
        jobs.plan("run", [QUICK, str(other)], [f"out_dir={tmp_path}"])
    # the same experiment twice (only out_dir differs) is refused too
    with pytest.raises(ConfigError, match="are the same experiment"):
        jobs.plan("run", [QUICK], [f"out_dir={tmp_path / 'a'},{tmp_path / 'b'}"])


def test_the_same_config_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resolve to the same run folder"):
        jobs.plan("run", [QUICK, QUICK], [f"out_dir={tmp_path}"])


def test_lottery_rounds_sweep_shares_a_folder_so_refused(tmp_path: Path) -> None:
    # rounds is not hashed (raising it extends a run in its folder): one folder, refused
    with pytest.raises(ConfigError, match="resolve to the same run folder"):
        jobs.plan("lottery", [QUICK_LOTTERY], [f"out_dir={tmp_path}", "rounds=2,3"])


def test_a_folder_in_use_is_refused_before_starting(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prunekit.experiments.paths import locked

    specs = jobs.plan("run", [QUICK], [*tiny(tmp_path, data), "seed=0,1"])
    specs[1].folder.mkdir(parents=True)
    with locked(specs[1].folder):  # as another process running seed=1 would
        assert cli.main(["run", QUICK, *tiny(tmp_path, data), "seed=0,1", "--jobs", "2"]) == 2
    assert f"the run folder {specs[1].folder} is in use by pid {os.getpid()}" in (
        capsys.readouterr().err
    )
    assert not specs[0].folder.exists()


# ------------------------------------------------------------------ the process pool
def recorder(path: Path, seconds: float, code: int = 0) -> list[str]:
    """A child that appends its start and end times to ``path``, sleeps, exits ``code``."""
    script = (
        "import sys, time; t = time.time(); time.sleep(float(sys.argv[2])); "
        "open(sys.argv[1], 'a').write(f'{t} {time.time()}\\n'); sys.exit(int(sys.argv[3]))"
    )
    return [sys.executable, "-c", script, str(path), str(seconds), str(code)]


def test_at_most_jobs_children_at_a_time_and_a_failure_stops_no_other(tmp_path: Path) -> None:
    times = tmp_path / "times.txt"
    codes = [0, 3, 0, 0, 0]
    tasks = [
        jobs.Task(f"t{i}", recorder(times, 0.4, code), tmp_path / f"t{i}.log")
        for i, code in enumerate(codes)
    ]
    outcomes = jobs.run_tasks(tasks, jobs=2, out=DEVNULL)
    assert [o.status for o in outcomes] == [
        "finished",
        "failed (exit 3)",
        "finished",
        "finished",
        "finished",
    ]
    spans = [tuple(map(float, line.split())) for line in times.read_text().splitlines()]
    assert len(spans) == 5  # all ran, the failed one too
    # most children alive at once, counted from their own clocks: 2, never 3
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    alive = peak = 0
    for _, change in events:
        alive += change
        peak = max(peak, alive)
    assert peak == 2


def test_a_child_that_cannot_start_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # its log folder is a file: the log cannot be opened
    tasks = [
        jobs.Task("blocked", [sys.executable, "-c", "pass"], tmp_path / "file" / "job.log"),
        jobs.Task("ok", [sys.executable, "-c", "pass"], tmp_path / "ok.log"),
    ]
    blocked, ok = jobs.run_tasks(tasks, jobs=1, out=DEVNULL)
    assert blocked.status.startswith("failed (not started: ")
    assert ok.status == "finished"


def test_exit_status_and_message_name_the_failed_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # stand-in children: the run with seed=1 fails, the others succeed at once
    fake = "import sys; sys.exit(4 if 'seed=1' in sys.argv else 0)"
    monkeypatch.setattr(jobs, "CHILD", (sys.executable, "-c", fake))
    code = cli.main(["run", QUICK, *tiny(tmp_path, data), "seed=0,1,2", "--jobs", "3"])
    captured = capsys.readouterr()
    assert code == 1
    specs = jobs.plan("run", [QUICK], [*tiny(tmp_path, data), "seed=0,1,2"])
    log = specs[1].folder / "job.log"
    assert f"1 of 3 runs did not finish: seed=1 (failed (exit 4), log: {log})" in captured.err
    table = captured.out.split("#  run")[1].splitlines()
    assert [line.split()[:4] for line in table[2:5]] == [
        ["1", "seed=0", "finished", table[2].split()[3]],
        ["2", "seed=1", "failed", "(exit"],
        ["3", "seed=2", "finished", table[4].split()[3]],
    ]
    assert "=== " in log.read_text()  # the child's command line heads its log


def test_ctrl_c_stops_the_children_and_starts_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs, "STOP_GRACE_S", 1.0)
    stubborn = (  # ignores SIGTERM: must be killed after the grace period
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    )
    tasks = [
        jobs.Task("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "a"),
        jobs.Task("stubborn", [sys.executable, "-c", stubborn], tmp_path / "b"),
        jobs.Task("never", [sys.executable, "-c", "pass"], tmp_path / "c"),
    ]
    pids: list[int] = []
    real_start = jobs._start

    def start(task: jobs.Task) -> Any:
        proc = real_start(task)
        pids.append(proc.pid)
        return proc

    monkeypatch.setattr(jobs, "_start", start)
    timer = threading.Timer(1.5, _thread.interrupt_main)  # Ctrl-C, as a terminal sends it
    began = time.monotonic()
    timer.start()
    outcomes = jobs.run_tasks(tasks, jobs=2, out=DEVNULL)
    took = time.monotonic() - began
    assert [o.status for o in outcomes] == ["stopped", "stopped", "not started"]
    assert len(pids) == 2
    for pid in pids:  # both gone (waited for, so not even zombies)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert took < 10  # 1.5 s, then SIGTERM, then SIGKILL of the stubborn one after 1 s


def test_sigterm_to_the_parent_stops_the_children_too(tmp_path: Path) -> None:
    task = jobs.Task(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "a"
    )
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    (outcome,) = jobs.run_tasks([task], jobs=1, out=DEVNULL)
    assert outcome.status == "stopped"
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored


def test_an_ignored_sighup_stays_ignored(tmp_path: Path) -> None:
    """Under ``nohup`` (SIGHUP ignored) a closed terminal must not stop the runs."""
    task = jobs.Task(
        "short", [sys.executable, "-c", "import time; time.sleep(2.5)"], tmp_path / "a"
    )
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGHUP))
        timer.start()
        (outcome,) = jobs.run_tasks([task], jobs=1, out=DEVNULL)
        timer.join()
        assert outcome.status == "finished"
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


# ------------------------------------------------------------------ identical to serial runs
@pytest.fixture(scope="module")
def serial(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The run folders of seed 0 and seed 1 (in that order), each made by a plain serial
    ``prunekit run`` in this process."""
    out = tmp_path_factory.mktemp("serial")
    made = []
    for seed in (0, 1):
        before = set(folders(out))
        assert cli.main(["run", QUICK, *tiny(out, data), f"seed={seed}", "--threads", "1"]) == 0
        (new,) = set(folders(out)) - before
        made.append(new)
    return made


def test_jobs_2_gives_bit_identical_results_and_report_works(
    data: Path, serial: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert cli.main(["run", QUICK, *tiny(tmp_path, data), "seed=0,1", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    parallel = [tmp_path / s.name for s in serial]
    # out_dir is not hashed: the same folder names as the serial runs, in another out_dir
    assert folders(tmp_path) == sorted(parallel)
    for a, b in zip(serial, parallel, strict=True):
        assert_identical(results(a), results(b))
        assert (b / "job.log").is_file()
    # prunekit report over the parallel folders pools the two seeds: checked by hand
    accs = [json.loads((p / "summary.json").read_text())["pruned_test_acc"] for p in parallel]
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    text = report.compare([str(p) for p in parallel])
    assert f"{mean:.4f} ± {std:.4f}" in text
    assert f"{mean:.4f} ± {std:.4f}" in out  # the same comparison ends the --jobs output
    assert "[1/2] finished" in out and "[2/2] finished" in out


def test_cluster_local_runs_the_submitit_path_with_identical_results(
    data: Path, serial: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("submitit", reason="the cluster extra: pip install 'prunekit[cluster]'")
    capsys.readouterr()
    code = cli.main(["run", QUICK, *tiny(tmp_path, data), "seed=1", "--cluster", "local"])
    out = capsys.readouterr().out
    assert code == 0, out
    (run,) = folders(tmp_path)
    assert run.name == serial[1].name
    assert_identical(results(serial[1]), results(run))
    job_id = out.split(" job ")[1].split()[0]
    assert f"[1/1] finished  {run.name}  job {job_id}" in out
    assert list((run / "cluster").glob(f"{job_id}_*"))  # submitit's files, in the run folder


@pytest.mark.slow
def test_lottery_jobs_2_equals_serial(data: Path, tmp_path: Path) -> None:
    """Two lottery runs (seeds) with --jobs 2 equal the same runs made one by one."""
    args = [
        f"data.root={data}",
        "data.val_size=50",
        "data.subset=60",
        "data.batch_size=30",
        "rounds=2",
        "steps_per_round=8",
        "train.val_every=4",
    ]
    for seed in (0, 1):
        assert (
            cli.main(["lottery", QUICK_LOTTERY, *args, f"out_dir={tmp_path / 's'}", f"seed={seed}"])
            == 0
        )
    assert (
        cli.main(
            [
                "lottery",
                QUICK_LOTTERY,
                *args,
                f"out_dir={tmp_path / 'p'}",
                "seed=0,1",
                "--jobs",
                "2",
            ]
        )
        == 0
    )
    for a, b in zip(folders(tmp_path / "s"), folders(tmp_path / "p"), strict=True):
        sa, sb = (json.loads((f / "summary.json").read_text()) for f in (a, b))
        sa.pop("wall_s"), sb.pop("wall_s")
        for rec in sa["rounds"] + sb["rounds"]:
            rec.pop("wall_s", None)
        assert sa == sb
        for state in sorted(a.rglob("round_*/*.pt")):
            x = torch.load(state, weights_only=True)
            y = torch.load(b / state.relative_to(a), weights_only=True)
            assert x.keys() == y.keys()
            for key in x:
                for name in x[key]:
                    assert torch.equal(x[key][name], y[key][name]), (state, key, name)


class FakeJob:
    """What run_cluster reads of a submitit job."""

    def __init__(self, job_id: str, error: Exception | None, polls: int) -> None:
        self.job_id, self.error, self.polls, self.cancelled = job_id, error, polls, False
        self.paths = type("Paths", (), {"stderr": f"/logs/{job_id}.err"})()
        self.state = "FAILED" if error else "COMPLETED"

    def done(self) -> bool:
        self.polls -= 1
        return self.polls < 0

    def exception(self) -> Exception | None:
        return self.error

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


def test_run_cluster_reports_each_job_and_a_refused_submission_fails_alone(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = jobs.plan("run", [QUICK], [*tiny(tmp_path, data), "seed=0,1,2"])
    made: list[FakeJob] = []

    class FakeExecutor:
        def submit(self, fn: Any, argv: list[str], cwd: str) -> FakeJob:
            assert fn is jobs.run_command and cwd == os.getcwd()
            if "seed=1" in argv:
                raise RuntimeError("sbatch: error: invalid partition")
            made.append(
                FakeJob(
                    str(100 + len(made)), None if "seed=0" in argv else ValueError("boom"), polls=2
                )
            )
            return made[-1]

    monkeypatch.setattr(jobs, "_executor", lambda *args: FakeExecutor())
    outcomes = jobs.run_cluster(specs, "local", 1, {}, out=DEVNULL, poll_s=0.01)
    assert [(o.status, o.job_id) for o in outcomes] == [
        ("finished", "100"),
        ("failed (not submitted: RuntimeError)", None),
        ("failed (job FAILED)", "101"),
    ]
    # Ctrl-C while waiting cancels the jobs not done yet
    made.clear()

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs.time, "sleep", interrupt)
    specs = jobs.plan("run", [QUICK], [*tiny(tmp_path, data), "seed=0,2"])
    outcomes = jobs.run_cluster(specs, "local", 1, {}, out=DEVNULL, poll_s=0.01)
    assert [o.status for o in outcomes] == ["cancelled", "cancelled"]
    assert [j.cancelled for j in made] == [True, True]


@pytest.mark.slow
def test_cluster_local_a_failing_job_is_named_and_the_others_finish(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("submitit", reason="the cluster extra: pip install 'prunekit[cluster]'")
    missing = tmp_path / "no-data"
    args = [*tiny(tmp_path / "runs", data), f"data.root={data},{missing}", "--cluster", "local"]
    assert cli.main(["run", QUICK, *args]) == 1
    captured = capsys.readouterr()
    assert f"FAILED    data.root={missing}" in captured.out
    assert f"1 of 2 runs did not finish: data.root={missing} (failed (job " in captured.err
    assert "Fashion-MNIST folder not found" in Path(captured.err.split("log: ")[1][:-2]).read_text()
    ok = [f for f in folders(tmp_path / "runs") if (f / "summary.json").is_file()]
    assert len(ok) == 1 and "data.root-" in ok[0].name


def test_several_lottery_runs_share_the_slots_for_their_controls(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stand-in children write their command line into their run folder: 2 lottery runs,
    # --jobs 4: each gets --jobs 2; 3 runs, --jobs 4: one process each (no --jobs)
    script = (
        "import sys, pathlib; log = pathlib.Path(sys.argv[-1]); log.parent.mkdir(parents=True,"
        " exist_ok=True); (log.parent / 'argv.txt').write_text(' '.join(sys.argv[1:-1]))"
    )
    monkeypatch.setattr(jobs, "CHILD", (sys.executable, "-c", script))
    real_task = jobs.Task

    def task(label: str, argv: list[str], log: Path, env: dict[str, str]) -> jobs.Task:
        return real_task(label, [*argv, str(log)], log, env)

    monkeypatch.setattr(jobs, "Task", task)
    for out, seeds, expected in (("a", "seed=0,1", ["--jobs", "2"]), ("b", "seed=0,1,2", [])):
        args = [f"out_dir={tmp_path / out}", f"data.root={data}", seeds]
        assert cli.main(["lottery", QUICK_LOTTERY, *args, "--jobs", "4"]) == 0
        calls = [p.read_text().split() for p in sorted((tmp_path / out).glob("*/argv.txt"))]
        assert len(calls) == len(seeds.split(","))
        for argv in calls:
            assert argv[argv.index("--threads") :] == ["--threads", "1", *expected]
    assert jobs.processes_per_run("run", 8, 2) == 1  # gradual runs have no units
