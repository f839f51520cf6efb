"""``prunekit oneshot``: one-shot pruning of a trained dense model, no retraining.

A tiny run (LeNet-300-100, 20 dense steps on a fake Fashion-MNIST folder) is checked
against computations that do not use the runner or the engine: the dense accuracy by a
hand loop over the test images, magnitude masks by ``torch.topk`` over all weights (or
per layer), the accuracy of those hand-pruned models, exact zero counts, and the
report's mean ± sample std by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from prunekit.experiments import cli, report
from prunekit.experiments.config import ConfigError, OneShotConfig, load_config
from prunekit.experiments.data import datamodule_from_config
from prunekit.experiments.models import build_model
from prunekit.experiments.oneshot import prune_once

from tests.test_lottery import write_fake_fashion_mnist

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "experiments" / "configs" / "oneshot_lenet300.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def overrides(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        f"out_dir={out}",
        f"data.root={data}",
        "data.val_size=100",
        "data.batch_size=50",
        "dense.steps=20",
        "train.val_every=10",
        "methods=[magnitude]",
        "scopes=[global,layer]",
        "sparsities=[0.0,0.5,0.7,0.9]",
        "calibration_batches=2",
        *extra,
    ]


def run(out: Path, data: Path, *extra: str) -> int:
    return cli.main(["oneshot", str(CONFIG), *overrides(out, data, *extra)])


def only_folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert run(out, data) == 0
    return only_folder(out)


def summary_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "summary.json").read_text())


def load_test_set(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    dm = datamodule_from_config({"name": "fashion_mnist", "root": str(data), "val_size": 100}, 0)
    dm.setup("test")
    xs, ys = zip(*dm.test_dataloader(), strict=True)
    return torch.cat(xs), torch.cat(ys)


def dense_model(folder: Path) -> torch.nn.Module:
    model = build_model("lenet_300_100")
    model.load_state_dict(torch.load(folder / "dense.pt", weights_only=True))
    return model


def hand_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy by an explicit loop over single images (no batching, no runner code)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(len(y)):
            correct += int(model(x[i : i + 1])[0].argmax()) == int(y[i])
    return correct / len(y)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def hand_magnitude(model: torch.nn.Module, sparsity: float, scope: str) -> None:
    """Zero the round(s*N) smallest |w| (over all weights, or per layer) with torch.topk."""
    w = weights(model)
    with torch.no_grad():
        if scope == "global":
            flat = torch.cat([p.abs().flatten() for p in w.values()])
            k = round(sparsity * flat.numel())
            if k:
                threshold = torch.topk(flat, k, largest=False).values.max()
                assert int((flat <= threshold).sum()) == k  # no ties at the threshold
                for p in w.values():
                    p[p.abs() <= threshold] = 0.0
        else:
            for p in w.values():
                k = round(sparsity * p.numel())
                if k:
                    idx = torch.topk(p.abs().flatten(), k, largest=False).indices
                    p.view(-1)[idx] = 0.0


def test_summary_has_every_point_and_exact_measured_sparsity(finished: Path) -> None:
    summary = summary_of(finished)
    assert summary["kind"] == "oneshot"
    points = {(r["method"], r["scope"], r["target_sparsity"]) for r in summary["results"]}
    assert points == {
        ("magnitude", scope, s) for scope in ("global", "layer") for s in (0.0, 0.5, 0.7, 0.9)
    }
    n = 784 * 300 + 300 * 100 + 100 * 10  # 266,200 weights; s*n and s*layer are integers
    for r in summary["results"]:
        assert r["sparsity"] == round(r["target_sparsity"] * n) / n, r
    # metrics.csv holds the same rows
    lines = (finished / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("method,scope,target_sparsity,sparsity,test_loss,test_acc")
    assert len(lines) == 1 + len(summary["results"])


def test_dense_and_zero_sparsity_accuracy_equal_a_hand_evaluation(
    finished: Path, data: Path
) -> None:
    x, y = load_test_set(data)
    dense_acc = hand_accuracy(dense_model(finished), x, y)
    summary = summary_of(finished)
    assert summary["dense_test_acc"] == pytest.approx(dense_acc, abs=1e-12)
    for r in summary["results"]:
        if r["target_sparsity"] == 0.0:
            assert r["test_acc"] == pytest.approx(dense_acc, abs=1e-12)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_points_equal_hand_pruned_models(finished: Path, data: Path, scope: str) -> None:
    x, y = load_test_set(data)
    summary = summary_of(finished)
    accs = []
    for s in (0.5, 0.7, 0.9):
        model = dense_model(finished)
        hand_magnitude(model, s, scope)
        expected = hand_accuracy(model, x, y)
        (record,) = [
            r
            for r in summary["results"]
            if r["scope"] == scope and r["target_sparsity"] == s and r["method"] == "magnitude"
        ]
        assert record["test_acc"] == pytest.approx(expected, abs=1e-12), (scope, s)
        accs.append(expected)
    assert len(set(accs)) > 1  # the points differ: the test can tell sparsities apart


@pytest.mark.parametrize(("scope", "sparsity"), [("global", 0.7), ("layer", 0.9)])
def test_prune_once_magnitude_masks_equal_topk(finished: Path, scope: str, sparsity: float) -> None:
    expected = dense_model(finished)
    hand_magnitude(expected, sparsity, scope)
    model = dense_model(finished)
    record = prune_once(model, method="magnitude", scope=scope, sparsity=sparsity)
    for name, p in weights(model).items():
        assert torch.equal(p == 0, weights(expected)[name] == 0), name
        assert torch.equal(p, weights(expected)[name]), name  # survivors untouched
    assert record["sparsity"] == pytest.approx(sparsity, abs=0.5 / 266_200)


def test_rerun_reports_the_finished_run_unchanged(finished: Path, data: Path) -> None:
    before = (finished / "summary.json").read_bytes()
    assert run(finished.parent, data) == 0
    assert (finished / "summary.json").read_bytes() == before
    assert (finished / "accuracy.png").is_file()


def untimed(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in summary["results"]]


def test_dense_checkpoint_is_reused_and_gives_the_same_points(
    finished: Path, data: Path, tmp_path: Path
) -> None:
    assert run(tmp_path, data, f"dense.checkpoint={finished / 'dense.pt'}", "name=reuse") == 0
    folder = only_folder(tmp_path)
    assert not (folder / "dense.pt").exists()  # nothing trained
    assert untimed(summary_of(folder)) == untimed(summary_of(finished))


def test_report_table_and_plot_use_mean_and_sample_std(tmp_path: Path) -> None:
    runs = []
    for seed, acc in ((0, 0.5), (1, 0.75), (2, 1.0)):
        folder = tmp_path / f"x-{seed}"
        folder.mkdir()
        result = {
            "method": "wanda",
            "scope": "layer",
            "target_sparsity": 0.5,
            "sparsity": 0.5,
            "test_acc": acc,
        }
        summary = {
            "kind": "oneshot",
            "name": "x",
            "seed": seed,
            "dense_test_acc": 0.9,
            "results": [result],
        }
        (folder / "summary.json").write_text(json.dumps(summary))
        runs.append(folder)
    text = report.compare(runs, tmp_path / "plot.png")
    # mean 0.75, sample std sqrt(((0.25)^2 + 0 + 0.25^2) / 2) = 0.25
    assert math.isclose(math.sqrt((0.25**2 * 2) / 2), 0.25)
    assert "0.7500 ± 0.2500" in text
    assert "wanda" in text and "50%" in text
    assert (tmp_path / "plot.png").is_file()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("sparsities=[0.5,1.0]", "sparsities"),
        ("sparsities=[0.5,0.5]", "sparsities"),
        ("scopes=[row]", "scopes"),
        ("methods=[magnitud]", "magnitud"),
        ("calibration_batches=0", "calibration_batches"),
        ("dense.steps=0", "dense.steps"),
    ],
)
def test_bad_config_values_are_named(data: Path, tmp_path: Path, override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(OneShotConfig, CONFIG, [*overrides(tmp_path, data), override])
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- data-aware
DATA_AWARE = ("magnitude", "wanda", "taylor", "wanda_row")
VARIANT = "variants={wanda_row: {method: wanda, per_output: true, scope: layer}}"


@pytest.fixture(scope="module")
def data_aware(finished: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wanda, Taylor and per-row Wanda on the dense weights of ``finished`` (not retrained)."""
    out = tmp_path_factory.mktemp("data_aware")
    methods = f"methods=[{','.join(DATA_AWARE)}]"
    extra = (f"dense.checkpoint={finished / 'dense.pt'}", methods, VARIANT, "sparsities=[0.5,0.9]")
    assert run(out, data, *extra) == 0
    return only_folder(out)


