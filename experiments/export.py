"""``prunekit export RUN_DIR --compact | --sparse``: make a finished run's pruned model
pay off, and measure what it gained.

``--compact`` removes the dependency groups the run's masks pruned
(:func:`prunekit.compact`) and writes the smaller model; ``--sparse`` writes the weights
as a compressed checkpoint (:func:`prunekit.save_sparse`). Both print parameters, file
size, CPU latency and test accuracy before and after, and record them in the run folder.
"""

from __future__ import annotations

import json
import statistics
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from prunekit.experiments import paths as P
from prunekit.experiments.config import ConfigError, ExperimentConfig
from prunekit.experiments.data import load_fashion_mnist
from prunekit.experiments.models import build_model
from prunekit.experiments.training import evaluate, model_kwargs
from torch import nn

from prunekit import (
    DependencyGraph,
    UnsupportedModelError,
    compact,
    compress_state_dict,
    decompress_state_dict,
    pack_mask,
    unpack_mask,
)

COMPACT_FORMAT = "prunekit-compact"
#: 2: with a CRC-32 of everything in the file (torch.load checks none: a damaged byte
#: loaded as a wrong weight); files without a version (1) still load, unchecked.
#: 3: also the keyword arguments the model was built with (``model_kwargs``: the run's
#: num_classes and input_shape), covered by the CRC; 1 and 2 (built with none) still load
COMPACT_VERSION = 3


def _load(path: Path) -> Any:
    try:  # (map_location: a run trained on a GPU exports on a machine without one)
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated zip, not a torch file, unpickling refused...
        raise ConfigError(f"{path} cannot be loaded (truncated or corrupt?): {e}") from None


def _run_config(run: P.RunPaths) -> Any:
    """The run's ``seed``, ``model`` and ``data`` (what its network is built from), on
    the schema's defaults for those a hand-written config.yaml leaves out."""
    if not run.config.is_file():
        raise ConfigError(f"{run.root} is not a run folder (no {run.config.name})")
    try:
        saved = OmegaConf.load(run.config)
        return OmegaConf.merge(
            OmegaConf.structured(ExperimentConfig),
            {k: saved[k] for k in ("name", "seed", "model", "data") if k in saved},
        )
    except Exception as e:  # not YAML, unknown data keys, values of another type...
        raise ConfigError(f"{run.config}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _load_run(
    run: P.RunPaths,
) -> tuple[Any, dict[str, Any], nn.Module, dict[str, torch.Tensor]]:
    """The run's config, the keyword arguments its model is built with, the network with
    the final weights, and the masks."""
    cfg = _run_config(run)
    for path in (run.final_weights, run.masks):
        if not path.is_file():
            raise ConfigError(
                f"{path} does not exist: export reads a finished gradual run's "
                f"{run.final_weights.name} and {run.masks.name}"
            )
    try:  # built as the runners build it (training.network)
        kwargs = model_kwargs(cfg)
        net = build_model(cfg.model, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model={cfg.model!r} of {run.config}: {e}") from None
    try:
        net.load_state_dict(_load(run.final_weights))
    except RuntimeError as e:  # missing / unexpected keys, other shapes
        raise ConfigError(
            f"{run.final_weights} does not hold the weights of model={cfg.model!r} (the "
            f"run's config): {str(e).splitlines()[0]} ..."
        ) from None
    masks = _load(run.masks)
    _check_masks(run, net, masks)
    return cfg, kwargs, net.eval(), masks


def _check_masks(run: P.RunPaths, net: nn.Module, masks: Any) -> None:
    """``masks`` are bool masks of ``net``'s parameters, and the weights are zero wherever
    they prune: otherwise final.pt and masks.pt are not one run's (a file was replaced or
    written by another run), and the table's "before" would not be the pruned model."""
    params = dict(net.named_parameters())
    if not isinstance(masks, dict):
        raise ConfigError(f"{run.masks} holds a {type(masks).__name__}, not a dict of masks")
    for name, m in masks.items():
        if name not in params:
            raise ConfigError(f"{run.masks} names {name!r}, not a parameter of the model")
        if (
            not isinstance(m, torch.Tensor)
            or m.dtype != torch.bool
            or m.shape != params[name].shape
        ):
            raise ConfigError(
                f"{run.masks}: masks[{name!r}] must be a bool tensor of shape "
                f"{tuple(params[name].shape)}"
            )
    live = {n: int((params[n].detach() != 0)[~m].sum()) for n, m in masks.items()}
    live = {n: c for n, c in live.items() if c}
    if live:
        first = ", ".join(f"{n} ({c})" for n, c in list(live.items())[:3])
        raise ConfigError(
            f"{run.final_weights} has {sum(live.values()):,} non-zero weights where "
            f"{run.masks} prunes them, in {first}{' ...' if len(live) > 3 else ''}: the two "
            "files are not from one finished run (replaced or modified?)"
        )


def _test_batches(cfg: Any, limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    name, target, root = (cfg.data.get(k) for k in ("name", "_target_", "root"))
    if target is not None or name not in (None, "fashion_mnist"):
        raise ConfigError(
            f"export evaluates on Fashion-MNIST's test set; this run used data.name={name!r}, "
            f"data._target_={target!r}"
        )
    data = load_fashion_mnist() if root is None else load_fashion_mnist(root)
    x, y = data.test_images, data.test_labels
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(x), 500)]


