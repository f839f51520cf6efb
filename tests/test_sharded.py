"""Sharded parameters (FSDP2 ``fully_shard``, tensor-parallel ``Shard(1)``) on 2 and 4 gloo
CPU processes: the masks gathered from the shards equal, bit for bit, those one process
computes on the same full weights (uneven shards: 7, 13 and 5 rows; heavy ties), the
reported counts are the whole tensors' counts, training keeps pruned weights and Adam
moments at zero, and a state saved on 2 ranks loads on 4 and on 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from prunekit import Pruner
from tests.sharded_worker import make_model

WORKER = Path(__file__).with_name("sharded_worker.py")
FAST_CASES = "global,ties,random,ln_cols,f64_global"


def run_worker(
    out: Path, world: int, sharding: str, load: Path | None = None, cases: str | None = None
) -> dict[str, Any]:
    env = dict(os.environ)
    if cases:
        env["SHARDED_CASES"] = cases
    args = [sys.executable, str(WORKER), str(out), str(world), sharding]
    done = subprocess.run(
        args + ([str(load)] if load else []), capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=False)


def check_cases(results: dict[str, Any], expected_cases: set[str]) -> None:
    cases = {c for c in results} - {"trained", "loaded", "nm_split", "set_full", "exact_norms"}
    assert cases == expected_cases
    for case in cases:
        sharded, single, reported = results[case]
        assert set(sharded) == set(single)
        for name in single:
            assert sharded[name].dtype == torch.bool
            assert torch.equal(sharded[name], single[name]), (case, name)
        # sparsity() on the shards reports whole-tensor counts (counted here by hand)
        assert reported == [int((~single[n]).sum()) for n in single], case
        assert sum(reported) > 0, case


def check_trained(results: dict[str, Any]) -> None:
    weights, moments, masks = results["trained"]
    for name, mask in masks.items():
        assert bool((weights[name][~mask] == 0).all()), name
        assert bool((moments[name][~mask] == 0).all()), name
        assert bool((weights[name][mask] != 0).any()), name


def test_fsdp_two_ranks(tmp_path: Path) -> None:
    results = run_worker(tmp_path, 2, "fsdp", cases=FAST_CASES)
    check_cases(results, set(FAST_CASES.split(",")))
    check_trained(results)


ALL = {
    "global",
    "layer",
    "random",
    "scores",
    "ties",
    "ln_rows",
    "ln_cols",
    "ln_inf",
    "random_rows",
    "nm",
    "nm3",
    "f64_global",
    "f64_layer",
    "f64_scores",
    "f64_ln_rows",
    "f64_ln_cols_inf",
}
TP_SKIP = {"nm", "f64_ln_rows"}  # N:M needs whole groups; float64 norms are float64 sums


@pytest.mark.slow
@pytest.mark.parametrize(("world", "sharding"), [(2, "fsdp"), (4, "fsdp"), (2, "tp"), (4, "tp")])
def test_every_case(tmp_path: Path, world: int, sharding: str) -> None:
    results = run_worker(tmp_path, world, sharding, cases=",".join(sorted(ALL)))
    check_cases(results, ALL if sharding == "fsdp" else ALL - TP_SKIP)
    if sharding == "fsdp":
        check_trained(results)


def check_split_groups_refused(results: dict[str, Any], world: int) -> None:
    """N:M along Shard(1)'s dim with groups of 4 over 6 (2 ranks) or 3 (4 ranks) columns
    per rank: every rank raises, naming m and the ranks that split a group (all of them
    here), and no mask changed."""
    outcomes = results["nm_split"]
    assert len(outcomes) == world
    for rank, (message, unchanged) in enumerate(outcomes):
        assert "nm with m=4 along dim=1" in message, message
        assert f"rank(s) {list(range(world))} split a group of 4" in message, message
        width = 12 // world
        assert f"holds entries {rank * width}..{rank * width + width - 1} of dim 1" in message
        assert unchanged


def check_whole_masks_placed(results: dict[str, Any], world: int) -> None:
    """set_masks with whole masks on a sharded model. Through place_mask (the Pruner
    call-site change it is written for) each rank keeps its block: the gathered masks
    equal one process's; a whole mask that differs between ranks is refused on all."""
    _, _, single, helped, refusals = results["set_full"]
    for name, mask in single.items():
        assert torch.equal(helped[name], mask), name
    assert all(r is not None and "differs between ranks" in r for r in refusals), refusals
    assert len(refusals) == world


