"""structure="groups" inside training loops: what changes under the callback (dtype of the
model, resumes, second fits, copies, replaced parameters, added parameter groups,
gradient accumulation, BatchNorm in train mode with momentum and weight decay) is
followed or refused by name, never a silent wrong mask.

Expected values come from the weights themselves (dead rows and columns counted
directly) or from hand counts, not from the ranking code under test.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from prunekit.callbacks import Pruning
from prunekit.schedules import Polynomial
from torch import nn

from prunekit import compact
from tests.lit_helpers import TinyNet, loader, trainer

SCHEDULE = Polynomial(0.0, 0.5, begin=0, end=4, frequency=2)
EXAMPLE = torch.zeros(1, 12)


def dead_units(model: TinyNet) -> list[int]:
    """Hidden units of TinyNet pruned as a whole group, counted from the weights: the row,
    its bias entry and the next layer's column are all zero."""
    net, out = model.net, []
    for layer, nxt in ((0, 2), (2, 4)):
        dead = ~net[layer].weight.detach().any(dim=1)
        assert not net[layer].bias.detach()[dead].any()
        assert not net[nxt].weight.detach()[:, dead].any()
        out.append(int(dead.sum()))
    return out


def groups(**kwargs: Any) -> Pruning:
    return Pruning(SCHEDULE, structure="groups", example_input=EXAMPLE, scope="layer", **kwargs)


# ------------------------------------------------------------------ example_input
@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_example_input_follows_the_dtype_the_trainer_gives_the_model(precision: str) -> None:
    # Lightning converts the module's parameters (precision="64-true" / "bf16-true")
    # before on_fit_start; a float32 example_input (or example_input_array) must still
    # trace it, like it is moved to the module's device.
    model = TinyNet()
    pruning = groups()
    trainer(max_steps=6, callbacks=[pruning], precision=precision).fit(model, loader())
    assert pruning.example_input.dtype == torch.float32  # the user's argument is untouched
    assert dead_units(model) == [16, 8]  # half of 32 and of 16 units, every member zero


def test_an_example_input_the_model_cannot_run_is_named_before_anything_changes() -> None:
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = Pruning(SCHEDULE, structure="groups", example_input=torch.zeros(1, 13))
    with pytest.raises(ValueError, match=r"example_input.*\(1, 13\).*TinyNet"):
        trainer(max_steps=6, callbacks=[pruning]).fit(model, loader())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------- BatchNorm, momentum, weight decay
class ConvBN(pl.LightningModule):
    """conv(3->8)+BN+ReLU, conv(8->6, bias)+BN+ReLU, pool, fc; trained in train mode."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch_idx)
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)
        return torch.optim.SGD(
            self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True
        )


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_batchnorm_in_train_mode_momentum_and_weight_decay_keep_masked_equal_compacted(
    optimizer: str,
) -> None:
    model = ConvBN(optimizer)
    example = torch.zeros(1, 3, 6, 6)
    pruning = Pruning(SCHEDULE, structure="groups", example_input=example, scope="layer")
    # pruned at steps 2 and 4, then 6 more optimizer steps with momentum / Adam state
    trainer(max_steps=10, callbacks=[pruning]).fit(model, loader())
    for conv, bn, nxt, n in (("conv1", "bn1", "conv2", 8), ("conv2", "bn2", "fc", 6)):
        c, b = model.get_submodule(conv), model.get_submodule(bn)
        dead = ~c.weight.detach().flatten(1).any(dim=1)
        assert int(dead.sum()) == n // 2  # half of each layer's channels, from the weights
        assert not b.weight.detach()[dead].any() and not b.bias.detach()[dead].any()
        if c.bias is not None:
            assert not c.bias.detach()[dead].any()
        w = model.get_submodule(nxt).weight.detach()
        assert not w[:, dead].any()
        assert b.running_var[dead].min() > 0  # the running stats moved: not what keeps it zero
    x = torch.randn(4, 3, 6, 6)
    small = compact(model, example, pruner=pruning.pruner)
    assert small.conv1.out_channels == 4 and small.conv2.out_channels == 3
    for train in (False, True):  # running stats (eval) and batch stats (train)
        model.train(train)
        small.train(train)
        with torch.no_grad():
            assert torch.allclose(small(x), model(x), atol=1e-6)


# ------------------------------------------------------------ accumulation, groups
def test_an_update_in_the_middle_of_gradient_accumulation_keeps_every_member_zero() -> None:
    # updates at optimizer steps 1, 2, 3 fall between the 3 batches of one accumulation
    model = TinyNet("sgd")
    pruning = Pruning(
        Polynomial(0.0, 0.5, begin=0, end=3, frequency=1),
        structure="groups",
        example_input=EXAMPLE,
        scope="layer",
    )
    trainer(max_steps=6, callbacks=[pruning], accumulate_grad_batches=3).fit(model, loader(160))
    assert dead_units(model) == [16, 8]


class HeadLater(TinyNet):
    """The optimizer starts without the last layer (as under BackboneFinetuning)."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [*self.net[0].parameters(), *self.net[2].parameters()],
            lr=0.05,
            momentum=0.9,
            weight_decay=0.1,
        )