@torch.inference_mode()
def latencies(
    models: list[nn.Module], x: torch.Tensor, repeats: int, warmup: int = 3
) -> list[float]:
    """Median seconds per forward pass of each model on ``x``, measured alternately
    (model 1, model 2, model 1, ...) so load changes hit all of them alike."""
    for m in models:
        m.eval()
        for _ in range(warmup):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for m, t in zip(models, times, strict=True):
            start = time.perf_counter()
            m(x)
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def save_compact(
    path: Path,
    model_name: str,
    masks: dict[str, torch.Tensor],
    small: nn.Module,
    kwargs: dict[str, Any] | None = None,
) -> None:
    """Write a compacted model: its state_dict plus the packed masks that rebuild its
    structure from ``build_model(model_name, **kwargs)`` (see :func:`load_compact`;
    ``kwargs``: the run's ``training.model_kwargs``, ints and tuples of ints)."""
    saved = {
        "format": COMPACT_FORMAT,
        "version": COMPACT_VERSION,
        "model": model_name,
        "model_kwargs": dict(kwargs or {}),
        "masks": {n: pack_mask(m) for n, m in masks.items()},
        "shapes": {n: list(m.shape) for n, m in masks.items()},
        "state_dict": {k: v.detach().cpu() for k, v in small.state_dict().items()},
    }
    saved["crc32"] = _compact_crc(saved)
    P.save_torch(path, saved)


def _compact_crc(saved: dict[str, Any]) -> int:
    """CRC-32 of a compact file's model name, mask shapes, model keyword arguments
    (version 3) and every tensor (names, dtypes, shapes and bytes)."""
    head = [saved["model"], saved["shapes"]]
    if saved.get("version") != 2:
        head.append(saved["model_kwargs"])
    crc = zlib.crc32(json.dumps(head, sort_keys=True).encode())
    for part in ("masks", "state_dict"):
        for name in sorted(saved[part]):
            t = saved[part][name].reshape(-1).contiguous()
            crc = zlib.crc32(
                f"{part}.{name}:{t.dtype}:{list(saved[part][name].shape)}".encode(), crc
            )
            crc = zlib.crc32(t.view(torch.uint8).numpy(), crc) if t.numel() else crc
    return crc


def load_compact(path: Path, example_input: torch.Tensor) -> nn.Module:
    """The compacted model written by ``prunekit export --compact``."""
    saved = _load(path)
    if not isinstance(saved, dict) or saved.get("format") != COMPACT_FORMAT:
        raise ConfigError(f"{path} is not a {COMPACT_FORMAT} file")
    version = saved.get("version", 1)
    if version not in (1, 2, COMPACT_VERSION):
        raise ConfigError(
            f"{path}: {COMPACT_FORMAT} version={version!r}; this reads 1 to {COMPACT_VERSION}"
        )
    if version >= 2:
        try:
            ok = saved.get("crc32") == _compact_crc(saved)
        except Exception as e:  # a damaged structure: missing keys, not tensors...
            raise ConfigError(f"{path} is damaged: {type(e).__name__}: {e}") from None
        if not ok:
            raise ConfigError(
                f"{path} is damaged: its CRC-32 does not match (changed or corrupted after "
                "it was written)"
            )
    name, kwargs = saved.get("model"), saved.get("model_kwargs", {})
    how = f"build_model({name!r}, **{kwargs!r})"
    if version < 3:
        how += f" (a version {version} file does not record the run's num_classes/input_shape)"
    try:
        net = build_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: cannot rebuild its model, {how}: {e}") from None
    try:
        masks = {n: unpack_mask(b, saved["shapes"][n]) for n, b in saved["masks"].items()}
        small = compact(net, example_input, masks=masks, complete=True)
        small.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # other names or shapes
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"{path}: cannot rebuild the compacted model from {how}: {type(e).__name__}: {first}"
        ) from None
    return small.eval()


def _row(label: str, before: float, after: float, fmt: str) -> str:
    ratio = after / before if before else float("nan")
    return f"{label:<24}{format(before, fmt):>14}{format(after, fmt):>14}{ratio:>8.3f}"


