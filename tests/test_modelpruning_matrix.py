"""Coming from Lightning's ``ModelPruning``: its 40-case test matrix replayed against the
``Pruning`` callback, and the pieces that make the move a one-liner.

The matrix is ModelPruning's own: parameters_to_prune (explicit pairs or every weight and
bias) x use_global_unstructured x pruning_fn (l1_unstructured, random_unstructured,
ln_structured, random_structured, a custom ``BasePruningMethod``) x
use_lottery_ticket_hypothesis, amount=0.3 at each epoch end. For every case, the pruned
count of every parameter equals ModelPruning's, or both refuse the case, or
ModelPruning refuses and prunekit's count is the one computed by hand here (see
docs/migrating-from-modelpruning.md for each mapping and refusal).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from lightning.pytorch.callbacks import Callback, ModelPruning
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from prunekit.callbacks import Pruning
from prunekit.schedules import Constant, Steps
from torch import nn

import prunekit._masks
from prunekit import (
    Pruner,
    ln_structured_mask,
    random_structured_mask,
    register_method,
)
from tests.lit_helpers import TinyNet, loader, trainer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
EPOCHS = 3


class MatrixModel(BoringModel):
    """The model of ModelPruning's tests: 32 -> 32 -> 32 (no bias) -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            OrderedDict(
                [
                    ("mlp_1", nn.Linear(32, 32)),
                    ("mlp_2", nn.Linear(32, 32, bias=False)),
                    ("mlp_3", nn.Linear(32, 2)),
                ]
            )
        )


class EveryOther(torch_prune.BasePruningMethod):
    """A custom torch pruning method: prunes the entries at even positions of what it is
    given (torch gives it the entries that remain, so each call halves them)."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount: float) -> Any:  # type: ignore[override]
        return super().apply(module, name, amount=amount)


def every_other(
    t: torch.Tensor, amount: float | int, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The same rule as a prunekit mask function: of the entries still kept (flat
    order), prune every other one, starting with the first; the amount is ignored."""
    keep = torch.ones(t.numel(), dtype=torch.bool)
    if mask is not None:
        keep = mask.reshape(-1).clone()
    alive = keep.nonzero().squeeze(1)
    keep[alive[::2]] = False
    return keep.view(t.shape)


@pytest.fixture(autouse=True, scope="module")
def every_other_registered() -> Iterator[None]:
    """Registered only while this module's tests run: the method list other tests print
    (e.g. the bad-input catalogue's "choose one of [...]") must not depend on test order."""
    register_method("every_other_demo")(every_other)
    yield
    del prunekit._masks._METHODS["every_other_demo"]


FNS = ["l1_unstructured", "random_unstructured", "ln_structured", "random_structured", "custom"]
METHODS = {
    "l1_unstructured": ("magnitude", {}),
    "random_unstructured": ("random", {}),
    "ln_structured": ("ln_structured", {"n": 1, "dim": 0}),
    "random_structured": ("random_structured", {"dim": 0}),
    "custom": ("every_other_demo", {}),
}


def fit(model: pl.LightningModule, callback: Callback) -> None:
    pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    ).fit(model)


def pairs(model: MatrixModel, explicit: bool, structured: bool) -> list[tuple[nn.Module, str]]:
    """The (module, name) pairs ModelPruning prunes in this case."""
    if explicit:
        return [(model.layer.mlp_1, "weight"), (model.layer.mlp_2, "weight")]
    names = ("weight",) if structured else ("weight", "bias")
    return [
        (m, n) for n in names for m in model.layer if isinstance(getattr(m, n, None), nn.Parameter)
    ]


def names_of(model: nn.Module, chosen: list[tuple[nn.Module, str]]) -> list[str]:
    where = {id(m): name for name, m in model.named_modules()}
    return [f"{where[id(m)]}.{n}" for m, n in chosen]