class AddGroup(Callback):
    """After the first update (step 2), the last layer joins the optimizer."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, b: Any, i: int) -> None:
        optimizer = trainer.optimizers[0]
        if trainer.global_step == 3 and len(optimizer.param_groups) == 1:
            optimizer.add_param_group({"params": list(pl_module.net[4].parameters())})


def test_members_in_a_param_group_added_mid_training_stay_zero() -> None:
    model = HeadLater()
    pruning = groups()
    trainer(max_steps=10, callbacks=[pruning, AddGroup()]).fit(model, loader())
    assert len(pruning.pruner.optimizers[0].param_groups) == 2
    assert dead_units(model) == [16, 8]  # net.4's columns of the pruned units: zero
    assert model.net[4].weight.detach().count_nonzero() == 3 * 8  # and it trained the rest


# ------------------------------------------------ the Hugging Face Trainer callback
def _hf_bert_run(output_dir: Path, resume: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")
    from prunekit.integrations.transformers import PruningCallback

    from tests import hf_worker
    from tests.test_targets import tiny_bert

    transformers.set_seed(0)
    model = tiny_bert(transformers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (32, 10), generator=g)
    labels = torch.randint(0, 3, (32,), generator=g)
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]
    args: dict[str, Any] = {
        "structure": "groups",
        "example_input": BERT_EXAMPLE,
        "scope": "layer",
        "options": {"blocks_only": True},
    }
    args.update(kwargs)
    pruning = PruningCallback(Polynomial(0.0, 0.5, begin=1, end=5, frequency=2), **args)
    hf = transformers.Trainer(
        model=model,
        args=hf_worker.arguments(str(output_dir), max_steps=8, save_steps=4),
        train_dataset=data,
        callbacks=[pruning],
    )
    hf.train(resume_from_checkpoint=resume)
    return model, pruning


BERT_EXAMPLE = torch.ones(1, 10, dtype=torch.long)


def _dead_bert(model: nn.Module) -> list[tuple[int, int]]:
    """Per encoder layer: (heads, MLP units) whose every weight and bias entry is zero,
    counted from the weights (4 heads of 8 dims, 37 intermediate units)."""
    out = []
    for layer in model.bert.encoder.layer:
        att, heads = layer.attention, 0
        for h in range(4):
            rows = slice(8 * h, 8 * h + 8)
            parts = [getattr(att.self, p).weight[rows] for p in ("query", "key", "value")]
            parts += [getattr(att.self, p).bias[rows] for p in ("query", "key", "value")]
            parts.append(att.output.dense.weight[:, rows])
            heads += all(not t.detach().any() for t in parts)
        inter, down = layer.intermediate.dense, layer.output.dense
        dead = ~inter.weight.detach().any(dim=1)
        assert not inter.bias.detach()[dead].any() and not down.weight.detach()[:, dead].any()
        out.append((heads, int(dead.sum())))
    return out


def test_hf_trainer_groups_blocks_only_prunes_heads_and_units_compacts_and_resumes(
    tmp_path: Path,
) -> None:
    model, pruning = _hf_bert_run(tmp_path / "straight")
    # half of 4 heads and round(0.5 * 37) = 18 of 37 units, in each of the 2 layers
    assert _dead_bert(model) == [(2, 18), (2, 18)]
    model.eval()
    small = compact(model, BERT_EXAMPLE, pruner=pruning.pruner, blocks_only=True)
    x = torch.randint(1, 99, (3, 10))
    with torch.no_grad():
        assert torch.allclose(small(x).logits, model(x).logits, atol=1e-5)
    _, again = _hf_bert_run(
        tmp_path / "straight", resume=str(tmp_path / "straight" / "checkpoint-4")
    )
    for name, mask in pruning.pruner.masks.items():
        assert torch.equal(again.pruner.masks[name], mask), name
    with pytest.raises(ValueError, match=r"structure='groups'.*structure='weights'"):
        _hf_bert_run(
            tmp_path / "straight",
            resume=str(tmp_path / "straight" / "checkpoint-4"),
            structure="weights",
            example_input=None,
            options=None,
        )


def test_hf_callback_groups_arguments_are_checked() -> None:
    pytest.importorskip("transformers")
    from prunekit.integrations.transformers import PruningCallback

    sched = Polynomial(0.0, 0.5, begin=1, end=5, frequency=2)
    with pytest.raises(ValueError, match="structure='channels'"):
        PruningCallback(sched, structure="channels")
    with pytest.raises(ValueError, match="example_input"):
        PruningCallback(sched, structure="groups")
    with pytest.raises(ValueError, match="only used with structure='groups'"):
        PruningCallback(sched, example_input=BERT_EXAMPLE)
    with pytest.raises(TypeError, match="example_input must be"):
        PruningCallback(sched, structure="groups", example_input=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method='random'"):
        PruningCallback(sched, structure="groups", example_input=BERT_EXAMPLE, method="random")
    with pytest.raises(ValueError, match="targets="):
        PruningCallback(sched, structure="groups", example_input=BERT_EXAMPLE, targets=["a"])
    with pytest.raises(ValueError, match=r"options \['n'\]"):
        PruningCallback(sched, structure="groups", example_input=BERT_EXAMPLE, options={"n": 2})
    assert "structure='groups'" in repr(
        PruningCallback(sched, structure="groups", example_input=BERT_EXAMPLE)
    )


@pytest.mark.parametrize("structure", ["groups", "weights"])
def test_hf_second_train_with_the_same_callback_holds_the_masks_and_reports_them(
    tmp_path: Path, structure: str
) -> None:
    # A second trainer.train() on the same model restarts global_step at 0: the schedule's
    # lower targets are held (masks never regrow, the logged target is what they reach)
    transformers = pytest.importorskip("transformers")
    from tests import hf_worker

    extra: dict[str, Any] = {}
    if structure == "weights":
        extra = {"structure": "weights", "example_input": None, "options": None}
    model, pruning = _hf_bert_run(tmp_path / "first", **extra)
    masks = {n: m.clone() for n, m in pruning.pruner.masks.items()}
    assert pruning._target == 0.5
    again = transformers.Trainer(
        model=model,
        args=hf_worker.arguments(str(tmp_path / "second"), max_steps=4, save_strategy="no"),
        train_dataset=[{"input_ids": torch.ones(10, dtype=torch.long), "labels": 0}] * 16,
        callbacks=[pruning],
    )
    again.train()  # t = 1..4: the schedule asks for 0 ... 0.4375 < 0.5
    for name, mask in masks.items():
        assert torch.equal(pruning.pruner.masks[name], mask), name
    logged = [h["sparsity/target"] for h in again.state.log_history if "sparsity/target" in h]
    assert logged and set(logged) == {0.5}


# ------------------------------------------- what changes under the callback mid-fit
class Replace(Callback):
    """At step 3 (after the update of step 2), ``net.2`` becomes a new Linear."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, b: Any, i: int) -> None:
        if trainer.global_step == 3 and not hasattr(self, "masks"):
            self.masks = {n: m.clone() for n, m in trainer.callbacks[0].pruner.masks.items()}
            pl_module.net[2] = nn.Linear(32, 16)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.net[2].parameters())})


