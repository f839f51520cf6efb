"""The `Pruning` callback follows what changes under it, or says what changed.

Resumes with other arguments, a callback reused for a second model, a second fit with a
new Trainer, two callbacks in one Trainer, frozen targets and progressive unfreezing.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback, ModelCheckpoint
from prunekit.callbacks import Pruning
from prunekit.schedules import Constant, Polynomial, Steps
from torch import nn

from tests.lit_helpers import TinyNet, loader, make_batch, trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
TARGETS = ("net.0.weight", "net.2.weight", "net.4.weight")
SIZES = {"net.0.weight": 12 * 32, "net.2.weight": 32 * 16, "net.4.weight": 16 * 3}
N = sum(SIZES.values())


def zeros(model: nn.Module, names: tuple[str, ...] = TARGETS) -> int:
    return sum(int((model.get_parameter(n) == 0).sum()) for n in names)


def checkpoint_of(tmp_path: Path, pruning: Pruning, steps: int = 3) -> str:
    saver = ModelCheckpoint(tmp_path, filename="last")
    trainer(max_steps=steps, callbacks=[pruning, saver], enable_checkpointing=True).fit(
        TinyNet(), loader()
    )
    return str(tmp_path / "last.ckpt")


# ------------------------------------------------------------ resume (item 2)
@pytest.mark.parametrize(
    ("changed", "kwargs"),
    [
        ("method", {"method": "random"}),
        ("scope", {"scope": "layer"}),
        ("targets", {"targets": ["net.0.weight", "net.2.weight"]}),
        ("unit", {"unit": "epoch"}),
        ("options", {"method": "ln_structured", "scope": "layer", "dim": 1}),
    ],
)
def test_resume_with_other_arguments_names_them(
    tmp_path: Path, changed: str, kwargs: dict[str, Any]
) -> None:
    base: dict[str, Any] = (
        {"method": "ln_structured", "scope": "layer", "dim": 0} if changed == "options" else {}
    )
    options = {k: base.pop(k) for k in ("dim",) if k in base}
    ckpt = checkpoint_of(tmp_path, Pruning(Constant(0.5), **base, options=options))
    other = dict(base, **kwargs)
    other_options = {k: other.pop(k) for k in ("dim",) if k in other}
    fit = trainer(max_steps=6, callbacks=[Pruning(Constant(0.5), **other, options=other_options)])
    with pytest.raises(
        ValueError, match=rf"written with .*{changed}=.*resume with the same {changed}"
    ):
        fit.fit(model := TinyNet(), loader(), ckpt_path=ckpt)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():  # the checkpoint's weights, untouched
        assert torch.equal(value, saved[key]), key


def test_resume_with_the_same_arguments_continues_pruned(tmp_path: Path) -> None:
    ckpt = checkpoint_of(tmp_path, Pruning(Constant(0.5), scope="layer"))
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    model, pruning = TinyNet(), Pruning(Constant(0.5), scope="layer")
    trainer(max_steps=5, callbacks=[pruning]).fit(model, loader(), ckpt_path=ckpt)
    for name in TARGETS:  # the checkpoint's zeros are held, no new update at t=3, 4
        was_zero = saved[name] == 0
        assert int(was_zero.sum()) == round(0.5 * SIZES[name])
        assert torch.equal(~pruning.pruner.masks[name], was_zero)
        assert bool((model.get_parameter(name)[was_zero] == 0).all())


def test_checkpoint_written_under_the_old_state_key_still_loads(tmp_path: Path) -> None:
    ckpt = checkpoint_of(tmp_path, Pruning(Constant(0.5)))
    state = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("Pruning")]
    entry = state["callbacks"].pop(key)
    entry.pop("args", None)  # written before arguments were stored
    old = "Pruning{'unit': 'step', 'method': 'magnitude', 'scope': 'global', 'targets': 'None'}"
    state["callbacks"][old] = entry
    torch.save(state, tmp_path / "old.ckpt")
    model, pruning = TinyNet(), Pruning(Constant(0.5))
    trainer(max_steps=4, callbacks=[pruning]).fit(
        model, loader(), ckpt_path=str(tmp_path / "old.ckpt")
    )
    assert pruning.pruner.sparsity().pruned == round(0.5 * N)
    assert zeros(model) >= round(0.5 * N)
    with pytest.raises(ValueError, match=r"method=.*resume with the same method"):
        trainer(max_steps=4, callbacks=[Pruning(Constant(0.5), method="random")]).fit(
            TinyNet(), loader(), ckpt_path=str(tmp_path / "old.ckpt")
        )


def test_two_named_callbacks_keep_distinct_entries(tmp_path: Path) -> None:
    def callbacks() -> list[Pruning]:
        return [
            Pruning(Constant(0.5), targets="net.0.weight", name="first"),
            Pruning(Constant(0.25), targets="net.2.weight", name="second", method="random"),
        ]

    saver = ModelCheckpoint(tmp_path, filename="two")
    first = callbacks()
    trainer(max_steps=3, callbacks=[*first, saver], enable_checkpointing=True).fit(
        TinyNet(), loader()
    )
    ckpt = str(tmp_path / "two.ckpt")
    keys = [k for k in torch.load(ckpt, weights_only=False)["callbacks"] if "Pruning" in k]
    assert len(keys) == 2
    resumed = callbacks()
    trainer(max_steps=4, callbacks=resumed).fit(TinyNet(), loader(), ckpt_path=ckpt)
    for before, after in zip(first, resumed, strict=True):
        (name,) = before.pruner.names
        assert torch.equal(before.pruner.masks[name], after.pruner.masks[name])
    assert resumed[0].pruner.sparsity().pruned == round(0.5 * SIZES["net.0.weight"])
    assert resumed[1].pruner.sparsity().pruned == round(0.25 * SIZES["net.2.weight"])


def test_two_unnamed_callbacks_are_refused_before_training() -> None:
    def both() -> list[Pruning]:
        return [
            Pruning(Constant(0.5), targets="net.0.weight"),
            Pruning(Constant(0.5), targets="net.2.weight"),
        ]

    with pytest.raises(RuntimeError, match=r"state_key. must be unique"):  # Lightning's check
        trainer(max_steps=2, callbacks=both())
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first, second = both()
    fit = trainer(max_steps=2, callbacks=[first])
    fit.callbacks.append(second)  # added after the Trainer checked its list
    with pytest.raises(ValueError, match=r"two Pruning callbacks .*distinct name="):
        fit.fit(model, loader())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_resume_finds_the_entry_of_a_renamed_callback_only_when_unambiguous(tmp_path: Path) -> None:
    ckpt = checkpoint_of(tmp_path, Pruning(Constant(0.5), name="a"))
    pruning = Pruning(Constant(0.5), name="b")  # the only Pruning entry: it is this run's
    trainer(max_steps=4, callbacks=[pruning]).fit(TinyNet(), loader(), ckpt_path=ckpt)
    assert pruning.pruner.sparsity().pruned == round(0.5 * N)


# ------------------------------------------------------- second model (item 3)
def test_a_callback_reused_for_a_second_model_prunes_it() -> None:
    pruning = Pruning(Constant(0.5))
    first, second = TinyNet(), TinyNet(lr=2e-2)
    trainer(max_steps=3, callbacks=[pruning]).fit(first, loader())
    trainer(max_steps=3, callbacks=[pruning]).fit(second, loader())
    assert pruning.pruner.model is second
    assert pruning.pruner.sparsity().pruned == round(0.5 * N)
    assert zeros(second) >= round(0.5 * N)
    assert zeros(first) >= round(0.5 * N)  # the first model keeps its zeros


def test_reset_to_initial_uses_the_second_models_own_initial_weights() -> None:
    pruning = Pruning(Steps([(2, 0.5)]), reset_to_initial=True)
    first = TinyNet(optimizer="sgd")
    trainer(max_steps=2, callbacks=[pruning]).fit(first, loader())
    torch.manual_seed(123)
    second = TinyNet(optimizer="sgd")
    with torch.no_grad():
        for p in second.parameters():
            p.normal_()
    initial = {n: second.get_parameter(n).detach().clone() for n in TARGETS}
    trainer(max_steps=2, callbacks=[pruning]).fit(second, loader())
    for name in TARGETS:
        mask = pruning.pruner.masks[name]
        assert torch.equal(second.get_parameter(name).detach(), initial[name] * mask)


def test_a_deep_copy_of_a_used_callback_prunes_a_new_model() -> None:
    pruning = Pruning(Constant(0.5))
    trainer(max_steps=2, callbacks=[pruning]).fit(TinyNet(), loader())
    clone = copy.deepcopy(pruning)
    assert clone.pruner is None
    model = TinyNet()
    trainer(max_steps=2, callbacks=[clone]).fit(model, loader())
    assert clone.pruner.model is model and clone.pruner.sparsity().pruned == round(0.5 * N)


# ---------------------------------------------------- second fit (item 14)
class Watch(Callback):
    """After every step: pruned weights are zero, masks never regrow, sparsity recorded."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning, self.previous, self.pruned = pruning, None, []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
    ) -> None:
        pruner = self.pruning.pruner
        for name in pruner.names:
            mask = pruner.masks[name]
            assert bool((pl_module.get_parameter(name)[~mask] == 0).all()), name
            if self.previous is not None:
                assert bool((mask <= self.previous[name]).all()), name
        self.previous = {n: m.clone() for n, m in pruner.masks.items()}
        self.pruned.append(pruner.sparsity().pruned)