def hand_counts(
    model: MatrixModel, chosen: list[tuple[nn.Module, str]], fn: str, glob: bool
) -> dict[str, int]:
    """Pruned counts computed here from ModelPruning's documented rule: each epoch prunes
    round(0.3 x what remains) (entries, or rows for structured methods; over all pairs at
    once when global); the custom method prunes every other remaining entry (half of
    what remains, rounded up) whatever the amount."""
    sizes = {
        name: getattr(m, n) for name, (m, n) in zip(names_of(model, chosen), chosen, strict=True)
    }
    if fn == "custom":
        counts = {}
        for name, p in sizes.items():
            kept = p.numel()
            for _ in range(EPOCHS):
                kept -= math.ceil(kept / 2)
            counts[name] = p.numel() - kept
        return counts
    structured = fn.endswith("_structured")
    if glob:
        total = sum(p.numel() for p in sizes.values())
        kept = total
        for _ in range(EPOCHS):
            kept -= round(0.3 * kept)
        return {"all": total - kept}
    counts = {}
    for name, p in sizes.items():
        units = p.shape[0] if structured else p.numel()
        kept = units
        for _ in range(EPOCHS):
            kept -= round(0.3 * kept)
        counts[name] = (units - kept) * (p[0].numel() if structured else 1)
    return counts


def zeros_by_name(model: nn.Module, names: list[str]) -> dict[str, int]:
    return {n: int((model.get_parameter(n) == 0).sum()) for n in names}


CASES = [
    (explicit, glob, fn, lth)
    for explicit in (False, True)
    for glob in (False, True)
    for fn in FNS
    for lth in (False, True)
]


@pytest.mark.parametrize(("explicit", "glob", "fn", "lth"), CASES)
def test_modelpruning_case(explicit: bool, glob: bool, fn: str, lth: bool) -> None:
    structured = fn.endswith("_structured")
    # ---- ModelPruning
    pl.seed_everything(1)
    reference = MatrixModel()
    chosen = pairs(reference, explicit, structured)
    kwargs: dict[str, Any] = {
        "pruning_fn": EveryOther if fn == "custom" else fn,
        "amount": 0.3,
        "use_global_unstructured": glob,
        "use_lottery_ticket_hypothesis": lth,
        "verbose": 0,
    }
    if explicit:
        kwargs["parameters_to_prune"] = chosen
    else:
        kwargs["parameter_names"] = ["weight"] if structured else ["weight", "bias"]
    if structured:
        kwargs["pruning_dim"] = 0
    if fn == "ln_structured":
        kwargs["pruning_norm"] = 1
    method, options = METHODS[fn]
    targets: Any = (
        chosen
        if explicit
        else (["layer.*.weight"] if structured else ["layer.*.weight", "layer.*.bias"])
    )

    def prunekit_callback(model: MatrixModel, scope: str) -> Pruning:
        pairs_or_globs = pairs(model, True, structured) if explicit else targets
        return Pruning(
            amount=0.3,
            unit="epoch",
            targets=pairs_or_globs,
            method=method,
            scope=scope,
            options=options,
            reset_to_initial=lth,
        )

    if structured and glob:  # refused by both: one ranking across layers needs single weights
        with pytest.raises(MisconfigurationException, match="unstructured"):
            ModelPruning(**kwargs)
        with pytest.raises(ValueError, match=r"scope='global' ranks single weights"):
            Pruner(
                MatrixModel(),
                targets=["layer.mlp_1.weight"],
                method=method,
                scope="global",
                **options,
            )
        return
    if fn == "custom" and not glob:  # ModelPruning refuses; prunekit prunes each layer
        with pytest.raises(MisconfigurationException, match="only supported with"):
            ModelPruning(**kwargs)
        pl.seed_everything(1)
        model = MatrixModel()
        pruning = prunekit_callback(model, "layer")
        fit(model, pruning)
        counts = {n: int((~m).sum()) for n, m in pruning.pruner.masks.items()}
        assert counts == hand_counts(reference, chosen, fn, glob)
        return
    fit(reference, ModelPruning(**kwargs))
    expected = zeros_by_name(reference, names_of(reference, chosen))
    # ---- prunekit: the same pairs, the same relative amount, at the same epoch ends
    pl.seed_everything(1)
    model = MatrixModel()
    # a custom method is a mask function run per layer (its pattern is positional, and
    # all sizes here are even, so per layer equals ModelPruning's concatenated vector)
    scope = "global" if glob and fn != "custom" else "layer"
    pruning = prunekit_callback(model, scope)
    fit(model, pruning)
    got = {n: int((~m).sum()) for n, m in pruning.pruner.masks.items()}
    assert set(got) == set(expected)
    if glob and fn != "custom":  # one global count; how it splits differs for random
        total = hand_counts(reference, chosen, fn, True)["all"]
        assert sum(got.values()) == sum(expected.values()) == total
        if fn == "l1_unstructured" and not lth:  # same weights, same ranking
            assert got == expected
        # (with lth, ModelPruning's resets after the first restore weights that have
        # trained since: its saved copy shares storage with the reset parameter; prunekit
        # restores the fit-start values, so the later global rankings split differently)
    else:
        assert got == expected == hand_counts(reference, chosen, fn, False)
    zeros = zeros_by_name(model, list(got))
    assert all(zeros[n] >= c for n, c in got.items())  # pruned weights are zero


