"""Run by tests/test_sharded.py: prunes a model sharded over WORLD gloo CPU processes
(FSDP2 ``fully_shard``, or tensor-parallel ``Shard(1)``) and, in the same processes, an
unsharded copy of it with a plain Pruner; rank 0 saves both sets of masks.

Usage: python tests/sharded_worker.py OUT WORLD SHARDING [LOAD]
SHARDING is "fsdp" or "tp". OUT/result.pt gets {case: (sharded masks, single masks,
reported pruned counts)}; OUT/state.pt the sharded Pruner's state after the "global"
case. With LOAD (a state.pt from another world size), that state is loaded first and
the masks it restores are recorded as case "loaded".
"""

from __future__ import annotations

import copy
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunekit import Pruner
from prunekit._distributed import (
    Layout,
    Sharding,
    _slice_scores,
    exact_slice_norms,
    place_mask,
)


def make_model(ties: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Shapes that split unevenly over 2 and 4 ranks (7, 13 and 5 rows).

    float64 models hold values that float32 could not tell apart: few distinct values,
    each moved by a different multiple of 1e-10 (below float32's resolution), so ranking
    them in float32 would tie them and prune other entries than one float64 process.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5)
    ).to(dtype)
    if ties or dtype == torch.float64:  # few distinct values: long runs of equal magnitudes
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 8).round() / 8)
                if dtype == torch.float64:
                    p.add_(torch.randint(-50, 50, p.shape, generator=g, dtype=dtype) * 1e-10)
    return model


def shard(model: nn.Module, sharding: str, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    if sharding == "fsdp":
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        return fully_shard(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(1)]))
    return model


def full(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (m.full_tensor() if isinstance(m, DTensor) else m).clone() for n, m in masks.items()}


def scores_for(
    model: nn.Module, names: list[str], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    scores = {n: torch.randn(params[n].shape, generator=g) for n in names}
    if dtype == torch.float64:  # ties that only float64 breaks, against the index order
        for n, s in scores.items():
            later = torch.arange(s.numel(), dtype=torch.float64).view(s.shape)
            scores[n] = (s * 4).round().double() + 100 - later * 1e-13
    return scores


def raising(case: str, sharding: str, world: int) -> list[str]:
    """Every rank's error message (all ranks must raise, none may hang)."""
    kwargs, steps = RAISING[case]
    model = shard(make_model(False), sharding, world)
    pruner = Pruner(model, **kwargs)
    before = full(pruner.masks)
    try:
        for amount in steps:
            pruner.prune_to(amount)
        message = "did not raise"
    except ValueError as e:
        message = str(e)
    unchanged = all(torch.equal(m, before[n]) for n, m in full(pruner.masks).items())
    messages: list[Any] = [None] * world
    dist.all_gather_object(messages, (message, unchanged))
    return messages


def exact_norms(sharding: str, world: int) -> dict[tuple[str, int, int], tuple[Any, Any]]:
    """The slice scores of the sharded structured path when slices are split across
    ranks (L1 and L2 along both dims, forced onto the split-slices route even where a
    rank holds whole slices), next to exact_slice_norms of the whole weight."""
    from torch.distributed.tensor import DTensor

    model = shard(make_model(False), sharding, world)
    out = {}
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor) or p.ndim != 2:
            continue
        whole = p.full_tensor()
        sharded = Sharding.of([p])
        assert sharded is not None
        layout = Layout.of(p)
        for n in (1, 2):
            for dim in (0, 1):
                scores = _slice_scores(
                    p.to_local().detach(),
                    n,
                    dim,
                    [1 - dim],
                    False,
                    p.shape[dim],
                    layout.offset[dim],
                    layout.local[dim],
                    float(sharded.owns[0]),
                    sharded,
                )
                out[(name, n, dim)] = (scores, exact_slice_norms(whole, n, dim))
    return out


def set_full_masks(sharding: str, world: int) -> tuple[Any, Any]:
    """Pruner.set_masks given whole (unsharded) masks on a sharded model: the masks it
    leaves (or the error each rank raised), and one process's masks for the same input."""
    base = make_model(False)
    single_model, sharded_model = copy.deepcopy(base), shard(copy.deepcopy(base), sharding, world)
    single, sharded = Pruner(single_model), Pruner(sharded_model)
    g = torch.Generator().manual_seed(11)
    given = {n: torch.rand(m.shape, generator=g) > 0.4 for n, m in single.masks.items()}
    single.set_masks(given)
    try:
        sharded.set_masks(given)
        outcome: Any = full(sharded.masks)
    except (ValueError, TypeError, RuntimeError) as e:
        outcome = f"{type(e).__name__}: {e}"
    outcomes: list[Any] = [None] * world
    dist.all_gather_object(outcomes, outcome if isinstance(outcome, str) else "ok")
    # what set_masks does once it places each given mask with place_mask (the Pruner
    # call-site change this helper is for), done here by hand
    helped = Pruner(shard(copy.deepcopy(base), sharding, world))
    helped.set_masks({n: place_mask(m, helped.masks[n], f"masks[{n!r}]") for n, m in given.items()})
    # a whole mask that differs between ranks is refused on every rank, nothing changed
    skewed = {n: m ^ (dist.get_rank() == 1) for n, m in given.items()}
    refused: Any = None
    try:
        place_mask(skewed["0.weight"], helped.masks["0.weight"], "masks['0.weight']")
    except ValueError as e:
        refused = str(e)
    refusals: list[Any] = [None] * world
    dist.all_gather_object(refusals, refused)
    return outcome, outcomes, full(single.masks), full(helped.masks), refusals


