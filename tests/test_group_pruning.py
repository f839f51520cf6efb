"""Structured pruning of whole dependency groups: GroupPruner, the Pruning callback's
structure="groups", and the experiment config key pruning.structure.

Expected values come from hand formulas or brute force over the groups, never from the
ranking code under test.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from prunekit.callbacks import Pruning
from prunekit.experiments.config import ConfigError, GradualConfig, load_config
from prunekit.experiments.models import build_model
from prunekit.schedules import Polynomial
from torch import nn

from prunekit import DependencyGraph, GroupPruner, compact
from tests.lit_helpers import TinyNet, loader, trainer


class ConvBNNet(nn.Module):
    """conv(3->8)+BN+ReLU, conv(8->6, bias)+BN+ReLU, pool, flatten into fc(6*2*2 -> 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _dead_channels(model: ConvBNNet) -> dict[str, set[int]]:
    """Channels whose every member is zero, found directly from the weights."""
    out = {}
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        c, b = model.get_submodule(conv), model.get_submodule(bn)
        dead = set()
        for i in range(c.out_channels):
            if (
                not c.weight[i].any()
                and (c.bias is None or c.bias[i] == 0)
                and b.weight[i] == 0
                and b.bias[i] == 0
            ):
                dead.add(i)
        out[conv] = dead
    return out


def test_prune_to_removes_whole_channels_per_layer_and_matches_compaction() -> None:
    model = _randomise(ConvBNNet()).eval()
    x = torch.randn(4, 3, 4, 4)
    pruner = GroupPruner(model, x[:1])
    pruner.prune_to(0.5)
    dead = _dead_channels(model)
    assert len(dead["conv1"]) == 4 and len(dead["conv2"]) == 3  # round(0.5 * 8), round(0.5 * 6)
    for i in dead["conv1"]:  # the consumer's input slice goes too
        assert not model.conv2.weight[:, i].any()
    for i in dead["conv2"]:  # after pool(2) and flatten, channel i owns inputs 4i..4i+3
        assert not model.fc.weight[:, 4 * i : 4 * i + 4].any()
    assert pruner.sparsity().fraction == pytest.approx(7 / 14)
    assert pruner.sparsity().per_target() == {"conv1": 0.5, "conv2": 0.5}
    small = compact(model, x[:1], pruner=pruner)
    assert small.conv1.out_channels == 4 and small.conv2.out_channels == 3
    assert small.fc.in_features == 12
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


def test_ranking_is_the_lowest_group_norm_by_brute_force() -> None:
    """reduce='sum': a hidden unit's score is its row, bias and outgoing column squared."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    w1, b1, w2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight))
    norms = [float(w1[i].pow(2).sum() + b1[i] ** 2 + w2[:, i].pow(2).sum()) for i in range(6)]
    best = min(
        itertools.combinations(range(6), 2), key=lambda c: sum(norms[i] for i in c)
    )  # the pair of units with the smallest total norm is the two lowest
    pruner = GroupPruner(model, torch.zeros(1, 3), reduce="sum")
    pruner.prune_to(2)
    gone = {i for i in range(6) if not model[0].weight[i].any()}
    assert gone == set(best)
    assert all(model[0].bias[i] == 0 and not model[2].weight[:, i].any() for i in gone)


def test_masks_only_shrink_and_a_lower_amount_holds() -> None:
    model = _randomise(ConvBNNet())
    pruner = GroupPruner(model, torch.zeros(1, 3, 4, 4))
    pruner.prune_to(0.5)
    before = {n: m.clone() for n, m in pruner.masks.items()}
    pruner.prune_to(0.25)  # below what is pruned: nothing changes
    assert all(torch.equal(before[n], m) for n, m in pruner.masks.items())
    with torch.no_grad():  # regrowth by the optimizer must not revive a pruned group...
        model.conv1.weight.add_(1.0)
    pruner.apply_masks()
    pruner.prune_to(0.75)  # ... and a pruned group stays pruned when more go
    for n, m in pruner.masks.items():
        assert bool((before[n] | ~m).all()), n  # pruned before => pruned now
    assert [len(d) for d in _dead_channels(model).values()] == [6, 4]  # round(.75*8), round(.75*6)


def test_global_scope_prunes_exactly_the_total_and_never_empties_a_layer() -> None:
    model = _randomise(ConvBNNet())
    pruner = GroupPruner(model, torch.zeros(1, 3, 4, 4), scope="global")
    pruner.prune_to(0.5)
    dead = _dead_channels(model)
    assert len(dead["conv1"]) + len(dead["conv2"]) == 7  # round(0.5 * 14)
    with pytest.raises(ValueError, match="every group of layer"):
        pruner.prune_to(13)  # one group left: some layer would be emptied


def test_training_keeps_every_member_at_zero_and_masked_equals_compacted() -> None:
    model = _randomise(ConvBNNet())
    x = torch.randn(8, 3, 4, 4)
    target = torch.randint(0, 5, (8,))
    pruner = GroupPruner(model, x[:1])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    pruner.attach(optimizer)
    for step in range(6):
        if step in (1, 3):
            pruner.prune_to(0.25 if step == 1 else 0.5)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()
    dead = _dead_channels(model)  # BN weight and bias of pruned channels stayed at zero
    assert [len(d) for d in dead.values()] == [4, 3]
    model.eval()  # running statistics changed in training; removal must not depend on them
    small = compact(model, x[:1], pruner=pruner)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in small.parameters()) == (
        4 * 3 * 9 + 2 * 4 + 3 * 4 * 9 + 3 + 2 * 3 + 5 * 12 + 5
    )  # conv1, bn1, conv2 (+bias), bn2, fc, counted by hand


def test_state_dict_round_trip_and_refusals() -> None:
    model = _randomise(ConvBNNet())
    pruner = GroupPruner(model, torch.zeros(1, 3, 4, 4))
    pruner.prune_to(0.5)
    state = pruner.state_dict()
    fresh = _randomise(ConvBNNet())
    again = GroupPruner(fresh, torch.zeros(1, 3, 4, 4))
    again.load_state_dict(state)
    assert all(torch.equal(again.masks[n], m) for n, m in pruner.masks.items())
    assert _dead_channels(fresh) == _dead_channels(model)
    other = GroupPruner(_randomise(ConvBNNet()), torch.zeros(1, 3, 4, 4), scope="global")
    with pytest.raises(ValueError, match=r"scope='layer'.*scope='global'"):
        other.load_state_dict(state)
    partial = GroupPruner(_randomise(ConvBNNet()), torch.zeros(1, 3, 4, 4))
    half = GroupPruner(_randomise(ConvBNNet()), torch.zeros(1, 3, 4, 4))
    half.pruner.set_masks({"conv1.weight": pruner.masks["conv1.weight"]})  # rows only
    with pytest.raises(ValueError, match="part of a dependency group"):
        partial.load_state_dict(half.state_dict())
    assert all(bool(m.all()) for m in partial.masks.values())  # refused before any change
    with pytest.raises(ValueError, match="not a GroupPruner state_dict"):
        partial.load_state_dict(pruner.pruner.state_dict())


def test_bad_arguments_are_named() -> None:
    model = ConvBNNet()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="scope='channel'"):
        GroupPruner(model, x, scope="channel")
    with pytest.raises(ValueError, match="reduce='max'"):
        GroupPruner(model, x, reduce="max")
    with pytest.raises(ValueError, match="no prunable dependency group"):
        GroupPruner(nn.Linear(3, 2), torch.zeros(1, 3))  # its outputs are the model's
    with pytest.raises(TypeError, match="not a mapping"):
        GroupPruner(model, x).prune_to({"conv1": 0.5})  # type: ignore[arg-type]


def test_resnet20_residual_groups_prune_together_and_compact_equal() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    x = torch.randn(2, 1, 28, 28)
    pruner = GroupPruner(model, x[:1])
    pruner.prune_to(0.5)
    model.eval()
    live = [int(model.get_submodule(f"layer1.{b}.bn2").weight.ne(0).sum()) for b in range(3)]
    stem = model.bn1.weight.ne(0)
    assert live == [8, 8, 8]  # the stage-1 residual stream: half of 16 channels, coupled
    for b in range(3):  # ... the same channels in the stem and in every block's output
        assert torch.equal(model.get_submodule(f"layer1.{b}.bn2").weight.ne(0), stem)
    small = compact(model, x[:1], pruner=pruner)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ the callback
class GroupZeros(Callback):
    """After every batch: pruned hidden units of TinyNet have zero rows, biases, inputs."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        net = pl_module.net
        for layer, nxt in ((0, 2), (2, 4)):
            dead = ~net[layer].weight.any(dim=1)
            if dead.any():
                assert not net[layer].bias[dead].any()
                assert not net[nxt].weight[:, dead].any()
                self.checked += 1


def test_callback_groups_schedule_counts_channels_and_resumes_exactly(tmp_path: Path) -> None:
    schedule = Polynomial(0.0, 0.75, begin=0, end=8, frequency=2)
    example = torch.zeros(1, 12)

    def run(max_steps: int, ckpt: str | None = None, every: int | None = None):  # type: ignore[no-untyped-def]
        model = TinyNet()
        pruning = Pruning(schedule, structure="groups", example_input=example, scope="layer")
        zeros = GroupZeros()
        callbacks: list[Callback] = [pruning, zeros]
        if every:
            callbacks.append(
                ModelCheckpoint(
                    tmp_path, every_n_train_steps=every, save_top_k=-1, filename="{step}"
                )
            )
        trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=bool(every)).fit(
            model, loader(), ckpt_path=ckpt
        )
        return model, pruning, zeros

    straight, pruning, zeros = run(12)
    assert zeros.checked > 0
    # 75 % of 32 and of 16 hidden units, counted from the weights
    assert int((~straight.net[0].weight.any(dim=1)).sum()) == 24
    assert int((~straight.net[2].weight.any(dim=1)).sum()) == 12
    assert pruning.pruner.sparsity().fraction == pytest.approx(0.75)
    run(5, every=5)  # stops mid-ramp
    resumed, resumed_pruning, _ = run(12, ckpt=str(tmp_path / "step=5.ckpt"))
    for n, m in pruning.pruner.masks.items():
        assert torch.equal(resumed_pruning.pruner.masks[n], m), n
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="structure="):  # a weights run cannot resume it
        trainer(max_steps=12, callbacks=[Pruning(schedule)]).fit(
            TinyNet(), loader(), ckpt_path=str(tmp_path / "step=5.ckpt")
        )


