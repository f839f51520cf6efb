"""Result tables and plots of finished runs, and ``prunekit report`` across runs.

Runs are grouped by experiment name (and kind); a group's runs differ only in their seed.
Every spread shown, in tables and plots, is the **sample** standard deviation over the
seeds (n - 1 in the denominator, ``statistics.stdev``), and says so. Each experiment name
gets its own plot, never pooled with another name.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
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


# ------------------------------------------------------------------ statistics
SPREAD = "mean ± sample std (n-1) over seeds"


def mean_std(values: Iterable[float]) -> tuple[float, float | None, int]:
    """``(mean, sample std, n)``; the std is None for a single value.

    >>> mean_std([0.5, 0.75, 1.0])  # std = sqrt((0.25**2 + 0 + 0.25**2) / (3 - 1)) = 0.25
    (0.75, 0.25, 3)
    """
    present = list(values)
    if not present:
        raise ValueError("mean_std needs at least one value")
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def _mean_std(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    mean, std, _ = mean_std(present)
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _one_name(summaries: Sequence[dict[str, Any]]) -> str:
    names = sorted({s["name"] for s in summaries})
    if len(names) != 1:
        raise ValueError(f"one experiment per plot, got names {names} (never pooled)")
    return names[0]


# ------------------------------------------------------------------ lottery
def lottery_points(
    summaries: Sequence[dict[str, Any]], metric: str = "test_acc_early_stop"
) -> dict[str, list[tuple[float, float, float | None, int]]]:
    """Per line (rewind mode or control): ``(remaining, mean, sample std, n)`` per round,
    over the given runs (the seeds of one experiment), most weights first.

    >>> def rec(r, rem, acc):
    ...     return {"round": r, "variant": "lottery", "remaining": rem, "test_acc_early_stop": acc}
    >>> runs = [{"name": "x", "rewind": "init", "rounds": [rec(0, 1.0, 0.9), rec(1, 0.8, a)]}
    ...         for a in (0.5, 1.0)]
    >>> lottery_points(runs)["lottery (rewind=init)"]  # sample std of (0.5, 1.0): sqrt(0.125)
    [(1.0, 0.9, 0.0, 2), (0.8, 0.75, 0.3535533905932738, 2)]
    """
    _one_name(summaries)
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for summary in summaries:
        for record in summary["rounds"]:
            variant = record["variant"]
            label = f"lottery (rewind={summary['rewind']})" if variant == "lottery" else variant
            series[label][round(record["remaining"], 6)].append(record[metric])
    return {
        label: [(x, *mean_std(points[x])) for x in sorted(points, reverse=True)]
        for label, points in series.items()
    }


def _error_line(ax: Any, label: str, points: Sequence[Sequence[Any]], **style: Any) -> None:
    """One line of (fraction, mean, sample std, n) points, x in percent, n in the label;
    ``style``: more matplotlib line options (e.g. ``linestyle``)."""
    ax.errorbar(
        [100 * p[0] for p in points],
        [p[1] for p in points],
        yerr=[p[2] or 0.0 for p in points],
        marker="o",
        markersize=3,
        capsize=2,
        label=f"{label} (n={max(p[3] for p in points)})",
        **style,
    )


def lottery_figure(
    summaries: Sequence[dict[str, Any]], *, metric: str = "test_acc_early_stop"
) -> Any:
    """Accuracy against weights remaining (log x) of one experiment: one line per rewind
    mode or control, mean ± sample std over its seeds, and the dense round 0 as reference."""
    name = _one_name(summaries)
    fig, ax = _axes(
        f"{name}: accuracy vs weights remaining\n({SPREAD})",
        "weights remaining (%)",
        metric.replace("_", " "),
    )
    for label, points in lottery_points(summaries, metric).items():
        _error_line(ax, label, points)
    dense, _, n = mean_std(r[metric] for s in summaries for r in s["rounds"] if r["round"] == 0)
    ax.axhline(dense, linestyle=":", color="0.4", label=f"dense, round 0 (mean of {n})")
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 80, not 8 x 10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.invert_xaxis()
    ax.legend(fontsize="small")
    return fig


def plot_lottery(
    summaries: Sequence[dict[str, Any]], path: Path, *, metric: str = "test_acc_early_stop"
) -> Path:
    """:func:`lottery_figure` of one experiment's runs (seeds), written to ``path``."""
    lottery_figure(summaries, metric=metric).savefig(path)
    return path