def check_exact_norms(results: dict[str, Any]) -> None:
    """L1/L2 slice scores summed across ranks (exact integer sums, then rounded once)
    equal exact_slice_norms of the whole weight bit for bit, whatever the split."""
    pairs = results["exact_norms"]
    assert len(pairs) == 3 * 2 * 2  # 3 weights, n = 1 and 2, dim = 0 and 1
    for key, (sharded, whole) in pairs.items():
        assert sharded.dtype == whole.dtype == torch.float32, key
        assert torch.equal(sharded, whole), key


def test_tensor_parallel_split_groups_whole_masks_exact_norms(tmp_path: Path) -> None:
    results = run_worker(tmp_path, 2, "tp", cases="nm_split,nm3,set_full,exact_norms")
    check_cases(results, {"nm3"})
    check_split_groups_refused(results, 2)
    check_whole_masks_placed(results, 2)
    check_exact_norms(results)


@pytest.mark.slow
def test_split_groups_whole_masks_exact_norms_on_four_ranks(tmp_path: Path) -> None:
    results = run_worker(tmp_path, 4, "tp", cases="nm_split,set_full,exact_norms")
    check_split_groups_refused(results, 4)
    check_whole_masks_placed(results, 4)
    check_exact_norms(results)
    fsdp = run_worker(tmp_path / "fsdp", 4, "fsdp", cases="set_full,exact_norms")
    check_whole_masks_placed(fsdp, 4)
    check_exact_norms(fsdp)


@pytest.mark.slow
def test_pruner_set_masks_takes_whole_masks_on_a_sharded_model(tmp_path: Path) -> None:
    results = run_worker(tmp_path, 2, "fsdp", cases="set_full")
    outcome, outcomes, single, _, _ = results["set_full"]
    assert outcomes == ["ok", "ok"], outcomes
    for name, mask in single.items():
        assert torch.equal(outcome[name], mask), name


@pytest.mark.slow
def test_state_saved_on_two_ranks_loads_on_four_and_on_one(tmp_path: Path) -> None:
    saved = run_worker(tmp_path / "two", 2, "fsdp", cases="global")
    masks = saved["global"][0]
    state = tmp_path / "two" / "state.pt"
    loaded = run_worker(tmp_path / "four", 4, "fsdp", load=state, cases="global")
    got, weights, reported = loaded["loaded"]
    for name, mask in masks.items():
        assert torch.equal(got[name], mask)
        assert bool((weights[name][~mask] == 0).all())
    assert reported == [int((~m).sum()) for m in masks.values()]
    model = make_model(ties=False)  # one process, no process group
    pruner = Pruner(model)
    pruner.load_state_dict(torch.load(state, weights_only=False))
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(pruner.masks[name], mask)
        assert bool((params[name][~mask] == 0).all())


LIGHTNING = Path(__file__).with_name("sharded_lightning_worker.py")


def run_lightning(
    out: Path,
    devices: str,
    ckpt: Path | None = None,
    kill_at: int | None = None,
    relative: str | None = None,
) -> dict[str, Any]:
    """The Lightning worker in a session of its own (its process group is every rank);
    with ``kill_at``, it must die by SIGKILL at that step, and nothing is returned; with
    ``relative`` (a method), the callback prunes 10 % of what remains at every step."""
    env = dict(os.environ)
    if kill_at is not None:
        env["KILL_AT_STEP"] = str(kill_at)
    if relative is not None:
        env["RELATIVE_METHOD"] = relative
    args = [sys.executable, str(LIGHTNING), str(out), devices]
    done = subprocess.run(
        args + ([str(ckpt)] if ckpt else []),
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        start_new_session=True,
    )
    if kill_at is not None:
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        assert not (out / "result.pt").exists()
        return {}
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted 2-rank ModelParallelStrategy fit (checkpoints at steps 4, 8, 12),
    shared by the Lightning tests."""
    out = tmp_path_factory.mktemp("lightning") / "two"
    return out, run_lightning(out, "2")


def check_resumed(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    """A fit resumed from the step-8 checkpoint makes the updates at 10 and 12 with the
    uninterrupted fit's masks, and ends with its masks."""
    assert [r["step"] for r in resumed["records"]] == [10, 12]
    after = {r["step"]: r["masks"] for r in reference["records"]}
    for record in resumed["records"]:
        for name, mask in record["masks"].items():
            assert torch.equal(mask, after[record["step"]][name]), (record["step"], name)
    assert resumed["final"].keys() == reference["final"].keys()
    for name, mask in reference["final"].items():
        assert torch.equal(resumed["final"][name], mask), name