def calibration_batches(data: Path, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` training batches of seed 0, as the runner's config draws them."""
    config = {"name": "fashion_mnist", "root": str(data), "val_size": 100, "batch_size": 50}
    dm = datamodule_from_config(config, 0)
    dm.setup("fit")
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) == n:
            return batches
    raise AssertionError("too few batches")


def hand_scores(model: torch.nn.Module, method: str, data: Path) -> dict[str, torch.Tensor]:
    """Wanda: |W_ij| * ||X_j||_2 over the calibration inputs of each layer (Sun et al. 2024);
    Taylor: |sum over batches of W * dL/dW| with the batch-mean cross-entropy (Molchanov et
    al. 2019). LeNet-300-100 written out by hand: fc1 -> relu -> fc2 -> relu -> fc3."""
    w = weights(model)
    batches = calibration_batches(data)
    if method == "wanda":
        sq = {n: 0.0 for n in w}
        with torch.no_grad():
            for x, _ in batches:
                h0 = x.flatten(1).double()
                h1 = torch.relu(h0 @ w["fc1.weight"].double().T + model.fc1.bias.double())
                h2 = torch.relu(h1 @ w["fc2.weight"].double().T + model.fc2.bias.double())
                for name, h in (("fc1.weight", h0), ("fc2.weight", h1), ("fc3.weight", h2)):
                    sq[name] = sq[name] + (h**2).sum(0)
        return {n: w[n].abs().double() * sq[n].sqrt()[None, :] for n in w}
    total = {n: torch.zeros_like(p) for n, p in w.items()}
    for x, y in batches:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, p in w.items():
            total[n] += p.detach() * p.grad
    model.zero_grad()
    return {n: t.abs().double() for n, t in total.items()}


def hand_prune(model: torch.nn.Module, scores: dict[str, torch.Tensor], s: float, how: str) -> None:
    """Zero the lowest scores: over all weights (global), per layer, or per output row."""
    w = weights(model)
    with torch.no_grad():
        if how == "global":
            flat = torch.cat([t.flatten() for t in scores.values()])
            k = round(s * flat.numel())
            threshold = torch.topk(flat, k, largest=False).values.max()
            assert int((flat <= threshold).sum()) == k  # no ties at the threshold
            for n, t in scores.items():
                w[n][t <= threshold] = 0.0
            return
        for n, t in scores.items():
            rows = t if how == "row" else t.flatten()[None, :]
            k = round(s * rows.shape[1])
            idx = torch.topk(rows, k, dim=1, largest=False).indices
            w[n].view(rows.shape).scatter_(1, idx, 0.0)


@pytest.mark.parametrize(
    ("label", "scope", "how"),
    [
        ("wanda", "global", "global"),
        ("wanda", "layer", "layer"),
        ("wanda_row", "layer", "row"),
        ("taylor", "global", "global"),
        ("taylor", "layer", "layer"),
    ],
)
def test_data_aware_points_equal_hand_computed_scores(
    finished: Path, data_aware: Path, data: Path, label: str, scope: str, how: str
) -> None:
    x, y = load_test_set(data)
    summary = summary_of(data_aware)
    assert summary["calibration_samples"] == 100  # 2 batches of 50
    method = "wanda" if label == "wanda_row" else label
    for s in (0.5, 0.9):
        model = dense_model(finished)
        hand_prune(model, hand_scores(dense_model(finished), method, data), s, how)
        (record,) = [
            r
            for r in summary["results"]
            if (r["method"], r["scope"], r["target_sparsity"]) == (label, scope, s)
        ]
        assert record["pruner_method"] == method
        if how == "row":  # each row of 784 / 300 / 100 entries loses round(s * row) of them
            pruned = sum(
                rows * round(s * size) for rows, size in ((300, 784), (100, 300), (10, 100))
            )
        else:  # 266,200 * s and each layer's size * s are integers
            pruned = round(s * 266_200)
        assert record["sparsity"] == pruned / 266_200
        assert record["test_acc"] == pytest.approx(hand_accuracy(model, x, y), abs=1e-12)


def test_data_aware_masks_differ_from_magnitude(finished: Path, data: Path) -> None:
    """The hand scores are not magnitude's ranking in disguise (else the test above could
    pass with a runner that ignored the method)."""
    for method in ("wanda", "taylor"):
        a, b = dense_model(finished), dense_model(finished)
        hand_prune(a, hand_scores(dense_model(finished), method, data), 0.5, "global")
        hand_magnitude(b, 0.5, "global")
        differing = sum(
            int(((p == 0) != (q == 0)).sum())
            for p, q in zip(weights(a).values(), weights(b).values(), strict=True)
        )
        assert differing > 1000, method


def test_wanda_row_runs_only_in_layer_scope(data_aware: Path) -> None:
    rows = [r for r in summary_of(data_aware)["results"] if r["method"] == "wanda_row"]
    assert {r["scope"] for r in rows} == {"layer"} and len(rows) == 2
    assert rows[0]["options"] == {"per_output": True}
