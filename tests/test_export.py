"""``prunekit export``: compacted models and compressed checkpoints written into a run
folder, with a before/after table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from prunekit.experiments import cli
from prunekit.experiments.config import ConfigError
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


# ------------------------------------------- a user's model, built as the runners build it
class ShapedMLP(torch.nn.Module):
    """A user's model (by import path) whose own defaults are not the run's data: built
    without the run's num_classes / input_shape it has 3 outputs for 8x8 inputs."""

    def __init__(self, num_classes: int = 3, input_shape: tuple[int, ...] = (1, 8, 8)) -> None:
        super().__init__()
        width = 1
        for s in input_shape:
            width *= s
        self.fc1 = torch.nn.Linear(width, 16)
        self.fc2 = torch.nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _user_run_folder(root: Path) -> torch.nn.Module:
    """A finished run of ShapedMLP on Fashion-MNIST (10 classes, 1x28x28) by hand."""
    torch.manual_seed(0)
    net = ShapedMLP(num_classes=10, input_shape=(1, 28, 28)).eval()
    graph = DependencyGraph(net, EXAMPLE)
    masks = graph.group_masks(0.5)
    Pruner(net, targets=graph.param_names).set_masks(masks)
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"name": "u", "model": f"{__name__}.ShapedMLP", "data": {"root": DEFAULT_DATA_DIR}}
    OmegaConf.save(OmegaConf.create(cfg), root / "config.yaml")
    torch.save(net.state_dict(), root / "final.pt")
    torch.save(masks, root / "masks.pt")
    return net


@pytest.mark.parametrize("mode", ["--compact", "--sparse"])
def test_export_builds_a_user_model_for_the_runs_data(tmp_path: Path, mode: str) -> None:
    """(export built it as ShapedMLP() -- 3 classes, 8x8 inputs -- and refused final.pt.)
    compact.pt records what the model was built with, so load_compact rebuilds it."""
    net = _user_run_folder(tmp_path)
    assert cli.main(["export", str(tmp_path), mode, "--repeats", "1", "--test-limit", "100"]) == 0
    record = json.loads((tmp_path / f"export_{mode[2:]}.json").read_text())
    full = 784 * 16 + 16 + 16 * 10 + 10  # by hand: 12,730
    kept = 784 * 8 + 8 + 8 * 10 + 10  # half of the 16 hidden features: 6,370
    assert record["params"] == [full, kept if mode == "--compact" else full]
    if mode == "--sparse":
        return
    saved = torch.load(tmp_path / "compact.pt", weights_only=True)
    assert saved["version"] == 3
    assert saved["model_kwargs"] == {"num_classes": 10, "input_shape": (1, 28, 28)}
    small = load_compact(tmp_path / "compact.pt", EXAMPLE)
    assert small.get_submodule("fc2").weight.shape == (10, 8)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=0)
    # what the model is built with is covered by the CRC
    saved["model_kwargs"]["num_classes"] = 3
    torch.save(saved, tmp_path / "changed.pt")
    with pytest.raises(ConfigError, match=r"changed\.pt is damaged"):
        load_compact(tmp_path / "changed.pt", EXAMPLE)


def test_a_compact_file_without_model_kwargs_is_refused_clearly(tmp_path: Path) -> None:
    """A file written before compact.pt recorded num_classes / input_shape (no version:
    unchecked) of a model whose defaults are not the run's: a clear error, not a raw one."""
    _user_run_folder(tmp_path)
    assert (
        cli.main(["export", str(tmp_path), "--compact", "--repeats", "1", "--test-limit", "50"])
        == 0
    )
    old = torch.load(tmp_path / "compact.pt", weights_only=True)
    for key in ("version", "crc32", "model_kwargs"):
        del old[key]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ConfigError, match=r"old\.pt: cannot rebuild.*does not record"):
        load_compact(tmp_path / "old.pt", EXAMPLE)


class TinyNet(torch.nn.Module):
    """The model of tests/data/compact_v2_tinynet.pt, a version-2 compact file written by
    export.py as of commit b5b9fe2 (fc1 kept features 1 and 3 of 6)."""

    def __init__(self, num_classes: int = 3, input_shape: tuple[int, ...] = (1, 2, 2)) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 6)
        self.fc2 = torch.nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_a_version_2_compact_file_still_loads(tmp_path: Path) -> None:
    path = Path(__file__).parent / "data" / "compact_v2_tinynet.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["version"] == 2 and "model_kwargs" not in saved
    small = load_compact(path, torch.zeros(1, 1, 2, 2))
    s = saved["state_dict"]
    assert s["fc1.weight"].shape == (2, 4) and s["fc2.weight"].shape == (3, 2)
    x = torch.randn(5, 1, 2, 2)
    by_hand = torch.relu(x.flatten(1) @ s["fc1.weight"].t() + s["fc1.bias"])
    by_hand = by_hand @ s["fc2.weight"].t() + s["fc2.bias"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), by_hand, atol=1e-6, rtol=0)
    # a changed byte is still caught by the version-2 CRC
    raw = bytearray(path.read_bytes())
    raw[raw.index(s["fc2.bias"].numpy().tobytes())] ^= 0x10
    (tmp_path / "damaged.pt").write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"damaged\.pt is damaged"):
        load_compact(tmp_path / "damaged.pt", torch.zeros(1, 1, 2, 2))