def test_callback_groups_bad_arguments() -> None:
    sched = Polynomial(0.0, 0.5, begin=0, end=4, frequency=2)
    with pytest.raises(ValueError, match="structure='channels'"):
        Pruning(sched, structure="channels")
    with pytest.raises(ValueError, match="amount="):
        Pruning(amount=0.2, structure="groups")
    with pytest.raises(ValueError, match="method='random'"):
        Pruning(sched, structure="groups", method="random")
    with pytest.raises(ValueError, match="targets="):
        Pruning(sched, structure="groups", targets=["net.0.weight"])
    with pytest.raises(ValueError, match=r"options \['n'\]"):
        Pruning(sched, structure="groups", options={"n": 2})
    with pytest.raises(ValueError, match="only used with structure='groups'"):
        Pruning(sched, example_input=torch.zeros(1, 12))
    with pytest.raises(TypeError, match="example_input must be"):
        Pruning(sched, structure="groups", example_input=[1, 2])
    with pytest.raises(ValueError, match="example_input_array"):
        trainer(max_steps=2, callbacks=[Pruning(sched, structure="groups")]).fit(
            TinyNet(), loader()
        )


def test_config_structure_key(tmp_path: Path) -> None:
    base = Path(__file__).parent.parent / "experiments" / "configs" / "groups_conv4_50.yaml"
    cfg = load_config(GradualConfig, str(base), ["data.subset=100"])
    assert cfg.pruning.structure == "groups"
    with pytest.raises(ConfigError, match=r"pruning\.structure"):
        load_config(GradualConfig, str(base), ["pruning.structure=channels"])
    with pytest.raises(ConfigError, match=r"pruning: .*method='random'"):
        load_config(GradualConfig, str(base), ["pruning.method=random"])


