"""Global magnitude pruning of a row-sharded model (DTensor ``Shard(0)``, as FSDP2 lays
it out) on WORLD gloo CPU processes: prunekit (histograms and counts all-reduced) against
what one would otherwise write (gather the full weights on rank 0, ``kthvalue`` there,
broadcast the threshold). Wall time (slowest rank) and bytes each rank sends.

Usage::

    .venv/bin/python benchmarks/sharded.py --size 200M --world 2 4
    .venv/bin/python benchmarks/sharded.py --size 2M --world 2      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import parse_size
from prunekit import Pruner, _distributed

SPARSITY = 0.9


def _model(size: int, tensors: int, world: int, rank: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    cols = 1024
    rows = max(1, size // tensors // cols)
    model = nn.Module()
    for i in range(tensors):
        g = torch.Generator().manual_seed(1000 * i + rank)
        chunk = -(-rows // world)  # Shard(0) splits rows as torch.chunk does
        here = max(0, min(chunk, rows - rank * chunk))
        shard = torch.randn(here, cols, generator=g)  # each rank makes its own block
        param = DTensor.from_local(shard, mesh, [Shard(0)], shape=(rows, cols), stride=(cols, 1))
        model.register_parameter(f"w{i}", nn.Parameter(param, requires_grad=False))
    return model


def _run(rank: int, world: int, port: int, size: int, tensors: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _model(size, tensors, world, rank)
    params = [p for _, p in model.named_parameters()]
    total = sum(p.numel() for p in params)
    rss_model = _peak_rss_mb()

    # prunekit: histograms and counts all-reduced
    pruner = Pruner(model, targets="*")
    dist.barrier()
    sent = _distributed.reduced_bytes
    start = time.perf_counter()
    pruner.prune_to(SPARSITY)
    dist.barrier()
    t_prunekit = time.perf_counter() - start
    sent = _distributed.reduced_bytes - sent
    pruned = pruner.sparsity().pruned
    rss_prunekit = _peak_rss_mb()

    # the alternative: gather every weight on rank 0, kthvalue there, broadcast the threshold
    dist.barrier()
    start = time.perf_counter()
    local = torch.cat([p.to_local().reshape(-1) for p in params])
    sizes = [torch.zeros((), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(local.numel()))
    longest = int(max(sizes))  # gloo gathers equal sizes: pad, then trim
    padded = torch.cat([local, local.new_zeros(longest - local.numel())])
    gathered = [torch.empty(longest) for _ in sizes] if rank == 0 else None
    dist.gather(padded, gathered, dst=0)
    threshold = torch.zeros(())
    if rank == 0:
        assert gathered is not None
        weights = torch.cat([g[: int(n)] for g, n in zip(gathered, sizes, strict=True)])
        threshold = weights.abs_().kthvalue(round(SPARSITY * total)).values
    dist.broadcast(threshold, src=0)
    masks = [p.to_local().abs() > threshold for p in params]
    dist.barrier()
    t_gather = time.perf_counter() - start
    del masks, gathered, padded
    # peak resident memory (MB) of the most loaded rank: after building the model, after
    # prunekit's prune (masks included), after the gather (rank 0 holds every weight)
    peaks = torch.tensor([rss_model, rss_prunekit, _peak_rss_mb()], dtype=torch.float64)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.write_text(
            json.dumps(
                {
                    "world": world,
                    "parameters": total,
                    "prunekit_s": t_prunekit,
                    "prunekit_bytes_per_rank": sent,
                    "pruned": pruned,
                    "exact": pruned == round(SPARSITY * total),
                    "gather_s": t_gather,
                    "gather_bytes_per_sending_rank": local.numel() * 4,
                    "peak_rss_mb": {
                        "model": peaks[0].item(),
                        "after_prunekit": peaks[1].item(),
                        "after_gather": peaks[2].item(),
                    },
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(size: int, tensors: int, world: int) -> dict[str, Any]:
    out = Path(f"/tmp/prunekit_sharded_{os.getpid()}_{world}.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(world, port, size, tensors, out), nprocs=world)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="200M")
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    results = []
    for world in args.world:
        r = measure(parse_size(args.size), args.tensors, world)
        results.append(r)
        print(
            f"world {world}, {r['parameters']:,} parameters: prunekit {r['prunekit_s']:.2f} s, "
            f"{r['prunekit_bytes_per_rank'] / 1e6:.2f} MB all-reduced per rank, exact={r['exact']} | "
            f"gather + kthvalue {r['gather_s']:.2f} s, "
            f"{r['gather_bytes_per_sending_rank'] / 1e6:.0f} MB sent per rank | peak RSS of "
            f"the most loaded rank: model {r['peak_rss_mb']['model']:.0f} MB, after prunekit "
            f"{r['peak_rss_mb']['after_prunekit']:.0f} MB, after gather "
            f"{r['peak_rss_mb']['after_gather']:.0f} MB",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
