"""Many runs at once: several configs and sweeps over override values, run in parallel
processes on this machine (``--jobs N``) or as cluster jobs through submitit
(``--cluster slurm``).

How a user writes several runs (``prunekit run`` and ``prunekit lottery`` alike)::

    prunekit run a.yaml b.yaml                        # two configs: two runs
    prunekit run a.yaml seed=0,1,2 train.lr=0.1,0.01  # a sweep: the product, 6 runs
    prunekit run a.yaml seed=0,1 --jobs 2             # two processes at a time

A value with a comma at its top level lists the values of a sweep; commas inside
brackets, braces or quotes do not split (``controls=[random_reinit,random_prune]`` is one
value, ``'controls=[random_reinit],[random_prune]'`` two). Every run of a sweep keeps its
own run folder as a single run would (``out_dir/<name>-<hash>``). A swept key other than
``seed`` (and the keys that are not part of a run folder's identity, ``out_dir``,
``rounds``, ``checkpoint_every``) is added to the run's name (``quick-gradual_train.lr-0.01``) so
that ``prunekit report`` keeps variants apart and pools only seeds. Two runs that would
share a folder, or share a name without differing only in their seed, are refused before
anything starts.

Each run is a child process ``python -m prunekit.experiments.cli <command> CONFIG
overrides... --threads T`` (the same command a serial run is), with its output in
``<run folder>/job.log``. On a cluster each run is one submitit job calling the same
command line in the job's process (:func:`run_command`).

Another subcommand joins by calling :func:`add_arguments` on its parser and
:func:`register_command` with its config schema.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from omegaconf import DictConfig, OmegaConf
from prunekit.experiments.config import ConfigError, GradualConfig, LotteryConfig, load_config
from prunekit.experiments.paths import UNHASHED_KEYS, RunFolderError, RunPaths

try:
    import fcntl
except ImportError:  # not POSIX: no lock probe (the run itself still refuses)
    fcntl = None  # type: ignore[assignment]

#: The subcommands that take ``CONFIG... [key=value ...]`` and so can run many runs.
COMMANDS: dict[str, type] = {"run": GradualConfig, "lottery": LotteryConfig}

#: Swept keys that are not added to a run's name: the seed (runs differing only in their
#: seed are one experiment, pooled by ``prunekit report``), the name itself, and the keys
#: left out of the run folder's hash.
NOT_IN_NAME = ("seed", "name", *UNHASHED_KEYS)

#: Seconds a stopped child gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0

#: Seconds a worker process (:class:`WorkerPool`) still starting up gets to return when
#: every unit is done, before it is terminated.
START_WAIT_S = 2.0

CLUSTERS = ("slurm", "local")

#: The command line of a child process, before ``spec.argv(threads)``: a serial run's.
CHILD = (sys.executable, "-m", "prunekit.experiments.cli")


def register_command(command: str, schema: type) -> None:
    """Let ``prunekit <command> CONFIG... [key=value ...]`` run many runs (its parser gets
    the options through :func:`add_arguments`).

    >>> register_command("run", GradualConfig)  # already there: no change
    >>> register_command("run", LotteryConfig)
    Traceback (most recent call last):
    ValueError: command='run' is already registered with GradualConfig
    """
    if COMMANDS.get(command, schema) is not schema:
        raise ValueError(
            f"command={command!r} is already registered with {COMMANDS[command].__name__}"
        )
    COMMANDS[command] = schema


def add_arguments(cmd: Any) -> None:
    """The options of many runs, on a subcommand's ``argparse`` parser."""
    cmd.add_argument(
        "--jobs",
        default=None,
        metavar="N",
        help="run up to N runs at a time on this machine, each in its own process with "
        "--threads torch threads (default 1: one after another); a single lottery run "
        "trains its controls in up to N-1 worker processes beside its lottery rounds",
    )
    cmd.add_argument(
        "--cluster",
        default=None,
        choices=CLUSTERS,
        help="submit one job per run with submitit: slurm, or local (submitit's local "
        "executor: every job at once on this machine, to try the cluster path)",
    )
    cmd.add_argument("--partition", default=None, help="--cluster slurm: the SLURM partition")
    cmd.add_argument(
        "--time", default=None, metavar="MIN", help="--cluster: job time limit, minutes"
    )
    cmd.add_argument(
        "--cpus-per-task",
        default=None,
        metavar="N",
        help="--cluster: CPUs per job (default --threads)",
    )
    cmd.add_argument("--mem-gb", default=None, metavar="GB", help="--cluster: memory per job")
    cmd.add_argument("--gpus-per-node", default=None, metavar="N", help="--cluster: GPUs per job")
    cmd.add_argument(
        "--cluster-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--cluster: any other submitit parameter, e.g. slurm_account=abc (repeatable)",
    )
    cmd.add_argument(
        "--no-wait",
        action="store_true",
        help="--cluster: submit, print the job ids and return without waiting",
    )


