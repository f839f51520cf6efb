"""Tests for prunekit.callbacks.HoldMasks and RewindPoint(path=...): fixed masks through a
fit, their checkpoint state, follow-or-raise, and a fit started from a rewind point."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from prunekit.callbacks import HoldMasks, RewindPoint
from torch import nn

from prunekit import Pruner
from tests.lit_helpers import TinyNet, loader, trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")

TARGETS = ("net.0.weight", "net.2.weight")


def random_masks(seed: int = 0, keep: float = 0.4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"net.0.weight": (32, 12), "net.2.weight": (16, 32)}
    return {n: torch.rand(s, generator=g) < keep for n, s in shapes.items()}


class StartProbe(Callback):
    """What the fit starts from, after the other callbacks' on_train_start."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = {
            "step": trainer.global_step,
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        }


def test_masks_are_held_through_training() -> None:
    masks = random_masks()
    model = TinyNet()
    before = {n: model.get_parameter(n).detach().clone() for n in TARGETS}
    hold = HoldMasks(masks)
    trainer(max_steps=6, callbacks=[hold]).fit(model, loader())
    for name in TARGETS:
        weight = model.get_parameter(name).detach()
        assert not weight[~masks[name]].any()  # pruned entries stayed exactly zero
        assert not torch.equal(weight[masks[name]], before[name][masks[name]])  # kept ones trained
    assert hold.pruner is None  # removed at fit end: plain weights with zeros
    # the masks given were not changed, and the callback keeps its own copy
    assert torch.equal(hold.masks["net.0.weight"], masks["net.0.weight"])
    assert hold.masks["net.0.weight"] is not masks["net.0.weight"]


def test_checkpoint_weights_and_optimizer_state_are_masked_at_start(tmp_path: Path) -> None:
    """A fit resumed from a dense checkpoint starts with pruned weights and their Adam
    moments zero, the kept ones as the checkpoint holds them."""
    dense = TinyNet()
    fit = trainer(max_steps=4)
    fit.fit(dense, loader())
    path = tmp_path / "dense.ckpt"
    fit.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    masks, probe = random_masks(1), StartProbe()
    trainer(max_steps=6, callbacks=[HoldMasks(masks), probe]).fit(
        TinyNet(), loader(), ckpt_path=str(path)
    )
    assert probe.seen["step"] == 4
    for index, name in enumerate(TARGETS):
        mask = masks[name]
        assert torch.equal(probe.seen["weights"][name], saved["state_dict"][name] * mask)
        state = probe.seen["optimizer"]["state"][2 * index]  # weights are params 0 and 2
        saved_state = saved["optimizer_states"][0]["state"][2 * index]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], saved_state[key] * mask)
            assert state[key][mask].ne(0).any()


def test_masks_round_trip_through_checkpoints(tmp_path: Path) -> None:
    masks = random_masks(2)
    fit = trainer(max_steps=3, callbacks=[HoldMasks(masks)])
    fit.fit(TinyNet(), loader())
    path = tmp_path / "held.ckpt"
    fit.save_checkpoint(path)
    entry = next(
        v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "HoldMasks" in k
    )
    assert set(entry["masks"]) == set(TARGETS)
    # resuming with the same masks continues
    model = TinyNet()
    trainer(max_steps=5, callbacks=[HoldMasks(masks)]).fit(model, loader(), ckpt_path=str(path))
    assert not model.net[0].weight[~masks["net.0.weight"]].any()
    # resuming with other masks is refused, naming the parameter whose mask differs
    other = {**masks, "net.2.weight": ~masks["net.2.weight"]}
    with pytest.raises(ValueError, match=r"other masks for \['net\.2\.weight'\]"):
        trainer(max_steps=5, callbacks=[HoldMasks(other)]).fit(
            TinyNet(), loader(), ckpt_path=str(path)
        )


