"""Hugging Face models and Trainer: default targets, exact global counts, masks held
through AdamW + accumulation + clipping, save_pretrained round trips, PruningCallback
(logs, checkpoints, kill and resume). Skipped when transformers is not installed."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from prunekit.integrations.transformers import STATE_FILE, PruningCallback  # noqa: E402
from prunekit.schedules import Linear, update_points  # noqa: E402

from prunekit import Pruner  # noqa: E402
from tests import hf_worker  # noqa: E402
from tests.test_targets import (  # noqa: E402
    doc_table,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_vit,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORKER = Path(__file__).with_name("hf_worker.py")
REPO = Path(__file__).resolve().parents[1]

BUILD: dict[str, Callable[[Any], nn.Module]] = {
    "BERT": tiny_bert,
    "GPT-2": tiny_gpt2,
    "Llama": tiny_llama,
    "ViT": tiny_vit,
}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILD[arch](transformers)


def batch(arch: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "ViT":
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 3, (4,), generator=g)}  # fmt: skip
    ids = torch.randint(1, 99, (4, 10), generator=g)
    if arch == "BERT":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (4,), generator=g)}
    return {"input_ids": ids, "labels": ids}


def documented_targets(model: nn.Module, arch: str) -> dict[str, nn.Parameter]:
    """The parameters docs/targets.md says are targeted (computed without the engine)."""
    globs = doc_table()[arch][0]
    return {
        n: p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, g) for g in globs)
    }


def zeros(params: dict[str, nn.Parameter]) -> int:
    return sum(int((p == 0).sum()) for p in params.values())


@pytest.mark.parametrize("arch", list(BUILD))
def test_global_prune_is_exact(arch: str) -> None:
    model = build(arch)
    expected = documented_targets(model, arch)
    total = sum(p.numel() for p in expected.values())
    before = torch.cat([p.detach().abs().flatten() for p in expected.values()])
    pruner = Pruner(model)
    assert set(pruner.names) == set(expected)
    pruner.prune_to(0.7)
    assert zeros(expected) == round(0.7 * total) == pruner.sparsity().pruned
    # one ranking across all targets: every pruned |w| <= every kept |w| (before pruning)
    pruned = torch.cat([~pruner.masks[n].flatten() for n in expected])
    assert before[pruned].max() <= before[~pruned].min()


@pytest.mark.parametrize("arch", list(BUILD))
def test_masks_hold_through_adamw_accumulation_and_clipping(arch: str) -> None:
    model = build(arch)
    model.train()
    expected = documented_targets(model, arch)
    total = sum(p.numel() for p in expected.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner = Pruner(model).attach(optimizer)
    updates = {0: 0.5, 2: 0.75}
    for step in range(4):
        if step in updates:
            pruner.prune_to(updates[step])
        for micro in range(2):  # gradient accumulation
            out = model(**batch(arch, step * 2 + micro))
            (out.loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad()
        target = updates[max(s for s in updates if s <= step)]
        assert zeros(expected) == round(target * total), step
        for name, mask in pruner.masks.items():
            param = model.get_parameter(name)
            assert bool((param[~mask] == 0).all())
            for key in ("exp_avg", "exp_avg_sq"):
                assert bool((optimizer.state[param][key][~mask] == 0).all()), (name, key)


@pytest.mark.parametrize("arch", ["GPT-2", "BERT"])
def test_save_pretrained_round_trip_keeps_the_zeros(arch: str, tmp_path: Path) -> None:
    model = build(arch)
    pruner = Pruner(model)
    pruner.prune_to(0.6)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    for name, mask in pruner.masks.items():
        weight = loaded.get_parameter(name)
        assert torch.equal(weight, model.get_parameter(name))
        assert int((weight == 0).sum()) >= int((~mask).sum())
        assert bool((weight[~mask] == 0).all())
    # a Pruner on the loaded model finds the same zeros (magnitude ranks them first)
    again = Pruner(loaded)
    again.prune_to(0.6)
    assert all(torch.equal(again.masks[n], pruner.masks[n]) for n in pruner.masks)


# ------------------------------------------------------------------- Trainer
class Probe(transformers.TrainerCallback):
    """Records the logs it sees and checks the zeros after every optimizer step."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.logs: list[dict[str, float]] = []
        self.steps = 0

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.logs.append(dict(logs))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        pruner = self.pruning.pruner
        assert pruner is not None
        self.steps += 1
        for name, mask in pruner.masks.items():
            assert bool((pruner.model.get_parameter(name)[~mask] == 0).all()), name