# ------------------------------------------------------------------------ sweeps
def split_values(override: str) -> tuple[str, list[str]]:
    """``key=v1,v2,...`` as ``(key, [v1, v2, ...])``, splitting only at top-level commas
    (not inside ``[]``, ``{}``, ``()`` or quotes).

    >>> split_values("seed=0,1,2")
    ('seed', ['0', '1', '2'])
    >>> split_values("controls=[random_reinit,random_prune]")
    ('controls', ['[random_reinit,random_prune]'])
    >>> split_values("data.root='/a,b',/c")
    ('data.root', ["'/a,b'", '/c'])
    >>> split_values("seed=")
    Traceback (most recent call last):
    prunekit.experiments.config.ConfigError: override 'seed=' has no value (write seed=null for null)
    """
    key, eq, text = override.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"override {override!r} must look like key=value")
    values, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    if quote or depth != 0:
        raise ConfigError(f"override {override!r} has an unclosed quote or bracket")
    if len(values) == 1 and not values[0].strip():
        raise ConfigError(f"override {override!r} has no value (write {key}=null for null)")
    empty = [i + 1 for i, v in enumerate(values) if not v.strip()]
    if empty:
        raise ConfigError(
            f"override {override!r} sweeps over an empty value (value number "
            f"{', '.join(map(str, empty))} of {len(values)}); remove the extra comma"
        )
    if len(set(values)) != len(values):
        twice = sorted({v for v in values if values.count(v) > 1})
        raise ConfigError(f"override {override!r} lists {', '.join(twice)} twice")
    return key, values


@dataclass(frozen=True)
class RunSpec:
    """One run of many: the command line of a serial run, and where it writes.

    ``swept`` holds the values that tell it apart from the other runs (its config file
    when there are several, the swept ``key=value`` pairs)."""

    command: str
    config: str
    overrides: tuple[str, ...]
    folder: Path
    name: str
    seed: int
    swept: tuple[str, ...] = ()
    resolved: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def label(self) -> str:
        return " ".join(self.swept) or self.folder.name

    def argv(self, threads: int) -> list[str]:
        """The arguments of ``prunekit`` that run it."""
        return [self.command, self.config, *self.overrides, "--threads", str(threads)]


def _suffix(value: str) -> str:
    kept = "".join(c if c.isalnum() or c in "._-" else "_" for c in value)
    return kept.strip("_") or "_"


def plan(command: str, configs: Sequence[str], overrides: Sequence[str]) -> list[RunSpec]:
    """Every run of ``configs`` × the product of the swept override values, each config
    loaded and validated (:func:`load_config`), checked to have a folder of its own and a
    name that ``prunekit report`` will not pool with another experiment. Raises
    :class:`ConfigError` naming the run and the problem; nothing is written.

    >>> runs = plan("run", ["experiments/configs/quick_gradual.yaml"],
    ...             ["seed=0,1", "pruning.method=magnitude,random"])
    >>> [(r.name, r.seed) for r in runs]  # doctest: +NORMALIZE_WHITESPACE
    [('quick-gradual_pruning.method-magnitude', 0), ('quick-gradual_pruning.method-random', 0),
     ('quick-gradual_pruning.method-magnitude', 1), ('quick-gradual_pruning.method-random', 1)]
    """
    if command not in COMMANDS:
        raise ValueError(f"command={command!r} is not one of {sorted(COMMANDS)}")
    schema = COMMANDS[command]
    axes: dict[str, list[str]] = {}
    for override in overrides:  # a key given twice: the last one counts, as in a single run
        key, values = split_values(override)
        axes.pop(key, None)
        axes[key] = values
    keys = list(axes)
    swept = [k for k, values in axes.items() if len(values) > 1]
    in_name = [k for k in swept if k not in NOT_IN_NAME]
    specs: list[RunSpec] = []
    combos = list(itertools.product(*axes.values()))
    total = len(configs) * len(combos)
    for config in configs:
        for combo in combos:
            items = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            chosen = dict(zip(keys, combo, strict=True))
            tags = ([config] if len(configs) > 1 else []) + [f"{k}={chosen[k]}" for k in swept]
            where = f"run {len(specs) + 1} of {total}" + (f" ({' '.join(tags)})" if tags else "")
            where = f"{where}: " if total > 1 else ""
            try:
                cfg = load_config(schema, config, items)
                if in_name:
                    suffix = "_".join(f"{k}-{_suffix(chosen[k])}" for k in in_name)
                    items.append(f"name={cfg.name}_{suffix}")
                    cfg = load_config(schema, config, items)
                folder = RunPaths.for_config(cfg).root
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
            specs.append(
                RunSpec(
                    command=command,
                    config=config,
                    overrides=tuple(items),
                    folder=folder,
                    name=str(cfg.name),
                    seed=int(cfg.seed),
                    swept=tuple(tags),
                    resolved=_plain(cfg),
                )
            )
    _check_distinct(specs)
    return specs


