"""``prunekit run experiments/configs/quick_gradual.yaml pruning.method=NAME`` works for
every data-aware method of issue 14 (and magnitude, as the reference).

Each run is the tiny gradual run of ``tests/test_runs.py`` (20 dense steps, 40 pruning
steps on a fake Fashion-MNIST folder, schedule to 80 % by step 30). Checked by hand:
the zeros counted in the saved final weights equal the masks' and the summary's
sparsity, the entry-level methods reach exactly round(0.8 * N) zeros over the
266,200 weights (global scope), and the data-aware masks are not magnitude's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prunekit.experiments import cli

from tests.test_lottery import write_fake_fashion_mnist
from tests.test_runs import N_WEIGHTS, QUICK, tiny

# six tiny trainings, ~3 s each on an idle core (~10 s each on the shared, loaded box)
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*"), pytest.mark.slow]

#: The methods of issue 14; ``activation`` is structured (whole neurons / channels).
METHODS = ("wanda", "taylor", "movement", "snip", "activation")
ENTRY_METHODS = ("magnitude", "wanda", "taylor", "movement", "snip")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The finished tiny run of a method (run once per method, on first use)."""
    done: dict[str, Path] = {}

    def run_of(method: str) -> Path:
        if method not in done:
            torch.set_num_threads(1)
            root = tmp_path_factory.mktemp(method)
            rc = cli.main(["run", str(QUICK), *tiny(root, data), f"pruning.method={method}"])
            assert rc == 0, f"prunekit run quick_gradual.yaml pruning.method={method} failed"
            (done[method],) = [p for p in root.iterdir() if p.is_dir()]
        return done[method]

    return run_of


def zeros_in(folder: Path) -> tuple[int, int, dict[str, torch.Tensor]]:
    """(zeros among the pruned weights of final.pt, their count, masks.pt), by hand."""
    final = torch.load(folder / "final.pt", weights_only=True)
    masks = torch.load(folder / "masks.pt", weights_only=True)
    zeros = sum(int((final[f"{n}"] == 0).sum()) for n in masks)
    total = sum(final[n].numel() for n in masks)
    return zeros, total, masks


@pytest.mark.parametrize("method", ["magnitude", *METHODS])
def test_quick_gradual_runs_with_method(runs: Callable[[str], Path], method: str) -> None:
    folder = runs(method)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == method
    zeros, total, masks = zeros_in(folder)
    assert total == N_WEIGHTS
    pruned = sum(int((~m).sum()) for m in masks.values())
    final = torch.load(folder / "final.pt", weights_only=True)
    for name, mask in masks.items():  # every pruned entry is zero in the saved weights
        assert not final[name][~mask].any(), name
    assert summary["sparsity"] == pytest.approx(pruned / total, abs=1e-12)
    if method in ENTRY_METHODS:  # global ranking of single weights: exact count
        assert pruned == round(0.8 * N_WEIGHTS) == zeros
    else:  # structured: whole rows (neurons) pruned, at least the target
        assert pruned >= round(0.8 * N_WEIGHTS) * 0.9
        for name, mask in masks.items():
            if mask.dim() == 2:
                rows = mask.all(dim=1) | ~mask.any(dim=1)
                assert bool(rows.all()), f"{name}: a row is partly pruned"


@pytest.mark.parametrize("method", ["wanda", "taylor", "movement", "snip"])
def test_data_aware_masks_are_not_magnitude_masks(runs: Callable[[str], Path], method: str) -> None:
    ref = torch.load(runs("magnitude") / "masks.pt", weights_only=True)
    got = torch.load(runs(method) / "masks.pt", weights_only=True)
    differing = sum(int((ref[n] != got[n]).sum()) for n in ref)
    assert differing > 0, f"{method} pruned exactly magnitude's weights"
