"""The ``prunekit`` command: ``run``, ``lottery`` and ``report``.

prunekit run     experiments/configs/quick_gradual.yaml [key=value ...]
prunekit lottery experiments/configs/quick_lottery.yaml [key=value ...]
prunekit instability experiments/configs/quick_instability.yaml [key=value ...]
prunekit oneshot experiments/configs/oneshot_lenet300.yaml [key=value ...]
prunekit report  RUN_DIR [RUN_DIR ...] [--plot comparison.png]
prunekit export  RUN_DIR --compact | --sparse
prunekit models | datasets                       # what model= and data.name= accept
prunekit run CONFIG [key=value ...] --print-config  # every key, its value and help text
prunekit run A.yaml [B.yaml ...] seed=0,1 key=v1,v2 --jobs N   # many runs (see jobs.py)
prunekit run CONFIG seed=0,1,2 --cluster slurm --partition P    # one submitit job per run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from prunekit.experiments import export, jobs, report
from prunekit.experiments.config import ConfigError, GradualConfig, LotteryConfig, load_config
from prunekit.experiments.paths import RunFolderError, RunPaths


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunekit", description="Pruning experiments on Fashion-MNIST."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "train or fine-tune under a sparsity schedule"),
        ("lottery", "iterative magnitude pruning with rewinding"),
        ("oneshot", "prune a trained dense model once per method and sparsity, no retraining"),
        ("instability", "linear mode connectivity: error barrier between two copies from step k"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="a YAML config (see experiments/configs/)")
        cmd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=0.01")
        cmd.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch CPU threads (default 1: fastest for these small models, no oversubscription)",
        )
        cmd.add_argument(
            "--print-config",
            action="store_true",
            help="print every config key with its value and help text, and exit (runs nothing)",
        )
        if name in jobs.COMMANDS:  # several configs, sweeps (key=a,b), --jobs, --cluster
            jobs.add_arguments(cmd)
    cmp = sub.add_parser("report", help="compare finished runs")
    cmp.add_argument("runs", nargs="+", help="run folders")
    cmp.add_argument("--plot", type=Path, default=None, help="write a combined plot here (PNG)")
    export.add_parser(sub)
    sub.add_parser("models", help="list the registered models (for model=...)")
    sub.add_parser("datasets", help="list the registered datasets (for data.name=...)")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting positionals (``key=value`` overrides, run folders) follow options,
    as in ``prunekit run CONFIG --threads 1 key=value``: argparse stops filling a
    ``nargs`` positional at the first option and would call the rest unrecognized."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        trailing = "overrides" if hasattr(args, "overrides") else "runs"
        if not hasattr(args, trailing):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, trailing, [*getattr(args, trailing), *extra])
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.command == "oneshot":
            from prunekit.experiments.oneshot import main as oneshot

            return oneshot(args)
        if args.command == "instability":
            from prunekit.experiments.instability import main as instability

            return instability(args)
        if args.command == "export":
            return export.main(args)
        if args.command == "report":
            print(report.compare(args.runs, args.plot))
            return 0
        if args.command in ("models", "datasets"):
            print(report.registry_table(args.command))
            return 0
        if args.command in jobs.COMMANDS:
            many = jobs.main(args)  # None: one run, run here below as always
            if many is not None:
                return many
        if args.print_config:
            schema = GradualConfig if args.command == "run" else LotteryConfig
            cfg = load_config(schema, args.config, args.overrides)
            print(report.config_help(schema, cfg))
            return 0
        if args.threads < 1:
            raise ConfigError(f"--threads={args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
        if args.command == "run":
            from prunekit.experiments.gradual import run_gradual

            cfg = load_config(GradualConfig, args.config, args.overrides)
            summary = run_gradual(cfg)
            run = RunPaths.for_config(cfg).root
            if not RunPaths(run).sparsity_plot.is_file():  # else: a finished run, reported
                report.plot_sparsity(run, RunPaths(run).sparsity_plot)
            if not RunPaths(run).accuracy_plot.is_file():
                report.plot_gradual([(run, summary)], RunPaths(run).accuracy_plot)
            print(report.gradual_table(summary))
        else:
            from prunekit.experiments.lottery import lottery_table, run_lottery

            cfg = load_config(LotteryConfig, args.config, args.overrides)
            summary = run_lottery(cfg, jobs=jobs.positive_int("--jobs", args.jobs or 1))
            run = RunPaths.for_config(cfg).root
            plot, written = RunPaths(run).accuracy_plot, RunPaths(run).summary.stat().st_mtime_ns
            if not plot.is_file() or plot.stat().st_mtime_ns < written:  # else: reported
                report.plot_lottery([summary], plot)
            print(lottery_table(summary))
        print(f"\nrun folder: {run}")
        return 0
    except (ConfigError, RunFolderError, OSError) as e:  # OSError: e.g. a full disk
        print(f"prunekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except jobs.UnitError as e:  # a unit of a --jobs N lottery run failed: named in e
        print(f"prunekit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
