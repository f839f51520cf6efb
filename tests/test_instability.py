"""Tests for prunekit.experiments.instability (linear mode connectivity, Frankle et al. 2020).

Runs train LeNet-300-100 for a few dozen steps on a small fake Fashion-MNIST folder
(random images, see tests/test_lottery.py), so they check mechanics, not accuracy. A
probe wrapped around ``training.fit`` records what every fit starts from and the labels
of its first training batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from prunekit.experiments import instability, training
from prunekit.experiments.config import ConfigError, InstabilityConfig, load_config
from prunekit.experiments.models import build_model
from prunekit.experiments.paths import RunPaths
from torch.utils.data import DataLoader, TensorDataset

from tests.test_lottery import write_fake_fashion_mnist

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")

WEIGHTS = ("fc1.weight", "fc2.weight", "fc3.weight")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def config(data_root: Path, out_dir: Path, *overrides: str) -> DictConfig:
    base = [
        "name=t",
        "steps=30",
        "rewind_steps=[0,10]",
        "alphas=5",
        "data.batch_size=50",
        "data.val_size=200",
        f"data.root={data_root}",
        "train.val_every=30",
        f"out_dir={out_dir}",
    ]
    return load_config(InstabilityConfig, None, [*base, *overrides])


class Probe(Callback):
    """The step and weights a fit starts from, and the labels of its first 2 batches."""

    def __init__(self, into: dict[str, Any], key: str) -> None:
        self.into, self.key = into, key
        into[key] = {"batches": []}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.into[self.key]["step"] = trainer.global_step
        self.into[self.key]["weights"] = {
            k.removeprefix("model."): v.detach().clone() for k, v in pl_module.state_dict().items()
        }

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if len(self.into[self.key]["batches"]) < 2:
            self.into[self.key]["batches"].append(batch[1].clone())


def install_probe(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    fits: dict[str, Any] = {}
    fit = training.fit

    def probed_fit(*args: Any, **kwargs: Any) -> pl.Trainer:
        key = Path(kwargs["log_dir"]).name
        kwargs["callbacks"] = [*kwargs["callbacks"], Probe(fits, key)]
        return fit(*args, **kwargs)

    mp.setattr(training, "fit", probed_fit)
    return fits


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def hand_error(weights: dict[str, torch.Tensor], cfg: DictConfig) -> float:
    """Test error of a LeNet-300-100 with ``weights``: argmax over all test images."""
    net = build_model("lenet_300_100")
    net.load_state_dict(weights)
    dm = training.datamodule(cfg, cfg.seed)
    x, y = dm.test_set.tensors
    with torch.no_grad():
        wrong = int((net(x).argmax(dim=1) != y).sum())
    return wrong / y.numel()


@pytest.fixture(scope="module")
def dense_run(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DictConfig, dict[str, Any], dict[str, Any]]:
    cfg = config(data_root, tmp_path_factory.mktemp("runs"))
    with pytest.MonkeyPatch.context() as mp:
        fits = install_probe(mp)
        summary = instability.run_instability(cfg)
    return cfg, summary, fits


# --------------------------------------------------------------------------- the analysis
def test_path_ends_equal_the_copies_errors_computed_by_hand(dense_run: Any) -> None:
    cfg, summary, _ = dense_run
    root = RunPaths.for_config(cfg).root
    assert [r["k"] for r in summary["results"]] == [0, 10]
    for result in summary["results"]:
        k = result["k"]
        copies = [load(root / f"k_{k}" / f"copy_{i}.pt") for i in (0, 1)]
        assert result["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert result["errors"][0] == pytest.approx(hand_error(copies[0], cfg), abs=1e-12)
        assert result["errors"][-1] == pytest.approx(hand_error(copies[1], cfg), abs=1e-12)
        assert result["endpoint_errors"] == [result["errors"][0], result["errors"][-1]]
        # the middle of the path is the hand average of the two copies
        middle = {n: (copies[0][n] + copies[1][n]) / 2 for n in copies[0]}
        assert result["errors"][2] == pytest.approx(hand_error(middle, cfg), abs=1e-12)
        errors = result["errors"]
        assert result["instability"] == pytest.approx(
            max(errors) - (errors[0] + errors[-1]) / 2, abs=1e-12
        )
        assert not torch.equal(copies[0]["fc1.weight"], copies[1]["fc1.weight"])
    saved = json.loads((root / "summary.json").read_text())
    assert saved == summary and saved["remaining"] == 1.0 and saved["kind"] == "instability"
    for name in summary["files"]:
        assert (root / name).is_file(), name


def test_interpolation_at_one_half_is_the_hand_average(dense_run: Any) -> None:
    cfg, _, _ = dense_run
    root = RunPaths.for_config(cfg).root
    a, b = load(root / "k_10" / "copy_0.pt"), load(root / "k_10" / "copy_1.pt")
    half = instability.interpolate(a, b, 0.5)
    for name in a:
        torch.testing.assert_close(half[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7)
    for name in a:  # the ends are exact
        assert torch.equal(instability.interpolate(a, b, 0.0)[name], a[name])
        assert torch.equal(instability.interpolate(a, b, 1.0)[name], b[name])
    with pytest.raises(ValueError, match=r"alpha=1\.5 must be in"):
        instability.interpolate(a, b, 1.5)
    with pytest.raises(ValueError, match=r"missing \['fc3.bias'\]"):
        instability.interpolate(a, {k: v for k, v in b.items() if k != "fc3.bias"}, 0.5)


def test_copies_start_from_step_k_and_see_other_data_orders(dense_run: Any) -> None:
    cfg, _, fits = dense_run
    root = RunPaths.for_config(cfg).root
    assert set(fits) == {"trunk", "k_0_copy_0", "k_0_copy_1", "k_10_copy_0", "k_10_copy_1"}
    initial = load(root / "init.pt")
    trunk = torch.load(root / "rewind_k10.ckpt", weights_only=False)
    assert trunk["global_step"] == 10
    at_k = {k.removeprefix("model."): v for k, v in trunk["state_dict"].items()}
    assert not torch.equal(at_k["fc1.weight"], initial["fc1.weight"])
    for i in (0, 1):
        zero, ten = fits[f"k_0_copy_{i}"], fits[f"k_10_copy_{i}"]
        assert zero["step"] == 0 and ten["step"] == 10
        for name in initial:
            assert torch.equal(zero["weights"][name], initial[name])
            assert torch.equal(ten["weights"][name], at_k[name])
    for k in (0, 10):  # the data order really differs between the two copies
        first, second = fits[f"k_{k}_copy_0"]["batches"], fits[f"k_{k}_copy_1"]["batches"]
        assert len(first) == len(second) == 2
        assert not torch.equal(first[0], second[0])
        assert not torch.equal(first[1], second[1])


def test_same_data_seed_gives_identical_copies_and_zero_instability(
    data_root: Path, tmp_path: Path
) -> None:
    cfg = config(data_root, tmp_path, "data_seeds=[3,3]", "rewind_steps=[5]", "steps=20")
    summary = instability.run_instability(cfg)
    root = RunPaths.for_config(cfg).root
    a, b = load(root / "k_5" / "copy_0.pt"), load(root / "k_5" / "copy_1.pt")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    (result,) = summary["results"]
    assert result["instability"] == 0.0
    assert len(set(result["errors"])) == 1


def test_finished_ks_are_reused(dense_run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, summary, _ = dense_run

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(training, "fit", fail)
    again = instability.run_instability(cfg)
    assert again["results"] == summary["results"]
    table = instability.instability_table(again)
    assert "instability" in table and "10" in table.splitlines()[-1]


def test_data_order_is_a_permutation_from_seed_plus_epoch() -> None:
    class Data(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.arange(10)), batch_size=10)

    loader = instability.DataOrder(Data(), seed=7).train_dataloader()
    for epoch in (0, 3):
        loader.sampler.set_epoch(epoch)
        (batch,) = next(iter(loader))
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch))
        assert torch.equal(batch, expected)
    with pytest.raises(ValueError, match="seed=-1 must be an int >= 0"):
        instability.DataOrder(Data(), seed=-1)


# --------------------------------------------------------------------------- sparse
def test_sparse_copies_hold_the_mask_from_step_k(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(0)
    net = build_model("lenet_300_100")
    masks = {n: torch.rand(net.get_parameter(n).shape, generator=g) < 0.3 for n in WEIGHTS}
    path = tmp_path / "round_03" / "lottery.pt"
    path.parent.mkdir()
    torch.save({"masks": masks, "weights": net.state_dict()}, path)
    fits = install_probe(monkeypatch)
    cfg = config(data_root, tmp_path, f"masks={path}", "rewind_steps=[10]", "steps=20")
    summary = instability.run_instability(cfg)
    root = RunPaths.for_config(cfg).root
    kept = sum(int(m.sum()) for m in masks.values())
    assert summary["remaining"] == kept / sum(m.numel() for m in masks.values())
    trunk = torch.load(root / "rewind_k10.ckpt", weights_only=False)["state_dict"]
    for i in (0, 1):
        final = load(root / "k_10" / f"copy_{i}.pt")
        start = fits[f"k_10_copy_{i}"]["weights"]
        for name in WEIGHTS:
            mask = masks[name]
            assert torch.equal(start[name], trunk[f"model.{name}"] * mask)  # survivors at k
            assert not final[name][~mask].any() and final[name][mask].ne(0).all()
    assert "sparse" in instability.instability_table(summary)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rewind_steps=[0,30]"], r"rewind_steps=\[0, 30\] must lie in \[0, steps=30\)"),
        (["rewind_steps=[5,5]"], r"rewind_steps=\[5, 5\] lists a step twice"),
        (["rewind_steps=[]"], r"rewind_steps=\[\] must list at least one"),
        (["data_seeds=[1]"], r"data_seeds=\[1\] must hold two seeds"),
        (["data_seeds=[1,-2]"], r"data_seeds=\[1, -2\] must be >= 0"),
        (["alphas=1"], r"alphas=1 must be in \[2, 1001\]"),
        (["eval_on=train"], r"eval_on='train' must be one of"),
        (["steps=0"], r"steps=0 must be >= 1"),
        (["rewind_stepz=[1]"], r"unknown key 'rewind_stepz'.*did you mean 'rewind_steps'"),
    ],
)
def test_bad_config_values_raise_naming_the_key(
    data_root: Path, tmp_path: Path, overrides: list[str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        config(data_root, tmp_path, *overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["masks=/no/such/masks.pt"], r"masks='/no/such/masks.pt': .*does not exist"),
        (["model=resnet20"], r"model='resnet20' has BatchNorm layers"),
    ],
    ids=["no-masks-file", "batchnorm"],
)
def test_bad_runs_fail_before_anything_is_written(
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: list[str],
    match: str,
) -> None:
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("training started"))
    cfg = config(data_root, tmp_path, *overrides)
    with pytest.raises(ConfigError, match=match):
        instability.run_instability(cfg)
    assert not RunPaths.for_config(cfg).root.exists()


def test_masks_that_do_not_fit_the_model_are_refused(data_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "masks.pt"
    torch.save({"fc9.weight": torch.ones(3, dtype=torch.bool)}, path)
    cfg = config(data_root, tmp_path, f"masks={path}")
    with pytest.raises(ConfigError, match=r"names 'fc9.weight', not a parameter"):
        instability.run_instability(cfg)
    torch.save({"fc1.weight": torch.ones(3, 3, dtype=torch.bool)}, path)
    with pytest.raises(ConfigError, match=r"'fc1.weight' has shape \(3, 3\)"):
        instability.run_instability(cfg)


def test_command_prints_the_table_and_the_plot_path(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from prunekit.experiments import cli

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text("name: tiny\nsteps: 12\nrewind_steps: [0, 4]\nalphas: 3\n")
    overrides = [
        "data.batch_size=50",
        "data.val_size=200",
        f"data.root={data_root}",
        "train.val_every=12",
        f"out_dir={tmp_path / 'runs'}",
    ]
    assert cli.main(["instability", str(config_file), *overrides]) == 0
    out = capsys.readouterr().out
    plot = Path(out.split("plot: ")[1].split()[0])
    assert plot.is_file() and plot.stat().st_size > 10_000 and plot.suffix == ".png"
    assert "max error on path" in out and out.count(" pts") == 2
    assert cli.main(["instability", str(config_file), *overrides, "--print-config"]) == 0
    assert "rewind_steps" in capsys.readouterr().out
    assert cli.main(["instability", str(config_file), *overrides, "alphas=1"]) == 2
    assert "alphas=1 must be in [2, 1001]" in capsys.readouterr().err


def test_combined_seeds_mean_and_sample_std(dense_run: Any, tmp_path: Path) -> None:
    _, summary, _ = dense_run
    runs = []
    for seed, values in enumerate(((0.01, 0.0), (0.02, 0.0), (0.06, 0.0))):
        run = json.loads(json.dumps(summary))  # a copy
        run["seed"] = seed
        for result, value in zip(run["results"], values, strict=True):
            result["instability"] = value
        runs.append(run)
    table = instability.combined_table(runs)
    # k = 0: 1, 2 and 6 points: mean 3, sample std sqrt((4 + 1 + 9) / 2) = sqrt(7)
    assert "3.00 ± 2.65  1.00, 2.00, 6.00" in table.splitlines()[3]
    assert "0.00 ± 0.00" in table.splitlines()[4]
    # above the line: the path's largest rise over the chord between its ends, by hand
    errors = torch.tensor(summary["results"][0]["errors"], dtype=torch.float64)
    a = torch.linspace(0, 1, len(errors), dtype=torch.float64)
    rise = max(float((errors - ((1 - a) * errors[0] + a * errors[-1])).max()), 0.0)
    assert table.splitlines()[3].endswith(f"{100 * rise:.2f} ± 0.00")
    plot = instability.plot_instability(runs, tmp_path / "three.png")
    assert plot.is_file() and plot.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match=r"has no summary\.json"):
        instability.combine([tmp_path])


CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


@pytest.mark.parametrize("name", ["quick_instability.yaml", "instability_lenet300.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(InstabilityConfig, CONFIGS / name, [])
    assert cfg.model == "lenet_300_100" and len(cfg.data_seeds) == 2


@pytest.mark.slow
def test_quick_config_runs_on_fashion_mnist(tmp_path: Path) -> None:
    """The shipped quick config end to end on the real data (about a minute on 2 cores)."""
    from prunekit.experiments import cli

    config_file = CONFIGS / "quick_instability.yaml"
    assert cli.main(["instability", str(config_file), f"out_dir={tmp_path}"]) == 0
    cfg = load_config(InstabilityConfig, config_file, [f"out_dir={tmp_path}"])
    summary = json.loads(RunPaths.for_config(cfg).summary.read_text())
    assert [r["k"] for r in summary["results"]] == [0, 50, 200]
    for result in summary["results"]:
        assert len(result["errors"]) == 11
        assert all(0.05 < e < 0.3 for e in result["errors"])  # trained, not chance (90 %)
        assert result["instability"] >= 0.0
    assert (RunPaths.for_config(cfg).root / "instability.png").is_file()


def test_report_shows_instability_runs(dense_run: Any, tmp_path: Path) -> None:
    from prunekit.experiments import report

    cfg, summary, _ = dense_run
    root = RunPaths.for_config(cfg).root
    text = report.compare([root], tmp_path / "cmp.png")
    assert instability.combined_table([summary]) in text  # not silently left out
    assert (tmp_path / "cmp.png").is_file()