def test_a_parameter_replaced_after_fit_start_is_named_before_the_masks_change() -> None:
    model, replace = TinyNet(), Replace()
    pruning = groups()
    with pytest.raises(ValueError, match=r"'net\.2\.weight' of TinyNet was replaced"):
        trainer(max_steps=8, callbacks=[pruning, replace]).fit(model, loader())
    for name, mask in replace.masks.items():  # the update of step 4 changed nothing
        assert torch.equal(pruning.pruner.masks[name], mask), name


def test_second_fit_holds_and_a_copied_callback_starts_afresh_on_a_copied_model() -> None:
    model, pruning = TinyNet(), groups()
    trainer(max_steps=6, callbacks=[pruning]).fit(model, loader())
    masks = {n: m.clone() for n, m in pruning.pruner.masks.items()}
    trainer(max_steps=3, callbacks=[pruning]).fit(model, loader())  # t restarts: held
    assert all(torch.equal(pruning.pruner.masks[n], m) for n, m in masks.items())
    assert pruning._target == 0.5 and dead_units(model) == [16, 8]
    twin, copied = copy.deepcopy(pruning), copy.deepcopy(model)
    assert twin.pruner is None
    trainer(max_steps=3, callbacks=[twin]).fit(copied, loader())  # afresh: t = 2 only
    assert twin.pruner.model is copied and pruning.pruner.model is model
    assert twin._target == SCHEDULE(2)  # what its own masks reach, reported as such
    assert twin.pruner.sparsity().fraction == pytest.approx(
        (round(SCHEDULE(2) * 32) + round(SCHEDULE(2) * 16)) / 48
    )