def _plain(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return plain


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(a.keys() | b.keys())
            for d in _differing(a.get(k), b.get(k), f"{prefix}{k}.")
        ]
    return [] if a == b else [prefix.rstrip(".")]


def _check_distinct(specs: Sequence[RunSpec]) -> None:
    """Two runs never share a run folder; two runs sharing a name differ in their seed
    and in nothing else that counts (``prunekit report`` pools them as seeds)."""
    by_folder: dict[Path, RunSpec] = {}
    for spec in specs:
        key = spec.folder.resolve()
        if key in by_folder:
            other = by_folder[key]
            raise ConfigError(
                f"runs '{other.label}' and '{spec.label}' resolve to the same run folder "
                f"{spec.folder} (one process per run folder; out_dir, rounds and "
                "checkpoint_every are not part of a run folder's identity): sweep values that "
                "change the run, or run them one after the other"
            )
        by_folder[key] = spec
    ignored = ("seed", *UNHASHED_KEYS)
    for a, b in itertools.combinations(specs, 2):
        if (a.command, a.name) != (b.command, b.name):
            continue
        differ = [k for k in _differing(a.resolved, b.resolved) if k.split(".")[0] not in ignored]
        if differ:
            raise ConfigError(
                f"runs '{a.label}' and '{b.label}' share name={a.name!r} but differ in "
                f"{', '.join(differ)}: prunekit report would pool them as seeds of one "
                "experiment; give them different names"
            )
        if a.seed == b.seed:
            raise ConfigError(
                f"runs '{a.label}' and '{b.label}' are the same experiment "
                f"(name={a.name!r}, seed={a.seed}) in two folders, {a.folder} and {b.folder}"
            )


def _probe_unlocked(folder: Path) -> None:
    """Raise if another process holds the run folder's lock now (the run would refuse)."""
    lock = RunPaths(folder).lock
    if fcntl is None or not lock.is_file():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text(errors="replace").strip() or "another process"
            raise RunFolderError(
                f"the run folder {folder} is in use by {holder}: one process per run folder"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ options
def positive_int(option: str, text: object) -> int:
    """``text`` as a whole number >= 1, else :class:`ConfigError` naming the option.

    >>> positive_int("--jobs", "4")
    4
    >>> positive_int("--jobs", "abc")
    Traceback (most recent call last):
    prunekit.experiments.config.ConfigError: --jobs='abc' must be a whole number >= 1
    """
    try:
        value = int(str(text), 10)
    except ValueError:
        value = 0
    if value < 1 or str(value) != str(text).strip().lstrip("+"):
        raise ConfigError(f"{option}={text!r} must be a whole number >= 1")
    return value


def positive_number(option: str, text: object) -> float:
    """``text`` as a number > 0, else :class:`ConfigError` naming the option."""
    try:
        value = float(str(text))
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{option}={text!r} must be a number > 0")
    return value


def cluster_parameters(args: Any) -> dict[str, Any]:
    """submitit parameters from the ``--cluster`` options (checked; none set is left out).

    >>> from argparse import Namespace
    >>> cluster_parameters(Namespace(cluster="slurm", partition="gpu", time="90", threads=2,
    ...     cpus_per_task=None, mem_gb=None, gpus_per_node=None,
    ...     cluster_option=["slurm_account=lab"]))
    {'timeout_min': 90, 'cpus_per_task': 2, 'slurm_partition': 'gpu', 'slurm_account': 'lab'}
    """
    params: dict[str, Any] = {}
    if args.time is not None:
        params["timeout_min"] = positive_int("--time", args.time)
    cpus = args.cpus_per_task if args.cpus_per_task is not None else args.threads
    params["cpus_per_task"] = positive_int("--cpus-per-task", cpus)
    if args.mem_gb is not None:
        params["mem_gb"] = positive_number("--mem-gb", args.mem_gb)
    if args.gpus_per_node is not None:
        params["gpus_per_node"] = positive_int("--gpus-per-node", args.gpus_per_node)
    if args.partition is not None:
        if not str(args.partition).strip():
            raise ConfigError(f"--partition={args.partition!r} must name a partition")
        params["slurm_partition"] = str(args.partition)
    for item in args.cluster_option:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"--cluster-option {item!r} must look like KEY=VALUE")
        if key in params:
            raise ConfigError(f"--cluster-option {item!r} sets {key} a second time")
        params[key] = yaml.safe_load(value)
    return params


