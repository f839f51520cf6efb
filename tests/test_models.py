"""Tests for prunekit.experiments.models (the registry, the models) and .module (Classifier)."""

from __future__ import annotations

import io
import re

import lightning as L
import pytest
import torch
from prunekit.experiments import models
from prunekit.experiments.models import build_model, list_models, output_layer_name, register_model
from prunekit.experiments.module import Classifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ALL_MODELS = ["conv2", "conv4", "conv6", "lenet5", "lenet_300_100", "resnet20"]


# Parameter counts from layer shapes alone (independent of the model code).
def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running stats are buffers)


def resnet20_count(shortcut: str) -> int:
    total = conv(1, 16, 3, bias=False) + bn(16) + linear(64, 10)
    c_in = 16
    for c_out in (16, 32, 64):
        for block in range(3):
            first_in = c_in if block == 0 else c_out
            total += conv(first_in, c_out, 3, bias=False) + conv(c_out, c_out, 3, bias=False)
            total += 2 * bn(c_out)
            if shortcut == "B" and block == 0 and first_in != c_out:
                total += conv(first_in, c_out, 1, bias=False) + bn(c_out)
        c_in = c_out
    return total


EXPECTED_PARAMS = {
    "lenet_300_100": linear(784, 300) + linear(300, 100) + linear(100, 10),
    "lenet5": conv(1, 6, 5)
    + conv(6, 16, 5)
    + linear(16 * 5 * 5, 120)
    + linear(120, 84)
    + linear(84, 10),
    "conv2": conv(1, 64, 3)
    + conv(64, 64, 3)
    + linear(64 * 14 * 14, 256)
    + linear(256, 256)
    + linear(256, 10),
    "conv4": conv(1, 64, 3)
    + conv(64, 64, 3)
    + conv(64, 128, 3)
    + conv(128, 128, 3)
    + linear(128 * 7 * 7, 256)
    + linear(256, 256)
    + linear(256, 10),
    "conv6": conv(1, 64, 3)
    + conv(64, 64, 3)
    + conv(64, 128, 3)
    + conv(128, 128, 3)
    + conv(128, 256, 3)
    + conv(256, 256, 3)
    + linear(256 * 3 * 3, 256)
    + linear(256, 256)
    + linear(256, 10),
    "resnet20": resnet20_count("A"),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- models -----------------------------------------------------------------------------


def test_list_models() -> None:
    assert list_models() == ALL_MODELS


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert build_model(name, num_classes=7).eval()(torch.randn(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 16, 20)])
def test_models_follow_the_input_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, num_classes=5, input_shape=shape).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 5)


def test_input_shape_sets_the_first_layers_by_hand() -> None:
    c, h, w = 3, 32, 32
    lenet = build_model("lenet_300_100", num_classes=5, input_shape=(c, h, w))
    assert n_params(lenet) == (c * h * w * 300 + 300) + (300 * 100 + 100) + (100 * 5 + 5)
    # LeNet-5: 32 -> conv 5x5 pad 2 (32) -> pool (16) -> conv 5x5 (12) -> pool (6)
    assert build_model("lenet5", input_shape=(c, h, w)).fc1.in_features == 16 * 6 * 6
    # Conv-4 on 16x20: two poolings -> 4x5 with 128 channels
    assert build_model("conv4", input_shape=(1, 16, 20)).fc1.in_features == 128 * 4 * 5
    assert build_model("resnet20", input_shape=(c, h, w)).conv1.in_channels == c
    with pytest.raises(ValueError, match=r"height and width must be >= 8"):
        build_model("conv6", input_shape=(1, 7, 28))


def test_a_model_by_import_path() -> None:
    model = build_model("torch.nn.Linear", in_features=3, out_features=2)
    assert isinstance(model, nn.Linear) and model.out_features == 2
    with pytest.raises(TypeError, match=r"made a OrderedDict, not an nn\.Module"):
        build_model("collections.OrderedDict")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_count(name: str) -> None:
    assert n_params(build_model(name)) == EXPECTED_PARAMS[name]