# ------------------------------------------------------------------ exclude=
def _channel_norms(model: ConvBNNet) -> list[float]:
    """conv2's channel groups, reduce='sum' by hand: the conv row and bias, both BN
    entries, and the 4 fc columns the channel owns after pool(2) and flatten."""
    w, b, g, beta, fc = (
        t.detach().double()
        for t in (
            model.conv2.weight,
            model.conv2.bias,
            model.bn2.weight,
            model.bn2.bias,
            model.fc.weight,
        )
    )
    return [
        float(
            w[i].pow(2).sum()
            + b[i] ** 2
            + g[i] ** 2
            + beta[i] ** 2
            + fc[:, 4 * i : 4 * i + 4].pow(2).sum()
        )
        for i in range(6)
    ]


def test_exclude_leaves_the_layer_bit_equal_and_counts_only_the_rest() -> None:
    model = _randomise(ConvBNNet())
    x = torch.randn(4, 3, 4, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = _channel_norms(model)
    pruner = GroupPruner(model, x[:1], exclude="conv1.weight", reduce="sum")
    pruner.prune_to(0.5)
    for name in ("conv1.weight", "bn1.weight", "bn1.bias"):  # conv1's 8 groups: untouched
        assert torch.equal(model.get_parameter(name), before[name]), name
        assert bool(pruner.masks[name].all()), name
    dead = _dead_channels(model)
    assert dead["conv1"] == set()
    # half of conv2's 6 channels (not of 14): the 3 lowest norms, found by brute force
    lowest = min(itertools.combinations(range(6), 3), key=lambda c: sum(norms[i] for i in c))
    assert dead["conv2"] == set(lowest)
    kept = [i for i in range(6) if i not in lowest]
    assert torch.equal(model.conv2.weight[kept], before["conv2.weight"][kept])
    assert pruner.sparsity().per_target() == {"conv2": 0.5}
    assert pruner.sparsity().fraction == 0.5
    pruner.prune_to(4)  # an int counts prunable groups per layer
    assert len(_dead_channels(model)["conv2"]) == 4 and _dead_channels(model)["conv1"] == set()
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    assert "exclude=['conv1.weight']" in repr(pruner)


def test_exclude_a_head_keeps_the_channels_feeding_it_and_compacts_equal() -> None:
    model = _randomise(ConvBNNet())
    x = torch.randn(4, 3, 4, 4)
    fc = model.fc.weight.detach().clone()
    pruner = GroupPruner(model, x[:1], exclude=["fc.*"])  # fc.weight: a member of conv2's groups
    pruner.prune_to(0.75)
    dead = _dead_channels(model)
    assert len(dead["conv1"]) == 6 and dead["conv2"] == set()  # round(.75 * 8); conv2 kept
    assert torch.equal(model.fc.weight, fc) and bool(pruner.masks["fc.weight"].all())
    assert pruner.sparsity().per_target() == {"conv1": 0.75}
    model.eval()
    small = compact(model, x[:1], pruner=pruner)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc.in_features) == (2, 6, 24)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


