"""The runners' fast path computes what a plain PyTorch loop computes, with less overhead.

``benchmarks/loop.py`` measures the time; these tests check what makes it fast without
changing results: the runners' ``Classifier`` calls ``self.log`` for the training metrics
only at the steps the loggers write (each call costs about a millisecond of Lightning
bookkeeping), the rows written are the same as with logging every step, and a round through
``training.fit`` reaches the same evaluations as a hand-written loop over the same data.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from prunekit.experiments import training
from prunekit.experiments.data import FILES, FashionMNISTDataModule
from prunekit.experiments.models import build_model
from prunekit.experiments.module import Classifier

from tests.test_data import idx_bytes, write


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable 28x28 10-class dataset in the Fashion-MNIST file layout."""
    root = tmp_path_factory.mktemp("fake-fashion")
    g = torch.Generator().manual_seed(0)
    for part, n in (("train", 400), ("test", 100)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 100, (n, 28, 28), generator=g) + 15 * labels.view(n, 1, 1)
        write(
            root / FILES[f"{part}_images"],
            idx_bytes(8, (n, 28, 28), images.to(torch.uint8).numpy().tobytes()),
        )
        write(
            root / FILES[f"{part}_labels"],
            idx_bytes(8, (n,), labels.to(torch.uint8).numpy().tobytes()),
        )
    return root


def datamodule(root: Path) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(root, batch_size=20, val_size=60, seed=3)
    dm.setup()
    return dm


def train_config() -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "optimizer": "adam",
            "lr": 1.2e-3,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "lr_schedule": None,
            "milestones": [],
            "gamma": 0.1,
        }
    )


def runner_round(dm: FashionMNISTDataModule, steps: int, val_every: int, log_dir: Path) -> Any:
    seed_everything(0, verbose=False)
    module = training.classifier(build_model("lenet_300_100"), train_config(), steps)
    evaluations = training.Evaluations(dm.test_dataloader())
    training.fit(
        module, dm, max_steps=steps, val_every=val_every, log_dir=log_dir, callbacks=[evaluations]
    )
    return module, evaluations.records


def plain_round(
    dm: FashionMNISTDataModule, steps: int, val_every: int
) -> list[tuple[int, float, float, float]]:
    """The same round by hand: per-epoch permutation from seed + epoch, batches cut from it."""
    x, y = dm.train_set.tensors  # type: ignore[union-attr]
    xv, yv = dm.val_set.tensors  # type: ignore[union-attr]
    xt, yt = dm.test_set.tensors  # type: ignore[union-attr]
    torch.manual_seed(0)
    model = build_model("lenet_300_100")
    optimizer = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    records, step, epoch = [], 0, 0
    while step < steps:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(dm.seed + epoch))
        epoch += 1
        for i in range(0, len(order), dm.batch_size):
            index = order[i : i + dm.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
            step += 1
            if step % val_every == 0:
                with torch.no_grad():
                    val = model(xv)
                    records.append(
                        (
                            step,
                            float(F.cross_entropy(val, yv)),
                            float((val.argmax(1) == yv).float().mean()),
                            int((model(xt).argmax(1) == yt).sum()) / len(yt),
                        )
                    )
            if step == steps:
                break
    return records


def test_a_runner_round_reaches_the_plain_loops_evaluations(
    fake_root: Path, tmp_path: Path, single_thread: None
) -> None:
    dm = datamodule(fake_root)
    _, records = runner_round(dm, steps=34, val_every=17, log_dir=tmp_path)  # 17 batches/epoch
    expected = plain_round(dm, steps=34, val_every=17)
    assert [r.step for r in records] == [e[0] for e in expected] == [17, 34]
    for record, (_, val_loss, val_acc, test_acc) in zip(records, expected, strict=True):
        assert record.val_loss == pytest.approx(val_loss, rel=1e-5)
        assert record.val_acc == pytest.approx(val_acc, abs=1e-6)
        assert record.test_acc == pytest.approx(test_acc, abs=1e-12)


def train_rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


def test_runner_logs_train_metrics_only_at_written_steps_same_rows(
    fake_root: Path, tmp_path: Path, single_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = datamodule(fake_root)
    calls: list[str] = []
    original = Classifier.log

    def counting_log(self: Classifier, name: str, *args: Any, **kwargs: Any) -> None:
        calls.append(name)
        original(self, name, *args, **kwargs)

    monkeypatch.setattr(Classifier, "log", counting_log)
    module, _ = runner_round(dm, steps=30, val_every=10, log_dir=tmp_path / "fast")
    assert module.hparams.log_every_step is False
    # training.fit writes every min(50, val_every) = 10 steps: 3 writes x 2 metrics
    assert sum(name.startswith("train/") for name in calls) == 3 * 2
    fast = train_rows(tmp_path / "fast")
    assert [row["step"] for row in fast] == ["9", "19", "29"]  # Lightning's step - 1

    # the same round logging every step writes exactly the same training rows
    monkeypatch.setattr(training, "Classifier", _every_step_classifier)
    runner_round(dm, steps=30, val_every=10, log_dir=tmp_path / "every")
    assert train_rows(tmp_path / "every") == fast


def _every_step_classifier(*args: Any, **kwargs: Any) -> Classifier:
    return Classifier(*args, **{**kwargs, "log_every_step": True})
