"""``prunekit export``: compacted models and compressed checkpoints written into a run
folder, with a before/after table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from prunekit.experiments import cli
from prunekit.experiments.data import DEFAULT_DATA_DIR
from prunekit.experiments.export import load_compact
from prunekit.experiments.models import build_model

from prunekit import DependencyGraph, Pruner, load_sparse

EXAMPLE = torch.zeros(1, 1, 28, 28)


def _run_folder(root: Path, amount: float = 0.5) -> torch.nn.Module:
    """A finished-run folder by hand: config, final weights, masks (whole groups)."""
    torch.manual_seed(0)
    net = build_model("lenet_300_100").eval()
    graph = DependencyGraph(net, EXAMPLE)
    masks = graph.group_masks(amount)
    Pruner(net, targets=graph.param_names).set_masks(masks)
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"name": "t", "model": "lenet_300_100", "data": {"root": DEFAULT_DATA_DIR}}
    OmegaConf.save(OmegaConf.create(cfg), root / "config.yaml")
    torch.save(net.state_dict(), root / "final.pt")
    torch.save(masks, root / "masks.pt")
    return net


def test_export_compact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = _run_folder(tmp_path)
    argv = ["export", str(tmp_path), "--compact", "--repeats", "3", "--test-limit", "300"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "latency" in out and "test accuracy (300)" in out
    record = json.loads((tmp_path / "export_compact.json").read_text())
    h1, h2 = 150, 50  # half of each hidden layer of LeNet-300-100
    kept = 784 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10
    assert record["params"] == [266_610, kept]
    # float32 weights kept + the packed masks (1 bit per entry of every masked parameter)
    mask_bits = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10
    assert record["file_bytes"][1] == pytest.approx(4 * kept + mask_bits / 8, rel=0.02)
    assert record["test_acc"][0] == record["test_acc"][1]
    small = load_compact(tmp_path / "compact.pt", EXAMPLE)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=0)


def test_export_sparse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = _run_folder(tmp_path)
    argv = ["export", str(tmp_path), "--sparse", "--repeats", "2", "--test-limit", "200"]
    assert cli.main(argv) == 0
    assert "final.sparse.pt" in capsys.readouterr().out
    back = load_sparse(tmp_path / "final.sparse.pt")
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())
    record = json.loads((tmp_path / "export_sparse.json").read_text())
    kept = sum(int((p != 0).sum()) for p in net.parameters())
    assert record["nonzero_params"] == [kept, kept]
    assert record["file_bytes"][1] < record["file_bytes"][0]


def test_export_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["export", str(tmp_path), "--compact"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    _run_folder(tmp_path)
    (tmp_path / "masks.pt").unlink()
    assert cli.main(["export", str(tmp_path), "--sparse"]) == 2
    assert "masks.pt does not exist" in capsys.readouterr().err
    _run_folder(tmp_path)
    assert cli.main(["export", str(tmp_path), "--sparse", "--repeats", "0"]) == 2
    assert "repeats=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", str(tmp_path), "--sparse", "--compact"])


def test_export_compact_completes_row_masks_and_says_so(tmp_path: Path) -> None:
    _run_folder(tmp_path)
    torch.manual_seed(1)
    net = build_model("lenet_300_100")
    pruner = Pruner(net, method="ln_structured", scope="layer", dim=0, exclude="fc3.weight")
    pruner.prune_to(0.5)  # rows of fc1 and fc2; their biases stay live
    torch.save(net.state_dict(), tmp_path / "final.pt")
    torch.save(pruner.masks, tmp_path / "masks.pt")
    argv = ["export", str(tmp_path), "--compact", "--repeats", "1", "--test-limit", "100"]
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "export_compact.json").read_text())
    assert record["note"].startswith("200 of 400 channel groups removed with the biases")
    assert record["params"][1] == 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