_CLUSTER_ONLY = (
    ("partition", "--partition"),
    ("time", "--time"),
    ("cpus_per_task", "--cpus-per-task"),
    ("mem_gb", "--mem-gb"),
    ("gpus_per_node", "--gpus-per-node"),
)


def _check_options(args: Any) -> None:
    if not isinstance(args.threads, int) or args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    if args.jobs is not None:
        positive_int("--jobs", args.jobs)
        if args.cluster is not None:
            raise ConfigError(
                f"--jobs={args.jobs!r} is for this machine; with --cluster={args.cluster} "
                "every run is its own job (leave out --jobs)"
            )
    if args.cluster is None:
        given = [flag for attr, flag in _CLUSTER_ONLY if getattr(args, attr) is not None]
        given += ["--cluster-option"] * bool(args.cluster_option) + ["--no-wait"] * args.no_wait
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --cluster slurm|local")


# ------------------------------------------------------------------------ entry point
def _is_config_file(item: str) -> bool:
    return "=" not in item and (item.endswith((".yaml", ".yml")) or Path(item).is_file())


def configs_and_overrides(args: Any) -> tuple[list[str], list[str]]:
    """The positionals: config files (``*.yaml``, ``*.yml`` or existing files) up to the
    first other item, then ``key=value`` overrides.

    >>> from argparse import Namespace
    >>> configs_and_overrides(Namespace(config="a.yaml", overrides=["b.yml", "seed=0,1"]))
    (['a.yaml', 'b.yml'], ['seed=0,1'])
    """
    rest = list(args.overrides)
    configs = [args.config]
    while rest and _is_config_file(rest[0]):
        configs.append(rest.pop(0))
    stray = [item for item in rest if _is_config_file(item)]
    if stray:
        raise ConfigError(
            f"{stray[0]!r} follows a key=value override: config files come first "
            "(prunekit run A.yaml B.yaml key=value ...)"
        )
    return configs, rest


