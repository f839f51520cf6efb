"""Tests for prunekit.experiments.lottery: rewinding, controls, restarts, summary, errors.

Every run trains LeNet-300-100 for a few dozen steps on a small fake Fashion-MNIST
folder (random images), so the tests check mechanics, not accuracy. A probe wrapped
around ``training.fit`` records each fit's model and optimizer state at
``on_train_start``, i.e. exactly what a round starts training from.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from prunekit.experiments import jobs, lottery, training
from prunekit.experiments.config import ConfigError, LotteryConfig, load_config
from prunekit.experiments.data import FILES
from prunekit.experiments.jobs import UnitError
from prunekit.experiments.models import build_model
from prunekit.experiments.paths import RunFolderError, RunPaths, locked
from prunekit.schedules import LotteryTicketPlan

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # lightning vs torch 2.13

SUMMARY_KEYS = {
    "kind",
    "name",
    "config_hash",
    "seed",
    "model",
    "rewind",
    "scope",
    "rounds",
    "dense_test_acc",
    "wall_s",
    "files",
}
RECORD_KEYS = {
    "round",
    "variant",
    "remaining",
    "remaining_per_layer",
    "test_acc_early_stop",
    "early_stop_step",
    "val_loss_min",
    "test_acc_final",
    "wall_s",
}
WEIGHTS = ("fc1.weight", "fc2.weight", "fc3.weight")


# --------------------------------------------------------------------------- fixtures
def write_fake_fashion_mnist(root: Path, n_train: int = 700, n_test: int = 100) -> Path:
    """Four IDX files of random images; the label shifts the mean brightness (learnable)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for part, n in (("train", n_train), ("test", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        noise = torch.randint(0, 100, (n, 28, 28), generator=g)
        images = (noise + 15 * labels.view(n, 1, 1)).to(torch.uint8)
        header = bytes([0, 0, 8, 3]) + b"".join(s.to_bytes(4, "big") for s in (n, 28, 28))
        (root / FILES[f"{part}_images"]).write_bytes(header + images.numpy().tobytes())
        label_header = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
        (root / FILES[f"{part}_labels"]).write_bytes(label_header + labels.numpy().tobytes())
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"))


def config(data_root: Path, out_dir: Path, *overrides: str) -> DictConfig:
    base = [
        "name=t",
        "rounds=2",
        "steps_per_round=30",
        "data.batch_size=50",
        "data.val_size=200",
        f"data.root={data_root}",
        "train.val_every=10",
        f"out_dir={out_dir}",
    ]
    return load_config(LotteryConfig, None, [*base, *overrides])


class Probe(Callback):
    """Records what a fit starts from, after every other callback's on_train_start."""

    def __init__(self, into: dict[str, Any], key: str) -> None:
        self.into, self.key = into, key

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        schedulers = trainer.lr_scheduler_configs
        self.into[self.key] = {
            "step": trainer.global_step,
            "weights": {
                k.removeprefix("model."): v.detach().clone()
                for k, v in pl_module.state_dict().items()
            },
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "lr": optimizer.param_groups[0]["lr"],
            "scheduler": copy.deepcopy(schedulers[0].scheduler.state_dict())
            if schedulers
            else None,
        }


def install_probe(mp: pytest.MonkeyPatch) -> dict[str, Any]:
    """``{"round_01_lottery": start state, ...}`` of every fit run from now on."""
    starts: dict[str, Any] = {}
    fit = training.fit

    def probed_fit(*args: Any, **kwargs: Any) -> pl.Trainer:
        key = Path(kwargs["log_dir"]).name
        kwargs["callbacks"] = [*kwargs["callbacks"], Probe(starts, key)]
        return fit(*args, **kwargs)

    mp.setattr(training, "fit", probed_fit)
    return starts


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return install_probe(monkeypatch)


def state(cfg: DictConfig, r: int, variant: str) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(RunPaths.for_config(cfg).round_state(r, variant), weights_only=True)


def counts(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: int(m.count_nonzero()) for n, m in masks.items()}


def param_index(name: str) -> int:
    """Index of a parameter in the optimizer's state (model parameter order)."""
    return [n for n, _ in build_model("lenet_300_100").named_parameters()].index(name)


# --------------------------------------------------------------------------- the init run
@pytest.fixture(scope="module")
def init_run(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DictConfig, dict[str, Any], dict[str, Any]]:
    """rewind=init, 2 rounds, both controls: (config, summary, start states)."""
    cfg = config(
        data_root,
        tmp_path_factory.mktemp("runs"),
        "controls=[random_reinit,random_prune]",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as --threads 1 (the tests of --jobs compare with this run)
    with pytest.MonkeyPatch.context() as mp:
        starts = install_probe(mp)
        try:
            summary = lottery.run_lottery(cfg)
        finally:
            torch.set_num_threads(threads)
    return cfg, summary, starts


def test_rewind_init_starts_survivors_from_their_initial_values(init_run: Any) -> None:
    cfg, _, starts = init_run
    initial = torch.load(RunPaths.for_config(cfg).initial_weights, weights_only=True)
    for r in (1, 2):
        masks = state(cfg, r, "lottery")["masks"]
        start = starts[f"round_{r:02d}_lottery"]
        assert start["step"] == 0 and start["optimizer"]["state"] == {}  # fresh optimizer
        for name in WEIGHTS:
            assert torch.equal(start["weights"][name], initial[name] * masks[name])
        assert torch.equal(start["weights"]["fc1.bias"], initial["fc1.bias"])
    # masks come from the final weights of the previous round and only shrink
    m1, m2 = state(cfg, 1, "lottery")["masks"], state(cfg, 2, "lottery")["masks"]
    final1 = state(cfg, 1, "lottery")["weights"]
    for name in WEIGHTS:
        assert not (m2[name] & ~m1[name]).any()
        kept, dropped = final1[name][m2[name]].abs(), final1[name][m1[name] & ~m2[name]].abs()
        assert kept.min() >= dropped.max()


def test_remaining_matches_the_plan_exactly(init_run: Any) -> None:
    cfg, summary, _ = init_run
    sizes = {n: build_model("lenet_300_100").get_parameter(n).numel() for n in WEIGHTS}
    plan = LotteryTicketPlan(cfg.rounds, cfg.rate, {"fc3.weight": 0.1})
    for record in summary["rounds"]:
        overall, kept = plan.remaining(record["round"], sizes)
        assert record["remaining"] == overall
        assert record["kept_per_layer"] == kept
        assert record["remaining_per_layer"] == {n: kept[n] / sizes[n] for n in sizes}
        assert counts(state(cfg, record["round"], record["variant"])["masks"]) == kept


def test_controls_reuse_the_round_mask(init_run: Any) -> None:
    cfg, _, starts = init_run
    initial = torch.load(RunPaths.for_config(cfg).initial_weights, weights_only=True)
    for r in (1, 2):
        lottery_masks = state(cfg, r, "lottery")["masks"]
        reinit = state(cfg, r, "random_reinit")["masks"]
        random = state(cfg, r, "random_prune")["masks"]
        for name in WEIGHTS:
            assert torch.equal(reinit[name], lottery_masks[name])
            assert not torch.equal(random[name], lottery_masks[name])
        assert counts(random) == counts(lottery_masks)
        # random_reinit: new random weights under the same mask
        start = starts[f"round_{r:02d}_random_reinit"]["weights"]
        assert not torch.equal(start["fc1.weight"], initial["fc1.weight"] * reinit["fc1.weight"])
        assert not start["fc1.weight"][~reinit["fc1.weight"]].any()
        # random_prune: rewound like the lottery variant (init weights), other mask
        start = starts[f"round_{r:02d}_random_prune"]["weights"]
        for name in WEIGHTS:
            assert torch.equal(start[name], initial[name] * random[name])


def test_summary_files_and_records(init_run: Any) -> None:
    cfg, summary, _ = init_run
    paths = RunPaths.for_config(cfg)
    assert set(summary) >= SUMMARY_KEYS
    assert json.loads(paths.summary.read_text()) == summary
    assert summary["kind"] == "lottery" and summary["rewind"] == "init"
    assert [(r["round"], r["variant"]) for r in summary["rounds"]] == [
        (0, "lottery"),
        *((r, v) for r in (1, 2) for v in ("lottery", "random_reinit", "random_prune")),
    ]
    assert summary["rounds"][0]["remaining"] == 1.0
    assert summary["dense_test_acc"] == summary["rounds"][0]["test_acc_final"]
    for record in summary["rounds"]:
        assert set(record) >= RECORD_KEYS and "evaluations" not in record
        full = json.loads(paths.round_result(record["round"], record["variant"]).read_text())
        assert [e["step"] for e in full["evaluations"]] == [10, 20, 30]
        best = min(full["evaluations"], key=lambda e: e["val_loss"])
        assert (record["early_stop_step"], record["test_acc_early_stop"]) == (
            best["step"],
            best["test_acc"],
        )
        assert record["test_acc_final"] == full["evaluations"][-1]["test_acc"]
    for name in summary["files"]:
        assert (paths.root / name).is_file(), name
    assert {
        "config.yaml",
        "summary.json",
        "init.pt",
        "logs/round_02_random_prune/metrics.csv",
    } <= set(summary["files"])
    # saved final weights load into a fresh network and keep their zeros
    saved = state(cfg, 2, "lottery")
    net = build_model("lenet_300_100")
    net.load_state_dict(saved["weights"])
    assert not net.fc1.weight[~saved["masks"]["fc1.weight"]].any()
    assert "random_prune" in lottery.lottery_table(summary)


# --------------------------------------------------------------------------- other rewinds
def test_rewind_step_restores_step_k_weights_and_optimizer(
    data_root: Path, tmp_path: Path, probe: dict[str, Any]
) -> None:
    cfg = config(
        data_root,
        tmp_path,
        "rounds=1",
        "rewind=step",
        "rewind_step=12",
        "train.lr_schedule=cosine",
        "controls=[random_prune]",
    )
    lottery.run_lottery(cfg)
    paths = RunPaths.for_config(cfg)
    checkpoint = torch.load(paths.rewind_checkpoint, weights_only=False)
    assert checkpoint["global_step"] == 12
    captured = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    captured_opt = checkpoint["optimizer_states"][0]["state"]
    for variant in ("lottery", "random_prune"):
        masks = state(cfg, 1, variant)["masks"]
        start = probe[f"round_01_{variant}"]
        assert start["step"] == 12
        assert start["scheduler"]["last_epoch"] == 12
        assert start["scheduler"] == checkpoint["lr_schedulers"][0]
        for name in WEIGHTS:
            mask = masks[name]
            assert torch.equal(start["weights"][name], captured[name] * mask)
            opt = start["optimizer"]["state"][param_index(name)]
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt[key], captured_opt[param_index(name)][key] * mask)
                assert opt[key][mask].ne(0).any() and not opt[key][~mask].any()
            assert opt["step"] == captured_opt[param_index(name)]["step"]
        assert torch.equal(start["weights"]["fc2.bias"], captured["fc2.bias"])
        record = json.loads(paths.round_result(1, variant).read_text())
        assert [e["step"] for e in record["evaluations"]] == [20, 30]  # trained from k to 30
        assert record["steps"] == 30


@pytest.mark.parametrize("mode", ["lr", "finetune"])
def test_rewind_lr_and_finetune_keep_the_final_weights(
    data_root: Path, tmp_path: Path, probe: dict[str, Any], mode: str
) -> None:
    cfg = config(
        data_root,
        tmp_path,
        "rounds=1",
        f"rewind={mode}",
        "finetune_lr=3e-5",
        "train.lr_schedule=cosine",
    )
    lottery.run_lottery(cfg)
    final0 = state(cfg, 0, "lottery")["weights"]
    masks = state(cfg, 1, "lottery")["masks"]
    start = probe["round_01_lottery"]
    assert start["step"] == 0 and start["optimizer"]["state"] == {}
    for name in WEIGHTS:
        assert torch.equal(start["weights"][name], final0[name] * masks[name])
    if mode == "lr":  # the LR schedule replayed from its start
        assert start["scheduler"]["last_epoch"] == 0 and start["lr"] == cfg.train.lr
    else:  # constant small LR
        assert start["scheduler"] is None and start["lr"] == 3e-5


def test_global_scope_one_ranking_with_layer_rates_apart(data_root: Path, tmp_path: Path) -> None:
    cfg = config(data_root, tmp_path, "scope=global", "steps_per_round=10")
    summary = lottery.run_lottery(cfg)
    plan = LotteryTicketPlan(cfg.rounds, cfg.rate, {"fc3.weight": 0.1})
    ranked = 784 * 300 + 300 * 100
    for r in (1, 2):
        kept = summary["rounds"][r]["kept_per_layer"]
        assert kept["fc1.weight"] + kept["fc2.weight"] == ranked - round(plan.sparsity(r) * ranked)
        assert kept["fc3.weight"] == 1000 - round(plan.sparsity(r, "fc3.weight") * 1000)
        assert kept["fc1.weight"] / 235200 != kept["fc2.weight"] / 30000  # not per layer


# --------------------------------------------------------------------------- restarts
def test_finished_rounds_are_reused_and_runs_extend(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(data_root, tmp_path, "rounds=1", "controls=[random_reinit]")
    first = lottery.run_lottery(cfg)
    trained: list[str] = []
    fit = training.fit

    def counting_fit(*args: Any, **kwargs: Any) -> pl.Trainer:
        trained.append(Path(kwargs["log_dir"]).name)
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", counting_fit)
    again = lottery.run_lottery(cfg)
    assert trained == []
    assert again["rounds"] == first["rounds"]
    # more rounds: same run folder (rounds is not hashed), only the new round trains
    longer = config(data_root, tmp_path, "rounds=2", "controls=[random_reinit]")
    assert RunPaths.for_config(longer).root == RunPaths.for_config(cfg).root
    extended = lottery.run_lottery(longer)
    assert trained == ["round_02_lottery", "round_02_random_reinit"]
    assert extended["rounds"][:3] == first["rounds"]
    assert extended["rounds"][3]["remaining"] == pytest.approx(0.6406, abs=1e-4)
    # an interrupted round (state saved, record not yet written) is trained again
    RunPaths.for_config(cfg).round_result(2, "random_reinit").unlink()
    lottery.run_lottery(longer)
    assert trained[2:] == ["round_02_random_reinit"]


# --------------------------------------------------------------------------- errors
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(training, "fit", fail)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (
            ["layer_rates={fc3.wieght: 0.1}"],
            ConfigError,
            r"fc3\.wieght.*did you mean 'fc3\.weight'",
        ),
        (["layer_rates={output: 0.1, model.fc3.weight: 0.2}"], ConfigError, "twice"),
        (["data.root=/no/such/folder"], FileNotFoundError, "/no/such/folder"),
    ],
    ids=["unknown-layer", "layer-twice", "no-data"],
)
def test_bad_configs_fail_before_training(
    data_root: Path,
    tmp_path: Path,
    no_training: None,
    overrides: list[str],
    error: type[Exception],
    match: str,
) -> None:
    cfg = config(data_root, tmp_path, *overrides)
    with pytest.raises(error, match=match):
        lottery.run_lottery(cfg)
    if error is ConfigError:  # nothing written either
        assert not RunPaths.for_config(cfg).root.exists()


def test_bad_rewind_mode_fails_at_load_and_run(
    data_root: Path, tmp_path: Path, no_training: None
) -> None:
    with pytest.raises(ConfigError, match="rewind='rewound'"):
        config(data_root, tmp_path, "rewind=rewound")
    with pytest.raises(ConfigError, match="rewind_step"):
        config(data_root, tmp_path, "rewind=step", "rewind_step=30")
    with pytest.raises(ConfigError, match="val_size"):
        config(data_root, tmp_path, "data.val_size=0")
    cfg = config(data_root, tmp_path)
    OmegaConf.update(cfg, "rewind", "rewound")  # a config built without load_config
    with pytest.raises(ConfigError, match="rewind='rewound'"):
        lottery.run_lottery(cfg)


def test_layer_rates_accept_network_and_module_names(data_root: Path, tmp_path: Path) -> None:
    cfg = config(data_root, tmp_path, "layer_rates={fc2.weight: 0.5, model.fc1.weight: 0.1}")
    with lottery._Run.prepare(cfg) as run:
        rates = run.rates
    assert rates == {"model.fc3.weight": 0.1, "model.fc2.weight": 0.5, "model.fc1.weight": 0.1}


# --------------------------------------------------------------------------- SNIP control
def hand_snip_masks(cfg: DictConfig, keep: int) -> dict[str, torch.Tensor]:
    """SNIP by hand: |W * dL/dW| of the initial weights on epoch 0's first training batch,
    the ``keep`` highest over all three weights kept (torch.topk on the concatenation)."""
    net = build_model("lenet_300_100")
    net.load_state_dict(torch.load(RunPaths.for_config(cfg).initial_weights, weights_only=True))
    x, y = next(iter(training.datamodule(cfg, cfg.seed).train_dataloader()))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    params = [net.get_parameter(n) for n in WEIGHTS]
    grads = torch.autograd.grad(loss, params)
    scores = torch.cat([(p * g).abs().flatten() for p, g in zip(params, grads, strict=True)])
    flat = torch.zeros_like(scores, dtype=torch.bool)
    flat[torch.topk(scores, keep).indices] = True
    masks, start = {}, 0
    for name, p in zip(WEIGHTS, params, strict=True):
        masks[name] = flat[start : start + p.numel()].view(p.shape)
        start += p.numel()
    return masks


def test_snip_control_masks_at_init_trained_from_init(
    data_root: Path, tmp_path: Path, probe: dict[str, Any]
) -> None:
    cfg = config(data_root, tmp_path, "controls=[snip]", "steps_per_round=20", "rewind=lr")
    summary = lottery.run_lottery(cfg)
    assert [(r["round"], r["variant"]) for r in summary["rounds"]] == [
        (0, "lottery"),
        (1, "lottery"),
        (1, "snip"),
        (2, "lottery"),
        (2, "snip"),
    ]
    initial = torch.load(RunPaths.for_config(cfg).initial_weights, weights_only=True)
    for r in (1, 2):
        lottery_masks = state(cfg, r, "lottery")["masks"]
        snip = state(cfg, r, "snip")["masks"]
        keep = sum(counts(lottery_masks).values())
        assert sum(counts(snip).values()) == keep  # the same sparsity in all
        expected = hand_snip_masks(cfg, keep)
        for name in WEIGHTS:
            assert torch.equal(snip[name], expected[name]), name
        assert counts(snip) != counts(lottery_masks)  # ranked globally, not per layer
        start = probe[f"round_{r:02d}_snip"]
        assert start["step"] == 0 and start["optimizer"]["state"] == {}
        assert start["lr"] == cfg.train.lr
        for name in WEIGHTS:  # from the initial weights (rewind=lr notwithstanding)
            assert torch.equal(start["weights"][name], initial[name] * snip[name])
    assert "snip" in lottery.lottery_table(summary)


# --------------------------------------------------------------------------- --jobs N
def result_files(root: Path) -> dict[str, Any]:
    """Every file a lottery run folder holds, comparable across runs: JSON without its
    wall times (``wall_s`` of the summary and of each record), config.yaml without its
    out_dir, the bytes of every member of a torch.save file, every other file's bytes.
    Left out: the lock, the plot (drawn by the CLI) and a --jobs child's job.log."""
    files: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in ("run.lock", "accuracy.png", "job.log"):
            continue
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data.pop("wall_s")
            for record in data.get("rounds", []):
                record.pop("wall_s")
            files[rel] = data
        elif path.suffix in (".pt", ".ckpt"):  # torch.save's zip: every member's bytes
            with zipfile.ZipFile(path) as archive:  # (under a folder named after the
                files[rel] = {  # temporary file it was written to: left out)
                    name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()
                }
        elif rel == "config.yaml":  # the resolved config names its out_dir
            files[rel] = path.read_text().replace(f"out_dir: {root.parent}\n", "")
        else:
            files[rel] = path.read_bytes()
    return files


def assert_same_files(a: Path, b: Path) -> None:
    fa, fb = result_files(a), result_files(b)
    assert sorted(fa) == sorted(fb)
    for rel, value in fa.items():
        assert value == fb[rel], rel  # JSON: equal values; every other file: equal bytes


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Any:
    """torch's thread count set to ``request.param`` for the test, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("threads", "start"),
    [(1, "forked"), pytest.param(2, "spawned", marks=pytest.mark.slow)],
    indirect=["threads"],
)
def test_jobs_2_writes_bit_identical_files_with_controls_in_a_worker(
    init_run: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    threads: int,
    start: str,
) -> None:
    """The worker (a forked copy with one torch thread; a fresh interpreter otherwise)
    trains every control; the files equal those of a serial run with as many threads
    (``init_run``'s, made with one thread)."""
    cfg, _, _ = init_run
    if threads != 1:  # float sums depend on the thread count: a serial run with as many
        cfg = copy.deepcopy(cfg)
        cfg.out_dir = str(tmp_path / "serial")
        lottery.run_lottery(cfg)
    serial = RunPaths.for_config(cfg).root
    parallel_cfg = copy.deepcopy(cfg)
    parallel_cfg.out_dir = str(tmp_path / "parallel")
    monkeypatch.setattr(lottery, "_PARENT_TRAINS_CONTROLS", False)  # all 4 in the worker
    # while the workers train under this process's run lock, a second independent run of
    # the folder is refused (tried at the start of round 2's lottery fit, here)
    refused: list[str] = []
    fit = training.fit

    def fit_and_try_a_second_run(*args: Any, **kwargs: Any) -> pl.Trainer:
        if Path(kwargs["log_dir"]).name == "round_02_lottery":
            with pytest.raises(RunFolderError, match=f"in use by pid {os.getpid()} ") as e:
                lottery.run_lottery(parallel_cfg, jobs=2)
            refused.append(str(e.value))
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", fit_and_try_a_second_run)
    capfd.readouterr()
    if start == "forked" and jobs.start_method(threads) != "fork":
        start = "spawned"  # another test left a Python thread running: fork is unsafe then
    summary = lottery.run_lottery(parallel_cfg, jobs=2)
    assert len(refused) == 1
    err = capfd.readouterr().err
    assert f", {start}; {threads} torch thread(s) each)" in err
    parallel = RunPaths.for_config(parallel_cfg).root
    assert parallel.name == serial.name
    for r in (1, 2):
        for variant in ("random_reinit", "random_prune"):
            assert f"round {r}/2 {variant} (worker pid " in err
    assert "round 1/2 lottery (worker pid" not in err  # the lottery chain: here
    assert_same_files(serial, parallel)
    assert [(rec["round"], rec["variant"]) for rec in summary["rounds"]] == [
        (0, "lottery"),
        *((r, v) for r in (1, 2) for v in ("lottery", "random_reinit", "random_prune")),
    ]


def test_a_worker_refuses_a_folder_its_parent_does_not_lock(init_run: Any) -> None:
    cfg, _, _ = init_run
    root = RunPaths.for_config(cfg).root
    with pytest.raises(RunFolderError, match=r"nobody holds run\.lock"):
        lottery._Run.attach(cfg, root, parent=os.getpid())
    with locked(root):  # held by this process: a worker of another parent is refused
        with pytest.raises(RunFolderError, match=f"held by pid {os.getpid()} "):
            lottery._Run.attach(cfg, root, parent=os.getpid() + 1)
        run = lottery._Run.attach(cfg, root, parent=os.getpid())  # its own parent's: fine
        assert run.where == f" (worker pid {os.getpid()})"


def test_jobs_must_be_a_whole_number(data_root: Path, tmp_path: Path, no_training: None) -> None:
    cfg = config(data_root, tmp_path)
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match=f"jobs={bad!r} must be a whole number >= 1"):
            lottery.run_lottery(cfg, jobs=bad)  # type: ignore[arg-type]
    assert not RunPaths.for_config(cfg).root.exists()


def test_a_failing_control_fails_the_run_naming_it(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # round 1's random_reinit cannot be written (a folder where its state file goes): the
    # worker fails; the run fails naming the unit, and no worker is left running
    cfg = config(data_root, tmp_path, "rounds=2", "steps_per_round=10", "controls=[random_reinit]")
    RunPaths.for_config(cfg).round_state(1, "random_reinit").mkdir(parents=True)
    monkeypatch.setattr(lottery, "_PARENT_TRAINS_CONTROLS", False)
    with pytest.raises(UnitError, match=r"round 1 random_reinit failed in worker process \d+") as e:
        lottery.run_lottery(cfg, jobs=2)
    assert "cannot write" in str(e.value) and "round_01/random_reinit.pt" in str(e.value)
    assert multiprocessing.active_children() == []
    assert RunPaths.for_config(cfg).lock.read_text() == ""  # the lock was released


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1], indirect=True)
def test_jobs_3_resumes_reusing_finished_units_identical_to_serial(
    data_root: Path, tmp_path: Path, threads: int, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two forked workers and this process sharing the controls (rewind=lr: a control
    starts from round r - 1's final weights; snip: from init.pt and the data), then a
    restart after losing round 2's lottery record and round 1's random_prune record."""
    overrides = ("rewind=lr", "controls=[snip,random_prune]", "steps_per_round=20")
    serial_cfg = config(data_root, tmp_path / "serial", *overrides)
    lottery.run_lottery(serial_cfg)
    serial = RunPaths.for_config(serial_cfg).root
    cfg = config(data_root, tmp_path / "parallel", *overrides)
    capfd.readouterr()
    lottery.run_lottery(cfg, jobs=3)
    assert "2 worker process(es)" in capfd.readouterr().err
    paths = RunPaths.for_config(cfg)
    assert_same_files(serial, paths.root)
    paths.round_result(2, "lottery").unlink()  # as if stopped while writing these
    paths.round_result(1, "random_prune").unlink()
    reused = [paths.round_state(r, v) for r in (1, 2) for v in ("lottery", "snip")]
    reused = [p for p in reused if p != paths.round_state(2, "lottery")]
    reused.append(paths.round_state(2, "random_prune"))
    before = {p: p.stat().st_mtime_ns for p in reused}
    redone = [paths.round_state(2, "lottery"), paths.round_state(1, "random_prune")]
    old = {p: p.stat().st_mtime_ns for p in redone}
    lottery.run_lottery(cfg, jobs=3)
    assert {p: p.stat().st_mtime_ns for p in reused} == before  # not trained again
    assert all(p.stat().st_mtime_ns != old[p] for p in redone)  # trained again
    assert_same_files(serial, paths.root)


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_a_restart_resumes(data_root: Path, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    argv = [
        sys.executable,
        "-m",
        "prunekit.experiments.cli",
        "lottery",
        str(repo / "experiments" / "configs" / "quick_lottery.yaml"),
        f"data.root={data_root}",
        "data.subset=null",
        "data.val_size=200",
        "data.batch_size=50",
        "rounds=3",
        "steps_per_round=300",
        "train.val_every=100",
        f"out_dir={tmp_path}",
        "--threads",
        "1",
        "--jobs",
        "2",
    ]
    log = tmp_path / "err.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=repo)
    deadline = time.monotonic() + 120
    while "(worker pid " not in log.read_text():  # a worker is training a control
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    text = log.read_text()
    worker = int(text.split("(worker pid ")[1].split(")")[0])
    proc.send_signal(signal.SIGINT)  # to the parent only: it must stop its worker
    assert proc.wait(timeout=60) != 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)
    root = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert (root / "run.lock").read_text() == ""
    finished = sorted(p.name for p in root.glob("round_*/*.json"))
    with open(log, "w") as err:  # started again: the finished units are reused
        assert subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=repo).returncode == 0
    text = log.read_text()
    assert text.count("finished before, reusing") == len(finished)
    assert len(list(root.glob("round_*/*.json"))) == 7