# ------------------------------------------------------------------------ resumes
def test_resume_with_the_default_options_spelled_out_continues_and_other_options_refused(
    tmp_path: Path,
) -> None:
    saver = ModelCheckpoint(tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    first = groups()
    trainer(max_steps=3, callbacks=[first, saver], enable_checkpointing=True).fit(
        TinyNet(), loader()
    )
    ckpt = str(tmp_path / "step=3.ckpt")
    straight = groups()
    trainer(max_steps=6, callbacks=[straight]).fit(TinyNet(), loader(), ckpt_path=ckpt)
    spelled = groups(options={"reduce": "normalized", "blocks_only": False})  # the defaults
    trainer(max_steps=6, callbacks=[spelled]).fit(TinyNet(), loader(), ckpt_path=ckpt)
    for name, mask in straight.pruner.masks.items():
        assert torch.equal(spelled.pruner.masks[name], mask), name
    with pytest.raises(ValueError, match=r"options=\{.*'reduce': 'normalized'.*'reduce': 'mean'"):
        trainer(max_steps=6, callbacks=[groups(options={"reduce": "mean"})]).fit(
            TinyNet(), loader(), ckpt_path=ckpt
        )


# ------------------------------------------------------------ a schedule that goes down
def _down(t: int) -> float:
    """0.5 at t = 2 and 3, then 0.25: not monotone (a user's callable)."""
    return 0.5 if t in (2, 3) else (0.25 if t >= 4 else 0.0)


def test_a_schedule_that_goes_down_is_refused_not_logged_over_held_masks() -> None:
    # structure="weights" refuses it (masks only shrink); groups used to hold the masks
    # silently and log sparsity/target 0.25 over masks at 0.5
    model = TinyNet()
    pruning = Pruning(_down, structure="groups", example_input=EXAMPLE, scope="layer")
    with pytest.raises(ValueError, match=r"schedule\(4\)=0.25.*0.5.*masks only shrink"):
        trainer(max_steps=6, callbacks=[pruning]).fit(model, loader())
    assert pruning._target == 0.5
    assert dead_units(model) == [16, 8]  # the masks of t = 2, unchanged


def test_hf_a_schedule_that_goes_down_is_refused(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from prunekit.integrations.transformers import PruningCallback

    from tests import hf_worker
    from tests.test_targets import tiny_bert

    pruning = PruningCallback(
        _down,
        structure="groups",
        example_input=BERT_EXAMPLE,
        scope="layer",
        options={"blocks_only": True},
    )
    hf = transformers.Trainer(
        model=tiny_bert(transformers),
        args=hf_worker.arguments(str(tmp_path), max_steps=6, save_strategy="no"),
        train_dataset=[{"input_ids": torch.ones(10, dtype=torch.long), "labels": 0}] * 24,
        callbacks=[pruning],
    )
    with pytest.raises(ValueError, match=r"schedule\(4\)=0.25.*0.5.*masks only shrink"):
        hf.train()
    assert pruning._target == 0.5


# ------------------------------------------------------------------ DDP (2 x gloo)
class _RankConvBN(ConvBN):
    """Each rank trains on other data: only DDP's averaging keeps the weights equal (the
    BatchNorm running stats differ between ranks: not synchronised)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.global_rank * 100_000 + batch_idx)
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        return nn.functional.cross_entropy(self(x), y)


def _ddp_worker(out: str, devices: int) -> None:
    """Run as ``python tests/test_groups_in_loops.py OUT DEVICES``: a groups fit under DDP
    that writes every rank's masks after every update to OUT/rank<r>.pt."""
    torch.set_num_threads(1)
    records: list[dict[str, Any]] = []

    class Recorder(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            pruner = trainer.callbacks[0].pruner  # type: ignore[attr-defined]
            fraction = pruner.sparsity().fraction
            if fraction != (records[-1]["fraction"] if records else 0.0):
                masks = {n: m.clone() for n, m in pruner.masks.items()}
                records.append({"step": trainer.global_step, "masks": masks, "fraction": fraction})

    pruning = Pruning(
        SCHEDULE, structure="groups", example_input=torch.zeros(1, 3, 6, 6), scope="global"
    )
    strategy = "ddp" if devices > 1 else "auto"
    fit = trainer(max_steps=8, devices=devices, strategy=strategy, callbacks=[pruning, Recorder()])
    model = _RankConvBN("sgd")
    fit.fit(model, loader())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"records": records, "weights": weights}, Path(out) / f"rank{fit.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_gloo_ranks_have_identical_group_masks(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]  # the worker imports tests.lit_helpers
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path), "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # of 8 + 6 = 14 channels: round(0.4375 * 14) = 6 pruned at step 2, 7 at step 4
    assert [(r["step"], r["fraction"]) for r in r0["records"]] == [(2, 6 / 14), (4, 7 / 14)]
    for a, b in zip(r0["records"], r1["records"], strict=True):
        assert a["fraction"] == b["fraction"]
        for name, mask in a["masks"].items():
            assert torch.equal(b["masks"][name], mask), name
    for name, w in r0["weights"].items():
        assert torch.equal(r1["weights"][name], w), name
    # half of the 8 + 6 channels, counted from rank 1's weights
    w = r1["weights"]
    dead = int((~w["conv1.weight"].flatten(1).any(1)).sum()) + int(
        (~w["conv2.weight"].flatten(1).any(1)).sum()
    )
    assert dead == 7


if __name__ == "__main__":
    import sys

    _ddp_worker(sys.argv[1], int(sys.argv[2]))