def place(full_scores: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The scores laid out as the (possibly sharded) parameters are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    out = {}
    for n, s in full_scores.items():
        p = params[n]
        out[n] = distribute_tensor(s, p.device_mesh, p.placements) if isinstance(p, DTensor) else s
    return out


CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # case: (Pruner arguments, successive prune_to sparsities)
    "global": ({}, [0.3, 0.6]),
    "layer": ({"scope": "layer"}, [0.5]),
    "random": ({"method": "random", "seed": 4}, [0.45, 0.7]),
    "scores": ({}, ["scores"]),
    "ties": ({}, [0.37, 0.81]),
    "ln_rows": ({"method": "ln_structured", "scope": "layer", "dim": 0}, [0.4]),
    "ln_cols": ({"method": "ln_structured", "scope": "layer", "dim": 1, "n": 1}, [0.4]),
    "ln_inf": ({"method": "ln_structured", "scope": "layer", "dim": 1, "n": float("inf")}, [0.3]),
    "random_rows": ({"method": "random_structured", "scope": "layer", "dim": 0}, [0.3, 0.5]),
    "nm": ({"targets": {"0.weight": {"method": "nm", "n": 2, "m": 4, "dim": 1}}}, [0.5]),
    # groups of 3 along dim 1 (width 12): whole groups on every rank of Shard(1) too
    "nm3": ({"targets": {"0.weight": {"method": "nm", "n": 2, "m": 3, "dim": 1}}}, [0.5]),
    # float64 weights (values float32 cannot tell apart): 64-bit keys across ranks
    "f64_global": ({}, [0.3, 0.6]),
    "f64_layer": ({"scope": "layer"}, [0.45]),
    "f64_scores": ({}, ["scores:0.5"]),  # 18 of the 30 scores tied in float32 go
    "f64_ln_rows": ({"method": "ln_structured", "scope": "layer", "dim": 0}, [0.4]),
    "f64_ln_cols_inf": (
        {"method": "ln_structured", "scope": "layer", "dim": 1, "n": float("inf")},
        [0.3],
    ),
}
TP_SKIP = ("nm", "f64_ln_rows")  # Shard(1) splits rows: N:M groups; float64 sums round

# Cases that must raise the same error on every rank (recorded as ("raised", messages)).
# Shard(1) of the 12 input columns leaves 6 (2 ranks) or 3 (4 ranks) per rank: groups of
# 4 along dim 1 cross ranks.
RAISING: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "nm_split": ({"targets": {"0.weight": {"method": "nm", "n": 2, "m": 4, "dim": 1}}}, [0.5]),
}


def run(rank: int, world: int, port: int, out: Path, sharding: str, load: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    wanted = os.environ.get("SHARDED_CASES", ",".join(CASES)).split(",")
    results: dict[str, Any] = {}
    for case in wanted:
        if case in RAISING:
            results[case] = raising(case, sharding, world)
            continue
        if case == "set_full":
            results[case] = set_full_masks(sharding, world)
            continue
        if case == "exact_norms":
            results[case] = exact_norms(sharding, world)
            continue
        kwargs, steps = CASES[case]
        if sharding == "tp" and case in TP_SKIP:
            continue
        dtype = torch.float64 if case.startswith("f64") else torch.float32
        base = make_model(ties=case == "ties", dtype=dtype)
        single_model, sharded_model = (
            copy.deepcopy(base),
            shard(copy.deepcopy(base), sharding, world),
        )
        single, sharded = Pruner(single_model, **kwargs), Pruner(sharded_model, **kwargs)
        for amount in steps:
            if isinstance(amount, str):  # "scores" or "scores:SPARSITY"
                sparsity = float(amount.partition(":")[2] or 0.55)
                scores = scores_for(single_model, single.names, dtype)
                single.prune_to(sparsity, scores=scores)
                sharded.prune_to(sparsity, scores=place(scores, sharded_model))
            else:
                single.prune_to(amount)
                sharded.prune_to(amount)
        report = sharded.sparsity()
        results[case] = (
            full(sharded.masks),
            full(single.masks),
            [t.pruned for t in report.targets],
        )
        if case == "global":
            state = sharded.state_dict()
            if rank == 0:
                torch.save(state, out / "state.pt")
        if case == "global" and sharding == "fsdp":  # (tp shards only the weights: no forward)
            # training keeps the pruned weights at zero through the step hooks
            optimizer = torch.optim.Adam(sharded_model.parameters(), lr=0.1)
            sharded.attach(optimizer)
            for _ in range(2):
                sharded_model(torch.randn(4, 12)).square().sum().backward()
                optimizer.step()
                optimizer.zero_grad()
            params = dict(sharded_model.named_parameters())
            weights = {n: _full(params[n].detach()) for n in sharded.names}
            moments = {n: _full(optimizer.state[params[n]]["exp_avg"]) for n in sharded.names}
            results["trained"] = (weights, moments, full(sharded.masks))
    if load:
        model = shard(make_model(False), sharding, world)
        pruner = Pruner(model)
        pruner.load_state_dict(torch.load(load, weights_only=False))
        params = dict(model.named_parameters())
        results["loaded"] = (
            full(pruner.masks),
            {n: _full(params[n].detach()) for n in pruner.names},
            [t.pruned for t in pruner.sparsity().targets],
        )
    if rank == 0:
        torch.save(results, out / "result.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads can race them at
    # interpreter exit and abort a worker whose work is finished ("terminate called
    # without an active exception"); the results are already written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).clone()


def main() -> None:
    out, world, sharding = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    load = sys.argv[4] if len(sys.argv) > 4 else None
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(world, port, out, sharding, load), nprocs=world)


if __name__ == "__main__":
    main()
