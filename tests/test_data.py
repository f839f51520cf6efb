"""Tests for prunekit.experiments.data: IDX parsing, Fashion-MNIST loading, the DataModule."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from prunekit.experiments.data import (
    DEFAULT_DATA_DIR,
    FILES,
    FashionMNISTDataModule,
    load_fashion_mnist,
    read_idx,
)

HAVE_REAL_DATA = all((Path(DEFAULT_DATA_DIR) / f"{name}.gz").is_file() for name in FILES.values())
needs_real_data = pytest.mark.skipif(
    not HAVE_REAL_DATA, reason=f"Fashion-MNIST not installed in {DEFAULT_DATA_DIR}"
)


def idx_bytes(type_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file built by hand: 0x0000, type code, ndim, big-endian uint32 sizes, data."""
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def write(path: Path, content: bytes, gzipped: bool = False) -> Path:
    path.write_bytes(gzip.compress(content) if gzipped else content)
    return path


# --- read_idx ---------------------------------------------------------------------------


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_uint8_images(tmp_path: Path, gzipped: bool) -> None:
    # two 2x3 "images" holding 0..11
    path = write(tmp_path / "x.idx", idx_bytes(0x08, (2, 2, 3), bytes(range(12))), gzipped)
    out = read_idx(path)
    assert out.dtype == torch.uint8
    assert out.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


def test_read_idx_big_endian_types(tmp_path: Path) -> None:
    ints = write(tmp_path / "i", idx_bytes(0x0C, (3,), struct.pack(">3i", -1, 258, 70000)))
    floats = write(tmp_path / "f", idx_bytes(0x0D, (2,), struct.pack(">2f", 1.5, -0.25)))
    shorts = write(tmp_path / "s", idx_bytes(0x0B, (2,), struct.pack(">2h", -300, 513)))
    assert read_idx(ints).tolist() == [-1, 258, 70000]
    assert read_idx(ints).dtype == torch.int32
    assert read_idx(floats).tolist() == [1.5, -0.25]
    assert read_idx(shorts).tolist() == [-300, 513]


