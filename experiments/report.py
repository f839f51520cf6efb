"""Result tables and plots of finished runs, and ``prunekit report`` across runs."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunekit.experiments.paths import RunPaths, read_json
from prunekit.schedules import from_dict


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # optional dependency, imported when plotting

    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (floats with 4 decimals).

    >>> print(table(["a", "bb"], [[1, 0.5], [22, "x"]]))
    a   bb
    --  ------
    1   0.5000
    22  x
    """
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


# ------------------------------------------------------------------ gradual
def gradual_table(summary: dict[str, Any]) -> str:
    """The result table of one ``prunekit run``."""
    rows = [
        ["dense test accuracy", summary["dense_test_acc"]],
        ["pruned test accuracy (end)", summary["pruned_test_acc"]],
        ["pruned test accuracy (min val loss)", summary["pruned_test_acc_early_stop"]],
        ["target sparsity", summary["target_sparsity"]],
        ["global sparsity", summary["sparsity"]],
        *[[f"  {name}", value] for name, value in summary["sparsity_per_layer"].items()],
        ["wall time (s)", round(summary["wall_s"]["total"], 1)],
    ]
    return table([summary["name"], "value"], rows)


def plot_sparsity(run: Path, path: Path) -> Path:
    """Sparsity over training (logged ``sparsity/actual``) against the schedule's target."""
    summary = json.loads((run / "summary.json").read_text())
    schedule = from_dict(summary["schedule"])
    steps, actual = [], []
    with open(RunPaths(run).metrics) as f:
        for row in csv.DictReader(f):
            if row.get("sparsity/actual") and row.get("step"):
                steps.append(int(row["step"]))
                actual.append(float(row["sparsity/actual"]))
    fig, ax = _axes(
        f"{summary['name']}: sparsity during training", summary["unit"] + "s", "sparsity"
    )
    horizon = summary["steps"]
    times = range(0, horizon + 1, max(1, horizon // 400))
    ax.plot(list(times), [schedule(t) for t in times], label="schedule target", color="0.5")
    ax.plot(steps, actual, "o", markersize=3, label="measured (logged)")
    ax.legend()
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ lottery
def plot_lottery(
    summaries: Sequence[dict[str, Any]], path: Path, *, metric: str = "test_acc_early_stop"
) -> Path:
    """Accuracy against weights remaining (log x), one line per rewind mode or control,
    mean ± spread over the given runs (seeds), as in the LTH paper's figures."""
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for summary in summaries:
        for record in summary["rounds"]:
            label = (
                record["variant"]
                if record["variant"] != "lottery"
                else f"lottery (rewind={summary['rewind']})"
            )
            series[label][round(record["remaining"], 6)].append(record[metric])
    fig, ax = _axes(
        "accuracy vs weights remaining", "weights remaining (%)", metric.replace("_", " ")
    )
    for label, points in series.items():
        xs = sorted(points, reverse=True)
        means = [statistics.fmean(points[x]) for x in xs]
        spread = [statistics.pstdev(points[x]) for x in xs]
        ax.errorbar(
            [100 * x for x in xs],
            means,
            yerr=spread,
            marker="o",
            markersize=3,
            capsize=2,
            label=label,
        )
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.legend()
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ report
def load_summaries(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The ``summary.json`` of each run folder; a folder without one is an error naming it."""
    out = []
    for run in runs:
        summary = RunPaths(Path(run)).summary
        if not summary.is_file():
            raise FileNotFoundError(f"{run} has no summary.json: not a finished prunekit run")
        out.append(read_json(summary))  # a corrupt file: RunFolderError naming it
    return out


def compare(runs: Sequence[str | Path], plot_path: Path | None = None) -> str:
    """A comparison table of finished runs (grouped by name, mean ± std over seeds) and,
    with ``plot_path``, a combined plot."""
    summaries = load_summaries(runs)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        groups[(s["kind"], s["name"])].append(s)
    lines = []
    gradual = [(k, g) for k, g in groups.items() if k[0] == "gradual"]
    if gradual:
        rows = [
            [
                name,
                len(g),
                _mean_std([s["dense_test_acc"] for s in g]),
                _mean_std([s["pruned_test_acc"] for s in g]),
                _mean_std([s["sparsity"] for s in g]),
            ]
            for (_, name), g in gradual
        ]
        lines.append(table(["run", "seeds", "dense acc", "pruned acc", "sparsity"], rows))
    lottery = [(k, g) for k, g in groups.items() if k[0] == "lottery"]
    for (_, name), g in lottery:
        by_round: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
        for s in g:
            for r in s["rounds"]:
                by_round[(r["round"], r["variant"])].append(r)
        rows = [
            [
                r,
                variant,
                f"{100 * records[0]['remaining']:.2f}%",
                len(records),
                _mean_std([x["test_acc_early_stop"] for x in records]),
                _mean_std([x["test_acc_final"] for x in records]),
            ]
            for (r, variant), records in sorted(by_round.items())
        ]
        lines.append(f"{name} (rewind={g[0]['rewind']})")
        lines.append(
            table(["round", "variant", "remaining", "seeds", "acc (early stop)", "acc (end)"], rows)
        )
    if plot_path is not None:
        if lottery:
            plot_lottery([s for _, g in lottery for s in g], plot_path)
        else:
            _plot_gradual_bars([(name, g) for (_, name), g in gradual], plot_path)
    return "\n\n".join(lines)


def _mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.4f}"
    return f"{statistics.fmean(present):.4f} ± {statistics.stdev(present):.4f}"


def _plot_gradual_bars(groups: Sequence[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    fig, ax = _axes("test accuracy against sparsity", "sparsity", "test accuracy")
    for name, g in groups:
        ax.scatter([s["sparsity"] for s in g], [s["pruned_test_acc"] for s in g], label=name)
        dense = [s["dense_test_acc"] for s in g if s["dense_test_acc"] is not None]
        if dense:
            ax.axhline(statistics.fmean(dense), linestyle=":", color="0.5")
    ax.legend()
    fig.savefig(path)
    return path
