"""structure="groups" inside training loops: what changes under the callback (dtype of the
model, resumes, second fits, copies, replaced parameters, added parameter groups,
gradient accumulation, BatchNorm in train mode with momentum and weight decay) is
followed or refused by name, never a silent wrong mask.

Expected values come from the weights themselves (dead rows and columns counted
directly) or from hand counts, not from the ranking code under test.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from prunekit.callbacks import Pruning
from prunekit.schedules import Polynomial

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