def test_names_and_shapes_that_do_not_fit_raise_before_training() -> None:
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"name \['net\.9\.weight'\], not parameters of TinyNet"):
        trainer(
            max_steps=2, callbacks=[HoldMasks({"net.9.weight": torch.ones(3, dtype=torch.bool)})]
        ).fit(model, loader())
    with pytest.raises(ValueError, match=r"net\.0\.weight.*\(\(12, 32\), \(32, 12\)\)"):
        trainer(
            max_steps=2,
            callbacks=[HoldMasks({"net.0.weight": torch.ones(12, 32, dtype=torch.bool)})],
        ).fit(model, loader())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name  # nothing trained, nothing zeroed


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        (
            {"net.0.weight": torch.ones(2, 2)},
            TypeError,
            r"masks\['net\.0\.weight'\] must be a torch\.bool",
        ),
        ({}, ValueError, r"holds no mask"),
        ([torch.ones(2, dtype=torch.bool)], TypeError, r"got list"),
    ],
    ids=["float-mask", "empty", "list"],
)
def test_bad_arguments(masks: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        HoldMasks(masks)


def test_a_pruner_on_a_submodule_is_attached_and_one_elsewhere_refused() -> None:
    model = TinyNet()
    pruner = Pruner(model.net, targets=["0.weight"])
    pruner.prune_to(0.5)
    mask = pruner.masks["0.weight"].clone()
    hold = HoldMasks(pruner)
    trainer(max_steps=4, callbacks=[hold]).fit(model, loader())
    assert not model.net[0].weight[~mask].any() and model.net[0].weight[mask].ne(0).all()
    assert pruner.optimizers  # still attached after the fit (the user's Pruner)
    stranger = Pruner(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not part of the TinyNet being fitted"):
        trainer(max_steps=1, callbacks=[HoldMasks(stranger)]).fit(TinyNet(), loader())


def test_pickle_and_repr() -> None:
    hold = HoldMasks({"net.0.weight": torch.tensor([[True, False], [False, False]])})
    assert repr(hold) == "HoldMasks(1 masks, 1 of 4 kept)"
    clone = pickle.loads(pickle.dumps(hold))
    assert torch.equal(clone.masks["net.0.weight"], hold.masks["net.0.weight"])


def test_rewind_point_path_writes_a_checkpoint_a_fit_starts_from(tmp_path: Path) -> None:
    path = tmp_path / "k3.ckpt"
    point = RewindPoint(step=3, path=path)
    trainer(max_steps=7, callbacks=[point]).fit(TinyNet(scheduler=True), loader())
    saved = torch.load(path, weights_only=False)
    assert saved["global_step"] == 3 and saved["lr_schedulers"][0]["last_epoch"] == 3
    assert not any("RewindPoint" in k for k in saved.get("callbacks", {}))  # no copy inside
    reference = TinyNet(scheduler=True)  # 3 steps from the same start, independently
    fit = trainer(max_steps=3)
    fit.fit(reference, loader())
    for name, value in reference.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value)
        assert torch.equal(point.weights[name], value)
    # a fit from it starts at step 3 with those weights and that optimizer state
    probe = StartProbe()
    trainer(max_steps=5, callbacks=[probe]).fit(
        TinyNet(scheduler=True), loader(), ckpt_path=str(path)
    )
    assert probe.seen["step"] == 3
    for name, value in reference.state_dict().items():
        assert torch.equal(probe.seen["weights"][name], value)
    exp_avg = fit.optimizers[0].state_dict()["state"][0]["exp_avg"]
    assert torch.equal(probe.seen["optimizer"]["state"][0]["exp_avg"], exp_avg)
    with pytest.raises(TypeError, match="path=3 must be a file path"):
        RewindPoint(step=1, path=3)  # type: ignore[arg-type]


def test_rewind_point_after_the_end_warns(tmp_path: Path) -> None:
    point = RewindPoint(step=50, path=tmp_path / "late.ckpt")
    with pytest.warns(UserWarning, match="ended at step 2, before the rewind point"):
        trainer(max_steps=2, callbacks=[point]).fit(TinyNet(), loader())
    assert not point.captured and not (tmp_path / "late.ckpt").exists()


def test_an_interrupted_fit_leaves_no_hooks() -> None:
    class Failing(TinyNet):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    hold = HoldMasks(random_masks(3))
    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=5, callbacks=[hold]).fit(model, loader())
    assert hold.pruner is None
    assert not model.net[0].weight[~random_masks(3)["net.0.weight"]].any()  # zeros kept
    assert model.net[0].weight._post_accumulate_grad_hooks in (None, {})  # hooks removed
