"""Global magnitude pruning to 90 % of large stacks of ``nn.Linear`` layers.

Three methods, each measured in a freshly spawned interpreter per (method, size, repeat),
so that peak memory cannot leak from one measurement into the next:

``prunekit``
    ``Pruner(model, scope="global")`` (allocates the bool masks), then ``prune_to(0.9)``.
``torch_prune``
    ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=0.9)``.
``concat_kthvalue``
    ``|w|`` of every layer copied into one flat buffer, ``torch.kthvalue`` for the
    threshold, masks ``|w| > threshold``, weights multiplied by them.

A worker builds the model from a seed (random normal weights), records its RSS, resets
the kernel's peak-RSS mark, runs the method and reports wall times and peak RSS above
that baseline. Afterwards (untimed) it checks the result against the regenerated weights:
the pruned count, the zeros in the weights, the threshold (largest pruned ``|w|``), that
no kept ``|w|`` is below it, and a digest of the masks to compare across methods.

Run a single measurement with ``python -m benchmarks.global_prune METHOD WIDTH LAYERS SEED``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import multiprocessing
import re
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from benchmarks import _memory
from benchmarks._common import (
    available_memory_bytes,
    log,
    median,
    rotated,
    wait_for_quiet,
)

METHODS = ("prunekit", "torch_prune", "concat_kthvalue")
SPARSITY = 0.9
#: Extra bytes per parameter assumed before a method has been measured on this machine
#: (used only to refuse runs that cannot fit in memory).
_GUESS_EXTRA_PER_PARAM = {"prunekit": 2.0, "torch_prune": 53.0, "concat_kthvalue": 16.5}
_MEMORY_MARGIN = 0.9  # use at most this fraction of MemAvailable
_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}


# --------------------------------------------------------------------------- sizes
def parse_size(text: str) -> int:
    """``"10M"`` -> 10_000_000; also ``K``, ``B`` / ``G`` (10**9) and plain integers.

    >>> parse_size("50M"), parse_size("1B"), parse_size("1000")
    (50000000, 1000000000, 1000)
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBG]?)\s*", text.upper())
    if not match:
        raise ValueError(f"size={text!r} must look like 10M, 200M or 1B")
    return int(float(match.group(1)) * _UNITS.get(match.group(2), 1))


def layout(params: int) -> tuple[int, int]:
    """(width, layers) of a stack of square bias-free Linear layers with about ``params``.

    >>> layout(10_000_000), layout(50_000_000), layout(200_000_000), layout(10**9)
    ((1024, 10), (2048, 12), (4096, 12), (4096, 60))
    """
    width = 1024 if params < 30_000_000 else 2048 if params < 150_000_000 else 4096
    return width, max(1, round(params / width**2))


# --------------------------------------------------------------------------- worker
def _build(width: int, layers: int, seed: int) -> Any:
    import torch
    from torch import nn

    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            layer.weight.normal_(generator=generator)  # touches every page
    return model


def _run_prunekit(model: Any) -> tuple[dict[str, float], dict[str, int], Callable[[], list]]:
    from prunekit import Pruner

    t0 = time.perf_counter()
    pruner = Pruner(model, scope="global")
    t1 = time.perf_counter()
    peak_setup = _memory.peak_rss()
    pruner.prune_to(SPARSITY)
    t2 = time.perf_counter()
    times = {"setup_s": t1 - t0, "prune_s": t2 - t1, "total_s": t2 - t0}
    return times, {"peak_after_setup": peak_setup}, lambda: list(pruner.masks.values())


def _run_torch_prune(model: Any) -> tuple[dict[str, float], dict[str, int], Callable[[], list]]:
    from torch.nn.utils import prune

    t0 = time.perf_counter()
    prune.global_unstructured(
        [(layer, "weight") for layer in model],
        pruning_method=prune.L1Unstructured,
        amount=SPARSITY,
    )
    t1 = time.perf_counter()
    times = {"setup_s": 0.0, "prune_s": t1 - t0, "total_s": t1 - t0}
    return times, {}, lambda: [layer.weight_mask.bool() for layer in model]


def _run_concat_kthvalue(
    model: Any,
) -> tuple[dict[str, float], dict[str, int], Callable[[], list]]:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        weights = [layer.weight for layer in model]
        total = sum(w.numel() for w in weights)
        flat = torch.empty(total)
        start = 0
        for w in weights:
            torch.abs(w.reshape(-1), out=flat[start : start + w.numel()])
            start += w.numel()
        threshold = torch.kthvalue(flat, round(SPARSITY * total)).values
        del flat
        masks = [torch.gt(w.abs(), threshold) for w in weights]
        for w, m in zip(weights, masks, strict=True):
            w.mul_(m)
    t1 = time.perf_counter()
    times = {"setup_s": 0.0, "prune_s": t1 - t0, "total_s": t1 - t0}
    return times, {}, lambda: masks


_RUNNERS = {
    "prunekit": _run_prunekit,
    "torch_prune": _run_torch_prune,
    "concat_kthvalue": _run_concat_kthvalue,
}