# ------------------------------------------------------------------ one-shot
def oneshot_points(
    summaries: Sequence[dict[str, Any]], metric: str = "test_acc"
) -> dict[str, list[tuple[float, float, float | None, int]]]:
    """Per line (``method (scope)``): ``(target sparsity, mean, sample std, n)`` over the
    given one-shot runs (the seeds of one experiment), sparsest last.

    >>> def run(acc):
    ...     return {"name": "x", "results": [{"method": "wanda", "scope": "layer",
    ...             "target_sparsity": 0.5, "test_acc": acc}]}
    >>> oneshot_points([run(0.5), run(1.0)])  # sample std of (0.5, 1.0): sqrt(0.125)
    {'wanda (layer)': [(0.5, 0.75, 0.3535533905932738, 2)]}
    """
    _one_name(summaries)
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for summary in summaries:
        for r in summary["results"]:
            label = f"{r['method']} ({r['scope']})"
            series[label][round(r["target_sparsity"], 6)].append(r[metric])
    return {
        label: [(x, *mean_std(points[x])) for x in sorted(points)]
        for label, points in series.items()
    }


def oneshot_figure(summaries: Sequence[dict[str, Any]]) -> Any:
    """Test accuracy against target sparsity of one one-shot experiment: one line per
    method and scope, mean ± sample std over its seeds, the dense accuracy as reference."""
    name = _one_name(summaries)
    fig, ax = _axes(
        f"{name}: one-shot pruning, no retraining\n({SPREAD})",
        "sparsity of the targeted weights (%)",
        "test accuracy",
    )
    for label, points in oneshot_points(summaries).items():
        _error_line(ax, label, points, linestyle="--" if label.endswith("(layer)") else "-")
    dense, _, n = mean_std(s["dense_test_acc"] for s in summaries)
    ax.axhline(dense, linestyle=":", color="0.4", label=f"dense (mean of {n})")
    ax.legend(fontsize="small")
    return fig


def plot_oneshot(summaries: Sequence[dict[str, Any]], path: Path) -> Path:
    """:func:`oneshot_figure` of one experiment's runs (seeds), written to ``path``."""
    oneshot_figure(summaries).savefig(path)
    return path