def test_second_fit_with_a_new_trainer_holds_masks_and_follows_the_schedule_again() -> None:
    schedule = Polynomial(0.0, 0.8, begin=0, end=8, frequency=2)
    pruning = Pruning(schedule)
    model = TinyNet()
    watch = Watch(pruning)
    trainer(max_steps=4, callbacks=[pruning, watch]).fit(model, loader())
    reached = pruning.pruner.sparsity().pruned
    assert reached == round(schedule(4) * N)
    trainer(max_steps=10, callbacks=[pruning, watch]).fit(model, loader())
    # t restarts at 0 with the new trainer: updates below the reached sparsity are held
    expected, level = [], reached
    for t in range(11):  # recorded after each step, when global_step = t = 1..10
        if schedule.is_update(t):
            level = max(level, round(schedule(t) * N))
        if t:
            expected.append(level)
    assert watch.pruned[4:] == expected
    assert expected[:5] == [reached] * 5 and expected[5] > reached  # held, then resumed
    assert pruning.pruner.sparsity().pruned == round(0.8 * N)


def test_second_fit_after_make_permanent_keeps_the_zeros() -> None:
    pruning = Pruning(Constant(0.5), make_permanent=True)
    model = TinyNet()
    trainer(max_steps=2, callbacks=[pruning]).fit(model, loader())
    watch = Watch(pruning)
    trainer(max_steps=3, callbacks=[pruning, watch]).fit(model, loader())
    assert watch.pruned == [round(0.5 * N)] * 3