def processes_per_run(command: str, jobs: int, runs: int) -> int:
    """How many of the ``jobs`` process slots each run gets when several runs share them:
    one, except for lottery runs when there are fewer runs than slots: ``jobs // runs``
    each (a lottery run trains its controls in its extra processes; see
    :func:`prunekit.experiments.lottery.run_lottery`).

    >>> processes_per_run("lottery", 4, 2), processes_per_run("lottery", 4, 3)
    (2, 1)
    >>> processes_per_run("run", 4, 2), processes_per_run("lottery", 2, 5)
    (1, 1)
    """
    if command != "lottery" or runs >= jobs:
        return 1
    return max(1, jobs // runs)


def main(args: Any, out: TextIO | None = None) -> int | None:
    """``prunekit run|lottery`` with several runs, ``--jobs`` or ``--cluster``: plan and
    check every run, then run them; the exit status. None when the arguments name one
    run to run here, in this process, as a serial run does (checked the same way)."""
    out = out or sys.stdout
    _check_options(args)
    configs, overrides = configs_and_overrides(args)
    specs = plan(args.command, configs, overrides)
    if args.print_config:
        from prunekit.experiments import report

        for spec in specs:
            cfg = load_config(COMMANDS[args.command], spec.config, list(spec.overrides))
            if len(specs) > 1:
                print(f"# {spec.label} -> {spec.folder}", file=out)
            print(report.config_help(COMMANDS[args.command], cfg), file=out)
        return 0
    if len(specs) == 1 and args.cluster is None:
        return None
    for spec in specs:
        _probe_unlocked(spec.folder)
    threads = int(args.threads)
    if args.cluster is not None:
        outcomes = run_cluster(
            specs, args.cluster, threads, cluster_parameters(args), not args.no_wait, out
        )
    else:
        jobs = positive_int("--jobs", args.jobs or 1)
        per_run = processes_per_run(args.command, jobs, len(specs))
        tasks = [
            Task(
                spec.label,
                [*CHILD, *spec.argv(threads), *(["--jobs", str(per_run)] if per_run > 1 else [])],
                RunPaths(spec.folder).job_log,
                {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
            )
            for spec in specs
        ]
        cores = os.cpu_count() or 1
        at_once = min(jobs, len(specs))
        each = f", each with --jobs {per_run} for its controls" if per_run > 1 else ""
        print(
            f"prunekit {args.command}: {len(specs)} runs, {at_once} at a time{each}, "
            f"{threads} torch thread(s) per process ({cores} CPU cores here); each run's "
            "output goes to <run folder>/job.log",
            file=out,
            flush=True,
        )
        if at_once * per_run * threads > cores:
            print(
                f"note: {at_once * per_run} processes x --threads {threads} > {cores} cores: "
                "they will compete for the cores",
                file=out,
                flush=True,
            )
        outcomes = run_tasks(tasks, jobs, out)
        for spec, outcome in zip(specs, outcomes, strict=True):
            outcome.folder = spec.folder
    return _finish(args.command, specs, outcomes, out)


def _finish(
    command: str, specs: Sequence[RunSpec], outcomes: Sequence[Outcome], out: TextIO
) -> int:
    print("\n" + outcome_table(outcomes), file=out, flush=True)
    done = [o.folder for o in outcomes if o.status == "finished" and o.folder is not None]
    if len(done) > 1:  # the finished ones, compared (a failed run has no summary.json)
        from prunekit.experiments import report

        try:
            print("\n" + report.compare([str(f) for f in done]), file=out, flush=True)
        except (ValueError, KeyError, OSError, RunFolderError) as e:
            print(f"\n(prunekit report over the run folders failed: {e})", file=out)
    listed = [o.folder for o in outcomes if o.status in ("finished", "submitted") and o.folder]
    if listed:
        folders = " ".join(str(f) for f in listed)
        print(f"\ncompare them: prunekit report {folders}", file=out, flush=True)
    bad = [o for o in outcomes if o.status not in ("finished", "submitted")]
    if not bad:
        return 0
    stopped = any(o.status in ("stopped", "not started", "cancelled") for o in outcomes)
    names = "; ".join(
        f"{o.label} ({o.status}{f', log: {o.log}' if o.log and o.log.exists() else ''})"
        for o in bad
    )
    print(
        f"prunekit {command}: {len(bad)} of {len(outcomes)} runs did not finish: {names}",
        file=sys.stderr,
        flush=True,
    )
    return 130 if stopped and not any(o.status.startswith("failed") for o in outcomes) else 1


# ------------------------------------------------------------------------ local processes
@dataclass
class Task:
    """A child process: its label, command line, log file and extra environment."""

    label: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """What became of one run: ``finished``, ``failed (...)``, ``stopped``, ``not
    started``, ``submitted`` (``--no-wait``) or ``cancelled``."""

    label: str
    status: str = "not started"
    seconds: float | None = None
    log: Path | None = None
    folder: Path | None = None
    job_id: str | None = None


def outcome_table(outcomes: Sequence[Outcome]) -> str:
    """The final table of many runs.

    >>> print(outcome_table([Outcome("seed=0", "finished", 12.34, folder=Path("runs/x"))]))
    #  run     status    time (s)  run folder
    -  ------  --------  --------  ----------
    1  seed=0  finished  12.3      runs/x
    """
    from prunekit.experiments.report import table

    with_ids = any(o.job_id for o in outcomes)
    headers = ["#", "run", "status", "time (s)", "run folder", *(["job id"] if with_ids else [])]
    rows = [
        [
            i,
            o.label,
            o.status,
            None if o.seconds is None else f"{o.seconds:.1f}",
            o.folder,
            *([o.job_id] if with_ids else []),
        ]
        for i, o in enumerate(outcomes, 1)
    ]
    return table(headers, rows)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While running children, SIGTERM or SIGHUP (a closed terminal) to this process stops
    them as Ctrl-C does. A signal already ignored stays ignored (``nohup`` ignores SIGHUP:
    runs started that way must outlive the terminal)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signals = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    caught = [sig for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN]
    try:
        previous = {sig: signal.signal(sig, handler) for sig in caught}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def run_tasks(
    tasks: Sequence[Task], jobs: int, out: TextIO | None = None, poll_s: float = 0.05
) -> list[Outcome]:
    """Run ``tasks`` as child processes, at most ``jobs`` at a time, in order. A failing
    task does not stop the others. Ctrl-C (or SIGTERM) stops the running children (SIGTERM
    to each child's process group, SIGKILL after ``STOP_GRACE_S``) and starts no more.
    Each child's stdout and stderr are appended to its ``log``.

    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "job.log"
    >>> ok = Task("ok", [sys.executable, "-c", "print('hi')"], log)
    >>> bad = Task("bad", [sys.executable, "-c", "raise SystemExit(3)"], log)
    >>> [o.status for o in run_tasks([ok, bad], jobs=2, out=open(os.devnull, "w"))]
    ['finished', 'failed (exit 3)']
    """
    jobs = positive_int("jobs", jobs)
    out = out or sys.stdout
    outcomes = [Outcome(t.label, log=t.log) for t in tasks]
    running: dict[int, tuple[subprocess.Popen[bytes], float]] = {}
    n = len(tasks)
    pending = list(range(n))

    def say(i: int, text: str) -> None:
        print(f"[{i + 1}/{n}] {text}", file=out, flush=True)

    with _sigterm_as_interrupt():
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    i = pending.pop(0)
                    try:
                        running[i] = (_start(tasks[i]), time.monotonic())
                    except OSError as e:  # e.g. its log cannot be written: it alone fails
                        outcomes[i].status = f"failed (not started: {e})"
                        say(i, f"FAILED    {tasks[i].label}  (not started: {e})")
                        continue
                    outcomes[i].status = "running"
                    say(
                        i,
                        f"started   {tasks[i].label}  (pid {running[i][0].pid}, log {tasks[i].log})",
                    )
                for i, (proc, started) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[i]
                    outcomes[i].seconds = time.monotonic() - started
                    if code == 0:
                        outcomes[i].status = "finished"
                        say(i, f"finished  {tasks[i].label}  ({outcomes[i].seconds:.1f} s)")
                    else:
                        outcomes[i].status = f"failed (exit {code})"
                        say(
                            i,
                            f"FAILED    {tasks[i].label}  (exit {code} after "
                            f"{outcomes[i].seconds:.1f} s); last lines of {tasks[i].log}:\n"
                            + _tail(tasks[i].log),
                        )
                time.sleep(poll_s)
        except KeyboardInterrupt:
            print(
                f"\ninterrupted: stopping {len(running)} running run(s), starting none of the "
                f"{len(pending)} left",
                file=out,
                flush=True,
            )
            _stop([proc for proc, _ in running.values()])
            for i, (_, started) in running.items():
                outcomes[i].status = "stopped"
                outcomes[i].seconds = time.monotonic() - started
                say(i, f"stopped   {tasks[i].label}")
        except BaseException:  # a bug here must not leave children running
            _stop([proc for proc, _ in running.values()])
            raise
    return outcomes


def _start(task: Task) -> subprocess.Popen[bytes]:
    task.log.parent.mkdir(parents=True, exist_ok=True)
    with open(task.log, "ab") as log:  # appended: a log of an earlier try stays
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        log.write(f"\n=== {now}: {' '.join(task.argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            task.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **task.env},
            start_new_session=True,  # a terminal's Ctrl-C reaches this process, which stops them
        )


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a 2nd Ctrl-C: stop them all
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------ cluster
def run_command(argv: list[str], cwd: str) -> None:
    """The body of one cluster job: ``prunekit *argv`` in this process, from ``cwd``
    (the submitting folder, so relative paths mean what they meant there). A run that
    fails raises ``RuntimeError``, so the job fails."""
    from prunekit.experiments import cli

    os.chdir(cwd)
    code = cli.main(argv)
    if code != 0:
        raise RuntimeError(f"prunekit {' '.join(argv)} exited with status {code}")


def _executor(cluster: str, folder: Path, params: dict[str, Any], name: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError(
            f"--cluster {cluster} needs submitit: pip install 'prunekit[cluster]'"
        ) from None
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    try:
        executor.update_parameters(name=name, **params)
    except (NameError, AssertionError, TypeError, ValueError) as e:
        raise ConfigError(f"--cluster {cluster} options {params}: {e}") from None
    return executor


def run_cluster(
    specs: Sequence[RunSpec],
    cluster: str,
    threads: int,
    params: dict[str, Any],
    wait: bool = True,
    out: TextIO | None = None,
    poll_s: float | None = None,
) -> list[Outcome]:
    """Submit one submitit job per run (folder of submitit's files: ``<run
    folder>/cluster``), print the job ids, and unless ``wait`` is False wait for them,
    printing each as it ends. Ctrl-C while waiting cancels the jobs not yet done."""
    out = out or sys.stdout
    if cluster not in CLUSTERS:
        raise ConfigError(f"--cluster={cluster!r} is not one of {CLUSTERS}")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "--cluster slurm: sbatch is not on PATH (submit from a SLURM login node; "
            "--cluster local tries the same path on this machine)"
        )
    with tempfile.TemporaryDirectory() as scratch:  # options checked before any is submitted
        _executor(cluster, Path(scratch), params, "check")
    cwd = os.getcwd()
    outcomes = [Outcome(s.label, folder=s.folder) for s in specs]
    n = len(specs)
    submitted: dict[int, Any] = {}
    try:
        for i, spec in enumerate(specs):
            folder = RunPaths(spec.folder).cluster_logs
            try:
                executor = _executor(cluster, folder, params, spec.folder.name)
                job = executor.submit(run_command, spec.argv(threads), cwd)
            except Exception as e:  # sbatch refused it, say: it alone fails
                outcomes[i].status = f"failed (not submitted: {type(e).__name__})"
                print(f"[{i + 1}/{n}] FAILED    {spec.label}  (not submitted: {e})", file=out)
                continue
            submitted[i] = job
            outcomes[i].job_id = str(job.job_id)
            outcomes[i].status = "submitted"
            outcomes[i].log = Path(job.paths.stderr)
            print(
                f"[{i + 1}/{n}] submitted {spec.label}  job {job.job_id}  -> {spec.folder}",
                file=out,
                flush=True,
            )
    except KeyboardInterrupt:
        _cancel(submitted, outcomes, out)
        return outcomes
    if not wait:
        return outcomes
    started = time.monotonic()
    poll = poll_s if poll_s is not None else (0.5 if cluster == "local" else 15.0)
    left = set(submitted)
    try:
        while left:
            for i in sorted(left):
                job = submitted[i]
                if not job.done():
                    continue
                left.discard(i)
                outcomes[i].seconds = time.monotonic() - started
                error = job.exception()
                if error is None:
                    outcomes[i].status = "finished"
                    print(
                        f"[{i + 1}/{n}] finished  {specs[i].label}  job {job.job_id}",
                        file=out,
                        flush=True,
                    )
                else:
                    outcomes[i].status = f"failed (job {job.state})"
                    reason = str(error).strip().splitlines()
                    print(
                        f"[{i + 1}/{n}] FAILED    {specs[i].label}  job {job.job_id}: "
                        f"{reason[-1] if reason else type(error).__name__}; log "
                        f"{job.paths.stderr}",
                        file=out,
                        flush=True,
                    )
            if left:
                time.sleep(poll)
    except KeyboardInterrupt:
        _cancel({i: submitted[i] for i in left}, outcomes, out)
    return outcomes


def _cancel(jobs_: dict[int, Any], outcomes: Sequence[Outcome], out: TextIO) -> None:
    print(f"\ninterrupted: cancelling {len(jobs_)} job(s)", file=out, flush=True)
    for i, job in jobs_.items():
        with contextlib.suppress(Exception):  # one that cannot be cancelled: the others still are
            job.cancel(check=False)
        outcomes[i].status = "cancelled"


# ------------------------------------------------------------------------ units of one run
class UnitError(RuntimeError):
    """A unit of a run (``prunekit lottery --jobs N``: one round's control) failed; the
    message names the unit, the process it ran in and the error (a worker's traceback)."""


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent dies (even by SIGKILL), so a
    worker never outlives the run that holds the run folder's lock."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _worker_main(setup: Any, args: tuple[Any, ...], tasks: Any, results: Any, parent: int) -> None:
    """A worker process: ``run = setup(*args)``, then ``run(unit)`` for each unit taken
    from ``tasks`` until None; every step is reported on ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops its workers itself
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked: not the parent's handler
    _die_with_parent(parent)
    pid = os.getpid()
    try:
        run = setup(*args)
    except BaseException:
        results.put(("setup failed", None, pid, traceback.format_exc()))
        return
    while True:
        unit = tasks.get()
        if unit is None:
            return
        results.put(("taken", unit, pid, ""))
        try:
            run(unit)
        except BaseException:
            results.put(("failed", unit, pid, traceback.format_exc()))
            return
        results.put(("done", unit, pid, ""))


def start_method(threads: int) -> str:
    """``fork`` where it is safe and cheap, else ``spawn``: fork needs POSIX, a single
    torch thread (no OpenMP thread pool, which a forked child cannot use) and no other
    Python thread running in this process.

    >>> start_method(2)
    'spawn'
    """
    import multiprocessing
    import threading

    if (
        threads == 1
        and sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
    ):
        return "fork"
    return "spawn"


class WorkerPool:
    """Independent units of one run in ``workers`` worker processes, beside the parent
    process, which keeps working on what the units depend on.

    ``start``: how workers start (:mod:`multiprocessing` start methods): ``spawn``, a
    fresh interpreter that imports everything again (safe anywhere, seconds of start-up),
    or ``fork``, a copy of this process with its imports and loaded data (a fraction of
    a second; POSIX only, and only safe while this process runs no other threads and no
    OpenMP thread pool: :func:`start_method`).

    Each worker calls ``setup(*args)`` once (``setup`` a module-level function; it
    returns the callable that runs one unit) and then takes units from a shared queue
    as they are :meth:`submit`-ted, so a free worker starts the next ready unit at once.
    :meth:`check` raises :class:`UnitError` as soon as a unit has failed or a worker has
    died; :meth:`finish` runs the units no worker has taken in this process (the parent
    is free by then) and waits for the rest. Leaving the ``with`` block stops the
    workers: at once (SIGTERM, SIGKILL after ``STOP_GRACE_S``) when it is left by an
    error or Ctrl-C; SIGTERM or SIGHUP to the parent counts as Ctrl-C meanwhile. Workers
    ignore SIGINT (the parent stops them) and, on Linux, die with the parent.

    Units must be picklable; ``name(unit)`` says which unit in messages.
    """

    def __init__(
        self,
        setup: Any,
        args: tuple[Any, ...],
        workers: int,
        name: Any = str,
        start: str = "spawn",
    ) -> None:
        import multiprocessing

        positive_int("workers", workers)
        if start not in ("spawn", "fork"):
            raise ValueError(f"start={start!r} is not one of ('spawn', 'fork')")
        self.name, self.start = name, start
        ctx = multiprocessing.get_context(start)
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.waiting: set[Any] = set()  # submitted, taken by nobody yet
        self.taken: dict[Any, int] = {}  # unit -> pid of the worker training it
        self.done: list[Any] = []
        self._signals = _sigterm_as_interrupt()
        self._signals.__enter__()
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(setup, args, self.tasks, self.results, os.getpid()),
                name=f"prunekit-worker-{i}",
            )
            for i in range(workers)
        ]
        try:
            for proc in self.procs:
                proc.start()
        except BaseException:
            self.stop(now=True)
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self.stop(now=kind is not None)

    def submit(self, unit: Any) -> None:
        """Queue ``unit``: the first free worker takes it."""
        self.waiting.add(unit)
        self.tasks.put(unit)

    def _handle(self, message: tuple[str, Any, int, str]) -> None:
        what, unit, pid, text = message
        if what == "taken":
            self.waiting.discard(unit)
            self.taken[unit] = pid
        elif what == "done":
            self.taken.pop(unit, None)
            self.done.append(unit)
        elif what == "failed":
            raise UnitError(f"{self.name(unit)} failed in worker process {pid}:\n{text.rstrip()}")
        else:
            raise UnitError(f"worker process {pid} could not start:\n{text.rstrip()}")

    def check(self, wait_s: float = 0.0) -> None:
        """Read what the workers reported (waiting up to ``wait_s`` for a first message);
        raise :class:`UnitError` for a failed unit or a worker that died."""
        import queue

        dead = [p for p in self.procs if p.exitcode is not None]  # before reading: no race
        try:
            message = self.results.get(timeout=wait_s) if wait_s > 0 else None
            if message is not None:
                self._handle(message)
            while True:
                self._handle(self.results.get_nowait())
        except queue.Empty:
            pass
        for proc in dead:
            units = [self.name(u) for u, pid in self.taken.items() if pid == proc.pid]
            doing = f" while running {', '.join(units)}" if units else ""
            raise UnitError(f"worker process {proc.pid} died (exit code {proc.exitcode}){doing}")

    def finish(self, run_here: Any) -> None:
        """Until every submitted unit is done: run a unit no worker has taken here
        (``run_here(unit)``; None: only wait), or wait for the workers. A unit failing
        here raises :class:`UnitError` naming it too."""
        import queue

        while self.waiting or self.taken:
            self.check()
            if not self.waiting or run_here is None:
                self.check(wait_s=0.2)
                continue
            try:
                unit = self.tasks.get(timeout=0.05)
            except queue.Empty:  # a worker took it meanwhile, or not yet flushed
                continue
            self.waiting.discard(unit)
            try:
                run_here(unit)
            except Exception as e:
                raise UnitError(
                    f"{self.name(unit)} failed in this process (pid {os.getpid()}): "
                    f"{type(e).__name__}: {e}"
                ) from e
            self.done.append(unit)
        self.check()

    def stop(self, now: bool = False) -> None:
        """Stop the workers. Normally (every unit done) each is told to return, and one
        still starting up after ``START_WAIT_S`` is terminated (it has nothing to do);
        ``now`` (an error, Ctrl-C): SIGTERM at once. SIGKILL after ``STOP_GRACE_S``;
        each is waited for. A worker that had exited by itself with an error is named on
        stderr (its units were trained here)."""
        terminated: set[int] = set()

        def terminate(proc: Any) -> None:
            if proc.pid is not None and proc.exitcode is None:
                terminated.add(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()

        try:
            if now:
                self.tasks.cancel_join_thread()
                for proc in self.procs:
                    terminate(proc)
            else:
                for proc in self.procs:
                    if proc.pid is not None:
                        self.tasks.put(None)
                deadline = time.monotonic() + START_WAIT_S
                for proc in self.procs:
                    if proc.pid is not None:
                        proc.join(max(0.0, deadline - time.monotonic()))
                for proc in self.procs:
                    terminate(proc)
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in self.procs:
                if proc.pid is None:
                    continue
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.exitcode is None:
                    proc.kill()
                    proc.join()
            for proc in self.procs:
                if proc.exitcode not in (0, None) and proc.pid not in terminated and not now:
                    print(
                        f"note: worker process {proc.pid} exited with code {proc.exitcode} "
                        "(its output is above; from your own script, start runs under "
                        "`if __name__ == '__main__':`); its units were trained here",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            self.results.cancel_join_thread()
            self._signals.__exit__(None, None, None)
