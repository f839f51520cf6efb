"""Lightning callbacks: schedule-driven updates, logging, checkpoints, resume, rewind."""

from __future__ import annotations

import csv
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from prunekit.callbacks import Pruning, RewindPoint
from prunekit.schedules import Constant, Polynomial, Steps

from prunekit import unpack_mask
from tests.lit_helpers import TinyNet, loader, trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
TARGETS = ("net.0.weight", "net.2.weight", "net.4.weight")


class ZeroChecker(Callback):
    """After every optimizer step: pruned weights are exactly zero and masks never regrow."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning, self.previous, self.steps = pruning, None, 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        pruner = self.pruning.pruner
        for name in pruner.names:
            mask = pruner.masks[name]
            assert bool((pl_module.get_parameter(name)[~mask] == 0).all()), name
            if self.previous is not None:
                assert bool((mask <= self.previous[name]).all())
        self.previous = {n: m.clone() for n, m in pruner.masks.items()}
        self.steps += 1


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_logged_sparsity_follows_schedule_at_every_update(tmp_path: Path) -> None:
    schedule = Polynomial(0.0, 0.8, begin=2, end=14, frequency=3)
    pruning = Pruning(schedule, unit="step")
    checker = ZeroChecker(pruning)
    logger = CSVLogger(tmp_path, name="run")
    trainer(max_steps=20, logger=logger, log_every_n_steps=7, callbacks=[pruning, checker]).fit(
        TinyNet(), loader()
    )
    rows = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("sparsity/target")]
    logged = {
        int(r["step"]): (float(r["sparsity/target"]), float(r["sparsity/actual"]))
        for r in rows
        if r["step"]
    }
    updates = [t for t in range(20) if schedule.is_update(t) and schedule(t) > 0]
    assert updates == [5, 8, 11, 14]
    n = 12 * 32 + 32 * 16 + 16 * 3
    for t in updates:
        target = 0.8 * (1 - (1 - (t - 2) / 12) ** 3)  # Zhu & Gupta, computed here
        assert logged[t][0] == pytest.approx(target, abs=1e-6)
        assert logged[t][1] == pytest.approx(round(target * n) / n, abs=1e-7)  # logged as float32
    assert checker.steps == 20
    assert pruning.pruner.sparsity().pruned == round(0.8 * n)


def test_epoch_unit_and_epoch_end_logging(tmp_path: Path) -> None:
    pruning = Pruning(Steps([(1, 0.5), (2, 0.75)]), unit="epoch")
    logger = CSVLogger(tmp_path, name="run")
    trainer(max_epochs=3, logger=logger, callbacks=[pruning]).fit(TinyNet(), loader(length=4))
    rows = [r for r in read_csv(Path(logger.log_dir) / "metrics.csv") if r.get("sparsity/actual")]
    by_epoch = {}
    for r in rows:
        by_epoch.setdefault(int(r["epoch"]), []).append(float(r["sparsity/target"]))
    # epoch 0 ends (t=1): 0.5; epoch 1 ends (t=2): 0.75; epoch-end logs repeat the current value
    assert by_epoch[0][-1] == 0.5 and by_epoch[1][-1] == 0.75 and by_epoch[2] == [0.75]


def test_gradient_accumulation_counts_optimizer_steps() -> None:
    seen = []

    class Spy(Pruning):
        def _maybe_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
            if t != self._last_t:
                seen.append(t)
            super()._maybe_update(trainer, pl_module, t)

    pruning = Spy(Steps([(3, 0.5)]))
    fit = trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[pruning])
    fit.fit(TinyNet(), loader())
    assert fit.global_step == 6 and seen == [0, 1, 2, 3, 4, 5, 6]
    assert pruning.pruner.sparsity().fraction == pytest.approx(0.5, abs=1e-3)


def test_never_prunes_during_sanity_check_and_validation() -> None:
    class Watch(Callback):
        def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.after_sanity = pruning.pruner.sparsity().pruned

        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.before_val = pruning.pruner.sparsity().pruned

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            assert pruning.pruner.sparsity().pruned == self.before_val

    pruning = Pruning(Constant(0.5, begin=0))
    watch = Watch()
    trainer(
        max_steps=4, num_sanity_val_steps=2, val_check_interval=2, callbacks=[pruning, watch]
    ).fit(TinyNet(), loader(), loader(length=4))
    assert watch.after_sanity == 0


@pytest.mark.parametrize(
    "options",
    [
        {"precision": "bf16-mixed"},
        {"gradient_clip_val": 0.1},
        {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
    ],
)
def test_invariants_under_precision_and_clipping(options: dict[str, Any]) -> None:
    pruning = Pruning(Polynomial(0.0, 0.9, begin=0, end=8, frequency=2))
    checker = ZeroChecker(pruning)
    trainer(max_steps=10, callbacks=[pruning, checker], **options).fit(
        TinyNet(optimizer="sgd"), loader()
    )
    assert checker.steps == 10
    n = pruning.pruner.sparsity().total
    assert pruning.pruner.sparsity().pruned == round(0.9 * n)


class TwoOptimizers(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self) -> Any:
        first = torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9)
        rest = torch.optim.Adam([*self.net[2].parameters(), *self.net[4].parameters()], lr=1e-2)
        return [first, rest]


def test_two_optimizers_manual_optimization() -> None:
    pruning = Pruning(Steps([(4, 0.6)]))
    checker = ZeroChecker(pruning)
    fit = trainer(max_steps=12, callbacks=[pruning, checker])
    fit.fit(TwoOptimizers(), loader())
    assert len(pruning.pruner._optimizers) == 2
    assert pruning.pruner.sparsity().fraction == pytest.approx(0.6, abs=1e-3)


def test_checkpoint_loads_into_unpruned_model_and_resume_is_exact(tmp_path: Path) -> None:
    schedule = Polynomial(0.0, 0.85, begin=0, end=16, frequency=2)

    def run(
        max_steps: int, ckpt: str | None = None, every: int | None = None
    ) -> tuple[TinyNet, Pruning]:
        model, pruning = TinyNet(scheduler=True), Pruning(schedule)
        callbacks: list[Callback] = [pruning]
        if every:
            callbacks.append(
                ModelCheckpoint(
                    tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}"
                )
            )
        trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(every)).fit(
            model, loader(), ckpt_path=ckpt
        )
        return model, pruning

    straight, straight_pruning = run(20)
    run(7, every=7)  # stops mid-ramp, at an odd step, between two updates
    checkpoint = tmp_path / "step=7.ckpt"
    fresh = TinyNet()
    state = torch.load(checkpoint, weights_only=False)
    fresh.load_state_dict(state["state_dict"], strict=True)  # plain keys
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("Pruning"))
    assert saved["last_t"] == 7
    for name in TARGETS:
        entry = saved["pruner"]["masks"][name]
        mask = unpack_mask(entry["packed"], entry["shape"])
        assert 0 < int((~mask).sum()) < mask.numel()  # mid-ramp
        assert bool((fresh.get_parameter(name)[~mask] == 0).all())
    resumed, resumed_pruning = run(20, ckpt=str(checkpoint))
    for name in TARGETS:
        assert torch.equal(resumed_pruning.pruner.masks[name], straight_pruning.pruner.masks[name])
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoint_from_other_schedule_or_model_is_refused(tmp_path: Path) -> None:
    saver = ModelCheckpoint(tmp_path, filename="last")
    trainer(max_steps=3, callbacks=[Pruning(Constant(0.5)), saver], enable_checkpointing=True).fit(
        TinyNet(), loader()
    )
    ckpt = str(tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="resume with the same schedule"):
        trainer(max_steps=6, callbacks=[Pruning(Constant(0.7))]).fit(
            TinyNet(), loader(), ckpt_path=ckpt
        )
    state = torch.load(ckpt, weights_only=False)
    key = next(k for k in state["callbacks"] if k.startswith("Pruning"))
    state["callbacks"][key]["pruner"]["masks"].pop("net.4.weight")
    torch.save(state, tmp_path / "broken.ckpt")
    model = TinyNet()
    with pytest.raises(ValueError, match="another model"):
        trainer(max_steps=6, callbacks=[Pruning(Constant(0.5))]).fit(
            model, loader(), ckpt_path=str(tmp_path / "broken.ckpt")
        )


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Pruning(0.5), TypeError, r"schedule=0.5"),
        (lambda: Pruning(Constant(0.5), unit="batch"), ValueError, r"unit='batch'"),
        (lambda: Pruning(Constant(0.5), scope="net"), ValueError, r"scope='net'"),
        (lambda: Pruning(Constant(0.5), method="l9"), ValueError, r"method='l9'"),
        (lambda: Polynomial(0.5, 0.2, begin=0, end=10), ValueError, r"final"),
    ],
)
def test_bad_arguments_fail_at_construction(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_unknown_targets_fail_at_fit_start_before_any_step() -> None:
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = trainer(max_steps=3, callbacks=[Pruning(Constant(0.5), targets="net.1.weight")])
    with pytest.raises(ValueError, match=r"'net.1.weight' matches no parameter.*did you mean"):
        fit.fit(model, loader())
    assert fit.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_make_permanent_and_reset_to_initial() -> None:
    model = TinyNet(optimizer="sgd")
    initial = {n: model.get_parameter(n).detach().clone() for n in TARGETS}
    pruning = Pruning(Steps([(5, 0.5)]), reset_to_initial=True, make_permanent=True)
    trainer(max_steps=5, callbacks=[pruning]).fit(model, loader())
    for name in TARGETS:  # pruned at the last step, then survivors reset to their initial values
        mask = pruning.pruner.masks[name]
        assert torch.equal(model.get_parameter(name).detach(), initial[name] * mask)
    assert pruning.pruner._grad_hooks == [] and pruning.pruner._optimizers == []


def test_rewind_point_captures_step_k_weights_and_optimizer_state() -> None:
    point = RewindPoint(step=3)
    trainer(max_steps=8, callbacks=[point]).fit(TinyNet(scheduler=True), loader())
    reference = TinyNet(scheduler=True)
    fit = trainer(max_steps=3)
    fit.fit(reference, loader())
    for name, value in reference.state_dict().items():
        assert torch.equal(point.weights[name], value)
    expected_opt = fit.optimizers[0].state_dict()
    assert point.optimizer_states[0]["state"][0]["step"] == expected_opt["state"][0]["step"]
    assert torch.equal(
        point.optimizer_states[0]["state"][0]["exp_avg"], expected_opt["state"][0]["exp_avg"]
    )
    assert point.scheduler_states[0]["last_epoch"] == 3
    zero = RewindPoint(step=0)
    model = TinyNet()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = Pruning(Steps([(2, 0.5)]))
    trainer(max_steps=4, callbacks=[zero, pruning]).fit(model, loader())
    zero.rewind(model, pruning.pruner)
    for name in TARGETS:
        assert torch.equal(
            model.get_parameter(name).detach(), init[name] * pruning.pruner.masks[name]
        )


def test_callbacks_pickle_and_repr() -> None:
    pruning = Pruning(Polynomial(0.0, 0.5, begin=0, end=10), scope="layer")
    trainer(max_steps=2, callbacks=[pruning]).fit(TinyNet(), loader())
    clone = pickle.loads(pickle.dumps(pruning))
    assert clone.schedule == pruning.schedule and clone.pruner is None
    assert (
        repr(pruning)
        == "Pruning(schedule=Polynomial(...), unit='step', method='magnitude', scope='layer')"
    )
    assert "step=0" in repr(pickle.loads(pickle.dumps(RewindPoint(0))))


def test_lightning_cli_builds_callback_from_yaml(tmp_path: Path) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  callbacks:
    - class_path: prunekit.callbacks.Pruning
      init_args:
        schedule:
          class_path: prunekit.schedules.Polynomial
          init_args: {initial: 0.0, final: 0.9, begin: 10, end: 100, frequency: 10}
        unit: step
        scope: layer
"""
    )
    cli = LightningCLI(
        TinyNet, run=False, args=["--config", str(config)], save_config_callback=None
    )
    found = [c for c in cli.trainer.callbacks if isinstance(c, Pruning)]
    assert len(found) == 1
    assert found[0].schedule == Polynomial(0.0, 0.9, begin=10, end=100, frequency=10)
    assert found[0].pruner_args["scope"] == "layer"