@pytest.mark.slow
def test_lightning_model_parallel_matches_one_process_and_resumes(
    tmp_path: Path, uninterrupted: tuple[Path, dict[str, Any]]
) -> None:
    """ModelParallelStrategy (FSDP2, 2 ranks) with the Pruning callback: the masks of every
    update and the logged sparsities equal a one-process run's; a run resumed from the
    sharded checkpoint written at step 8 ends with the uninterrupted run's masks."""
    two, sharded = uninterrupted
    single = run_lightning(tmp_path / "one", "1")
    steps = [r["step"] for r in single["records"]]
    assert steps == [r["step"] for r in sharded["records"]] == [4, 6, 8, 10, 12]
    for a, b in zip(single["records"], sharded["records"], strict=True):
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), (a["step"], name)
    # one row per update (and one at the epoch's end), with whole-model values
    assert sharded["logged"] == single["logged"]
    assert [r["step"] for r in sharded["logged"]] == [*steps, 13]
    for row, record in zip(sharded["logged"], sharded["records"], strict=False):
        total = sum(m.numel() for m in record["masks"].values())
        pruned = sum(int((~m).sum()) for m in record["masks"].values())
        assert row["sparsity/actual"] == pytest.approx(pruned / total)
    ckpt = two / "ckpt" / "epoch=0-step=8.ckpt"
    assert (ckpt / "meta.pt").exists()  # a distributed checkpoint directory
    check_resumed(run_lightning(tmp_path / "resumed", "2", ckpt), sharded)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "ln_structured"])
def test_lightning_relative_amounts_match_one_process(tmp_path: Path, method: str) -> None:
    """Pruning(amount=0.1, unit="step") (10 % of what remains, every step) under
    ModelParallelStrategy on 2 ranks: what remains is counted over the whole tensors (a
    sharded mask's own count_nonzero is one rank's share: the ranks used to compute
    different targets and the fit died in a collective), so every update's masks and
    the logged values equal one process's."""
    single = run_lightning(tmp_path / "one", "1", relative=method)
    sharded = run_lightning(tmp_path / "two", "2", relative=method)
    steps = [r["step"] for r in single["records"]]
    assert steps == [r["step"] for r in sharded["records"]] == list(range(1, 15))
    for a, b in zip(single["records"], sharded["records"], strict=True):
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), (a["step"], name)
    assert sharded["logged"] == single["logged"]
    last = single["records"][-1]["masks"]
    if method == "magnitude":  # 14 times 10 % of what remains, counted by hand
        kept, total = (
            sum(int(m.sum()) for m in last.values()),
            sum(m.numel() for m in last.values()),
        )
        expected = total
        for _ in range(14):
            expected -= round(0.1 * expected)
        assert kept == expected


@pytest.mark.slow
def test_lightning_killed_mid_run_resumes_to_the_uninterrupted_masks(
    tmp_path: Path, uninterrupted: tuple[Path, dict[str, Any]]
) -> None:
    """Both ranks SIGKILLed when step 11 starts (after the update at step 10, the
    checkpoint at step 8 on disk, the one at 12 not yet written); resumed from the last
    checkpoint, the fit ends with the uninterrupted fit's masks."""
    killed = tmp_path / "killed"
    run_lightning(killed, "2", kill_at=11)
    written = sorted(p.name for p in (killed / "ckpt").iterdir())
    assert written == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt"]
    last = killed / "ckpt" / written[-1]
    check_resumed(run_lightning(tmp_path / "resumed", "2", last), uninterrupted[1])


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["4", "1mp"])
def test_lightning_checkpoint_of_two_ranks_resumes_on_another_world_size(
    tmp_path: Path, uninterrupted: tuple[Path, dict[str, Any]], devices: str
) -> None:
    """The distributed checkpoint written on 2 ranks at step 8, resumed with
    ModelParallelStrategy on 4 ranks and on 1: torch.distributed.checkpoint reshards the
    weights and Adam moments, the callback's state holds whole masks (each rank keeps its
    block), and the updates at 10 and 12 and the final masks are the 2-rank fit's."""
    two, reference = uninterrupted
    ckpt = two / "ckpt" / "epoch=0-step=8.ckpt"
    check_resumed(run_lightning(tmp_path / devices, devices, ckpt), reference)


@pytest.mark.slow
def test_sharded_benchmark_runs_at_a_tiny_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/sharded.py (meant for ~200M parameters) at 300k on 2 ranks: prunekit's
    count is exact and its traffic a few histograms (under 2.2 MB), while the gather
    sends 4 bytes per weight of the rank."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # benchmarks/
    from benchmarks import sharded

    (result,) = sharded.main(["--size", "300k", "--tensors", "3", "--world", "2"])
    assert result["world"] == 2 and result["exact"]
    assert result["pruned"] == round(0.9 * result["parameters"])
    assert 0 < result["prunekit_bytes_per_rank"] < 2.2e6
    # rank 0 holds ceil(rows / 2) of each tensor's rows
    assert result["gather_bytes_per_sending_rank"] >= 4 * result["parameters"] // 2
