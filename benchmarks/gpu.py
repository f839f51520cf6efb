"""prunekit on one device (a GPU, or the CPU at a small size so that this cannot rot).

Checks exact counts and measures:

1. global magnitude pruning of ``--size`` parameters (``--tensors`` equal tensors) to
   ``--sparsity``, against ``torch.kthvalue`` and ``torch.topk`` of the concatenated
   magnitudes on the same device, and against one read of the weights
   (``sum(w.abs().sum())``);
2. the step time of a small transformer under bf16 autocast with fused AdamW, pruned
   (90 %, masks attached) against dense, in alternating blocks, medians.

Usage::

    .venv/bin/python benchmarks/gpu.py --device cuda --size 1B
    .venv/bin/python benchmarks/gpu.py --device cpu --size 2M --steps 5   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunekit import Pruner, global_magnitude_masks

_UNITS = {"k": 10**3, "M": 10**6, "B": 10**9}


def parse_size(text: str) -> int:
    """``"1B"`` -> 10**9.

    >>> parse_size("200M"), parse_size("50k"), parse_size("1234")
    (200000000, 50000, 1234)
    """
    if text and text[-1] in _UNITS:
        return int(float(text[:-1]) * _UNITS[text[-1]])
    return int(text)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).synchronize()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median wall time of ``fn`` (after one warm-up call) and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def global_prune(
    device: torch.device, size: int, tensors: int, sparsity: float, repeats: int
) -> dict:
    """Part 1: exact counts and times of global pruning, kthvalue, topk and one read."""
    g = torch.Generator(device=device).manual_seed(0)
    each = size // tensors
    weights = {f"w{i}": torch.randn(each, generator=g, device=device) for i in range(tensors)}
    total = each * tensors
    k = round(sparsity * total)

    t_prune, masks = timed(lambda: global_magnitude_masks(weights, sparsity), device, repeats)
    pruned = sum(int((~m).sum()) for m in masks.values())
    kept_min = min(
        float(w.abs()[m].min()) for w, m in zip(weights.values(), masks.values(), strict=True)
    )
    pruned_max = max(
        float(w.abs()[~m].max()) for w, m in zip(weights.values(), masks.values(), strict=True)
    )

    def kth() -> torch.Tensor:
        return torch.cat([w.abs() for w in weights.values()]).kthvalue(k).values

    def top() -> torch.Tensor:  # the kept entries: the N - k largest
        return torch.cat([w.abs() for w in weights.values()]).topk(total - k).values.min()

    def read() -> torch.Tensor:
        return sum(w.abs().sum() for w in weights.values())

    t_kth, kth_value = timed(kth, device, repeats)
    t_topk, topk_value = timed(top, device, repeats)
    t_read, _ = timed(read, device, repeats)
    exact = pruned == k and pruned_max <= kept_min and pruned_max <= float(kth_value) <= kept_min
    exact = exact and float(topk_value) == kept_min
    return {
        "parameters": total,
        "pruned": pruned,
        "expected": k,
        "exact": exact,
        "prunekit_s": t_prune,
        "kthvalue_s": t_kth,
        "topk_s": t_topk,
        "one_read_s": t_read,
        "prunekit_over_one_read": t_prune / t_read,
    }


def step_overhead(device: torch.device, width: int, layers: int, steps: int, rounds: int) -> dict:
    """Part 2: per-step time under bf16 autocast with fused AdamW, pruned vs dense."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(width, max(1, width // 64), 4 * width, batch_first=True)
    base = nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False))
    x = torch.randn(8, 64, width, device=device)
    runs = {}
    for variant in ("dense", "pruned"):
        model = _copy(base).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        pruner = None
        if variant == "pruned":
            pruner = Pruner(model)
            pruner.prune_to(0.9)
            pruner.attach(optimizer)
        runs[variant] = (model, optimizer, pruner)

    def block(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
        times = []
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
        return times

    pooled: dict[str, list[float]] = {v: [] for v in runs}
    for r in range(rounds + 1):  # round 0 warms up
        order = list(runs) if r % 2 else list(runs)[::-1]
        for variant in order:
            times = block(*runs[variant][:2])
            if r:
                pooled[variant].extend(times)
    model, _, pruner = runs["pruned"]
    assert pruner is not None
    still_zero = all(
        bool((p[~pruner.masks[n]] == 0).all())
        for n, p in model.named_parameters()
        if n in pruner.masks
    )
    dense, pruned = statistics.median(pooled["dense"]), statistics.median(pooled["pruned"])
    return {
        "dense_step_s": dense,
        "pruned_step_s": pruned,
        "overhead": pruned / dense - 1,
        "pruned_stay_zero": still_zero,
        "sparsity": pruner.sparsity().fraction,
    }


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default="1B", help="parameters pruned globally (1B, 200M, 2M...)")
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=1024, help="transformer width")
    parser.add_argument("--layers", type=int, default=8, help="transformer layers")
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks per variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "global_prune": global_prune(
            device, parse_size(args.size), args.tensors, args.sparsity, args.repeats
        ),
        "step": step_overhead(device, args.width, args.layers, args.steps, args.rounds),
    }
    g, s = results["global_prune"], results["step"]
    print(f"{results['device_name']} ({results['torch']})")
    print(
        f"global prune of {g['parameters']:,} to {args.sparsity}: exact={g['exact']} "
        f"({g['pruned']:,} pruned, {g['expected']:,} asked)\n"
        f"  prunekit {g['prunekit_s'] * 1e3:.1f} ms | kthvalue {g['kthvalue_s'] * 1e3:.1f} ms | "
        f"topk {g['topk_s'] * 1e3:.1f} ms | one read {g['one_read_s'] * 1e3:.1f} ms "
        f"(prunekit = {g['prunekit_over_one_read']:.1f} reads)"
    )
    print(
        f"step (bf16 autocast, fused AdamW, {args.layers}x{args.width} transformer): dense "
        f"{s['dense_step_s'] * 1e3:.2f} ms, pruned 90 % {s['pruned_step_s'] * 1e3:.2f} ms "
        f"({s['overhead']:+.1%}); pruned weights stay zero: {s['pruned_stay_zero']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