def test_tensorboard_per_layer_and_progress_bar(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pruning = Pruning(Steps([(2, 0.5), (4, 0.75)]), log_per_layer=True, scope="layer")
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    fit = trainer(max_steps=6, logger=loggers, callbacks=[pruning])
    fit.fit(TinyNet(), loader())
    events = EventAccumulator(loggers[0].log_dir)
    events.Reload()
    actual = {e.step: e.value for e in events.Scalars("sparsity/actual")}
    assert actual[2] == pytest.approx(0.5, abs=1e-3) and actual[4] == pytest.approx(0.75, abs=1e-3)
    for name in TARGETS:  # scope=layer: every layer at the target
        layer = {e.step: e.value for e in events.Scalars(f"sparsity/{name}")}
        expected = (
            round(0.75 * pruning.pruner.masks[name].numel()) / pruning.pruner.masks[name].numel()
        )
        assert layer[4] == pytest.approx(expected, abs=1e-6)
    rows = read_csv(Path(loggers[1].log_dir) / "metrics.csv")
    assert {int(r["step"]) for r in rows if r.get("sparsity/target")} >= {2, 4}
    assert fit.progress_bar_metrics["sparsity/actual"] == pytest.approx(0.75, abs=1e-3)


def test_amount_as_a_function_of_the_epoch() -> None:
    pruning = Pruning(
        lambda epoch: min(0.3 * epoch, 0.6), unit="epoch", method="random", scope="layer"
    )
    seen = []

    class Watch(Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append(round(pruning.pruner.sparsity().fraction, 3))

    trainer(max_epochs=3, callbacks=[pruning, Watch()]).fit(TinyNet(), loader(length=3))
    n = pruning.pruner.sparsity().total
    expected = [
        sum(round(s * m.numel()) for m in pruning.pruner.masks.values()) / n
        for s in (0.3, 0.6, 0.6)
    ]
    assert seen == [round(e, 3) for e in expected]
    assert pickle.loads(pickle.dumps(Pruning(abs))).schedule.fn is abs
