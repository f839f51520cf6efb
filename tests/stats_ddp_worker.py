"""Run by tests/test_stats.py: one rank of a 2-process gloo group; every data-aware method
collects statistics on this rank's own data and prunes; writes OUT/rank<r>.json.

Usage: python tests/stats_ddp_worker.py OUT RANK WORLD   (MASTER_ADDR/PORT in the env)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prunekit import Pruner
from tests.test_stats import data, net


def sum_loss(out: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(out, batch[1], reduction="sum")


def main() -> None:
    torch.set_num_threads(1)
    out, rank, world = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    record: dict[str, dict[str, list]] = {}
    mine = data(100 + rank)
    for method, scope in (
        ("wanda", "global"),
        ("taylor", "global"),
        ("snip", "global"),
        ("activation", "layer"),
    ):
        model = net()
        pruner = Pruner(model, method=method, scope=scope)
        pruner.calibrate([mine], sum_loss)
        pruner.prune_to(0.5)
        record[method] = {n: m.tolist() for n, m in pruner.masks.items()}
    # movement while training under DDP, with a checkpoint's state_dict on every rank
    model = net()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.3)
    pruner = Pruner(model, method="movement").attach(optimizer)
    for step in range(4):
        x, y = data(200 + 10 * step + rank)
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            pruner.prune_to(0.4)
    state = pruner.state_dict()  # all-reduces the statistics: every rank calls it
    pruner.prune_to(0.7)
    record["movement"] = {n: m.tolist() for n, m in pruner.masks.items()}
    record["movement_state_backwards"] = {
        n: e["counts"]["backwards"] for n, e in state["stats"]["targets"].items()
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo threads could abort a finished worker at interpreter exit


if __name__ == "__main__":
    main()