def oneshot_rows(summaries: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Table rows of one one-shot experiment: method, scope, target sparsity, seeds,
    measured sparsity and test accuracy (mean ± sample std)."""
    cells: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for summary in summaries:
        for r in summary["results"]:
            cells[(r["scope"], r["method"], r["target_sparsity"])].append(r)
    return [
        [
            method,
            scope,
            f"{100 * target:g}%",
            len(records),
            _mean_std([r["sparsity"] for r in records]),
            _mean_std([r["test_acc"] for r in records]),
        ]
        for (scope, method, target), records in cells.items()
    ]


# ------------------------------------------------------------------ methods
def method_points(
    summaries: Sequence[dict[str, Any]], metric: str = "pruned_test_acc"
) -> dict[str, list[tuple[float, float, float | None, int]]]:
    """Gradual runs of several methods: per line (``model: method (scope)``),
    ``(target sparsity, mean, sample std, n)`` over the runs that share it (their seeds).

    >>> def run(method, final, acc):
    ...     return {"model": "m", "method": method, "scope": "global",
    ...             "target_sparsity": final, "pruned_test_acc": acc}
    >>> points = method_points([run("taylor", 0.9, 0.5), run("taylor", 0.9, 1.0),
    ...                         run("magnitude", 0.9, 0.7)])
    >>> list(points)
    ['m: magnitude (global)', 'm: taylor (global)']
    >>> points["m: taylor (global)"]  # sample std of (0.5, 1.0): sqrt(0.125)
    [(0.9, 0.75, 0.3535533905932738, 2)]
    """
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        label = f"{s['model']}: {s['method']} ({s['scope']})"
        series[label][round(s["target_sparsity"], 6)].append(s[metric])
    return {
        label: [(x, *mean_std(series[label][x])) for x in sorted(series[label])]
        for label in sorted(series)
    }


def plot_methods(
    summaries: Sequence[dict[str, Any]], path: Path, *, metric: str = "pruned_test_acc"
) -> Path:
    """Gradual runs of several methods: accuracy at the end against the final target
    sparsity, one line per model, method and scope, mean ± sample std over the runs
    (seeds) of each point; written to ``path``."""
    fig, ax = _axes(
        f"gradual pruning: methods compared\n({SPREAD})",
        "final target sparsity (%)",
        metric.replace("_", " "),
    )
    for label, points in method_points(summaries, metric).items():
        _error_line(ax, label, points)
    # one dense model per (model, seed), however many runs started from it
    dense = {
        (s["model"], s["seed"], s["dense_test_acc"])
        for s in summaries
        if s.get("dense_test_acc") is not None
    }
    if dense:
        mean, _, n = mean_std(acc for _, _, acc in dense)
        ax.axhline(mean, linestyle=":", color="0.4", label=f"dense (mean of {n} models)")
    ax.legend(fontsize="small")
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ gradual accuracy
def gradual_curve(run: Path, summary: dict[str, Any]) -> tuple[list[tuple[int, float]], int]:
    """Validation accuracy against the run's optimizer step, dense phase included, and the
    step where pruning started (0: no dense phase in this folder).

    The dense phase comes from ``dense/metrics.csv`` (Lightning writes a validation with
    ``step = global_step - 1``), the pruning phase from the summary's evaluations, shifted
    by ``dense.steps`` of the run's ``config.yaml``.
    """
    dense_csv = Path(run) / "dense" / "metrics.csv"
    points: list[tuple[int, float]] = []
    offset = 0
    if dense_csv.is_file():
        with open(dense_csv, newline="") as f:
            points = [
                (int(row["step"]) + 1, float(row["val/acc"]))
                for row in csv.DictReader(f)
                if row.get("val/acc")
            ]
        config = RunPaths(Path(run)).config
        if config.is_file():
            offset = int(_yaml(config).get("dense", {}).get("steps", 0))
        offset = offset or (points[-1][0] if points else 0)
    points += [(offset + e["step"], e["val_acc"]) for e in summary["evaluations"]]
    return points, offset


def _yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path))
    return data if isinstance(data, dict) else {}


def gradual_figure(runs: Sequence[tuple[Path, dict[str, Any]]]) -> Any:
    """One gradual experiment (its seeds): test accuracy against sparsity (each seed, their
    mean ± sample std, the dense reference) and validation accuracy against the step with
    the dense phase shaded (mean over seeds, ± sample std band)."""
    from matplotlib.figure import Figure

    summaries = [s for _, s in runs]
    name = _one_name(summaries)
    fig = Figure(figsize=(11, 4.5), dpi=110, layout="constrained")
    left, right = fig.subplots(1, 2)
    fig.suptitle(f"{name}: gradual pruning ({SPREAD})")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)

    sparsity = [s["sparsity"] for s in summaries]
    accuracy = [s["pruned_test_acc"] for s in summaries]
    left.scatter(sparsity, accuracy, s=12, color="0.6", label=f"each seed (n={len(runs)})")
    mean_sparsity, _, _ = mean_std(sparsity)
    mean_acc, std_acc, n = mean_std(accuracy)
    left.errorbar(
        [mean_sparsity],
        [mean_acc],
        yerr=[std_acc or 0.0],
        marker="o",
        capsize=3,
        label=f"pruned, mean (n={n})",
    )
    dense = [s["dense_test_acc"] for s in summaries if s["dense_test_acc"] is not None]
    if dense:
        dense_mean, _, dense_n = mean_std(dense)
        left.axhline(dense_mean, linestyle=":", color="0.4", label=f"dense (mean of {dense_n})")
    left.set(xlabel="sparsity (measured)", ylabel="test accuracy (end)")
    left.set_title("accuracy vs sparsity")
    left.legend(fontsize="small")

    curves = [gradual_curve(run, summary) for run, summary in runs]
    by_step: dict[int, list[float]] = defaultdict(list)
    for points, _ in curves:
        for step, acc in points:
            by_step[step].append(acc)
    steps = sorted(by_step)
    stats = [mean_std(by_step[t]) for t in steps]
    means = [m for m, _, _ in stats]
    right.plot(steps, means, marker="o", markersize=3, label=f"val accuracy (mean of {len(runs)})")
    if len(runs) > 1:
        right.fill_between(
            steps,
            [m - (sd or 0.0) for m, sd, _ in stats],
            [m + (sd or 0.0) for m, sd, _ in stats],
            alpha=0.25,
            label="± sample std",
        )
    start = max(offset for _, offset in curves)
    if start:
        right.axvspan(0, start, color="0.85", label=f"dense phase (steps 0-{start})")
    right.set(xlabel="optimizer step", ylabel="validation accuracy")
    right.set_title("accuracy vs step")
    right.legend(fontsize="small")
    return fig


def plot_gradual(runs: Sequence[tuple[Path, dict[str, Any]]], path: Path) -> Path:
    """:func:`gradual_figure` of one gradual experiment's runs, written to ``path``."""
    gradual_figure(runs).savefig(path)
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
    """A comparison table of finished runs (grouped by kind and name, mean ± sample std
    over seeds) and, with ``plot_path``, one plot per experiment: ``plot_path`` itself when
    there is one, else ``<stem>-<name><suffix>`` beside it. The text ends with the paths
    written."""
    summaries = load_summaries(runs)
    groups: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]] = defaultdict(list)
    for run, s in zip(runs, summaries, strict=True):
        groups[(s["kind"], s["name"])].append((Path(run), s))
    lines = []
    gradual = [(k, g) for k, g in groups.items() if k[0] == "gradual"]
    if gradual:
        rows = [
            [
                name,
                len(g),
                _mean_std([s["dense_test_acc"] for _, s in g]),
                _mean_std([s["pruned_test_acc"] for _, s in g]),
                _mean_std([s["sparsity"] for _, s in g]),
            ]
            for (_, name), g in gradual
        ]
        lines.append(f"gradual runs ({SPREAD})")
        lines.append(table(["run", "seeds", "dense acc", "pruned acc", "sparsity"], rows))
    exported = export_rows(groups)
    if exported:
        lines.append(f"exported runs (prunekit export; after / before, {SPREAD})")
        lines.append(
            table(
                ["run", "export", "seeds", "params", "file", "latency", "acc before", "acc after"],
                exported,
            )
        )
    for (kind, name), g in groups.items():
        if kind != "lottery":
            continue
        by_round: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
        for _, s in g:
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
        lines.append(f"{name} (rewind={g[0][1]['rewind']}; {SPREAD})")
        lines.append(
            table(["round", "variant", "remaining", "seeds", "acc (early stop)", "acc (end)"], rows)
        )
    for (kind, name), g in groups.items():
        if kind != "oneshot":
            continue
        summaries = [s for _, s in g]
        lines.append(
            f"{name} (one-shot, no retraining; dense acc "
            f"{_mean_std([s['dense_test_acc'] for s in summaries])}; {SPREAD})"
        )
        lines.append(
            table(
                ["method", "scope", "target", "seeds", "sparsity", "test acc"],
                oneshot_rows(summaries),
            )
        )
    for (kind, _), g in groups.items():
        if kind == "instability":  # its runner's table (imported here: it imports this module)
            from prunekit.experiments.instability import combined_table

            lines.append(combined_table(sorted((s for _, s in g), key=lambda s: s["seed"])))
    if plot_path is not None:
        written = _plot_groups(groups, Path(plot_path))
        gradual_runs = [
            s for (kind, _), g in groups.items() if kind == "gradual" for _, s in g if "method" in s
        ]
        if len({s["method"] for s in gradual_runs}) > 1:  # a comparison of methods
            path = Path(plot_path)
            written.append(
                plot_methods(gradual_runs, path.with_name(f"{path.stem}-methods{path.suffix}"))
            )
        if exported:
            path = Path(plot_path)
            written.append(
                plot_exports(groups, path.with_name(f"{path.stem}-exports{path.suffix}"))
            )
        lines.append("\n".join(f"plot written: {p}" for p in written))
    return "\n\n".join(lines)


