"""Tests for prunekit.experiments.report and the listing commands: one plot per experiment
name (gradual and lottery alike), sample standard deviations everywhere, every line in the
legend, the written paths printed; ``prunekit models`` / ``datasets`` / ``--print-config``.

The run folders are small hand-written ``summary.json`` files (plus the dense phase's
``metrics.csv`` and ``config.yaml`` for gradual runs); expected numbers are computed here
by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from prunekit.experiments import cli, report

QUICK = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "quick_gradual.yaml"


def sample_std(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def lottery_run(
    folder: Path, name: str, seed: int, rewind: str, accs: dict[tuple[int, str], float]
) -> Path:
    """A lottery summary: rounds 0 and 1, variants as given; ``remaining`` 1.0 then 0.8."""
    rounds = [
        {
            "round": r,
            "variant": variant,
            "remaining": 1.0 if r == 0 else 0.8,
            "test_acc_early_stop": acc,
            "test_acc_final": acc - 0.01,
        }
        for (r, variant), acc in accs.items()
    ]
    summary = {"kind": "lottery", "name": name, "seed": seed, "rewind": rewind, "rounds": rounds}
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def gradual_run(
    folder: Path, seed: int, dense_val: list[float], pruning_val: list[float], **values: float
) -> Path:
    """A gradual run with 10 dense steps (validated at 5 and 10) then pruning evaluations
    at steps 3 and 6 of the pruning phase."""
    folder.mkdir(parents=True)
    (folder / "dense").mkdir()
    rows = ["epoch,step,train/acc,train/loss,val/acc,val/loss"]
    rows += [f"0,{step - 1},,,{acc},0.5" for step, acc in zip((5, 10), dense_val, strict=True)]
    (folder / "dense" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (folder / "config.yaml").write_text("name: gmp\ndense:\n  steps: 10\n")
    evaluations = [
        {"step": step, "val_loss": 0.4, "val_acc": acc, "test_acc": acc}
        for step, acc in zip((3, 6), pruning_val, strict=True)
    ]
    summary = {"kind": "gradual", "name": "gmp", "seed": seed, "evaluations": evaluations, **values}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Any]:
    """Two lottery experiments (lth-a: 2 seeds with a control, lth-b: 1 seed) and one
    gradual experiment (gmp: 2 seeds) in one report."""
    a = [
        lottery_run(
            tmp_path / f"a{seed}",
            "lth-a",
            seed,
            "init",
            {(0, "lottery"): 0.90 + 0.02 * seed, (1, "lottery"): acc, (1, "random_reinit"): 0.7},
        )
        for seed, acc in ((0, 0.80), (1, 0.86))
    ]
    b = [lottery_run(tmp_path / "b0", "lth-b", 0, "lr", {(0, "lottery"): 0.5, (1, "lottery"): 0.4})]
    g = [
        gradual_run(
            tmp_path / "g0",
            0,
            [0.60, 0.70],
            [0.72, 0.75],
            dense_test_acc=0.88,
            pruned_test_acc=0.84,
            sparsity=0.9,
        ),
        gradual_run(
            tmp_path / "g1",
            1,
            [0.62, 0.74],
            [0.70, 0.79],
            dense_test_acc=0.90,
            pruned_test_acc=0.80,
            sparsity=0.9,
        ),
    ]
    return {"a": a, "b": b, "g": g, "all": [*a, *g, *b]}


def test_mean_std_is_the_sample_std() -> None:
    values = [0.80, 0.86, 0.83, 0.91]
    mean, std, n = report.mean_std(values)
    assert n == 4 and mean == pytest.approx(sum(values) / 4)
    assert std == pytest.approx(sample_std(values))
    assert std != pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 4))  # not ddof=0
    assert report.mean_std([0.5]) == (0.5, None, 1)


def test_one_plot_per_experiment_name_gradual_included(
    folders: dict[str, Any], tmp_path: Path
) -> None:
    text = report.compare(folders["all"], tmp_path / "cmp.png")
    expected = [tmp_path / f"cmp-{name}.png" for name in ("lth-a", "gmp", "lth-b")]
    written = [
        line.removeprefix("plot written: ")
        for line in text.splitlines()
        if line.startswith("plot written: ")
    ]
    assert written == [str(p) for p in expected]
    assert all(p.stat().st_size > 0 for p in expected)
    assert not (tmp_path / "cmp.png").exists()
    # one experiment alone: exactly the path asked for
    alone = report.compare(folders["b"], tmp_path / "b.png")
    assert alone.endswith(f"plot written: {tmp_path / 'b.png'}") and (tmp_path / "b.png").is_file()


def test_a_plot_never_pools_two_names(folders: dict[str, Any]) -> None:
    summaries = report.load_summaries([*folders["a"], *folders["b"]])
    with pytest.raises(ValueError, match=r"never pooled"):
        report.lottery_figure(summaries)


def errorbars(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (plotted means, half-lengths of the error bars) of an axes' errorbars."""
    out = {}
    for container in ax.containers:
        line, _, (bars,) = container.lines
        halves = [(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
        out[container.get_label()] = (list(line.get_ydata()), halves)
    return out


def test_lottery_plot_numbers_are_means_and_sample_stds(folders: dict[str, Any]) -> None:
    fig = report.lottery_figure(report.load_summaries(folders["a"]))
    (ax,) = fig.axes
    bars = errorbars(ax)
    means, halves = bars["lottery (rewind=init) (n=2)"]
    assert means == pytest.approx([(0.90 + 0.92) / 2, (0.80 + 0.86) / 2])
    assert halves == pytest.approx([sample_std([0.90, 0.92]), sample_std([0.80, 0.86])])
    assert bars["random_reinit (n=2)"][0] == pytest.approx([0.7])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dense, round 0 (mean of 2)" in legend  # the reference line is in the legend
    labelled = [a.get_label() for a in [*ax.lines, *ax.containers]]
    assert sorted(legend) == sorted(x for x in labelled if not x.startswith("_"))
    dense = [line for line in ax.lines if line.get_label().startswith("dense")]
    assert dense[0].get_ydata()[0] == pytest.approx(0.91)
    assert "sample std" in ax.get_title()


def test_gradual_plot_accuracy_vs_sparsity_and_vs_step_with_the_dense_phase(
    folders: dict[str, Any],
) -> None:
    runs = [(p, s) for p, s in zip(folders["g"], report.load_summaries(folders["g"]), strict=True)]
    fig = report.gradual_figure(runs)
    left, right = fig.axes
    ((means, halves),) = errorbars(left).values()
    assert means == pytest.approx([0.82]) and halves == pytest.approx([sample_std([0.84, 0.80])])
    left_legend = [t.get_text() for t in left.get_legend().get_texts()]
    assert "dense (mean of 2)" in left_legend and "each seed (n=2)" in left_legend
    (curve,) = [line for line in right.lines if line.get_label().startswith("val accuracy")]
    # dense steps 5, 10 (csv rows say 4, 9), then pruning steps 3, 6 shifted by 10
    assert list(curve.get_xdata()) == [5, 10, 13, 16]
    assert list(curve.get_ydata()) == pytest.approx([0.61, 0.72, 0.71, 0.77])
    right_legend = [t.get_text() for t in right.get_legend().get_texts()]
    assert "dense phase (steps 0-10)" in right_legend and "± sample std" in right_legend
    assert "sample std" in fig.get_suptitle()


def test_tables_use_the_sample_std_and_say_so(folders: dict[str, Any]) -> None:
    text = report.compare(folders["all"])
    assert f"{0.83:.4f} ± {sample_std([0.80, 0.86]):.4f}" in text  # lth-a round 1
    assert f"{0.82:.4f} ± {sample_std([0.84, 0.80]):.4f}" in text  # gmp pruned accuracy
    assert text.count("sample std (n-1)") == 3  # gradual table, lth-a, lth-b
    assert "plot written" not in text


def test_exported_runs_get_ratios_and_a_latency_plot(
    folders: dict[str, Any], tmp_path: Path
) -> None:
    records = [  # (params, file bytes, latency ms, test acc) before and after, per seed
        ([1000, 250], [8000, 2400], [10.0, 4.0], [0.80, 0.80]),
        ([1000, 250], [8000, 2000], [12.0, 3.0], [0.84, 0.84]),
    ]
    for folder, (params, size, ms, acc) in zip(folders["g"], records, strict=True):
        record = {"params": params, "file_bytes": size, "latency_ms": ms, "test_acc": acc}
        (folder / "export_compact.json").write_text(json.dumps(record))
    text = report.compare(folders["all"], tmp_path / "r.png")
    row = next(line for line in text.splitlines() if line.startswith("gmp  compact"))
    assert row.split()[:3] == ["gmp", "compact", "2"]
    assert f"{0.25:.4f} ± {0.0:.4f}" in row  # parameters
    assert f"{0.275:.4f} ± {sample_std([0.3, 0.25]):.4f}" in row  # file size
    assert f"{0.325:.4f} ± {sample_std([0.4, 0.25]):.4f}" in row  # latency
    assert row.count(f"{0.82:.4f} ± {sample_std([0.80, 0.84]):.4f}") == 2  # before = after
    assert (tmp_path / "r-exports.png").stat().st_size > 0
    assert f"plot written: {tmp_path / 'r-exports.png'}" in text
    assert "export" not in report.compare(folders["a"])  # runs without exports: no table


def test_cli_report_prints_the_written_paths(
    folders: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = [str(p) for p in folders["all"]]
    assert cli.main(["report", *runs, "--plot", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert f"plot written: {tmp_path / 'r-gmp.png'}" in out


def test_models_and_datasets_commands(capsys: pytest.CaptureFixture[str]) -> None:
    from prunekit.experiments.data import list_datasets
    from prunekit.experiments.models import list_models

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in list_models())
    assert "LeNet-300-100 (266,610 parameters" in out
    assert cli.main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in list_datasets())
    assert "input 1x28x28, 10 classes" in out


def test_print_config_lists_every_key_with_its_help(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import fields, is_dataclass

    from prunekit.experiments.config import GradualConfig

    args = ["run", str(QUICK), f"out_dir={tmp_path}", "data.batch_size=32", "--print-config"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "data.batch_size = 32\n    training batch size\n" in out
    assert "pruning.scope = global\n" in out
    assert not any(tmp_path.iterdir())  # nothing ran

    def keys(node: type, prefix: str = "") -> list[str]:
        found = []
        for f in fields(node):
            default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
            if is_dataclass(default):
                found += keys(type(default), f"{prefix}{f.name}.")
            else:
                found.append(f"{prefix}{f.name}")
        return found

    listed = [
        line.split(" = ")[0]
        for line in out.splitlines()
        if " = " in line and not line.startswith(" ")
    ]
    assert listed == keys(GradualConfig)
    helps = [line for line in out.splitlines() if line.startswith("    ")]
    assert len(helps) == len(listed) and all(h.strip() for h in helps)