def _check(model: Any, masks: list, width: int, layers: int, seed: int) -> dict[str, Any]:
    """Untimed: compare the masks with the regenerated original weights (two passes)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    original = torch.empty(width, width)
    pruned = zeros = 0
    max_pruned, min_kept = -math.inf, math.inf
    full = hashlib.blake2b(digest_size=16)
    for layer, mask in zip(model, masks, strict=True):
        magnitude = original.normal_(generator=generator).abs_()
        pruned += int(mask.numel() - mask.count_nonzero())
        zeros += int((layer.weight == 0).sum())
        if not bool(mask.all()):
            max_pruned = max(max_pruned, float(magnitude[~mask].max()))
        if bool(mask.any()):
            min_kept = min(min_kept, float(magnitude[mask].min()))
        full.update(mask.contiguous().numpy().tobytes())
    # Second pass: entries tied at the threshold, and a digest of the masks with them
    # cleared, which any exact method shares whatever order it breaks ties in.
    ties = 0
    off_ties = hashlib.blake2b(digest_size=16)
    generator.manual_seed(seed)
    for mask in masks:
        magnitude = original.normal_(generator=generator).abs_()
        tied = magnitude == max_pruned
        ties += int(tied.sum())
        off_ties.update((mask & ~tied).numpy().tobytes())
    return {
        "pruned": pruned,
        "weight_zeros": zeros,
        "threshold": max_pruned,
        "min_kept": min_kept,
        "separated": min_kept >= max_pruned,  # no kept |w| below a pruned one
        "ties_at_threshold": ties,
        "digest": full.hexdigest(),
        "digest_off_ties": off_ties.hexdigest(),
    }


def worker(method: str, width: int, layers: int, seed: int) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    try:  # if memory runs out after all, the kernel should pick this process, not others
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    model = _build(width, layers, seed)
    gc.collect()
    base = _memory.rss()
    reset_ok = _memory.reset_peak()
    times, marks, get_masks = _RUNNERS[method](model)
    peak, after = _memory.peak_rss(), _memory.rss()
    params = width * width * layers
    memory = {
        "baseline_rss": base,
        "model_bytes": params * 4,
        "peak_extra": peak - base,
        "retained_extra": after - base,
        "peak_reset": reset_ok,
        **{f"{key}_extra": value - base for key, value in marks.items()},
    }
    result: dict[str, Any] = {
        "method": method,
        "params": params,
        "k": round(SPARSITY * params),
        "threads": torch.get_num_threads(),
        "times": times,
        "memory": memory,
    }
    result.update(_check(model, get_masks(), width, layers, seed))
    return result


# --------------------------------------------------------------------------- driver
def _child(conn: Connection, method: str, width: int, layers: int, seed: int) -> None:
    """Entry point of a fresh (spawned) interpreter: one measurement, sent back."""
    try:
        conn.send(worker(method, width, layers, seed))
    except MemoryError as error:
        conn.send({"error": f"out of memory ({error})"})
    except RuntimeError as error:
        kind = "out of memory" if "memory" in str(error).lower() else "failed"
        conn.send({"error": f"{kind}: {str(error)[:200]}"})
    finally:
        conn.close()


def _spawn(method: str, width: int, layers: int, seed: int, timeout: float) -> dict[str, Any]:
    """Run :func:`worker` in a freshly spawned interpreter, so no peak leaks between runs."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, method, width, layers, seed))
    process.start()
    send.close()
    result: dict[str, Any] | None = None
    try:
        if receive.poll(timeout):
            result = receive.recv()
        else:
            result = {"error": f"timeout after {timeout:.0f} s"}
    except EOFError:  # the process died without a word (its exit code tells why)
        process.join(30)
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
    if result is None:
        code = process.exitcode
        if code in (-9, 137):
            return {"error": f"out of memory (killed, exit {code})"}
        return {"error": f"failed (exit {code})"}
    return result


def _repeats(params: int, quick: bool) -> int:
    if quick:
        return 2
    return 3 if params <= 300_000_000 else 2


def _method_repeats(method: str, params: int, repeats: int) -> int:
    """torch.prune is slow at large sizes: fewer repeats there."""
    if method == "torch_prune" and params > 100_000_000:
        return 1
    return repeats


def _memory_guard(method: str, params: int, measured: dict[str, float]) -> str | None:
    per_param = measured.get(method, _GUESS_EXTRA_PER_PARAM[method])
    need = params * (4 + per_param) + 400 * 2**20  # weights + extra + interpreter
    have = available_memory_bytes() * _MEMORY_MARGIN
    if need > have:
        return (
            f"skipped: needs ~{need / 2**30:.0f} GiB ({per_param:.1f} B/param extra on top of "
            f"the 4 B/param weights), {have / 2**30:.0f} GiB usable"
        )
    return None