def test_known_parameter_counts() -> None:
    assert EXPECTED_PARAMS["lenet_300_100"] == 266_610
    assert EXPECTED_PARAMS["lenet5"] == 61_706
    assert EXPECTED_PARAMS["resnet20"] == 269_722 - 2 * 16 * 9  # CIFAR's 0.27M, 1 input channel


def test_resnet20_option_b_shortcuts() -> None:
    model = build_model("resnet20", shortcut="B")
    assert n_params(model) == resnet20_count("B")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut='C'"):
        build_model("resnet20", shortcut="C")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_layer(name: str) -> None:
    model = build_model(name, num_classes=7)
    layer = output_layer_name(model)
    assert layer == model.output_layer
    params = dict(model.named_parameters())
    assert params[f"{layer}.weight"].shape[0] == 7
    assert list(params)[-1] == f"{layer}.bias"  # the last layer applied


def test_lenet_300_100_parameter_names() -> None:
    names = [n for n, _ in build_model("lenet_300_100").named_parameters()]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]


def test_conv6_names_and_feature_map_sizes() -> None:
    model = build_model("conv6")
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    assert names == [f"conv{i}.weight" for i in range(1, 7)] + [
        "fc1.weight",
        "fc2.weight",
        "fc3.weight",
    ]
    sizes = []
    for i in (1, 2, 3):
        pool = getattr(model, f"pool{i}")
        pool.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
    model(torch.zeros(1, 1, 28, 28))
    assert sizes == [(64, 14, 14), (128, 7, 7), (256, 3, 3)]


def test_resnet20_feature_map_sizes() -> None:
    model = build_model("resnet20").eval()
    sizes = []
    for stage in (model.layer1, model.layer2, model.layer3):
        stage.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
    model(torch.zeros(1, 1, 28, 28))
    assert sizes == [(16, 28, 28), (32, 14, 14), (64, 7, 7)]


def test_output_layer_name_fallback_and_errors() -> None:
    assert output_layer_name(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) == "2"
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        output_layer_name(nn.Conv2d(1, 1, 1))
    model = nn.Linear(2, 2)
    model.output_layer = "head"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="output_layer='head'"):
        output_layer_name(model)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_num_classes_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet5", num_classes=bad)


# --- registry ---------------------------------------------------------------------------


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register models without leaking them into other tests."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))


def test_register_and_build(scratch_registry: None) -> None:
    @register_model("tiny")
    def tiny(num_classes: int = 10, width: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.Linear(width, num_classes))

    assert "tiny" in list_models()
    assert tiny is models._REGISTRY["tiny"]  # the decorator returns the factory unchanged
    assert build_model("tiny", width=5)[1].out_features == 5


def test_duplicate_name_raises(scratch_registry: None) -> None:
    with pytest.raises(ValueError, match="'lenet5' is already registered"):
        register_model("lenet5")(lambda: nn.Identity())
    register_model("once")(nn.Identity)
    with pytest.raises(ValueError, match="'once' is already registered"):
        register_model("once")(nn.Identity)


def test_bad_registration_name() -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        register_model("")


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("lenet_300", "lenet_300_100"), ("conv_4", "conv4"), ("ResNet20", "resnet20")],
)
def test_unknown_name_suggests_closest(name: str, suggestion: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(name)
    text = str(info.value)
    assert f"unknown model name={name!r}" in text
    assert f"did you mean {suggestion!r}" in text
    assert all(valid in text for valid in ALL_MODELS)


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(ValueError, match="Valid names: conv2, conv4") as info:
        build_model("transformer_xl")
    assert "did you mean" not in str(info.value)


# --- Classifier -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop' must be one of"),
        ({"lr_schedule": "linear"}, "lr_schedule='linear' must be one of"),
        ({"lr": 0.0}, "lr=0.0"),
        ({"momentum": 1.0}, "momentum=1.0"),
        ({"weight_decay": -1e-4}, "weight_decay=-0.0001"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"max_steps": 2.5}, "max_steps=2.5"),
        ({"lr_schedule": "step"}, "milestones=()"),
        ({"lr_schedule": "step", "milestones": [5, 3]}, "milestones=[5, 3]"),
        ({"milestones": [5]}, "only used with lr_schedule='step'"),
        ({"gamma": 0}, "gamma=0"),
        ({"num_classes": 1}, "num_classes=1"),
    ],
)
def test_classifier_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Classifier(nn.Linear(784, 10), **kwargs)  # type: ignore[arg-type]