def test_read_idx_accepts_name_with_or_without_gz(tmp_path: Path) -> None:
    write(tmp_path / "labels.gz", idx_bytes(0x08, (3,), bytes([7, 0, 9])), gzipped=True)
    write(tmp_path / "plain", idx_bytes(0x08, (2,), bytes([4, 5])))
    assert read_idx(tmp_path / "labels").tolist() == [7, 0, 9]
    assert read_idx(str(tmp_path / "labels.gz")).tolist() == [7, 0, 9]
    assert read_idx(tmp_path / "plain.gz").tolist() == [4, 5]


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_idx(tmp_path / "nothere")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00", "only 2 bytes"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "bad magic number"),
        (b"\x00\x00\x07\x01" + b"\x00" * 8, "bad magic number"),  # unknown type code
        (b"\x00\x00\x08\x00", "bad magic number"),  # zero dimensions
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "header alone needs 16"),
        (idx_bytes(0x08, (2, 3), bytes(5)), "truncated: 17 bytes, expected 18"),
        (idx_bytes(0x08, (2,), bytes(3)), "longer than its header says"),
        (idx_bytes(0x0C, (2,), bytes(7)), "truncated"),
    ],
    ids=["tiny", "magic", "type-code", "no-dims", "short-header", "short", "long", "short-int32"],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = write(tmp_path / "bad-idx", content)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip(tmp_path: Path) -> None:
    full = gzip.compress(idx_bytes(0x08, (100,), bytes(range(100))))
    path = write(tmp_path / "cut.gz", full[: len(full) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# --- load_fashion_mnist -----------------------------------------------------------------


def make_fake_fashion_mnist(root: Path, n_train: int = 4, n_test: int = 2) -> None:
    """Four tiny IDX files: train image i is filled with pixel value 255*(i%2), label i%10."""
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("test", n_test)):
        pixels = b"".join(bytes([255 * (i % 2)]) * 784 for i in range(n))
        labels = bytes(i % 10 for i in range(n))
        write(root / f"{FILES[part + '_images']}.gz", idx_bytes(8, (n, 28, 28), pixels), True)
        write(root / FILES[part + "_labels"], idx_bytes(8, (n,), labels))  # not gzipped


def test_load_fake_data_normalises(tmp_path: Path) -> None:
    make_fake_fashion_mnist(tmp_path / "fm")
    ds = load_fashion_mnist(tmp_path / "fm")
    assert ds.train_images.shape == (4, 1, 28, 28)
    assert ds.test_images.shape == (2, 1, 28, 28)
    assert ds.train_images.dtype == torch.float32
    assert ds.train_labels.dtype == torch.int64
    assert ds.train_labels.tolist() == [0, 1, 2, 3]
    black, white = (0 - 0.2860) / 0.3530, (1 - 0.2860) / 0.3530
    assert torch.allclose(ds.train_images[0], torch.full((1, 28, 28), black))
    assert torch.allclose(ds.train_images[1], torch.full((1, 28, 28), white))
    assert load_fashion_mnist(str(tmp_path / "fm")) is ds  # cached on the resolved root


def test_load_rejects_mismatched_label_count(tmp_path: Path) -> None:
    make_fake_fashion_mnist(tmp_path)
    write(tmp_path / FILES["train_labels"], idx_bytes(8, (3,), bytes(3)))
    with pytest.raises(ValueError, match=r"labels of shape \(3,\) for 4 images"):
        load_fashion_mnist(tmp_path)


def test_load_missing_dir_says_how_to_install(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(missing)
    text = str(info.value)
    assert str(missing) in text
    assert "apt-get install dataset-fashion-mnist" in text
    assert "/usr/share/datasets/fashion-mnist" in text
    assert "data.root" in text


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    make_fake_fashion_mnist(tmp_path)
    (tmp_path / f"{FILES['test_images']}.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as info:
        load_fashion_mnist(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


@needs_real_data
def test_real_fashion_mnist_shapes_and_label_counts() -> None:
    ds = load_fashion_mnist()
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_images.dtype == ds.test_images.dtype == torch.float32
    assert ds.train_labels.dtype == ds.test_labels.dtype == torch.int64
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    # standardised with the training statistics
    assert abs(ds.train_images.mean().item()) < 1e-3
    assert abs(ds.train_images.std().item() - 1) < 1e-3
    assert load_fashion_mnist(DEFAULT_DATA_DIR) is ds


# --- FashionMNISTDataModule -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"val_size": -1}, "val_size=-1"),
        ({"val_size": 60000}, "val_size=60000"),
        ({"seed": -3}, "seed=-3"),
        ({"subset": 0}, "subset=0"),
        ({"subset": 55001}, "subset=55001"),
        ({"num_workers": -1}, "num_workers=-1"),
    ],
)
def test_datamodule_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(**kwargs)


def test_datamodule_hparams_load_with_weights_only(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(tmp_path, batch_size=8, subset=10)
    buffer = io.BytesIO()
    torch.save(dict(dm.hparams), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # a Path in there would fail
    assert loaded == {
        "root": str(tmp_path),
        "batch_size": 8,
        "val_size": 5000,
        "seed": 0,
        "subset": 10,
        "num_workers": 0,
        "eval_batch_size": 1000,
    }


def test_datamodule_rejects_non_int_batch_size() -> None:
    with pytest.raises(TypeError, match=r"batch_size=2\.5"):
        FashionMNISTDataModule(batch_size=2.5)  # type: ignore[arg-type]


def test_split_is_a_seeded_partition() -> None:
    train, val = FashionMNISTDataModule(seed=0).split_indices()
    assert (len(train), len(val)) == (55000, 5000)
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(60000))
    again_train, again_val = FashionMNISTDataModule(seed=0).split_indices()
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    _, other_val = FashionMNISTDataModule(seed=1).split_indices()
    assert not torch.equal(torch.sort(val).values, torch.sort(other_val).values)


def test_subset_takes_the_first_training_images_after_the_split() -> None:
    full_train, full_val = FashionMNISTDataModule(seed=4).split_indices()
    train, val = FashionMNISTDataModule(seed=4, subset=100).split_indices()
    assert torch.equal(train, full_train[:100]) and torch.equal(val, full_val)


@needs_real_data
def test_datamodule_on_real_data() -> None:
    dm = FashionMNISTDataModule(batch_size=64, seed=0)
    dm.setup("fit")
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    ds = load_fashion_mnist()
    _, val_idx = dm.split_indices()
    assert torch.equal(dm.val_set.tensors[1], ds.train_labels[val_idx])

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    assert len(dm.train_dataloader()) == -(-55000 // 64)

    other = FashionMNISTDataModule(batch_size=64, seed=1)
    other.setup("fit")
    assert not torch.equal(other.val_set.tensors[1], dm.val_set.tensors[1])  # type: ignore[union-attr]

    # validation and test loaders keep the stored order, eval_batch_size (1000) at a time
    _, yv = next(iter(dm.val_dataloader()))  # type: ignore[arg-type]
    assert torch.equal(yv, dm.val_set.tensors[1][:1000])
    _, yt = next(iter(dm.test_dataloader()))
    assert torch.equal(yt, ds.test_labels[:1000])
    assert len(dm.test_dataloader()) == 10 and len(dm.val_dataloader()) == 5  # type: ignore[arg-type]


def epoch_order(dm: FashionMNISTDataModule, epoch: int) -> list[int]:
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return list(sampler)


def test_train_shuffle_is_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    make_fake_fashion_mnist(tmp_path, n_train=200, n_test=2)
    dms = [FashionMNISTDataModule(tmp_path, batch_size=50, val_size=20, seed=s) for s in (0, 0, 1)]
    for dm in dms:
        dm.setup("fit")
    assert sorted(epoch_order(dms[0], 0)) == list(range(180))
    assert epoch_order(dms[0], 0) == epoch_order(dms[1], 0)
    assert epoch_order(dms[0], 3) == epoch_order(dms[1], 3)
    assert epoch_order(dms[0], 0) != epoch_order(dms[0], 1)
    assert epoch_order(dms[0], 0) != epoch_order(dms[2], 0)

    # batches follow the sampler; without set_epoch (a plain loop) each pass moves on
    labels = dms[0].train_set.tensors[1]  # type: ignore[union-attr]
    loader = dms[0].train_dataloader()
    for epoch in (0, 1):
        seen = torch.cat([y for _, y in loader])
        assert torch.equal(seen, labels[epoch_order(dms[0], epoch)])


class RecordLabels(L.Callback):
    def __init__(self) -> None:
        self.labels: list[torch.Tensor] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.labels.append(batch[1])


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # val_size=0
def test_lightning_sets_the_epoch_of_the_train_sampler(tmp_path: Path, single_thread: None) -> None:
    """Epoch e of a fit sees ``epoch_order(e)``, so a run resumed at epoch e does too."""
    from prunekit.experiments.models import build_model
    from prunekit.experiments.module import Classifier

    make_fake_fashion_mnist(tmp_path, n_train=30, n_test=2)
    dm = FashionMNISTDataModule(tmp_path, batch_size=10, val_size=0, seed=3)
    record = RecordLabels()
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(Classifier(build_model("lenet_300_100")), datamodule=dm)
    labels = dm.train_set.tensors[1]  # type: ignore[union-attr]
    for epoch in (0, 1):
        seen = torch.cat(record.labels[3 * epoch : 3 * epoch + 3])
        assert torch.equal(seen, labels[epoch_order(dm, epoch)])


def test_val_size_zero_disables_validation(tmp_path: Path) -> None:
    make_fake_fashion_mnist(tmp_path, n_train=10, n_test=2)
    dm = FashionMNISTDataModule(tmp_path, batch_size=4, val_size=0)
    dm.setup("fit")
    assert dm.val_dataloader() == []
    assert len(dm.train_set) == 10  # type: ignore[arg-type]


def test_dataloader_before_setup_raises() -> None:
    with pytest.raises(RuntimeError, match="setup"):
        FashionMNISTDataModule().train_dataloader()


@needs_real_data
def test_fit_a_few_steps_on_a_subset(single_thread: None) -> None:
    from prunekit.experiments.models import build_model
    from prunekit.experiments.module import Classifier

    L.seed_everything(0, verbose=False)
    dm = FashionMNISTDataModule(batch_size=60, subset=600, seed=0)
    clf = Classifier(build_model("lenet_300_100"))
    trainer = L.Trainer(
        max_epochs=1,
        limit_val_batches=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(clf, datamodule=dm)
    assert trainer.global_step == 10
    assert trainer.callback_metrics["val/acc"] > 0.5  # 10 Adam steps already reach ~65%


# --- the dataset registry, any dataset, _target_ data modules ---------------------------


@pytest.fixture
def scratch_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register datasets without leaking them into other tests."""
    from prunekit.experiments import data

    monkeypatch.setattr(data, "_REGISTRY", dict(data._REGISTRY))


def test_dataset_registry_lists_builds_and_refuses_duplicates(scratch_datasets: None) -> None:
    from prunekit.experiments.data import build_datamodule, list_datasets, register_dataset

    assert list_datasets() == ["fashion_mnist"]
    dm = build_datamodule("fashion_mnist", batch_size=8, seed=2)
    assert isinstance(dm, FashionMNISTDataModule) and (dm.batch_size, dm.seed) == (8, 2)
    with pytest.raises(ValueError, match="'fashion_mnist' is already registered"):
        register_dataset("fashion_mnist")(FashionMNISTDataModule)
    with pytest.raises(ValueError) as info:
        build_datamodule("fashion_mnst")
    assert "did you mean 'fashion_mnist'" in str(info.value)
    assert "Valid names: fashion_mnist" in str(info.value)
    with pytest.raises(ValueError, match="non-empty string"):
        register_dataset("")


def write_tiny_idx(root: Path, n_train: int = 120, n_test: int = 30) -> Path:
    """A 3-class dataset of 1x8x8 uint8 images: class c is bright in row band c (learnable)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for part, n in (("train", n_train), ("test", n_test)):
        labels = torch.arange(n) % 3
        images = torch.randint(0, 60, (n, 8, 8), generator=g)
        for i, c in enumerate(labels.tolist()):
            images[i, 2 * c : 2 * c + 3] += 180
        write(
            root / FILES[f"{part}_images"],
            idx_bytes(8, (n, 8, 8), images.to(torch.uint8).numpy().tobytes()),
        )
        write(
            root / FILES[f"{part}_labels"],
            idx_bytes(8, (n,), labels.to(torch.uint8).numpy().tobytes()),
        )
    return root


def test_idx_datamodule_subclass_reads_any_size_and_normalises(tmp_path: Path) -> None:
    from prunekit.experiments.data import IDXDataModule, data_shape

    root = write_tiny_idx(tmp_path / "tiny", n_train=12, n_test=6)

    class Tiny(IDXDataModule):
        input_shape, num_classes, mean, std = (1, 8, 8), 3, 0.5, 0.25

    dm = Tiny(root, batch_size=4, val_size=3, seed=1)
    dm.setup()
    raw = read_idx(root / FILES["train_images"])
    train_idx, _ = dm.split_indices(12)
    x, y = dm.train_set.tensors  # type: ignore[union-attr]
    assert x.shape == (9, 1, 8, 8) and data_shape(dm) == ((1, 8, 8), 3)
    expected = (raw[train_idx].float() / 255 - 0.5) / 0.25  # by hand
    assert torch.allclose(x[:, 0], expected)
    assert torch.equal(y, (torch.arange(12) % 3)[train_idx])

    class WrongShape(Tiny):
        input_shape = (1, 9, 9)

    with pytest.raises(ValueError, match=r"expected \(N, H, W\) with \(9, 9\) per image"):
        WrongShape(root, val_size=3).setup()

    class TwoClasses(Tiny):
        num_classes = 2

    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        TwoClasses(root, val_size=3).setup()
    with pytest.raises(ValueError, match="has no default folder"):
        Tiny()


def test_data_shape_names_what_is_missing() -> None:
    from prunekit.experiments.data import data_shape

    class NoShape(L.LightningDataModule):
        num_classes = 3

    class OneClass(L.LightningDataModule):
        input_shape, num_classes = (1, 4, 4), 1

    with pytest.raises(TypeError, match=r"NoShape.input_shape=None must be a tuple"):
        data_shape(NoShape())
    with pytest.raises(TypeError, match=r"OneClass.num_classes=1 must be an int >= 2"):
        data_shape(OneClass())


class InTestData(L.LightningDataModule):
    """A user's own data module (used by import path, ``data._target_``): 2x6x6 inputs, 4
    classes; class c has a bright channel-0 row c."""

    input_shape = (2, 6, 6)
    num_classes = 4

    def __init__(self, n: int = 96, seed: int = 0, batch_size: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 4
        self.x = torch.randn(n, 2, 6, 6, generator=g)
        self.x[torch.arange(n), 0, self.y] += 3.0
        self.seed, self.batch_size = seed, batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        ds = torch.utils.data.TensorDataset(self.x[:64], self.y[:64])
        g = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(ds, self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.x[64:80], self.y[64:80]), 16
        )

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.x[80:], self.y[80:]), 16
        )


def test_datamodule_from_config_target_gets_options_and_seed() -> None:
    from prunekit.experiments.data import datamodule_from_config

    target = f"{__name__}.InTestData"
    dm = datamodule_from_config({"_target_": target, "options": {"n": 40, "batch_size": 8}}, seed=5)
    assert isinstance(dm, InTestData) and (dm.y.numel(), dm.batch_size, dm.seed) == (40, 8, 5)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        datamodule_from_config({"_target_": f"{__name__}.Nope"}, seed=0)
    with pytest.raises(TypeError, match="not a LightningDataModule"):
        datamodule_from_config({"_target_": "collections.OrderedDict"}, seed=0)


def tiny_gradual(out: Path, *overrides: str) -> Any:
    from omegaconf import OmegaConf
    from prunekit.experiments.config import GradualConfig, load_config

    schedule = "{kind: polynomial, initial: 0.0, final: 0.5, begin: 0, end: 6, frequency: 3}"
    base = ["name=tiny", "steps=6", "train.val_every=3", f"out_dir={out}"]
    cfg = load_config(GradualConfig, None, [*base, f"pruning.schedule={schedule}", *overrides])
    assert OmegaConf.is_config(cfg)
    return cfg


def check_lenet_on(summary: dict[str, Any], run: Path, features: int, classes: int) -> None:
    """LeNet-300-100 was built for the data: fc1 takes ``features`` inputs, fc3 gives
    ``classes`` outputs; global 50 % sparsity counted over those weights."""
    n = features * 300 + 300 * 100 + 100 * classes
    assert summary["sparsity"] == pytest.approx(round(0.5 * n) / n)
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["fc1.weight"].shape == (300, features)
    assert final["fc3.weight"].shape == (classes, 100)


def test_a_registered_idx_dataset_runs_through_both_runners(
    tmp_path: Path, scratch_datasets: None, single_thread: None
) -> None:
    from prunekit.experiments.config import LotteryConfig, load_config
    from prunekit.experiments.data import IDXDataModule, register_dataset
    from prunekit.experiments.gradual import run_gradual
    from prunekit.experiments.lottery import run_lottery
    from prunekit.experiments.paths import RunPaths

    root = write_tiny_idx(tmp_path / "tiny")

    @register_dataset("tiny_idx")
    class TinyIDX(IDXDataModule):
        default_root, input_shape, num_classes = str(root), (1, 8, 8), 3

    common = ["data.name=tiny_idx", "data.val_size=30", "data.batch_size=10"]
    cfg = tiny_gradual(tmp_path / "runs", *common)
    summary = run_gradual(cfg)
    check_lenet_on(summary, RunPaths.for_config(cfg).root, features=64, classes=3)
    assert [e["step"] for e in summary["evaluations"]] == [3, 6]

    lottery = load_config(
        LotteryConfig,
        None,
        [
            "name=tiny-lth",
            "rounds=1",
            "steps_per_round=4",
            "train.val_every=2",
            f"out_dir={tmp_path / 'runs'}",
            *common,
        ],
    )
    result = run_lottery(lottery)
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    # round 1 keeps 80 % of fc1/fc2 and 90 % of the 3-class output layer (the plan's rates)
    kept = result["rounds"][1]["kept_per_layer"]
    assert kept == {
        "fc1.weight": round(0.8 * 64 * 300),
        "fc2.weight": round(0.8 * 300 * 100),
        "fc3.weight": round(0.9 * 100 * 3),
    }


def test_a_target_datamodule_from_the_test_file_runs(tmp_path: Path, single_thread: None) -> None:
    from prunekit.experiments.gradual import run_gradual
    from prunekit.experiments.paths import RunPaths

    cfg = tiny_gradual(
        tmp_path, f"data._target_={__name__}.InTestData", "data.options={n: 96, batch_size: 16}"
    )
    summary = run_gradual(cfg)
    check_lenet_on(summary, RunPaths.for_config(cfg).root, features=2 * 6 * 6, classes=4)


def test_a_model_class_by_import_path(tmp_path: Path, single_thread: None) -> None:
    from prunekit.experiments.gradual import run_gradual
    from prunekit.experiments.paths import RunPaths

    cfg = tiny_gradual(
        tmp_path,
        f"data._target_={__name__}.InTestData",
        f"model={__name__}.in_test_model",
    )
    summary = run_gradual(cfg)
    final = torch.load(RunPaths.for_config(cfg).root / "final.pt", weights_only=True)
    assert set(final) == {"1.weight", "1.bias"} and final["1.weight"].shape == (4, 72)
    assert summary["sparsity"] == pytest.approx(round(0.5 * 4 * 72) / (4 * 72))


def in_test_model(num_classes: int, input_shape: tuple[int, int, int]) -> torch.nn.Module:
    """A user's own model factory: called with the data's classes and input shape."""
    c, h, w = input_shape
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, num_classes))