def _summarise(method: str, runs: list[dict[str, Any]], skipped: str | None) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {"method": method, "repeats": len(ok), "runs": runs}
    if skipped:
        summary["status"] = skipped
        return summary
    if not ok:
        summary["status"] = runs[0]["error"] if runs else "not run"
        return summary
    summary["status"] = "ok" if len(ok) == len(runs) else f"{len(runs) - len(ok)} run(s) failed"
    for key in ("setup_s", "prune_s", "total_s"):
        summary[key] = median([r["times"][key] for r in ok])
    params = ok[0]["params"]
    summary["peak_extra_bytes"] = median([r["memory"]["peak_extra"] for r in ok])
    summary["retained_extra_bytes"] = median([r["memory"]["retained_extra"] for r in ok])
    summary["peak_extra_per_param"] = summary["peak_extra_bytes"] / params
    summary["retained_extra_per_param"] = summary["retained_extra_bytes"] / params
    if method == "prunekit":
        summary["setup_peak_extra_per_param"] = (
            median([r["memory"]["peak_after_setup_extra"] for r in ok]) / params
        )
    return summary


def _correctness(params: int, methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    k = round(SPARSITY * params)
    runs = {m: [r for r in s["runs"] if "error" not in r] for m, s in methods.items()}
    runs = {m: r for m, r in runs.items() if r}
    out: dict[str, Any] = {"k": k}
    all_runs = [r for rs in runs.values() for r in rs]
    if not all_runs:
        return out
    thresholds = {r["threshold"] for r in all_runs}
    out["ties_at_threshold"] = max(r["ties_at_threshold"] for r in all_runs)
    # Exact methods keep some of the tied entries when the tie straddles the cut; only
    # then may their masks differ from each other and from ``|w| > kthvalue``.
    out["tie_across_cut"] = any(r["min_kept"] == r["threshold"] for r in all_runs)
    out["same_threshold"] = len(thresholds) == 1
    out["all_separated"] = all(r["separated"] for r in all_runs)
    for method, rs in runs.items():
        out[f"{method}_pruned"] = sorted({r["pruned"] for r in rs})
        out[f"{method}_weight_zeros"] = sorted({r["weight_zeros"] for r in rs})
    exact = [r["pruned"] == k and r["weight_zeros"] == k for r in runs.get("prunekit", [])]
    out["prunekit_exact"] = all(exact) if exact else None
    digests = {m: {r["digest"] for r in rs} for m, rs in runs.items()}
    off_ties = {m: {r["digest_off_ties"] for r in rs} for m, rs in runs.items()}
    out["digests_per_method"] = {m: sorted(d) for m, d in digests.items()}
    for other in ("concat_kthvalue", "torch_prune"):
        if other not in digests or "prunekit" not in digests:
            continue
        out[f"masks_equal_{other}"] = digests["prunekit"] == digests[other]
        out[f"masks_equal_off_ties_{other}"] = off_ties["prunekit"] == off_ties[other]
    return out


def run(
    sizes: list[str], *, quick: bool = False, timeout: float = 300.0, seed: int = 0
) -> list[dict[str, Any]]:
    """All sizes, methods alternated within each repeat; medians and checks per size."""
    return list(measure(sizes, quick=quick, timeout=timeout, seed=seed))


def measure(
    sizes: list[str], *, quick: bool = False, timeout: float = 300.0, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Like :func:`run`, handing out each size's entry as soon as it is complete."""
    measured: dict[str, float] = {}  # method -> largest peak extra bytes/param seen
    for size in sizes:
        params_wanted = parse_size(size)
        width, layers = layout(params_wanted)
        params = width * width * layers
        repeats = _repeats(params, quick)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
        skipped: dict[str, str | None] = {m: _memory_guard(m, params, measured) for m in METHODS}
        for method, reason in skipped.items():
            if reason:
                log(f"global {size} {method}: {reason}")
        for r in range(repeats):
            for method in rotated(METHODS, r):
                if skipped[method] or r >= _method_repeats(method, params, repeats):
                    continue
                if runs[method] and "error" in runs[method][-1]:
                    continue  # a timeout or OOM is not retried
                wait_for_quiet()
                result = _spawn(method, width, layers, seed, timeout)
                runs[method].append(result)
                log(f"global {size} ({params:,} params) {method} #{r + 1}: {_describe(result)}")
        methods = {m: _summarise(m, runs[m], skipped[m]) for m in METHODS}
        for method, summary in methods.items():
            if "peak_extra_per_param" in summary:
                measured[method] = max(measured.get(method, 0.0), summary["peak_extra_per_param"])
        yield {
            "size": size,
            "params": params,
            "layout": f"{layers} x Linear({width}, {width}, bias=False)",
            "methods": methods,
            "correctness": _correctness(params, methods),
        }


def _describe(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"]
    t, m = result["times"], result["memory"]
    setup = f"setup {t['setup_s']:.3f} s + " if t["setup_s"] else ""
    return (
        f"{setup}prune {t['prune_s']:.3f} s, peak extra {m['peak_extra'] / 2**20:,.0f} MiB "
        f"({m['peak_extra'] / result['params']:.2f} B/param), pruned {result['pruned']:,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="one global-pruning measurement (a worker)")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("width", type=int)
    parser.add_argument("layers", type=int)
    parser.add_argument("seed", type=int)
    args = parser.parse_args()
    try:
        result = worker(args.method, args.width, args.layers, args.seed)
    except (MemoryError, RuntimeError) as error:
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        print(f"out of memory: {error}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