# ------------------------------------ optimizers replaced or extended (follow)
class Backbone(pl.LightningModule):
    """A backbone frozen at first (BackboneFinetuning) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = make_batch(self.current_epoch * 1000 + batch_idx)
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


@pytest.mark.parametrize("targets", [None, "backbone.*.weight"])
def test_backbone_finetuning_unfreezes_pruned_frozen_targets_and_masks_hold(
    targets: str | None,
) -> None:
    # targets=backbone only: the optimizer holds no target until the backbone's group is
    # added, so the callback must attach it then
    pruning = Pruning(Constant(0.5), scope="layer", targets=targets)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.5)
    model = Backbone()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    watch = Watch(pruning)
    fit = trainer(max_epochs=3, callbacks=[finetuning, pruning, watch])
    fit.fit(model, loader(length=4))
    assert len(fit.optimizers[0].param_groups) == 2  # the backbone's group was added
    names = ("backbone.0.weight", "backbone.2.weight") + (() if targets else ("head.weight",))
    assert pruning.pruner.names == list(names)
    for name in names:
        mask, weight = pruning.pruner.masks[name], model.get_parameter(name).detach()
        assert int((~mask).sum()) == round(0.5 * mask.numel())
        assert bool((weight[~mask] == 0).all())
        assert not torch.equal(weight[mask], start[name][mask])  # trained after unfreezing


def test_a_frozen_target_is_pruned_and_stays_pruned() -> None:
    model = TinyNet()
    model.net[0].requires_grad_(False)
    pruning = Pruning(Steps([(1, 0.5), (3, 0.7)]))
    watch = Watch(pruning)
    trainer(max_steps=5, callbacks=[pruning, watch]).fit(model, loader())
    assert pruning.pruner.sparsity().pruned == round(0.7 * N)


class NewOptimizer(Callback):
    """Replaces the trainer's optimizer at the start of epoch 1 (as some recipes do)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            trainer.optimizers = [torch.optim.SGD(pl_module.parameters(), lr=0.5, momentum=0.9)]


