"""Training-step time with 90 % masks attached, against the dense model.

Variants, each on its own copy of the same initial weights:

``dense``        no pruning;
``prunekit``     ``Pruner(model, scope="global").prune_to(0.9)`` then ``.attach(optimizer)``
                 (gradient hooks + an optimizer step post-hook; the forward is untouched);
``torch_prune``  ``torch.nn.utils.prune.global_unstructured`` at 90 % on the same
                 parameters (a forward pre-hook recomputes ``weight = weight_orig * mask``).

Each round runs a block of steps of every variant, in an order that rotates from round to
round; per-step wall times are pooled per variant and their medians compared.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from benchmarks._common import log, median, rotated, wait_for_quiet

VARIANTS = ("dense", "prunekit", "torch_prune")
SPARSITY = 0.9


class _Transformer(nn.Module):
    """A 6-layer encoder on random embeddings, mean-pooled into a 10-way classifier."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(384, 6, 1536, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.head = nn.Linear(384, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def lenet() -> nn.Module:
    """LeNet-300-100."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def conv4() -> nn.Module:
    """Conv-4-like: two pairs of 3x3 convolutions (64, 128) with pooling, then FC 256-256-10."""

    def pair(cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    return nn.Sequential(
        *pair(1, 64),
        *pair(64, 128),
        nn.Flatten(),
        nn.Linear(128 * 7 * 7, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


@dataclass(frozen=True)
class Case:
    """One model, its input, its optimizer, and the time this benchmark may spend on it."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    budget_s: float  # wall time for all timed steps of all variants (default run)


CASES = (
    Case(
        "lenet",
        "LeNet-300-100, batch 60, Adam",
        lenet,
        (60, 1, 28, 28),
        lambda p: torch.optim.Adam(p, lr=1e-3),
        40.0,
    ),
    Case(
        "lenet_fused",
        "LeNet-300-100, batch 60, Adam(fused=True)",
        lenet,
        (60, 1, 28, 28),
        lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
        40.0,
    ),
    Case(
        "conv4",
        "Conv-4-like (64,64,128,128 conv + FC 256,256,10), 1x28x28, batch 128, SGD momentum",
        conv4,
        (128, 1, 28, 28),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        60.0,
    ),
    Case(
        "transformer",
        "6-layer TransformerEncoder (d 384, 6 heads, ff 1536), seq 128, batch 16, AdamW",
        _Transformer,
        (16, 128, 384),
        lambda p: torch.optim.AdamW(p, lr=1e-4),
        75.0,
    ),
)


@dataclass
class _Runner:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    targets: list[tuple[nn.Module, str]]  # (module, attribute) of the pruned weights
    times: list[float]
    pruner: Any = None  # prunekit's Pruner, kept alive with its hooks


def _target_names(model: nn.Module) -> list[str]:
    """The parameters prunekit targets by default; torch.prune gets the same ones."""
    from prunekit import Pruner

    return Pruner(copy.deepcopy(model), scope="global").names


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module, _, attr = name.rpartition(".")
    return model.get_submodule(module), attr


def _recompute_out_proj(module: nn.Module, args: Any) -> None:
    """MultiheadAttention reads ``out_proj.weight`` without calling ``out_proj``, so
    torch.prune's hook on it never runs (the second backward then fails); run it here."""
    for hook in module.out_proj._forward_pre_hooks.values():
        hook(module.out_proj, args)


def _make(variant: str, case: Case, initial: nn.Module, names: list[str]) -> _Runner:
    model = copy.deepcopy(initial)
    targets = [_split(model, n) for n in names]
    if variant == "torch_prune":
        torch_prune.global_unstructured(
            targets, pruning_method=torch_prune.L1Unstructured, amount=SPARSITY
        )
        for module in model.modules():
            if isinstance(module, nn.MultiheadAttention):
                module.register_forward_pre_hook(_recompute_out_proj)
    optimizer = case.optimizer(model.parameters())
    pruner = None
    if variant == "prunekit":
        from prunekit import Pruner

        pruner = Pruner(model, scope="global")
        pruner.prune_to(SPARSITY)
        pruner.attach(optimizer)
    return _Runner(model, optimizer, targets, [], pruner)


def _step(runner: _Runner, x: Tensor, y: Tensor) -> float:
    start = time.perf_counter()
    runner.optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(runner.model(x), y).backward()
    runner.optimizer.step()
    return time.perf_counter() - start


def _zeros(runner: _Runner) -> tuple[int, int]:
    """(zeros, total) over the pruned weights as the forward pass sees them."""
    zeros = total = 0
    with torch.no_grad():
        for module, attr in runner.targets:
            weight = getattr(module, attr)
            if hasattr(module, attr + "_mask"):  # torch.prune: recompute orig * mask
                weight = getattr(module, attr + "_orig") * getattr(module, attr + "_mask")
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros, total


def run_case(
    case: Case, *, rounds: int, budget_scale: float, min_steps: int = 3, seed: int = 0
) -> dict[str, Any]:
    """Time one model: ``rounds`` interleaved blocks per variant; medians and ratios."""
    torch.manual_seed(seed)
    initial = case.build()
    names = _target_names(initial)
    x = torch.randn(case.input_shape)
    y = torch.randint(0, 10, (case.input_shape[0],))
    runners = {v: _make(v, case, initial, names) for v in VARIANTS}
    for runner in runners.values():  # warm up allocator, kernels, optimizer state
        _step(runner, x, y)
    probe = median([_step(runners["dense"], x, y) for _ in range(min_steps - 1)]) or 1e-3
    budget = case.budget_s * budget_scale
    steps = int(min(200, max(min_steps, budget / (rounds * len(VARIANTS) * probe))))
    rewarm = probe < 0.25  # small models: one untimed step after the other variants ran
    log(
        f"step {case.name}: ~{probe * 1e3:.1f} ms/step, {rounds} rounds x {steps} steps per variant"
    )
    per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        for variant in rotated(VARIANTS, r):
            runner = runners[variant]
            wait_for_quiet()
            if rewarm:
                _step(runner, x, y)
            block = [_step(runner, x, y) for _ in range(steps)]
            runner.times.extend(block)
            per_round[variant].append(median(block) or 0.0)
            log(
                f"step {case.name} round {r + 1}/{rounds} {variant}: "
                f"median {per_round[variant][-1] * 1e3:.2f} ms/step"
            )
    dense = median(runners["dense"].times) or float("nan")
    variants: dict[str, Any] = {}
    for variant, runner in runners.items():
        ratios = [a / b for a, b in zip(per_round[variant], per_round["dense"], strict=True)]
        zeros, total = _zeros(runner)
        variants[variant] = {
            "median_step_ms": (median(runner.times) or 0.0) * 1e3,
            "ratio_to_dense": (median(runner.times) or 0.0) / dense,
            "round_ratios": ratios,
            "steps": len(runner.times),
            "target_zeros": zeros,
            "target_total": total,
        }
    return {
        "model": case.name,
        "description": case.description,
        "params": sum(p.numel() for p in initial.parameters()),
        "targets": len(names),
        "target_params": variants["dense"]["target_total"],
        "expected_zeros": round(SPARSITY * variants["dense"]["target_total"]),
        "rounds": rounds,
        "steps_per_block": steps,
        "variants": variants,
    }


def run(*, quick: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """Every model; ``quick`` shortens the blocks."""
    rounds, scale, min_steps = (2, 0.15, 2) if quick else (5, 1.0, 3)
    return [
        run_case(case, rounds=rounds, budget_scale=scale, min_steps=min_steps, seed=seed)
        for case in CASES
    ]
