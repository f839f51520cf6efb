"""`prunekit run` / `report` end to end on tiny settings, and config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from prunekit.experiments import cli
from prunekit.experiments.config import (
    ConfigError,
    GradualConfig,
    InstabilityConfig,
    LotteryConfig,
    OneShotConfig,
    load_config,
)

QUICK = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "quick_gradual.yaml"
TINY = ["data.subset=600", "steps=30", "dense.steps=20", "train.val_every=10"]


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir())


def test_run_writes_summary_plots_and_reuses_dense_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    args = [
        "run",
        str(QUICK),
        *TINY,
        f"out_dir={tmp_path}",
        "pruning.schedule={kind: polynomial, initial: 0.0, final: 0.8, begin: 0, end: 20, frequency: 5}",
    ]
    assert cli.main(args) == 0
    (run,) = run_dirs(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    n = 784 * 300 + 300 * 100 + 100 * 10
    assert summary["sparsity"] == pytest.approx(round(0.8 * n) / n)
    assert summary["target_sparsity"] == 0.8
    assert set(summary["sparsity_per_layer"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert 0.1 < summary["pruned_test_acc"] <= 1 and 0.1 < summary["dense_test_acc"] <= 1
    for name in ("config.yaml", "metrics.csv", "sparsity.png", "dense.pt", "final.pt", "masks.pt"):
        assert (run / name).stat().st_size > 0, name
    final = torch.load(run / "final.pt", weights_only=True)
    masks = torch.load(run / "masks.pt", weights_only=True)
    assert all(bool((final[k][~m] == 0).all()) for k, m in masks.items())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["steps"] == 30 and config["data"]["subset"] == 600
    out = capsys.readouterr().out
    assert "global sparsity" in out and str(run) in out

    dense = torch.load(run / "dense.pt", weights_only=True)
    assert cli.main(args) == 0  # same config, same folder: finished, reported
    assert "already finished" in capsys.readouterr().err
    (run / "summary.json").unlink()  # as if stopped after the dense phase
    assert cli.main(args) == 0  # dense weights reused, not retrained
    assert all(
        torch.equal(v, torch.load(run / "dense.pt", weights_only=True)[k]) for k, v in dense.items()
    )
    assert "dense weights loaded" in capsys.readouterr().err

    assert cli.main(["report", str(run), str(run), "--plot", str(tmp_path / "cmp.png")]) == 0
    table = capsys.readouterr().out
    assert "quick-gradual" in table and (tmp_path / "cmp.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["steps=10", "trian.lr=0.1"], r"unknown key 'trian'.*did you mean 'train'"),
        (["steps=10", "train.lrr=0.1"], r"unknown key 'train.lrr'.*did you mean 'lr'"),
        (["steps=ten"], r"bad value for 'steps'"),
        (["steps=10", "model=lenet"], r"model='lenet' is not one of"),
        (["steps=10", "pruning.unit=batch"], r"pruning.unit='batch'"),
        (["steps=10", "pruning.schedule.final=1.5"], r"pruning.schedule: .*final"),
        (["steps=10", "pruning.schedule.kind=polynomal"], r"did you mean 'polynomial'"),
        (["steps=10", "train.optimizer=rmsprop"], r"train.optimizer='rmsprop'"),
        (["steps=10", "lr"], r"override 'lr' must look like key=value"),
    ],
)
def test_config_errors_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(GradualConfig, None, ["name=x", *overrides])


def test_missing_values_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required value.*steps"):
        load_config(GradualConfig, None, ["name=x"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(GradualConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsteps: 5\ndata:\n  bath_size: 3\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'data.bath_size' \(in .*bad.yaml\).*'batch_size'"
    ):
        load_config(GradualConfig, bad)
    with pytest.raises(ConfigError, match=r"rewind='late'"):
        load_config(
            LotteryConfig, None, ["name=x", "rounds=2", "steps_per_round=10", "rewind=late"]
        )


def test_cli_reports_missing_data_and_unwritable_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-data"
    assert cli.main(["run", str(QUICK), *TINY, f"out_dir={tmp_path}", f"data.root={missing}"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and str(missing) in err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert cli.main(["run", str(QUICK), *TINY, f"out_dir={blocked}"]) == 2
    assert "cannot write the run folder" in capsys.readouterr().err
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # nothing half-written
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


SHIPPED = sorted(QUICK.parent.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_validates_and_matches_its_file_name(path: Path) -> None:
    from prunekit.experiments.models import build_model

    raw = yaml.safe_load(path.read_text())
    schema = (
        LotteryConfig
        if "rounds" in raw
        else OneShotConfig
        if "sparsities" in raw
        else InstabilityConfig
        if "rewind_steps" in raw
        else GradualConfig
    )
    cfg = load_config(schema, path)
    if "${" not in raw["name"]:  # else the name follows other keys (method, sparsity)
        assert cfg.name == path.stem.replace("_", "-")
    model = build_model(cfg.model)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # Fashion-MNIST: 10 classes
    if path.stem.startswith("gmp_"):  # gmp_<model>_<percent>.yaml ramps to that sparsity
        assert cfg.pruning.schedule.final == int(path.stem.rsplit("_", 1)[1]) / 100
