"""Statistics of data-aware methods: collected in the training loop, exact under gradient
accumulation, reset after updates, free when unused, saved and restored, and summed
across ranks under DDP (2 gloo processes).

Expected statistics are computed here by autograd on copies of the model and by the
formulas (sum of squared inputs, sum of W * dL/dW), never by the code under test.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit import Pruner

WEIGHTS = ["0.weight", "2.weight"]
WORKER = Path(__file__).with_name("stats_ddp_worker.py")


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def data(seed: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 5, generator=g), torch.randint(0, 3, (rows,), generator=g)


def loss_of(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], reduction: str = "sum"
) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction=reduction)


def by_hand(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], reduction: str = "sum"
) -> dict[str, torch.Tensor]:
    """W * dL/dW of one backward on ``batch``, by autograd on a copy."""
    twin = copy.deepcopy(model)
    params = [twin.get_parameter(n) for n in WEIGHTS]
    grads = torch.autograd.grad(loss_of(twin, batch, reduction), params)
    return {n: p.detach() * g for n, p, g in zip(WEIGHTS, params, grads, strict=True)}


def stats_of(pruner: Pruner) -> dict[str, torch.Tensor]:
    got = pruner._stats.reduced(WEIGHTS)
    return {n: got[n].grads for n in WEIGHTS}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradient_accumulation_equals_the_concatenated_batch(reduction: str) -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, method="taylor").attach(optimizer)
    first, second = data(1), data(2)
    whole = (torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]]))
    expected = by_hand(model, whole, reduction)
    scale = 0.5 if reduction == "mean" else 1.0  # the usual 1/k of k micro-batches
    for micro in (first, second):
        (loss_of(model, micro, reduction) * scale).backward()
    got = stats_of(pruner)
    for n in WEIGHTS:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)
    optimizer.step()
    optimizer.zero_grad()
    assert pruner._stats.reduced(WEIGHTS)["0.weight"].backwards == 2  # per backward


def test_training_steps_accumulate_weight_times_gradient_at_each_step() -> None:
    model = net()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    pruner = Pruner(model, method="movement").attach(optimizer)
    expected = {n: torch.zeros_like(twin.get_parameter(n)) for n in WEIGHTS}
    for step in range(3):
        batch = data(10 + step)
        for n, v in by_hand(twin, batch).items():  # with the weights of that step
            expected[n] += v
        loss_of(twin, batch).backward()
        twin_opt.step()
        twin_opt.zero_grad()
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    got = stats_of(pruner)
    for n in WEIGHTS:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)


def test_forward_statistics_count_training_mode_only_and_calibrate() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = Pruner(model, method="wanda").attach(optimizer)
    x_train, x_eval, x_cal = data(1)[0], data(2)[0] * 100, data(3)[0]
    model(x_train)
    model.eval()
    with torch.no_grad():
        model(x_eval)  # an evaluation pass: not counted
    pruner.calibrate([x_cal])  # counted whatever the mode
    got = pruner._stats.reduced(["0.weight"])["0.weight"]
    assert got.rows == 8
    expected = torch.cat([x_train, x_cal]).square().sum(0).sqrt()
    torch.testing.assert_close(got.input_norm.view(-1), expected)


def test_statistics_reset_after_each_update_and_cost_nothing_when_unused() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, method="taylor").attach(optimizer)
    loss_of(model, data(1)).backward()
    pruner.prune_to(0.5)
    with pytest.raises(RuntimeError, match="calibrate"):
        pruner.prune_to(0.6)
    pruner.remove()
    assert all(p._backward_hooks in (None, {}) for p in model.parameters())

    plain = net()
    Pruner(plain).attach(torch.optim.SGD(plain.parameters(), lr=0.1))  # magnitude
    assert all(p._backward_hooks in (None, {}) for p in plain.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in plain.modules())

    wanda = net()
    pruner = Pruner(wanda, method="wanda")  # not attached: no hooks until calibrate/attach
    assert all(not m._forward_pre_hooks for m in wanda.modules())
    pruner.calibrate([data(1)[0]])
    assert all(not m._forward_pre_hooks for m in wanda.modules())  # removed afterwards


def test_calibrate_leaves_grads_as_found_and_steps_nothing() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    pruner = Pruner(model, method="snip").attach(optimizer)
    loss_of(model, data(5)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner.calibrate([data(6), data(7)], lambda out, b: nn.functional.cross_entropy(out, b[1]))
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p, weights[n]), n
    assert not optimizer.state  # never stepped


@pytest.mark.parametrize("method", ["movement", "taylor", "wanda"])
def test_resume_mid_accumulation_gives_the_masks_of_an_uninterrupted_run(method: str) -> None:
    def run(stop_at: int | None) -> dict[str, torch.Tensor]:
        model = net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
        pruner = Pruner(model, method=method).attach(optimizer)
        for step in range(6):
            if step == stop_at:  # save everything, rebuild from scratch, load
                saved = copy.deepcopy(
                    {
                        "model": model.state_dict(),
                        "opt": optimizer.state_dict(),
                        "pruner": pruner.state_dict(),
                    }
                )
                pruner.remove()
                model = net(seed=99)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["opt"])
                pruner = Pruner(model, method=method).attach(optimizer)
                pruner.load_state_dict(saved["pruner"])
            loss_of(model, data(20 + step)).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step in (2, 5):
                pruner.prune_to(0.3 if step == 2 else 0.6)
        return pruner.masks

    uninterrupted = run(None)
    resumed = run(4)  # after the first update, two steps into the second window
    for n in WEIGHTS:
        assert torch.equal(uninterrupted[n], resumed[n]), n


def test_load_state_dict_checks_statistics_before_changing_anything() -> None:
    model = net()
    pruner = Pruner(model, method="movement")
    pruner.calibrate([data(1)], lambda out, b: loss_of(model, b))
    state = pruner.state_dict()
    other = Pruner(net(), method="movement")
    bad = copy.deepcopy(state)
    bad["stats"]["targets"]["0.weight"]["values"]["grads"] = torch.zeros(2, 2)
    bad["masks"]["0.weight"]["packed"] = state["masks"]["0.weight"]["packed"]
    with pytest.raises(
        ValueError,
        match=r"stats\['0\.weight'\]\['grads'\] must be a float tensor of shape \(4, 5\)",
    ):
        other.load_state_dict(bad)
    assert other._stats.reduced(["0.weight"])["0.weight"].backwards == 0
    with pytest.raises(
        ValueError, match="collected for method='movement', this target uses method='taylor'"
    ):
        Pruner(net(), method="taylor").load_state_dict(state)
    other.load_state_dict(state)
    assert other._stats.reduced(["0.weight"])["0.weight"].backwards == 1


def test_a_deep_copy_collects_for_its_own_model() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, method="wanda").attach(optimizer)
    model(data(1)[0])
    twin = copy.deepcopy(pruner)
    twin.model(data(2)[0] * 10)
    assert pruner._stats.reduced(["0.weight"])["0.weight"].rows == 4
    assert twin._stats.reduced(["0.weight"])["0.weight"].rows == 8
    expected = torch.cat([data(1)[0], data(2)[0] * 10]).square().sum(0).sqrt()
    torch.testing.assert_close(
        twin._stats.reduced(["0.weight"])["0.weight"].input_norm.view(-1), expected
    )


# ------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_statistics_are_summed_across_ranks_and_masks_identical(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), str(rank), "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # bit-identical masks for every method
    # one process on both ranks' data, by hand: wanda's input norms and taylor's W * g
    model = net()
    xs = [data(100 + r)[0] for r in range(2)]
    norms = {}
    with torch.no_grad():
        h = torch.cat(xs)
        norms["0.weight"] = h.square().sum(0).sqrt()
        norms["2.weight"] = torch.tanh(model[0](h)).square().sum(0).sqrt()
    wanda = {n: model.get_parameter(n).detach().abs() * norms[n] for n in WEIGHTS}
    taylor = {
        n: v.abs()
        for n, v in by_hand(
            model, (torch.cat(xs), torch.cat([data(100 + r)[1] for r in range(2)]))
        ).items()
    }
    for method, scores in (("wanda", wanda), ("taylor", taylor)):
        flat = torch.cat([scores[n].flatten() for n in WEIGHTS])
        k = round(0.5 * flat.numel())
        expected = torch.ones(flat.numel(), dtype=torch.bool)
        expected[torch.sort(flat.double(), stable=True).indices[:k]] = False
        got = torch.cat([torch.tensor(ranks[0][method][n]).flatten() for n in WEIGHTS])
        assert torch.equal(got, expected), method


def test_inputs_given_by_keyword_are_seen() -> None:
    model = net()
    pruner = Pruner(model, method="wanda", targets=["0.weight"])
    x = data(1)[0]
    pruner.calibrate([x])
    with torch.no_grad():
        pruner._stats.calibrating = True
        pruner._stats.hook({"0.weight": model[0].weight})
        model[0](input=x * 2)
        pruner._stats.unhook()
        pruner._stats.calibrating = False
    got = pruner._stats.reduced(["0.weight"])["0.weight"]
    assert got.rows == 8
    torch.testing.assert_close(got.input_norm.view(-1), (x.square().sum(0) * 5).sqrt())
