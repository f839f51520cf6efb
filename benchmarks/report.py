"""Turn the results dictionary into markdown tables, target verdicts and a scaling plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.global_prune import METHODS, parse_size

_LABELS = {
    "prunekit": "prunekit `Pruner(scope='global').prune_to(0.9)`",
    "torch_prune": "`torch.nn.utils.prune.global_unstructured`",
    "concat_kthvalue": "concat `abs(w)` + `torch.kthvalue`",
}
_STEP_LABELS = {"dense": "dense", "prunekit": "prunekit", "torch_prune": "torch.prune"}


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --------------------------------------------------------------------------- sections
def _machine(info: dict[str, Any]) -> list[str]:
    rows = [
        ["CPUs", str(info.get("cpu_count"))],
        ["CPU model", str(info.get("cpu_model"))],
        ["RAM", f"{info.get('memory_total_gib', '?')} GiB"],
        ["torch / threads", f"{info.get('torch')} / {info.get('torch_threads')}"],
        ["lightning", str(info.get("lightning"))],
        ["python / OS", f"{info.get('python')} / {info.get('platform')}"],
        [
            "load average (1, 5, 15 min) at start / end",
            f"{info.get('load_average_at_start')} / {info.get('load_average_at_end')}",
        ],
        [
            "CPU busy with other processes at start / end",
            f"{info.get('cpu_busy_elsewhere_at_start', 0):.0%} / "
            f"{info.get('cpu_busy_elsewhere_at_end', 0):.0%}",
        ],
        ["command", f"`{info.get('command')}`"],
        ["wall time of the suite", f"{info.get('suite_seconds', 0):.0f} s"],
    ]
    lines = ["## Machine", "", *_table(["", ""], rows)]
    busy = max(
        info.get("cpu_busy_elsewhere_at_start", 0.0), info.get("cpu_busy_elsewhere_at_end", 0.0)
    )
    if busy > 0.1:
        lines += [
            "",
            f"**Other processes kept up to {busy:.0%} of the CPUs busy during this run: "
            "timings are slower and noisier than on an idle machine (prunekit's many short "
            "multi-threaded kernels suffer most). Compare runs only from idle machines.**",
        ]
    return lines


def _global(results: list[dict[str, Any]]) -> list[str]:
    header = [
        "size",
        "method",
        "setup s",
        "prune s",
        "total s",
        "total vs prunekit",
        "peak extra MiB",
        "peak extra B/param",
        "kept after B/param",
        "pruned",
        "runs",
    ]
    rows = []
    for entry in results:
        methods = entry["methods"]
        pk_total = methods["prunekit"].get("total_s")
        for method in METHODS:
            s = methods[method]
            size = f"{entry['size']} ({entry['params']:,})"
            if "total_s" not in s:
                rows.append([size, _LABELS[method], f"**{s['status']}**", *[""] * 8])
                continue
            pruned = sorted({r["pruned"] for r in s["runs"] if "pruned" in r})
            rows.append(
                [
                    size,
                    _LABELS[method],
                    _num(s["setup_s"]) if method == "prunekit" else "–",
                    _num(s["prune_s"]),
                    _num(s["total_s"]),
                    _num(s["total_s"] / pk_total, "{:.1f}x") if pk_total else "–",
                    _num(s["peak_extra_bytes"] / 2**20, "{:,.0f}"),
                    _num(s["peak_extra_per_param"], "{:.2f}"),
                    _num(s["retained_extra_per_param"], "{:.2f}"),
                    ", ".join(f"{p:,}" for p in pruned),
                    f"{s['repeats']}" + ("" if s["status"] == "ok" else f" ({s['status']})"),
                ]
            )
    check_header = [
        "size",
        "k = round(0.9 N)",
        "prunekit count exact",
        "entries equal to the threshold (a tie across the cut?)",
        "same threshold, kept ≥ pruned (all methods)",
        "masks = concat+kthvalue (all / off ties)",
        "masks = torch.prune (all / off ties)",
    ]
    checks = []
    for entry in results:
        c = entry["correctness"]

        def equal(other: str, c: dict[str, Any] = c) -> str:
            if f"masks_equal_{other}" not in c:
                return "–"
            whole = c[f"masks_equal_{other}"]
            expected_difference = whole is False and c.get("tie_across_cut")
            whole_text = "no (the tie)" if expected_difference else _yes(whole)
            return f"{whole_text} / {_yes(c[f'masks_equal_off_ties_{other}'])}"

        checks.append(
            [
                entry["size"],
                f"{c['k']:,}",
                _yes(c.get("prunekit_exact")),
                f"{c.get('ties_at_threshold', '–')} ({'yes' if c.get('tie_across_cut') else 'no'})",
                _yes(c.get("same_threshold") and c.get("all_separated")),
                equal("concat_kthvalue"),
                equal("torch_prune"),
            ]
        )
    layouts = ", ".join(f"{e['size']}: {e['layout']}" for e in results)
    return [
        "## 1. Global magnitude pruning to 90 %",
        "",
        f"Models: {layouts}; random normal weights, float32. Each figure is the median over "
        "fresh subprocesses (methods alternated within each repeat). *Peak extra* is the "
        "peak resident memory above the RSS right after the model was built (kernel VmHWM, "
        "reset before the method runs); *kept after* is what is still held afterwards "
        "(prunekit and concat: the bool masks; torch.prune: `weight_orig`'s companion float "
        "mask and the recomputed `weight`). prunekit's *setup* is the `Pruner` constructor "
        "(it allocates the masks), *prune* is `prune_to(0.9)`; *total vs prunekit* divides by "
        "prunekit's setup + prune.",
        "",
        *_table(header, rows),
        "",
        "Correctness, checked in the same run against the regenerated weights. The threshold "
        "is the largest pruned |w|. Random float32 weights often hold a few equal magnitudes "
        "there; when such a tie straddles the cut, prunekit prunes exactly k (ties broken by "
        "position), `abs(w) > kthvalue` prunes every tied entry (so k + a few) and "
        "`torch.topk` breaks the tie its own way, so whole masks may differ at the tied "
        "entries only: *off ties* compares the masks with those entries cleared.",
        "",
        *_table(check_header, checks),
    ]


def _scaling(results: list[dict[str, Any]], image: str | None) -> list[str]:
    rows = []
    for method, key in (("prunekit", "prune_s"), *((m, "total_s") for m in METHODS)):
        label = "prunekit prune_to only" if key == "prune_s" else _LABELS[method]
        cells = []
        for entry in results:
            s = entry["methods"][method]
            if key not in s:
                cells.append("–")
                continue
            cells.append(f"{s[key]:.3g} s / {s['peak_extra_per_param']:.2f} B")
        rows.append([label, *cells])
    header = ["method (time / peak extra per param)", *(e["size"] for e in results)]
    lines = ["## 4. Scaling", "", *_table(header, rows)]
    if image:
        lines += ["", f"![prune time and peak extra memory versus parameters]({image})"]
    return lines


def _yes(value: object) -> str:
    if value is None:
        return "–"
    return "yes" if value is True else "**no**" if value is False else str(value)


def _steps(results: list[dict[str, Any]]) -> list[str]:
    header = [
        "model",
        "dense ms/step",
        "prunekit ms/step",
        "prunekit / dense",
        "torch.prune ms/step",
        "torch.prune / dense",
        "per-round ratios prunekit (min–max)",
        "rounds x steps",
        "zeros kept exact",
    ]
    rows = []
    for entry in results:
        v = entry["variants"]
        ratios = v["prunekit"]["round_ratios"]
        exact = all(
            v[name]["target_zeros"] == entry["expected_zeros"]
            for name in ("prunekit", "torch_prune")
        )
        rows.append(
            [
                entry["description"],
                _num(v["dense"]["median_step_ms"], "{:.2f}"),
                _num(v["prunekit"]["median_step_ms"], "{:.2f}"),
                _num(v["prunekit"]["ratio_to_dense"]),
                _num(v["torch_prune"]["median_step_ms"], "{:.2f}"),
                _num(v["torch_prune"]["ratio_to_dense"]),
                f"{min(ratios):.3f}–{max(ratios):.3f}",
                f"{entry['rounds']} x {entry['steps_per_block']}",
                _yes(exact),
            ]
        )
    return [
        "## 2. Training-step time with 90 % masks attached",
        "",
        "One step = `zero_grad`, forward, cross-entropy, backward, `optimizer.step()` on a fixed "
        "random batch. Variants alternate in blocks (order rotated each round, one untimed "
        "step before each block of fast models); medians of all per-step times. prunekit: "
        "`Pruner(model, scope='global').prune_to(0.9)` + `.attach(optimizer)`; torch.prune: "
        "`global_unstructured(L1Unstructured, 0.9)` on the same parameters (for "
        "`MultiheadAttention`, an extra pre-hook recomputes `out_proj.weight`, which "
        "torch.prune's own hook never does: without it the second backward fails). "
        "*Zeros kept exact*: after all steps exactly round(0.9·N) of the targeted weights are "
        "zero in both variants. PyTorch's default (foreach) Adam on CPU is markedly slower "
        "when many gradients and moments are exactly zero (`sqrt(0)` is slow there), which "
        "any pruning method pays, not the masking itself; the fused Adam row shows the "
        "masking overhead without that effect.",
        "",
        *_table(header, rows),
    ]


_LIGHTNING_NAMES = {
    "none": "no pruning",
    "model_pruning": "Lightning `ModelPruning('l1_unstructured', use_global_unstructured=True)`",
    "prunekit": "prunekit `callbacks.Pruning(Steps(...), unit='epoch', scope='global')`",
    "prunekit_idle": "prunekit `Pruning(..., unit='step')` attached, nothing to prune in the run",
}
_OPTIMIZER_NAMES = {"adam": "Adam", "adam_fused": "Adam(fused=True)"}


def _lightning_runs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """optimizer -> variant -> figures (results written before the optimizers were split
    hold one optimizer, default Adam, under ``variants``)."""
    return result.get("optimizers") or {"adam": result["variants"]}


def _lightning(result: dict[str, Any]) -> list[str]:
    rows = []
    for optimizer, variants in _lightning_runs(result).items():
        for variant, s in variants.items():
            if "median_fit_s" not in s:
                continue
            rows.append(
                [
                    _OPTIMIZER_NAMES.get(optimizer, optimizer),
                    _LIGHTNING_NAMES[variant],
                    _num(s["median_fit_s"], "{:.2f}"),
                    _num(s["ratio_to_none"]),
                    f"{s['sparsity']:.4f}",
                    str(s["steps"]),
                ]
            )
    return [
        "## 3. Epoch-like Lightning run",
        "",
        f"{result['setup']}; random data, `Trainer(max_steps=300, logger=False, "
        f"enable_checkpointing=False)`; median of {result['rounds']} fits per variant "
        "(alternated, after one untimed warm-up fit). ModelPruning gets relative amounts "
        "0.5, 0.5, 0.6 (its amount is a fraction of the remaining weights) and "
        "`use_lottery_ticket_hypothesis=False`. With the default Adam, prunekit pays for "
        "clearing the moments of pruned weights (exact zeros are slow in CPU Adam's "
        "`sqrt`); ModelPruning leaves them to decay.",
        "",
        *_table(
            ["optimizer", "variant", "fit s", "vs no pruning", "final sparsity", "steps"], rows
        ),
    ]


# --------------------------------------------------------------------------- targets
def _verdict(value: float | None, limit: float, higher_is_better: bool, unit: str = "") -> str:
    """``met`` or ``missed``, with how far off: a shortfall for speed-ups, an excess for
    limits; ratios to dense (``unit="ratio"``) are shown as overheads in percent."""
    if value is None:
        return "not measured"
    ok = value >= limit if higher_is_better else value <= limit
    if unit == "ratio":
        text = f"{value - 1:+.1%} vs dense, limit {limit - 1:+.0%}"
    else:
        text = f"{value:.3g}{unit}, {'target' if higher_is_better else 'limit'} {limit:g}{unit}"
    if ok:
        return f"**met** ({text})"
    gap = 1 - value / limit if higher_is_better else value / limit - 1
    if unit == "ratio":
        return f"**missed** ({text}: {(value - limit) * 100:.1f} points over)"
    return f"**missed** ({text}: {gap:.0%} {'short' if higher_is_better else 'over'})"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's performance targets with the measured figures and a verdict."""
    out = []
    by_params = {parse_size(e["size"]): e for e in results.get("global", [])}
    g50 = by_params.get(50_000_000)
    if g50:
        m = g50["methods"]
        pk = m["prunekit"]
        for other, limit in (("torch_prune", 30.0), ("concat_kthvalue", 3.0)):
            o = m[other]
            speed = o["total_s"] / pk["prune_s"] if "total_s" in o and "prune_s" in pk else None
            with_setup = (
                o["total_s"] / pk["total_s"] if "total_s" in o and "total_s" in pk else None
            )
            out.append(
                {
                    "target": f"50M global prune_to(0.9) ≥ {limit:.0f}x faster than {other}",
                    "measured": (
                        f"{_num(speed, '{:.1f}x')} (prune_to {_num(pk.get('prune_s'))} s vs "
                        f"{_num(o.get('total_s'))} s; {_num(with_setup, '{:.1f}x')} counting the "
                        "constructor)"
                    ),
                    "verdict": _verdict(speed, limit, True, "x"),
                }
            )
        peak = pk.get("peak_extra_per_param")
        out.append(
            {
                "target": "50M peak extra memory ≤ 1.5 B/param (constructor + prune_to)",
                "measured": f"{_num(peak, '{:.2f}')} B/param",
                "verdict": _verdict(peak, 1.5, False, " B/param"),
            }
        )
    else:
        out.append({"target": "50M targets", "measured": "50M not run", "verdict": "not run"})
    g1b = next((e for p, e in by_params.items() if p >= 10**9), None)
    if g1b:
        pk = g1b["methods"]["prunekit"]
        exact = g1b["correctness"].get("prunekit_exact")
        total = pk.get("total_s")
        verdict = _verdict(total, 10.0, False, " s")
        if exact is not True and total is not None:
            verdict = "**missed** (count not exact)"
        out.append(
            {
                "target": "1B global prune < 10 s with exact count",
                "measured": (
                    f"{_num(total)} s (constructor {_num(pk.get('setup_s'))} s + prune_to "
                    f"{_num(pk.get('prune_s'))} s), exact: {_yes(exact)}"
                ),
                "verdict": verdict,
            }
        )
    else:
        out.append(
            {
                "target": "1B global prune < 10 s with exact count",
                "measured": "not run (use --big)",
                "verdict": "not run",
            }
        )
    limits = {"conv4": 1.03, "transformer": 1.03, "lenet": 1.05, "lenet_fused": 1.05}
    for entry in results.get("steps", []):
        limit = limits.get(entry["model"])
        if limit is None:
            continue
        prunekit = entry["variants"]["prunekit"]
        ratio, rounds = prunekit["ratio_to_dense"], prunekit["round_ratios"]
        verdict = _verdict(ratio, limit, False, "ratio")
        if min(rounds) <= limit < max(rounds):  # the rounds disagree about the verdict
            verdict += f"; inconclusive: per-round ratios {min(rounds):.2f}–{max(rounds):.2f}"
        out.append(
            {
                "target": f"{entry['model']} step time with masks ≤ {limit:.2f}x dense",
                "measured": f"{ratio:.3f}x",
                "verdict": verdict,
            }
        )
    for optimizer, variants in _lightning_runs(
        results.get("lightning") or {"variants": {}}
    ).items():
        idle = variants.get("prunekit_idle", {}).get("ratio_to_none")
        if idle is None:
            continue
        out.append(
            {
                "target": f"Lightning, {_OPTIMIZER_NAMES.get(optimizer, optimizer)}: the "
                "callback adds no measurable time at steps where nothing is pruned",
                "measured": f"idle callback {idle:.3f}x the run without it",
                "verdict": _verdict(idle, 1.03, False, "ratio") + " (3 % taken as the noise floor)",
            }
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    """The whole report."""
    lines = ["# prunekit benchmarks", ""]
    if results.get("interrupted"):
        lines += [f"**Incomplete: {results['interrupted']}.**", ""]
    for part, command in results.get("merged", {}).items():
        lines += [f"Part {part!r} comes from an earlier run: `{command}`.", ""]
    lines += [*_machine(results["machine"]), ""]
    if results.get("global"):
        lines += [*_global(results["global"]), ""]
    if results.get("steps"):
        lines += [*_steps(results["steps"]), ""]
    if results.get("lightning"):
        lines += [*_lightning(results["lightning"]), ""]
    if results.get("global"):
        lines += [*_scaling(results["global"], results.get("plot")), ""]
    rows = [[t["target"], t["measured"], t["verdict"]] for t in results.get("targets", [])]
    lines += ["## Targets", "", *_table(["target", "measured", "verdict"], rows), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot
def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Log-log prune time and peak extra memory versus parameters; ``False`` if not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = {  # label: (method, time key, colour)
        "prunekit prune_to": ("prunekit", "prune_s", "tab:blue"),
        "prunekit constructor + prune_to": ("prunekit", "total_s", "tab:blue"),
        "concat + kthvalue": ("concat_kthvalue", "total_s", "tab:orange"),
        "torch.prune global_unstructured": ("torch_prune", "total_s", "tab:red"),
    }
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (method, key, colour) in series.items():
        points = [
            (e["params"], e["methods"][method][key], e["methods"][method]["peak_extra_bytes"])
            for e in results
            if key in e["methods"][method]
        ]
        if not points:
            continue
        params, seconds, peak = zip(*points, strict=True)
        style = "--" if key == "prune_s" else "-"
        ax_time.plot(params, seconds, style, color=colour, marker="o", label=label)
        if key == "total_s":
            gib = [p / 2**30 for p in peak]
            ax_mem.plot(params, gib, color=colour, marker="o", label=label.split(" ")[0])
    sizes = [e["params"] for e in results]
    for per_param, style in ((4, ":"), (1, "-.")):
        ax_mem.plot(
            sizes,
            [n * per_param / 2**30 for n in sizes],
            style,
            color="gray",
            label=f"{per_param} B/param" + (" (the weights)" if per_param == 4 else ""),
        )
    for ax, title, unit in (
        (ax_time, "wall time of global pruning to 90 %", "seconds"),
        (ax_mem, "peak resident memory above the model", "GiB"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
