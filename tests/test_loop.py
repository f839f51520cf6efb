"""SparsityScheduler: the plain-loop driver reaches every update, saves and resumes exactly."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch
from prunekit.schedules import Constant, Linear, Polynomial, update_points
from torch import nn

from prunekit import Pruner, SparsityScheduler

README = Path(__file__).resolve().parents[1] / "README.md"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _train(
    steps: int, schedule: object, *, start: dict | None = None, until: int | None = None
) -> tuple[nn.Module, SparsityScheduler, list[int]]:
    """``steps`` AdamW steps on fixed data with the scheduler stepped after each; the
    updates' ``t`` are recorded. ``start`` resumes from a saved checkpoint; the loop
    stops early at ``until``."""
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model).attach(optimizer)
    seen: list[int] = []  # the t of every prune_to call
    holder: list[SparsityScheduler] = []
    original = pruner.prune_to

    def record(sparsity: float) -> None:
        seen.append(holder[0].t + 1 if holder else 0)  # step() prunes at t + 1
        original(sparsity)

    pruner.prune_to = record  # type: ignore[method-assign]
    scheduler = SparsityScheduler(pruner, schedule)
    holder.append(scheduler)
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["pruning"])
        first = scheduler.t
    data = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 20, generator=data), torch.randint(0, 4, (8,), generator=data))
        for _ in range(steps)
    ]
    for t in range(first, until if until is not None else steps):
        x, y = batches[t]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model, scheduler, seen


def _checkpoint(model: nn.Module, scheduler: SparsityScheduler) -> dict:
    optimizer = scheduler.pruner.optimizers[0]
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "pruning": scheduler.state_dict(),
        },
        buffer,
    )
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_natural_loop_reaches_every_update_including_the_last() -> None:
    # The loop: `for t in range(300)` calling `if s.is_update(t)` never sees t = 300.
    schedule = Polynomial(0.0, 0.8, begin=0, end=300, frequency=10)
    model, scheduler, seen = _train(300, schedule)
    total = 20 * 16 + 16 * 4
    zeros = sum(int((m.weight == 0).sum()) for m in (model[0], model[2]))
    assert scheduler.t == 300
    assert zeros == round(0.8 * total) == 307
    assert scheduler.target == 0.8
    # every update point with a new target, t = 0 excluded (target 0 there: nothing to do)
    assert seen == [t for t in update_points(schedule, 300) if schedule(t) > 0]
    assert seen[-1] == 300


def test_update_at_t0_happens_at_construction() -> None:
    model = _net()
    pruner = Pruner(model)
    scheduler = SparsityScheduler(pruner, Constant(0.5, begin=0))
    assert scheduler.t == 0 and scheduler.target == 0.5
    assert pruner.sparsity().pruned == round(0.5 * (20 * 16 + 16 * 4))


def test_resume_from_state_dict_gives_the_uninterrupted_run() -> None:
    schedule = Linear(0.0, 0.75, begin=5, end=40, frequency=5)
    full, _, _ = _train(50, schedule)
    half, scheduler, _ = _train(50, schedule, until=23)
    saved = _checkpoint(half, scheduler)
    assert saved["pruning"]["t"] == 23
    resumed, scheduler2, seen = _train(50, schedule, start=saved)
    assert scheduler2.t == 50
    assert seen == [25, 30, 35, 40]  # only the updates after the checkpoint
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (resumed[0].weight == 0).sum() + (resumed[2].weight == 0).sum() == round(0.75 * 384)


def test_load_state_dict_refuses_another_schedule_and_changes_nothing() -> None:
    model = _net()
    pruner = Pruner(model)
    scheduler = SparsityScheduler(pruner, Linear(0.0, 0.5, begin=0, end=10))
    for _ in range(10):
        scheduler.step()
    state = scheduler.state_dict()
    other = SparsityScheduler(Pruner(_net()), Linear(0.0, 0.9, begin=0, end=10))
    before = {n: m.clone() for n, m in other.pruner.masks.items()}
    with pytest.raises(ValueError, match="schedule"):
        other.load_state_dict(state)
    assert other.t == 0
    assert all(torch.equal(before[n], m) for n, m in other.pruner.masks.items())
    with pytest.raises(ValueError, match="state"):
        other.load_state_dict({"t": 3})
    with pytest.raises(ValueError, match="t"):
        other.load_state_dict({**state, "t": -1, "schedule": None})


def test_schedule_must_be_duck_typed() -> None:
    pruner = Pruner(_net())
    with pytest.raises(TypeError, match="is_update"):
        SparsityScheduler(pruner, lambda t: 0.5)
    with pytest.raises(TypeError, match="pruner"):
        SparsityScheduler(object(), Constant(0.5))  # type: ignore[arg-type]


def test_failed_update_leaves_t_unchanged() -> None:
    # a schedule whose sparsity decreases: masks only shrink, the engine refuses
    class Down:
        def __call__(self, t: int) -> float:
            return 0.5 if t == 0 else 0.2

        def is_update(self, t: int) -> bool:
            return True

    scheduler = SparsityScheduler(Pruner(_net()), Down())
    with pytest.raises(ValueError, match="only shrink"):
        scheduler.step()
    assert scheduler.t == 0 and scheduler.target == 0.5


def test_readme_plain_loop_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    block = re.search(
        r"<!-- plain-loop example[^>]*-->\n```python\n(.*?)```", text, flags=re.DOTALL
    )
    assert block is not None, "README lost its plain-loop example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README plain-loop example", "exec"), namespace)
    pruner = namespace["pruner"]
    assert pruner.sparsity().pruned == round(0.8 * (64 * 32 + 32 * 10)) == 1894
    assert namespace["scheduler"].t == 300
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["pruning"]["t"] == 300