# ------------------------------------------------------------------ exports
def export_records(
    groups: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]],
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Per (experiment name, export mode): the ``prunekit export`` records of its runs
    (``export_compact.json`` / ``export_sparse.json`` in the run folders), in run order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (kind, name), g in groups.items():
        if kind != "gradual":
            continue
        for mode in ("compact", "sparse"):
            paths = [RunPaths(run).export_record(mode) for run, _ in g]
            records = [read_json(p) for p in paths if p.is_file()]
            if records:
                out[(name, mode)] = records
    return out


def export_rows(
    groups: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]],
) -> list[list[Any]]:
    """One row per (experiment, export mode): ratios after / before of parameters, file
    size and latency, and test accuracy before and after (mean ± sample std over seeds)."""

    def ratio(records: list[dict[str, Any]], key: str) -> str:
        return _mean_std([r[key][1] / r[key][0] for r in records])

    return [
        [
            name,
            mode,
            len(records),
            ratio(records, "params"),
            ratio(records, "file_bytes"),
            ratio(records, "latency_ms"),
            _mean_std([r["test_acc"][0] for r in records]),
            _mean_std([r["test_acc"][1] for r in records]),
        ]
        for (name, mode), records in export_records(groups).items()
    ]


def plot_exports(
    groups: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]], path: Path
) -> Path:
    """Test accuracy after export against the exported model's latency (ms, as measured
    by ``prunekit export``; each run's own dense-shape time as a hollow marker), mean ±
    sample std over seeds, one colour per experiment and export mode."""
    fig, ax = _axes(
        "What pruning pays: accuracy against CPU latency (prunekit export)",
        "latency (ms per batch, prunekit export; hollow: before export)",
        "test accuracy",
    )
    for (name, mode), records in export_records(groups).items():
        after = [r["latency_ms"][1] for r in records]
        before = [r["latency_ms"][0] for r in records]
        acc = [r["test_acc"][1] for r in records]
        x, x_std, n = mean_std(after)
        y, y_std, _ = mean_std(acc)
        line = ax.errorbar(
            [x],
            [y],
            xerr=[x_std or 0.0],
            yerr=[y_std or 0.0],
            marker="o",
            capsize=2,
            label=f"{name} --{mode} (n={n})",
        )
        ax.plot(
            [statistics.fmean(before)],
            [statistics.fmean(r["test_acc"][0] for r in records)],
            marker="o",
            markerfacecolor="none",
            color=line[0].get_color(),
            linestyle="none",
        )
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _plot_groups(
    groups: dict[tuple[str, str], list[tuple[Path, dict[str, Any]]]], plot_path: Path
) -> list[Path]:
    """One plot per experiment (kind, name); the name goes into the file name when there
    are several (and the kind too when two kinds share a name)."""
    names = [name for _, name in groups]
    written = []
    for (kind, name), g in groups.items():
        path = plot_path
        if len(groups) > 1:
            tag = name if names.count(name) == 1 else f"{name}-{kind}"
            path = plot_path.with_name(f"{plot_path.stem}-{tag}{plot_path.suffix}")
        if kind == "lottery":
            plot_lottery([s for _, s in g], path)
        elif kind == "oneshot":
            plot_oneshot([s for _, s in g], path)
        elif kind == "instability":
            from prunekit.experiments.instability import plot_instability

            plot_instability(sorted((s for _, s in g), key=lambda s: s["seed"]), path)
        else:
            plot_gradual(g, path)
        written.append(path)
    return written