# ----------------------------------------------- the pieces a move needs
def test_structured_fraction_below_one_keeps_a_slice() -> None:
    two_rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for amount in (0.8, 0.9, 0.99):  # round(amount * 2) == 2
        assert int(ln_structured_mask(two_rows, amount, n=1, dim=0).any(dim=1).sum()) == 1
        assert int(random_structured_mask(two_rows, amount, dim=0).any(dim=1).sum()) == 1
    assert not ln_structured_mask(two_rows, 1.0, n=1, dim=0).any()  # asked for all: all
    assert not ln_structured_mask(two_rows, 2, n=1, dim=0).any()
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    pruner = Pruner(model, method="ln_structured", scope="layer", n=1, dim=0)
    pruner.prune_to(0.97)
    assert int((model[1].weight != 0).any(dim=1).sum()) == 1  # round(0.97 * 2) = 2 rows, one kept
    assert int((model[0].weight != 0).any(dim=1).sum()) == 1  # round(0.97 * 8) = 8 rows, too


def test_module_weight_pairs_as_targets() -> None:
    model = TinyNet()
    pruning = Pruning(Constant(0.5), targets=[(model.net[0], "weight"), (model.net[4], "weight")])
    trainer(max_steps=1, callbacks=[pruning]).fit(model, loader())
    assert pruning.pruner.names == ["net.0.weight", "net.4.weight"]
    assert pruning.pruner.sparsity().pruned == round(0.5 * (12 * 32 + 16 * 3))
    single = Pruning(Constant(0.5), targets=(model.net[2], "bias"), scope="layer")
    trainer(max_steps=1, callbacks=[single]).fit(model, loader())
    assert single.pruner.names == ["net.2.bias"] and single.pruner.sparsity().pruned == 8


def test_relative_amount_prunes_a_fraction_of_what_remains_each_epoch() -> None:
    model, n = TinyNet(), 12 * 32 + 32 * 16 + 16 * 3
    seen = []
    pruning = Pruning(
        amount=0.3, unit="epoch", on_update=lambda p, t: seen.append((t, p.sparsity().pruned))
    )
    trainer(max_epochs=4, callbacks=[pruning]).fit(model, loader(length=2))
    kept, expected = n, []
    for t in range(1, 5):  # round(0.3 x what remains) at each epoch end, by hand
        kept -= round(0.3 * kept)
        expected.append((t, n - kept))
    assert seen == expected
    counted = Pruning(amount=lambda t: 10 if t % 2 else 0, unit="step", scope="layer")
    trainer(max_steps=5, callbacks=[counted]).fit(TinyNet(), loader())
    assert counted.pruner.sparsity().pruned == 3 * 10 * 3  # t = 1, 3, 5; ten per layer


def test_after_validation_prunes_after_validation_not_before() -> None:
    pruning = Pruning(Steps([(1, 0.5), (3, 0.7)]), after_validation=True)
    n = 12 * 32 + 32 * 16 + 16 * 3
    log: list[tuple[str, int, int]] = []

    class Watch(Callback):
        def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            log.append(("validation", trainer.global_step, pruning.pruner.sparsity().pruned))

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, *a: Any
        ) -> None:
            log.append(("step", trainer.global_step, pruning.pruner.sparsity().pruned))

    trainer(max_steps=6, val_check_interval=2, callbacks=[pruning, Watch()]).fit(
        TinyNet(), loader(), loader(length=2)
    )
    # updates due at t=1 and t=3 wait for the validations after steps 2 and 4
    assert log == [
        ("step", 1, 0),
        ("step", 2, 0),
        ("validation", 2, 0),
        ("step", 3, round(0.5 * n)),
        ("step", 4, round(0.5 * n)),
        ("validation", 4, round(0.5 * n)),
        ("step", 5, round(0.7 * n)),
        ("step", 6, round(0.7 * n)),
        ("validation", 6, round(0.7 * n)),
    ]


