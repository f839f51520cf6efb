"""What pruning pays: latency of compacted models and size of compressed checkpoints.

1. Latency, compacted / masked-dense, at 50 % of the channel groups of every layer
   (``DependencyGraph.group_masks(0.5)``), for Conv-4 and ResNet-20 (zero-pad shortcuts),
   forward passes on a batch of 64 Fashion-MNIST-sized images, one thread. Next to them,
   the same architecture built by hand at half width (every layer's channels halved, the
   image input and the logits kept): what compaction should reach. The models run
   alternately (order rotating each round); medians. Goal <= 0.35. Then again with the
   models and input in ``torch.channels_last`` memory format (rows ``-cl``), where oneDNN
   picks other convolution kernels.
2. Checkpoint size, compressed (bitmask + kept values) / dense ``torch.save``, at 90 %
   global unstructured magnitude sparsity, next to torch's CSR format. Goal <= 0.15.

Run on a quiet machine: ``.venv/bin/python -m benchmarks.compact`` (about a minute);
``--quick`` for a small check that it works.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import torch
from prunekit.experiments.models import build_model
from torch import nn

from benchmarks._common import median, rotated
from prunekit import DependencyGraph, Pruner, compact, compress_state_dict, model_cost

MODELS = ("conv4", "resnet20")
LATENCY_GOAL, SIZE_GOAL = 0.35, 0.15
FORMATS = {"": torch.contiguous_format, "-cl": torch.channels_last}


def _with_bn_statistics(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@torch.inference_mode()
def _time(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def latency(
    name: str, batch: int, rounds: int, memory_format: torch.memory_format = torch.contiguous_format
) -> dict[str, float]:
    torch.manual_seed(0)
    model = _with_bn_statistics(build_model(name))
    example = torch.randn(1, 1, 28, 28)
    graph = DependencyGraph(model, example)
    masks = graph.group_masks(0.5)
    Pruner(model, targets=graph.param_names).set_masks(masks)
    small = compact(model, example, masks=masks).eval()
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        error = float((model(x) - small(x)).abs().max())
    variants = {"masked": model, "compact": small, "half": _half_width(build_model(name)).eval()}
    x = x.contiguous(memory_format=memory_format)
    for m in variants.values():
        m.to(memory_format=memory_format)
    for m in variants.values():
        for _ in range(3):
            _time(m, x)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        for key in rotated(list(variants), r):
            times[key].append(_time(variants[key], x))
    dense_ms, small_ms, half_ms = (1e3 * median(times[k]) for k in ("masked", "compact", "half"))
    cost, small_cost = model_cost(model, example), model_cost(small, example)
    return {
        "masked_ms": dense_ms,
        "compact_ms": small_ms,
        "ratio": small_ms / dense_ms,
        "half_ratio": half_ms / dense_ms,
        "half_macs_ratio": model_cost(variants["half"], example).macs / cost.macs,
        "params_ratio": small_cost.params / cost.params,
        "macs_ratio": small_cost.macs / cost.macs,
        "max_abs_error": error,
    }


def _half_width(model: nn.Module) -> nn.Module:
    """``model`` rebuilt with every Conv / Linear / BatchNorm at half its channels, except
    the first layer's input (the image) and the last layer's output (the logits); the
    zero-pad shortcuts of ResNet blocks (``pad``) halve with them. Fresh weights."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    first, last = layers[0][0], layers[-1][0]
    for name, mod in list(model.named_modules()):
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        leaf = name.rpartition(".")[2]
        if isinstance(mod, nn.Conv2d):
            cin = mod.in_channels if name == first else mod.in_channels // 2
            cout = mod.out_channels if name == last else mod.out_channels // 2
            new: nn.Module = nn.Conv2d(
                cin, cout, mod.kernel_size, mod.stride, mod.padding, bias=mod.bias is not None
            )
        elif isinstance(mod, nn.Linear):
            fin = mod.in_features if name == first else mod.in_features // 2
            fout = mod.out_features if name == last else mod.out_features // 2
            new = nn.Linear(fin, fout, bias=mod.bias is not None)
        elif isinstance(mod, nn.BatchNorm2d):
            new = nn.BatchNorm2d(mod.num_features // 2)
        else:
            if isinstance(getattr(mod, "pad", None), int):
                mod.pad //= 2
            continue
        setattr(parent, leaf, new)
    return model


def _saved(obj: object) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def _csr(t: torch.Tensor) -> torch.Tensor:
    """torch's CSR form of ``t`` (as 2-d), its parts copied out: ``to_sparse_csr`` leaves
    the column indices in a storage twice their size, which ``torch.save`` writes whole."""
    c = t.reshape(t.shape[0], -1).to_sparse_csr()
    parts = (c.crow_indices().clone(), c.col_indices().clone(), c.values().clone())
    return torch.sparse_csr_tensor(*parts, c.shape)


def checkpoint_size(name: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(name)
    Pruner(model).prune_to(0.9)
    state = model.state_dict()
    dense = _saved(state)
    csr = {k: _csr(v) if v.dim() > 1 else v for k, v in state.items()}
    return {
        "dense_bytes": dense,
        "bitmask_ratio": _saved(compress_state_dict(state)) / dense,
        "csr_ratio": _saved(csr) / dense,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="batch 8, 5 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.rounds = 8, 5
    torch.set_num_threads(1)
    print(f"load average at start: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, 1 thread")
    print(f"\nlatency at 50 % of channel groups, batch {args.batch}, {args.rounds} rounds (median)")
    print(
        f"{'model':<10}{'masked ms':>11}{'compact ms':>12}{'ratio':>8}{'params':>8}{'MACs':>8}"
        f"{'max err':>10}{'by hand':>9}{'MACs':>7}  goal <= {LATENCY_GOAL}"
    )
    for name, fmt in [(m, f) for f in FORMATS for m in MODELS]:
        r = latency(name, args.batch, args.rounds, FORMATS[fmt])
        print(
            f"{name + fmt:<10}{r['masked_ms']:>11.2f}{r['compact_ms']:>12.2f}{r['ratio']:>8.3f}"
            f"{r['params_ratio']:>8.3f}{r['macs_ratio']:>8.3f}{r['max_abs_error']:>10.1e}"
            f"{r['half_ratio']:>9.3f}{r['half_macs_ratio']:>7.3f}"
            f"  {'met' if r['ratio'] <= LATENCY_GOAL else 'MISSED'}"
        )
    print("(by hand: the architecture built at half width, latency and MACs / masked;")
    print(" -cl: all three models and the input in channels_last memory format)")
    print("\ncheckpoint size at 90 % unstructured (global magnitude), ratio to dense torch.save")
    print(f"{'model':<15}{'dense bytes':>12}{'bitmask':>9}{'CSR':>7}  goal <= {SIZE_GOAL}")
    for name in ("lenet_300_100", *MODELS):
        s = checkpoint_size(name)
        print(
            f"{name:<15}{s['dense_bytes']:>12,}{s['bitmask_ratio']:>9.3f}{s['csr_ratio']:>7.3f}"
            f"  {'met' if s['bitmask_ratio'] <= SIZE_GOAL else 'MISSED'}"
        )
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