# ------------------------------------------------------------------ listings
def registry_table(what: str) -> str:
    """``prunekit models`` / ``prunekit datasets``: each registered name, described.

    >>> print(registry_table("models").splitlines()[0])
    model          description
    """
    if what == "models":
        from prunekit.experiments.models import describe_models

        rows = describe_models()
        extra = "model= also takes an import path (package.module.Class) of your own model"
    elif what == "datasets":
        from prunekit.experiments.data import describe_datasets

        rows = describe_datasets()
        extra = (
            "data._target_= takes an import path of your own LightningDataModule; register "
            "an IDX dataset with @register_dataset (prunekit.experiments.data)"
        )
    else:
        raise ValueError(f"{what=} must be 'models' or 'datasets'")
    return table([what[:-1], "description"], [[k, v] for k, v in rows.items()]) + f"\n\n{extra}"


def config_help(schema: type, cfg: Any) -> str:
    """Every key of ``cfg`` (a loaded ``schema`` config) with its value and help text.

    >>> from prunekit.experiments.config import GradualConfig, load_config
    >>> text = config_help(GradualConfig, load_config(GradualConfig, None, ["name=x", "steps=5"]))
    >>> text.splitlines()[:2]
    ['name = x', '    experiment name; the run folder is named from it and the config']
    """
    from dataclasses import fields, is_dataclass

    from omegaconf import OmegaConf

    lines: list[str] = []

    def walk(node: type, prefix: str) -> None:
        for f in fields(node):
            key = f"{prefix}{f.name}"
            default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
            if is_dataclass(default):
                walk(type(default), f"{key}.")
                continue
            value = OmegaConf.select(cfg, key)
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            shown = json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"{key} = {shown}")
            lines.append(f"    {f.metadata.get('help', '')}")

    walk(schema, "")
    return "\n".join(lines)