def test_an_optimizer_replaced_during_fit_is_followed() -> None:
    # The update at the end of epoch 1 happens under the new optimizer: its momentum at
    # the newly pruned entries must be cleared, and its steps re-masked.
    pruning = Pruning(Steps([(1, 0.3), (2, 0.6)]), unit="epoch")
    watch = Watch(pruning)
    model = TinyNet()
    fit = trainer(max_epochs=3, callbacks=[NewOptimizer(), pruning, watch])
    fit.fit(model, loader(length=4))
    assert isinstance(fit.optimizers[0], torch.optim.SGD)
    assert watch.pruned[-1] == round(0.6 * N)
    assert zeros(model) >= round(0.6 * N)


def test_second_fit_of_a_changed_module_is_refused_naming_it() -> None:
    pruning = Pruning(Constant(0.5))
    model = TinyNet()
    trainer(max_steps=2, callbacks=[pruning]).fit(model, loader())
    model.net[4] = nn.Linear(16, 5)  # a new head, of another shape
    with pytest.raises(
        ValueError, match=r"TinyNet changed since its previous fit .*net\.4\.weight"
    ):
        trainer(max_steps=2, callbacks=[pruning]).fit(model, loader())
    fresh = Pruning(Constant(0.5))  # what the message advises
    trainer(max_steps=2, callbacks=[fresh]).fit(model, loader())
    assert fresh.pruner.sparsity().pruned == round(0.5 * (12 * 32 + 32 * 16 + 16 * 5))


# ---------------------------------------------------------------- RewindPoint
def test_a_rewind_point_reused_for_a_second_model_captures_that_model() -> None:
    from prunekit.callbacks import RewindPoint

    point = RewindPoint(step=0)
    trainer(max_steps=2, callbacks=[point]).fit(TinyNet(), loader())
    second = TinyNet(lr=5e-2)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)  # other initial weights than the first model's
    initial = {k: v.clone() for k, v in second.state_dict().items()}
    trainer(max_steps=2, callbacks=[point]).fit(second, loader())
    for key, value in initial.items():
        assert torch.equal(point.weights[key], value), key
    point.rewind(second)
    assert all(torch.equal(v, initial[k]) for k, v in second.state_dict().items())


def test_rewinding_another_model_is_refused_naming_it() -> None:
    from prunekit.callbacks import RewindPoint

    point = RewindPoint(step=0)
    trainer(max_steps=1, callbacks=[point]).fit(TinyNet(), loader())
    other = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"step 0 belong to another model than Sequential"):
        point.rewind(other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