def test_classifier_hparams_load_with_weights_only() -> None:
    clf = Classifier(nn.Linear(4, 10), optimizer="sgd", lr_schedule="step", milestones=(3, 7))
    buffer = io.BytesIO()
    torch.save(dict(clf.hparams), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["milestones"] == [3, 7] and loaded["optimizer"] == "sgd"


def test_classifier_checks_the_logits_against_num_classes() -> None:
    batch = (torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"gives 3 logits per sample, but num_classes=5"):
        Classifier(nn.Linear(4, 3), num_classes=5).training_step(batch, 0)
    assert Classifier(nn.Linear(4, 3), num_classes=3).training_step(batch, 0).ndim == 0
    assert Classifier(nn.Linear(4, 3)).training_step(batch, 0).ndim == 0  # None: unchecked


def test_classifier_rejects_non_module() -> None:
    with pytest.raises(TypeError, match="model="):
        Classifier("lenet5")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)],
)
def test_configure_optimizer(name: str, cls: type[torch.optim.Optimizer]) -> None:
    clf = Classifier(nn.Linear(4, 10), optimizer=name, lr=0.05, momentum=0.5, weight_decay=1e-3)
    optimizer = clf.configure_optimizers()
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]  # type: ignore[union-attr]
    assert (group["lr"], group["weight_decay"]) == (0.05, 1e-3)
    if name == "sgd":
        assert group["momentum"] == 0.5


def lrs_over(clf: Classifier, steps: int) -> list[float]:
    config = clf.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]  # type: ignore[index]
    assert config["lr_scheduler"]["interval"] == "step"  # type: ignore[index]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_step_schedule() -> None:
    clf = Classifier(
        nn.Linear(4, 10), optimizer="sgd", lr=1.0, lr_schedule="step", milestones=[2, 4], gamma=0.5
    )
    assert lrs_over(clf, 5) == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_cosine_schedule() -> None:
    clf = Classifier(nn.Linear(4, 10), lr=1.0, lr_schedule="cosine", max_steps=4)
    assert lrs_over(clf, 5) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])


def learnable_data(n: int, seed: int) -> TensorDataset:
    """Noisy copies of ten fixed random "prototype" images, labelled by prototype."""
    prototypes = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(prototypes[y] + 2 * torch.randn(n, 1, 28, 28, generator=g), y)


def mean_loss(model: nn.Module, ds: TensorDataset) -> float:
    with torch.no_grad():
        x, y = ds.tensors
        return nn.functional.cross_entropy(model(x), y).item()


def test_fit_reduces_loss_and_logs_metrics(single_thread: None) -> None:
    L.seed_everything(0, verbose=False)
    train, val = learnable_data(640, seed=1), learnable_data(128, seed=2)
    clf = Classifier(build_model("lenet_300_100"), lr_schedule="cosine")
    before = mean_loss(clf, train)
    trainer = L.Trainer(
        max_steps=20,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(
        clf,
        train_dataloaders=DataLoader(train, batch_size=32, shuffle=True),
        val_dataloaders=DataLoader(val, batch_size=64),
    )
    assert trainer.global_step == 20
    assert mean_loss(clf, train) < 0.5 * before
    logged = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(logged)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)  # cosine ran out

    (results,) = trainer.test(clf, dataloaders=DataLoader(val, batch_size=64), verbose=False)
    assert set(results) == {"test/loss", "test/acc"}
    assert 0.0 <= results["test/acc"] <= 1.0
    # micro accuracy is the plain fraction of correct predictions
    with torch.no_grad():
        x, y = val.tensors
        assert results["test/acc"] == pytest.approx((clf(x).argmax(1) == y).float().mean().item())