def test_exclude_then_compact_removes_only_the_prunable_channels() -> None:
    model = _randomise(ConvBNNet())
    x = torch.randn(4, 3, 4, 4)
    pruner = GroupPruner(model, x[:1], exclude="conv1.*")
    pruner.prune_to(0.5)
    model.eval()
    small = compact(model, x[:1], pruner=pruner)
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc.in_features) == (8, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in small.parameters()) == (
        8 * 3 * 9 + 2 * 8 + 3 * 8 * 9 + 3 + 2 * 3 + 5 * 12 + 5
    )  # conv1, bn1 whole; conv2 (+bias), bn2, fc at 3 channels, by hand


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(),
        nn.Linear(4, 2),
    )  # fmt: skip


def test_exclude_global_scope_ranks_the_prunable_groups_only() -> None:
    model = _mlp()
    w = [model[i].weight.detach().double() for i in (0, 2, 4, 6)]
    b = [model[i].bias.detach().double() for i in (0, 2, 4)]
    first = model[0].weight.detach().clone()
    # reduce='sum' by hand: unit j of layer k is its row, bias and outgoing column
    scores = {
        (k, j): float(w[k][j].pow(2).sum() + b[k][j] ** 2 + w[k + 1][:, j].pow(2).sum())
        for k in (1, 2)
        for j in range(w[k].shape[0])
    }
    means = {k: sum(v for (m, _), v in scores.items() if m == k) / w[k].shape[0] for k in (1, 2)}
    ranked = sorted(scores, key=lambda k: (scores[k] / means[k[0]], k))
    expected = set(ranked[:5])  # round(0.5 * 10): layers 2 and 4 only, layer 0 excluded
    pruner = GroupPruner(model, torch.zeros(1, 4), scope="global", reduce="sum", exclude="0.*")
    pruner.prune_to(0.5)
    gone = {
        (k, j) for k in (1, 2) for j in range(w[k].shape[0]) if not model[2 * k].weight[j].any()
    }
    assert gone == expected
    assert torch.equal(model[0].weight, first) and bool(model[0].weight.all())
    assert pruner.sparsity().fraction == 0.5  # 5 of the 10 prunable groups
    assert set(pruner.sparsity().per_target()) == {"2", "4"}


