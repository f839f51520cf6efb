"""Run prunekit's benchmark suite and write results.json, results.md and scaling.png.

    .venv/bin/python benchmarks/run.py [--sizes 10M,50M,200M] [--big] [--quick] [--out DIR]

Parts: ``global`` (global magnitude pruning of 10M-1B parameters: time, peak memory,
correctness), ``steps`` (training-step overhead of attached masks), ``lightning`` (an
epoch-like Lightning run with ModelPruning and prunekit's callback). Progress goes to
stderr, one line per measurement; the markdown report is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import prunekit and benchmarks from this tree
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import global_prune, report
from benchmarks._common import ROOT, cpu_busy_elsewhere, log, machine_info, quiet_wait

PARTS = ("global", "steps", "lightning")
DEFAULT_SIZES = "10M,50M,200M"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated model sizes for global pruning (default {DEFAULT_SIZES}; "
        "10M with --quick)",
    )
    parser.add_argument("--big", action="store_true", help="add the 1B-parameter model")
    parser.add_argument("--quick", action="store_true", help="10M only, fewer and shorter repeats")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder"
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per global-pruning subprocess"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on a shared machine: before each measurement wait up to this long for other "
        "processes to leave the CPUs idle (default 0: don't wait)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every part (default: torch's own default, the CPU count); "
        "1 gives steadier figures on a shared machine",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the parts of an existing OUT/results.json that this run does not repeat",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: rewrite results.md and scaling.png from OUT/results.json",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts {unknown} unknown; choose from {list(PARTS)}")
    args.parts = parts
    sizes = args.sizes or ("10M" if args.quick else DEFAULT_SIZES)
    args.sizes = [s.strip() for s in sizes.split(",") if s.strip()]
    if args.big and not any(global_prune.parse_size(s) >= 10**9 for s in args.sizes):
        args.sizes.append("1B")
    for size in args.sizes:
        try:
            global_prune.parse_size(size)
        except ValueError as error:
            parser.error(str(error))
    args.sizes.sort(key=global_prune.parse_size)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen parts; write and print the report."""
    args = _arguments(argv)
    if args.render:
        return _render(args.out)
    quiet_wait["seconds"] = args.quiet_wait
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads={args.threads} must be >= 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the subprocesses inherit it
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine_info()
    info["command"] = shlex.join([Path(sys.executable).name, *sys.argv])
    log(
        f"machine: {info['cpu_count']} CPUs, torch {info['torch']} ({info['torch_threads']} "
        f"threads), load {info['load_average_at_start']}"
    )
    if info["cpu_busy_elsewhere_at_start"] > 0.1:
        log(
            f"warning: {info['cpu_busy_elsewhere_at_start']:.0%} of the CPUs are busy with other "
            "processes; timings will be noisy"
        )
    results: dict[str, Any] = {"machine": info, "args": {"sizes": args.sizes, "quick": args.quick}}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        _merge(results, args.out / "results.json", args.parts, args.sizes)
    signal.signal(signal.SIGTERM, _terminate)
    status, part = 0, ""
    try:
        for part in args.parts:
            _run_part(part, results, args, started)
            _write(results, args.out, started)  # partial results survive a later failure
    except (_Terminated, KeyboardInterrupt) as stop:
        status = 143 if isinstance(stop, _Terminated) else 130
        results["interrupted"] = f"stopped by a signal during the {part!r} part"
        log(results["interrupted"])
    text = _write(results, args.out, started)
    log(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}")
    print(text)
    if status:
        sys.exit(status)
    return results


class _Terminated(Exception):
    """SIGTERM arrived: stop measuring, write what there is."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def _run_part(part: str, results: dict[str, Any], args: argparse.Namespace, started: float) -> None:
    if part == "global":
        entries = results.setdefault("global", [])
        for entry in global_prune.measure(
            args.sizes, quick=args.quick, timeout=args.timeout, seed=args.seed
        ):
            entries.append(entry)
            entries.sort(key=lambda e: e["params"])
            if report.plot(entries, args.out / "scaling.png"):
                results["plot"] = "scaling.png"
            _write(results, args.out, started)  # each finished size survives a later failure
    elif part == "steps":
        from benchmarks import step_overhead

        results["steps"] = step_overhead.run(quick=args.quick, seed=args.seed)
    elif part == "lightning":
        from benchmarks import lightning_epoch

        results["lightning"] = lightning_epoch.run(quick=args.quick, seed=args.seed)


def _merge(results: dict[str, Any], path: Path, running: list[str], sizes: list[str]) -> None:
    """Keep what an earlier results.json holds and this run does not repeat: whole parts,
    and for the global part the sizes not measured again."""
    if not path.exists():
        return
    earlier = json.loads(path.read_text())
    merged = dict(earlier.get("merged", {}))
    for part in PARTS:
        if part in earlier and part not in running:
            results[part] = earlier[part]
            merged.setdefault(part, earlier["machine"].get("command", "?"))
        elif part in running:
            merged.pop(part, None)
    if "global" in running and earlier.get("global"):
        again = {global_prune.parse_size(s) for s in sizes}
        kept = [e for e in earlier["global"] if global_prune.parse_size(e["size"]) not in again]
        if kept:
            results["global"] = kept
            merged["global (sizes " + ", ".join(e["size"] for e in kept) + ")"] = earlier[
                "machine"
            ].get("command", "?")
    if merged:
        results["merged"] = merged


def _render(out: Path) -> dict[str, Any]:
    results = json.loads((out / "results.json").read_text())
    if results.get("global") and report.plot(results["global"], out / "scaling.png"):
        results["plot"] = "scaling.png"
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(text + "\n")
    print(text)
    return results


def _write(results: dict[str, Any], out: Path, started: float) -> str:
    info = results["machine"]
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_busy_elsewhere_at_end"] = round(cpu_busy_elsewhere(0.2), 2)
    info["suite_seconds"] = time.perf_counter() - started
    results["targets"] = report.targets(results)
    text = report.markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