def export_run(
    run_dir: str | Path,
    *,
    mode: str,
    batch_size: int = 64,
    repeats: int = 30,
    test_limit: int | None = None,
) -> str:
    """Export the run in ``run_dir`` (``mode`` ``"compact"`` or ``"sparse"``); returns the
    table, also written to the run folder as JSON."""
    if mode not in ("compact", "sparse"):
        raise ValueError(f"mode={mode!r} must be 'compact' or 'sparse'")
    for name, value, low in (("batch_size", batch_size, 1), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an int >= {low}")
    if test_limit is not None and (not isinstance(test_limit, int) or test_limit < 1):
        raise ValueError(f"test_limit={test_limit!r} must be None or an int >= 1")
    run = P.RunPaths(Path(run_dir))
    cfg, kwargs, net, masks = _load_run(run)
    batches = _test_batches(cfg, test_limit)
    example = batches[0][0][:1]
    x = batches[0][0][:batch_size]
    if mode == "compact":
        graph = DependencyGraph(net, example)
        pruned = graph.pruned(masks)
        note = f"{sum(pruned)} of {len(graph.groups)} channel groups removed"
        try:
            small = compact(net, example, masks=masks)
        except UnsupportedModelError:
            raise
        except ValueError:  # the masks leave biases / BatchNorm entries of pruned channels
            small = compact(net, example, masks=masks, complete=True)
            note += (
                " with the biases, BatchNorm entries and next layers' inputs the masks left "
                "live, so the outputs differ from the masked model's"
            )
        save_compact(run.compact_model, cfg.model, graph.masks_for(pruned), small, kwargs)
        after_model, after_file = load_compact(run.compact_model, example), run.compact_model
    else:
        P.save_torch(run.sparse_weights, compress_state_dict(net.state_dict()))
        after_model = build_model(cfg.model, **kwargs).eval()
        after_model.load_state_dict(decompress_state_dict(_load(run.sparse_weights)))
        after_file = run.sparse_weights
        note = "weights stored as bitmask + kept values; inference runs dense"
    t_before, t_after = latencies([net, after_model], x, repeats)
    acc_before, acc_after = evaluate(net, batches)[1], evaluate(after_model, batches)[1]

    def count(m: nn.Module, nonzero: bool) -> int:
        return sum(int((p != 0).sum()) if nonzero else p.numel() for p in m.parameters())

    record = {
        "mode": mode,
        "file": after_file.name,
        "params": [count(net, False), count(after_model, False)],
        "nonzero_params": [count(net, True), count(after_model, True)],
        "file_bytes": [run.final_weights.stat().st_size, after_file.stat().st_size],
        "latency_ms": [1e3 * t_before, 1e3 * t_after],
        "latency_batch": x.shape[0],
        "threads": torch.get_num_threads(),
        "test_acc": [acc_before, acc_after],
        "test_images": sum(len(b[1]) for b in batches),
        "note": note,
    }
    P.write_json(run.export_record(mode), record)
    return export_table(record)


def export_table(record: dict[str, Any]) -> str:
    """The before/after table of an export record."""
    lines = [
        f"{'':<24}{'before':>14}{'after':>14}{'ratio':>8}",
        _row("parameters", *record["params"], ","),
        _row("non-zero parameters", *record["nonzero_params"], ","),
        _row("file size (bytes)", *record["file_bytes"], ","),
        _row(
            f"latency (ms, batch {record['latency_batch']}, {record['threads']}t)",
            *record["latency_ms"],
            ".2f",
        ),
        _row(f"test accuracy ({record['test_images']})", *record["test_acc"], ".4f"),
        f"\n{record['note']}; written: {record['file']}",
    ]
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    """The ``export`` subcommand's arguments (``sub``: the CLI's subparsers)."""
    cmd = sub.add_parser(
        "export", help="write a run's compacted model or compressed weights; before/after table"
    )
    cmd.add_argument("run", type=Path, help="a finished gradual run folder")
    mode = cmd.add_mutually_exclusive_group(required=True)
    mode.add_argument("--compact", action="store_true", help="remove pruned channel groups")
    mode.add_argument("--sparse", action="store_true", help="compressed sparse checkpoint")
    cmd.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    cmd.add_argument("--batch-size", type=int, default=64, help="latency batch (default 64)")
    cmd.add_argument("--repeats", type=int, default=30, help="latency repeats (default 30)")
    cmd.add_argument(
        "--test-limit", type=int, default=None, help="evaluate on the first N test images"
    )


def main(args: Any) -> int:
    """Run ``prunekit export`` with parsed ``args``; bad values raise ``ConfigError``."""
    if args.threads < 1:
        raise ConfigError(f"--threads={args.threads} must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        table = export_run(
            args.run,
            mode="compact" if args.compact else "sparse",
            batch_size=args.batch_size,
            repeats=args.repeats,
            test_limit=args.test_limit,
        )
    except ValueError as e:  # bad numbers, or a model the trace cannot follow
        raise ConfigError(str(e)) from e
    print(table)
    return 0