def test_group_masks_exclude_and_its_checks() -> None:
    model = _mlp()
    graph = GroupPruner(model, torch.zeros(1, 4)).graph
    assert graph.excluded("2.bias") == [False] * 8 + [True] * 6 + [False] * 4
    masks = graph.group_masks(0.5, exclude=["2.weight"])  # layers 0 and 2 both touch it
    assert all(bool(masks[n].all()) for n in ("0.weight", "0.bias", "2.weight", "2.bias"))
    assert int((~masks["4.weight"].all(dim=1)).sum()) == 2  # round(0.5 * 4)
    first = graph.group_masks(0.5)  # prunes layer 0's units, among others
    with pytest.raises(ValueError, match="prune 4 excluded group"):
        graph.group_masks(0.5, masks=first, exclude="0.weight")
    with pytest.raises(ValueError, match="leaves no dependency group to prune"):
        graph.group_masks(0.5, exclude=["2.weight", "6.weight"])


def test_exclude_bad_patterns_raise_before_anything_changes() -> None:
    model = _randomise(ConvBNNet())
    x = torch.zeros(1, 3, 4, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"exclude entry 'conv9\.weight' matches no parameter of ConvBNNet"
    ):
        GroupPruner(model, x, exclude=["conv1.weight", "conv9.weight"])
    with pytest.raises(
        ValueError,
        match=r"exclude entry 'conv1' matches no parameter.*did you mean.*is a module.*'conv1\.\*'",
    ):
        GroupPruner(model, x, exclude="conv1")  # a module name (as for Pruner)
    with pytest.raises(
        ValueError, match=r"exclude=\['conv1\.\*', 'fc\.weight'\] leaves no dependency group"
    ):
        GroupPruner(model, x, exclude=["conv1.*", "fc.weight"])
    with pytest.raises(TypeError, match="exclude=3"):
        GroupPruner(model, x, exclude=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exclude entry 3"):
        GroupPruner(model, x, exclude=[3])  # type: ignore[list-item]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # a parameter in no group (fc's outputs are the model's) is dense anyway: no change
    plain = GroupPruner(copy.deepcopy(model), x)
    extra = GroupPruner(model, x, exclude="fc.bias")
    plain.prune_to(0.5)
    extra.prune_to(0.5)
    assert all(torch.equal(extra.masks[n], m) for n, m in plain.masks.items())


def test_exclude_is_in_the_state_dict_and_a_different_one_is_refused() -> None:
    x = torch.zeros(1, 3, 4, 4)
    pruner = GroupPruner(_randomise(ConvBNNet()), x, exclude=["conv1.*"])
    pruner.prune_to(0.5)
    state = pruner.state_dict()
    assert state["exclude"] == ["conv1.*"]
    same = GroupPruner(_randomise(ConvBNNet()), x, exclude="conv1.*")
    same.load_state_dict(state)
    assert all(torch.equal(same.masks[n], m) for n, m in pruner.masks.items())
    for other in ((), ["fc.weight"]):
        fresh = GroupPruner(_randomise(ConvBNNet()), x, exclude=other)
        named = re.escape("exclude=['conv1.*']") + ".*" + re.escape(f"exclude={list(other)!r}")
        with pytest.raises(ValueError, match=named):
            fresh.load_state_dict(state)
        assert all(bool(m.all()) for m in fresh.masks.values())  # refused before any change
    # a state saved without exclude (older prunekit) loads where none is given
    plain = GroupPruner(_randomise(ConvBNNet()), x)
    plain.prune_to(0.5)
    old = {k: v for k, v in plain.state_dict().items() if k != "exclude"}
    GroupPruner(_randomise(ConvBNNet()), x).load_state_dict(old)
    # masks pruning an excluded group (edited state) are refused
    forged = dict(plain.state_dict(), exclude=["conv1.*"])
    with pytest.raises(ValueError, match="excluded group"):
        GroupPruner(_randomise(ConvBNNet()), x, exclude="conv1.*").load_state_dict(forged)


def test_callback_groups_exclude_keeps_the_layer_and_a_resume_must_match(tmp_path: Path) -> None:
    schedule = Polynomial(0.0, 0.75, begin=0, end=4, frequency=2)
    example = torch.zeros(1, 12)
    model = TinyNet()
    pruning = Pruning(schedule, structure="groups", example_input=example, exclude="net.0.*")
    saver = ModelCheckpoint(tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    trainer(max_steps=6, callbacks=[pruning, saver], enable_checkpointing=True).fit(model, loader())
    net = model.net
    assert bool(net[0].weight.any(dim=1).all())  # layer 0: no unit pruned (32 alive)
    assert bool(pruning.pruner.masks["net.0.weight"].all())
    assert bool(pruning.pruner.masks["net.0.bias"].all())
    assert int((~net[2].weight.any(dim=1)).sum()) == 12  # round(0.75 * 16) of layer 2 only
    assert pruning.pruner.sparsity().fraction == pytest.approx(0.75)
    assert pruning.pruner.exclude == ["net.0.*"]
    with pytest.raises(ValueError, match=r"exclude=\['net\.0\.\*'\].*exclude=\[\]"):
        trainer(
            max_steps=8, callbacks=[Pruning(schedule, structure="groups", example_input=example)]
        ).fit(TinyNet(), loader(), ckpt_path=str(tmp_path / "step=6.ckpt"))
    with pytest.raises(TypeError, match="exclude=3"):
        Pruning(schedule, structure="groups", exclude=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"exclude entry 'net\.9\.weight' matches no parameter"):
        trainer(
            max_steps=2,
            callbacks=[
                Pruning(schedule, structure="groups", example_input=example, exclude="net.9.weight")
            ],
        ).fit(TinyNet(), loader())


def test_config_groups_exclude_runs_and_compacts(tmp_path: Path, single_thread: None) -> None:
    from prunekit.experiments.gradual import run_gradual
    from prunekit.experiments.paths import RunPaths

    from tests.test_data import tiny_gradual

    base = Path(__file__).parent.parent / "experiments" / "configs" / "groups_conv4_50.yaml"
    cfg = load_config(GradualConfig, str(base), ["data.subset=100", "pruning.exclude=[conv1.*]"])
    assert list(cfg.pruning.exclude) == ["conv1.*"]
    with pytest.raises(ConfigError, match=r"pruning: exclude entry 'conv9\.weight' matches no"):
        load_config(GradualConfig, str(base), ["pruning.exclude=[conv9.weight]"])
    with pytest.raises(ConfigError, match=r"pruning: .*leaves no dependency group"):
        load_config(GradualConfig, str(base), ["pruning.exclude=['*']"])
    cfg = tiny_gradual(
        tmp_path,
        "data._target_=tests.test_data.InTestData",
        "data.options={n: 96, batch_size: 16}",
        "pruning.structure=groups",
        "pruning.scope=layer",
        "pruning.exclude=[fc1.weight]",
    )
    summary = run_gradual(cfg)
    root = RunPaths.for_config(cfg).root
    masks = torch.load(root / "masks.pt", weights_only=True)
    final = torch.load(root / "final.pt", weights_only=True)
    assert bool(masks["fc1.weight"].all()) and bool(final["fc1.weight"].any(dim=1).all())
    assert int((~final["fc2.weight"].any(dim=1)).sum()) == 50  # round(0.5 * 100) of fc2
    assert summary["sparsity"] == 0.5 and summary["sparsity_per_layer"] == {"fc2": 0.5}
    net = build_model("lenet_300_100", num_classes=4, input_shape=(2, 6, 6)).eval()
    net.load_state_dict(final)
    x = torch.randn(5, 2, 6, 6)
    small = compact(net, x[:1], masks=masks)
    assert (small.fc1.out_features, small.fc2.out_features) == (300, 50)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=0)


def test_example_input_follows_the_model_dtype_and_is_not_changed() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    x = torch.ones(1, 4)  # float32, as users write it
    graph = DependencyGraph(model, x)
    assert x.dtype == torch.float32  # the caller's tensor is left alone
    assert graph.example_input[0].dtype == torch.float64
    masks = graph.group_masks(0.5)  # 3 of the 6 hidden units kept
    assert int(masks["0.weight"].all(dim=1).sum()) == 3
    ids = torch.tensor([[1, 2]])
    emb = nn.Sequential(
        nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2)
    )
    assert (
        DependencyGraph(emb.double(), ids).example_input[0].dtype == torch.long
    )  # ids keep theirs