def test_on_update_can_resample_the_surviving_weights() -> None:
    def resample(pruner: Pruner, t: int) -> None:
        torch.manual_seed(t)
        for module in pruner.model.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        pruner.apply_masks()

    model = TinyNet(optimizer="sgd", lr=0.0)  # no training: the weights are what on_update left
    pruning = Pruning(Steps([(2, 0.5)]), on_update=resample)
    trainer(max_steps=3, callbacks=[pruning]).fit(model, loader())
    fresh = TinyNet()
    torch.manual_seed(2)
    for m in fresh.net:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    for name in pruning.pruner.names:
        mask = pruning.pruner.masks[name]
        assert torch.equal(
            model.get_parameter(name).detach(), fresh.get_parameter(name).detach() * mask
        )


def test_two_callbacks_on_the_same_weights_are_refused_by_name() -> None:
    first = Pruning(Constant(0.5), name="a")
    second = Pruning(Constant(0.2), targets="net.2.weight", name="b", method="random")
    with pytest.raises(
        ValueError, match=r"\['net.2.weight'\] are targets of two Pruning callbacks"
    ):
        trainer(max_steps=1, callbacks=[first, second]).fit(TinyNet(), loader())


def test_relative_amount_resumes_exactly(tmp_path: Any) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs: int, ckpt: str | None = None, save: bool = False) -> Pruning:
        pruning = Pruning(amount=0.25, unit="epoch", scope="layer")
        callbacks: list[Callback] = [pruning]
        if save:
            callbacks.append(ModelCheckpoint(tmp_path, filename="{epoch}", save_top_k=-1))
        trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=save).fit(
            TinyNet(), loader(length=2), ckpt_path=ckpt
        )
        return pruning

    straight = run(4)
    run(2, save=True)
    resumed = run(4, ckpt=str(tmp_path / "epoch=1.ckpt"))
    for name, mask in straight.pruner.masks.items():
        assert torch.equal(resumed.pruner.masks[name], mask), name
    size = 12 * 32
    kept = size
    for _ in range(4):
        kept -= round(0.25 * kept)
    assert int((~straight.pruner.masks["net.0.weight"]).sum()) == size - kept
    with pytest.raises(
        ValueError, match=r"written with schedule=\{'kind': 'relative', 'amount': 0\.25\}"
    ):
        trainer(max_epochs=4, callbacks=[Pruning(amount=0.3, unit="epoch", scope="layer")]).fit(
            TinyNet(), loader(length=2), ckpt_path=str(tmp_path / "epoch=1.ckpt")
        )


def test_relative_amount_callable_is_checked_when_called() -> None:
    import numpy as np

    pruning = Pruning(amount=lambda t: np.float32(0.5) if t == 1 else 1.5, unit="step")
    fit_ = trainer(max_steps=4, callbacks=[pruning])
    with pytest.raises(ValueError, match=r"amount\(t=2\)=1\.5 must be a fraction of what remains"):
        fit_.fit(TinyNet(), loader())
    assert pruning.pruner.sparsity().pruned == round(0.5 * (12 * 32 + 32 * 16 + 16 * 3))


def test_after_validation_needs_a_validation_and_says_what_it_left_undone() -> None:
    pruning = Pruning(Constant(0.5), after_validation=True)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"after_validation=True .* validates nothing"):
        trainer(max_steps=2, limit_val_batches=0, callbacks=[pruning]).fit(
            model, loader(), loader(length=2)
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    late = Pruning(Steps([(1, 0.5), (5, 0.7)]), after_validation=True)
    with pytest.warns(UserWarning, match=r"asks for 0\.7000 by step 5, but no validation ran"):
        trainer(max_steps=5, val_check_interval=2, callbacks=[late]).fit(
            TinyNet(), loader(), loader(length=2)
        )
    n = 12 * 32 + 32 * 16 + 16 * 3
    assert late.pruner.sparsity().pruned == round(0.5 * n)  # what the validations allowed