def run_trainer(
    output_dir: Path, *, resume: str | None = None, **overrides: Any
) -> tuple[Any, PruningCallback, Probe]:
    pruning = PruningCallback(hf_worker.SCHEDULE)
    probe = Probe(pruning)
    trainer = transformers.Trainer(
        model=hf_worker.model(),
        args=hf_worker.arguments(str(output_dir), **overrides),
        train_dataset=hf_worker.dataset(),
        callbacks=[pruning, probe],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, pruning, probe


def test_trainer_prunes_at_optimizer_steps_and_logs(tmp_path: Path) -> None:
    trainer, pruning, probe = run_trainer(tmp_path, logging_steps=100, save_strategy="no")
    schedule = hf_worker.SCHEDULE
    pruner = pruning.pruner
    assert pruner is not None
    # accelerate wrapped the optimizer; the pruner is attached to the one it wraps
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert pruner.optimizers == [trainer.optimizer.optimizer]
    assert probe.steps == hf_worker.STEPS  # optimizer steps, not the 24 batches
    total = sum(m.numel() for m in pruner.masks.values())
    assert pruner.sparsity().pruned == round(0.8 * total)
    # a log at every update (t = 3, 5, 7, 9: at t = 1 the target is still 0), with the
    # schedule's value at that step
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in history] == [3, 5, 7, 9]
    assert [t for t in update_points(schedule, 12) if schedule(t) > 0] == [3, 5, 7, 9]
    for h in history:
        assert h["sparsity/target"] == schedule(h["step"])
        assert h["sparsity/actual"] == pytest.approx(round(schedule(h["step"]) * total) / total)
    seen = [log for log in probe.logs if "loss" in log]  # a callback after it sees the keys
    assert [log["sparsity/target"] for log in seen] == [h["sparsity/target"] for h in history]
    state = trainer.optimizer.optimizer.state
    for name, mask in pruner.masks.items():
        param = pruner.model.get_parameter(name)
        assert bool((state[param]["exp_avg"][~mask] == 0).all())


def test_report_to_loggers_get_the_sparsity_when_the_callback_runs_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    pruning = PruningCallback(hf_worker.SCHEDULE)
    args = hf_worker.arguments(str(tmp_path), save_strategy="no", report_to=["tensorboard"])
    trainer = transformers.Trainer(
        model=hf_worker.model(), args=args, train_dataset=hf_worker.dataset()
    )
    trainer.callback_handler.callbacks.insert(0, pruning)  # before TensorBoardCallback
    trainer.train()
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    target = {e.step: e.value for e in events.Scalars("train/sparsity/target")}
    assert "train/sparsity/actual" in scalars
    # every update, and the end-of-training summary (step 12)
    assert target == {t: pytest.approx(hf_worker.SCHEDULE(t)) for t in (3, 5, 7, 9, 12)}


def test_trainer_resume_from_checkpoint_reaches_the_same_masks(tmp_path: Path) -> None:
    full, pruning, _ = run_trainer(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert saved["global_step"] == 4 and saved["last_t"] == 4
    assert saved["target"] == hf_worker.SCHEDULE(3)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir / "checkpoint-4")
    resumed, pruning2, probe = run_trainer(resumed_dir, resume=str(resumed_dir / "checkpoint-4"))
    assert probe.steps == hf_worker.STEPS - 4
    assert pruning.pruner is not None and pruning2.pruner is not None
    for name, mask in pruning.pruner.masks.items():
        assert torch.equal(mask, pruning2.pruner.masks[name]), name
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_resume_without_the_pruning_state_raises(tmp_path: Path) -> None:
    run_trainer(tmp_path, save_steps=4)
    (tmp_path / "checkpoint-4" / STATE_FILE).unlink()
    with pytest.raises(RuntimeError, match="no prunekit state"):
        run_trainer(tmp_path, resume=str(tmp_path / "checkpoint-4"))


def test_resume_with_masks_of_another_run_raises(tmp_path: Path) -> None:
    run_trainer(tmp_path / "a")
    run_trainer(tmp_path / "b", learning_rate=3e-2)  # other weights, other masks
    shutil.copy(tmp_path / "b" / "checkpoint-8" / STATE_FILE, tmp_path / "a" / "checkpoint-8")
    with pytest.raises(RuntimeError, match="another run"):
        run_trainer(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-8"))


def test_callback_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="schedule"):
        PruningCallback(0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope"):
        PruningCallback(Linear(0.0, 0.5, begin=0, end=10), scope="net")
    with pytest.raises(ValueError, match="method"):
        PruningCallback(Linear(0.0, 0.5, begin=0, end=10), method="magnitud")


@pytest.mark.slow
def test_trainer_killed_after_a_checkpoint_resumes_to_identical_masks(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def worker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(WORKER), *args], env=env, capture_output=True, text=True,
            timeout=600, cwd=REPO,
        )  # fmt: skip

    full = worker(str(tmp_path / "full"), str(tmp_path / "full.pt"))
    assert full.returncode == 0, full.stderr[-2000:]
    killed = worker(str(tmp_path / "run"), str(tmp_path / "killed.pt"), "--kill-at", "4")
    assert killed.returncode == -9  # SIGKILL, after checkpoint-4 and one more step
    assert not (tmp_path / "killed.pt").exists()
    assert (tmp_path / "run" / "checkpoint-4" / STATE_FILE).exists()
    assert not (tmp_path / "run" / "checkpoint-8").exists()
    resumed = worker(
        str(tmp_path / "run"), str(tmp_path / "resumed.pt"),
        "--resume", str(tmp_path / "run" / "checkpoint-4"),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert a["step"] == b["step"] == hf_worker.STEPS
    assert a["masks"].keys() == b["masks"].keys()
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
