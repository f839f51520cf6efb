"""Dependency groups and compaction on a zoo of models: the compacted model computes what
the masked one does, its parameter count matches a count by hand, and models the trace
cannot follow are refused with the operation named."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from prunekit.experiments.models import build_model
from torch import nn

from prunekit import (
    DependencyGraph,
    Pruner,
    UnsupportedModelError,
    compact,
    compaction_report,
    model_cost,
)

ATOL = 1e-5


def _randomise_norms(model: nn.Module) -> nn.Module:
    """BatchNorm with non-trivial statistics and affine parameters (defaults hide bugs)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _mask_and_compact(model: nn.Module, x: torch.Tensor, amount: float = 0.5, scope: str = "layer"):
    graph = DependencyGraph(model, x)
    masks = graph.group_masks(amount, scope=scope)
    pruner = Pruner(model, targets=graph.param_names)
    pruner.set_masks(masks)
    small = compact(model, x, pruner=pruner)
    return graph, masks, small


def _assert_same_outputs(
    model: nn.Module, small: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...]
) -> None:
    model.eval()
    small.eval()
    with torch.no_grad():
        args = x if isinstance(x, tuple) else (x,)
        expected, got = model(*args), small(*args)
    if isinstance(expected, tuple):
        expected, got = expected[0], got[0]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kept_rows(mask: torch.Tensor) -> int:
    return int(mask.reshape(mask.shape[0], -1).any(dim=1).sum())


def _kept_cols(mask: torch.Tensor) -> int:
    return int(mask.transpose(0, 1).reshape(mask.shape[1], -1).any(dim=1).sum())


# ------------------------------------------------------------------ the zoo
def test_mlp_chain() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)
    ).eval()  # fmt: skip
    x = torch.randn(5, 10)
    graph, _masks, small = _mask_and_compact(model, x)
    assert [g.layer for g in graph.groups].count("0") == 12
    _assert_same_outputs(model, small, x)
    h1, h2 = 6, 4  # half of each hidden layer
    first, second = small.get_submodule("0"), small.get_submodule("2")
    assert (first.out_features, second.in_features, second.out_features) == (h1, h1, h2)
    assert _params(small) == 10 * h1 + h1 + h1 * h2 + h2 + h2 * 3 + 3


def test_mlp_masked_hidden_units_are_zero_and_tanh_of_pruned_unit_is_ignored() -> None:
    # tanh(0) = 0, sigmoid(0) = 0.5: a pruned unit after a sigmoid is not zero, so the
    # consumer's input slice must be masked too
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 4)
    _, masks, small = _mask_and_compact(model, x)
    assert not masks["2.weight"].all()
    _assert_same_outputs(model, small, x)


class ConvBNStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.fc(x.view(-1, 12 * 4 * 4))  # a literal size compaction must rewrite


def test_conv_bn_relu_stack_with_flatten_into_linear() -> None:
    torch.manual_seed(2)
    model = _randomise_norms(ConvBNStack())
    x = torch.randn(2, 3, 8, 8)
    _, masks, small = _mask_and_compact(model, x)
    # the masks cover every member: conv rows and bias, BN entries, the next inputs
    dead = ~masks["conv1.weight"].reshape(8, -1).any(dim=1)
    assert int(dead.sum()) == 4
    assert not masks["conv1.bias"][dead].any() and not masks["bn1.weight"][dead].any()
    assert not masks["bn1.bias"][dead].any() and not masks["conv2.weight"][:, dead].any()
    dead2 = ~masks["conv2.weight"].reshape(12, -1).any(dim=1)
    cols = masks["fc.weight"].view(5, 12, 16)
    assert not cols[:, dead2].any() and cols[:, ~dead2].all()  # H*W inputs per channel
    _assert_same_outputs(model, small, x)
    c1, c2 = 4, 6
    by_hand = (3 * 9 * c1 + c1) + 2 * c1 + (c1 * 9 * c2) + 2 * c2 + (c2 * 16 * 5 + 5)
    assert _params(small) == by_hand


def _count_from_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Parameters left after removing the rows/inputs the masks kill entirely."""
    total = 0
    for name, p in model.named_parameters():
        m = masks.get(name)
        if m is None:
            total += p.numel()
        elif p.dim() == 1:
            total += int(m.sum())
        else:
            total += _kept_rows(m) * _kept_cols(m) * p[0, 0].numel()
    return total


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet20_residual_channels_prune_together(shortcut: str) -> None:
    torch.manual_seed(3)
    model = _randomise_norms(build_model("resnet20", shortcut=shortcut))
    x = torch.randn(2, 1, 28, 28)
    _, masks, small = _mask_and_compact(model, x)
    # channels joined by the residual additions of stage 1 go together: pruning conv1's
    # channel 0 prunes channel 0 of every layer1 block's second conv (and, with zero-pad
    # shortcuts, channel 8 = 0 + 16/2 of layer2's: the pad puts 8 zero channels first)
    graph = DependencyGraph(model, x)
    target = [
        i
        for i, g in enumerate(graph.groups)
        if any(m[0] == "conv1.weight" and m[1] == "out" and 0 in m[3] for m in g.members)
    ]
    assert len(target) == 1
    one = graph.masks_for([i == target[0] for i in range(len(graph.groups))])
    coupled = {"conv1.weight": 0, **{f"layer1.{b}.conv2.weight": 0 for b in range(3)}}
    if shortcut == "A":
        coupled.update({f"layer2.{b}.conv2.weight": 8 for b in range(3)})
        coupled.update({f"layer3.{b}.conv2.weight": 24 for b in range(3)})
    for name, row in coupled.items():
        dead = ~one[name].reshape(one[name].shape[0], -1).any(dim=1)
        assert dead.nonzero().flatten().tolist() == [row], name
    assert not one["bn1.weight"][0] and not one["layer1.0.conv1.weight"][:, 0].any()
    _assert_same_outputs(model, small, x)
    assert _params(small) == _count_from_masks(model, masks)
    assert _params(small) < _params(model) * 0.5


def test_option_a_shortcut_padding_is_rewritten() -> None:
    torch.manual_seed(4)
    model = _randomise_norms(build_model("resnet20", shortcut="A"))
    x = torch.randn(1, 1, 28, 28)
    graph = DependencyGraph(model, x)
    # stage 2 channel 0 and stage 3 channel 60 exist only as zero padding on the shortcut
    chosen = {("layer2.0.conv2.weight", 0), ("layer3.0.conv2.weight", 60)}
    pruned = [
        any((m[0], i) in chosen for m in g.members if m[1] == "out" for i in m[3])
        for g in graph.groups
    ]
    assert sum(pruned) == 2
    masks = graph.masks_for(pruned)
    Pruner(model, targets=list(masks)).set_masks(masks)
    small = compact(model, x, masks=masks)
    pads = [tuple(n.args[1][4:6]) for n in small.graph.nodes if n.target is F.pad]
    assert pads == [(7, 8), (16, 15)]  # were (8, 8) and (16, 16)
    _assert_same_outputs(model, small, x)


class CatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 6, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x), x], dim=1)  # x's channels cannot go
        y = F.relu(self.bn(y))
        return self.head(y).mean(dim=(2, 3))


def test_concatenation_offsets_channels() -> None:
    torch.manual_seed(5)
    model = _randomise_norms(CatNet())
    x = torch.randn(2, 2, 5, 5)
    graph, masks, small = _mask_and_compact(model, x)
    assert not any(
        10 in m[3] or 11 in m[3] for g in graph.groups for m in g.members if m[0] == "bn.weight"
    )
    # bn entries 0..5 follow a, 6..9 follow b, 10..11 (x) stay
    assert masks["bn.weight"][10:].all()
    assert torch.equal(masks["bn.weight"][:6], masks["a.weight"].reshape(6, -1).any(dim=1))
    assert torch.equal(masks["bn.weight"][6:10], masks["b.weight"].reshape(4, -1).any(dim=1))
    _assert_same_outputs(model, small, x)
    ka, kb = 3, 2
    by_hand = (2 * 9 * ka + ka) + (2 * kb + kb) + 2 * (ka + kb + 2) + ((ka + kb + 2) * 5 + 5)
    assert _params(small) == by_hand


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


def test_transformer_encoder_heads_and_mlp() -> None:
    torch.manual_seed(6)
    model = Encoder().eval()
    x = torch.randn(3, 7, 6)
    graph, _masks, small = _mask_and_compact(model, x)
    layers = {g.layer for g in graph.groups}
    assert layers == {f"layers.{i}.{p}" for i in range(2) for p in ("self_attn.heads", "linear1")}
    _assert_same_outputs(model, small, x)
    # d_model stays (LayerNorm over it); 2 of 4 heads of 4 dims, 16 of 32 MLP features
    heads, hd, ff, d = 2, 4, 16, 16
    attention = 3 * (d * heads * hd + heads * hd) + (heads * hd * d + d)
    layer = attention + 2 * (2 * d) + (d * ff + ff) + (ff * d + d)  # + two LayerNorms
    assert _params(small) == (6 * d + d) + 2 * layer + (d * 3 + 3)


class AttentionNet(nn.Module):
    """Attention without a residual stream: its embedding dims can go as well."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.proj(x))
        out, _ = self.attn(h, h, h)
        return self.head(out)


def test_multihead_attention_heads_and_embedding() -> None:
    torch.manual_seed(7)
    model = AttentionNet().eval()
    x = torch.randn(4, 2, 5)  # (L, N, E): batch_first=False
    graph, _masks, small = _mask_and_compact(model, x)
    assert {g.layer for g in graph.groups} == {"proj", "attn.heads", "attn.out_proj"}
    _assert_same_outputs(model, small, x)
    e, inner, out = 4, 4, 4  # half the projection, one of two heads, half of out_proj
    by_hand = (5 * e + e) + 3 * (e * inner + inner) + (inner * out + out) + (out * 2 + 2)
    assert _params(small) == by_hand


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.dw(F.relu(self.pw(x)))))


def test_depthwise_convolution_follows_its_input_channels() -> None:
    torch.manual_seed(8)
    model = DepthwiseNet().eval()
    x = torch.randn(2, 3, 6, 6)
    _, _, small = _mask_and_compact(model, x)
    assert small.dw.groups == small.dw.out_channels == 4
    _assert_same_outputs(model, small, x)


def test_global_scope_and_cost_report() -> None:
    torch.manual_seed(9)
    model = build_model("conv4").eval()
    x = torch.randn(2, 1, 28, 28)
    _, masks, small = _mask_and_compact(model, x, amount=0.5, scope="global")
    _assert_same_outputs(model, small, x)
    before, after = model_cost(model, x), model_cost(small, x)
    assert before.params == _params(model) and after.params == _count_from_masks(model, masks)
    # MACs by hand for the dense Conv-4 at batch 2
    convs = 28 * 28 * (1 * 64 + 64 * 64) * 9 + 14 * 14 * (64 * 128 + 128 * 128) * 9
    assert before.macs == 2 * (convs + 6272 * 256 + 256 * 256 + 256 * 10)
    assert "parameters" in str(compaction_report(model, small, x))


# ------------------------------------------------------------------ contracts
def test_original_model_unchanged_and_state_dict_reloads() -> None:
    torch.manual_seed(10)
    model = _randomise_norms(build_model("resnet20", shortcut="B"))
    x = torch.randn(2, 1, 28, 28)
    graph = DependencyGraph(model, x)
    masks = graph.group_masks(0.5)
    Pruner(model, targets=graph.param_names).set_masks(masks)
    before = copy.deepcopy(model.state_dict())
    small = compact(model, x, masks=masks)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same masks on a fresh model of the same architecture give the same structure
    fresh = build_model("resnet20", shortcut="B").eval()
    rebuilt = compact(fresh, x, masks=masks, complete=True)
    rebuilt.load_state_dict(small.state_dict())
    _assert_same_outputs(small, rebuilt, x)
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    again = compact(build_model("resnet20", shortcut="B"), x, masks=masks, complete=True)
    again.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same_outputs(small, again.eval(), x)


def test_incomplete_masks_are_refused_naming_the_live_member() -> None:
    torch.manual_seed(11)
    model = ConvBNStack().eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = Pruner(model, targets=["conv1.weight"], method="ln_structured", scope="layer", dim=0)
    pruner.prune_to(0.5)  # conv1's rows only: its bias and bn1 stay live
    with pytest.raises(ValueError, match=r"conv1\.bias .*non-zero"):
        compact(model, x, pruner=pruner)
    forced = compact(model, x, pruner=pruner, complete=True)
    assert forced.conv1.out_channels == 4
    graph = DependencyGraph(model, x)
    whole = graph.masks_for(graph.pruned(pruner.masks))
    reference = copy.deepcopy(model)
    Pruner(reference, targets=list(whole)).set_masks(whole)
    _assert_same_outputs(reference, forced, x)


def test_bad_arguments() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="exactly one"):
        compact(model, x)
    with pytest.raises(TypeError, match="example_input"):
        DependencyGraph(model, [1, 2])
    graph = DependencyGraph(model, x)
    with pytest.raises(ValueError, match="scope='nope'"):
        graph.group_masks(0.5, scope="nope")
    with pytest.raises(ValueError, match="every group"):
        graph.group_masks(1.0)
    with pytest.raises(ValueError, match=r"masks\[.0\.weight.\]"):
        compact(model, x, masks={"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    other = Pruner(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="another model"):
        compact(model, x, pruner=other)


# ------------------------------------------------------------------ refusals
class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y
        return -y


class SplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return a * b


class MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.w = nn.Parameter(torch.randn(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.fc(x), self.w)


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.rnn = nn.GRU(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.fc(x))[0]


@pytest.mark.parametrize(
    ("model", "x", "named"),
    [
        (DataDependent(), torch.zeros(1, 3), "control flow"),
        (SplitNet(), torch.zeros(1, 2, 3, 3), "chunk"),
        (MatmulNet(), torch.zeros(1, 3), "matmul"),
        (LSTMNet(), torch.zeros(2, 1, 3), "GRU"),
    ],
)
def test_untraceable_or_unknown_ops_are_refused(
    model: nn.Module, x: torch.Tensor, named: str
) -> None:
    with pytest.raises(UnsupportedModelError, match=named):
        DependencyGraph(model, x)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    with pytest.raises(UnsupportedModelError):
        compact(model, x, masks=masks)


def test_channels_reaching_the_output_or_a_layernorm_are_pinned() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    graph = DependencyGraph(model, torch.zeros(1, 3))
    assert graph.groups == ()


def test_bert_attention_heads_and_intermediate() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(13)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (2, 7))
    with pytest.raises(UnsupportedModelError, match="blocks_only=True"):
        DependencyGraph(model, ids)  # fx cannot trace it; export can, but heads are reshaped
    graph = DependencyGraph(model, ids, blocks_only=True)
    assert {g.layer for g in graph.groups} == {
        f"bert.encoder.layer.{i}.{p}"
        for i in range(2)
        for p in ("attention.heads", "intermediate.dense")
    }
    masks = graph.group_masks(0.5)
    Pruner(model, targets=graph.param_names).set_masks(masks)
    small = compact(model, ids, masks=masks, blocks_only=True)
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, model(ids).logits, atol=ATOL, rtol=0)
    # by hand: 2 of 4 heads (4 dims each), 16 of 32 intermediate features, hidden 16
    d, inner, ff = 16, 8, 16
    embeddings = 50 * d + 16 * d + 2 * d + 2 * d
    layer = 3 * (d * inner + inner) + (inner * d + d) + 2 * d + (d * ff + ff) + (ff * d + d) + 2 * d
    assert _params(small) == embeddings + 2 * layer + (d * d + d) + (d * 2 + 2)
    assert small.bert.encoder.layer[0].attention.self.num_attention_heads == 2


def _stage_widths(model: nn.Module, x: torch.Tensor, reduce: str) -> list[int]:
    graph = DependencyGraph(model, x)
    small = compact(model, x, masks=graph.group_masks(0.5, reduce=reduce), complete=True)
    return [small.get_submodule(f"layer{s}.0.conv2").out_channels for s in (1, 2, 3)]


def test_layer_scope_halves_every_stage_of_a_zero_pad_resnet() -> None:
    # the residual streams of ResNet-20 (option A) are coupled: 16 groups span all three
    # stages, 16 only stages 2-3 (padding in stage 2), 32 only stage 3. Each of those
    # (groups of the same producers) is a layer of its own, so whatever the ranking, each
    # stage keeps half its width, as a network built at half width would (16, 32, 64 / 2).
    torch.manual_seed(12)
    model = build_model("resnet20").eval()
    x = torch.zeros(1, 1, 28, 28)
    for reduce in ("normalized", "sum", "mean"):
        assert _stage_widths(model, x, reduce) == [8, 16, 32], reduce
    layers = {g.layer for g in DependencyGraph(model, x).groups}
    assert {"conv1", "layer2.0.conv2", "layer3.0.conv2"} <= layers


def test_blocks_only_refuses_a_member_tied_to_another_layer() -> None:
    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    model = nn.Sequential(enc, nn.Linear(8, 16))
    model[1].weight = enc.linear1.weight  # the MLP's first weight is used twice
    with pytest.raises(UnsupportedModelError, match=r"0\.linear1\.weight is shared"):
        DependencyGraph(model, torch.zeros(1, 3, 8), blocks_only=True)
    model[1].weight = nn.Parameter(torch.randn(16, 8))
    assert len(DependencyGraph(model, torch.zeros(1, 3, 8), blocks_only=True).groups) == 2 + 16


def test_readme_compaction_example(capsys: pytest.CaptureFixture[str]) -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- compaction example[^>]*-->\n```python\n(.*?)```", text, re.DOTALL)
    assert block is not None, "README lost its compaction example"
    namespace: dict = {}
    exec(compile(block.group(1), "README compaction example", "exec"), namespace)
    model, small, x = namespace["model"], namespace["small"], torch.randn(2, 1, 28, 28)
    _assert_same_outputs(model, small, x)
    assert "parameters" in capsys.readouterr().out


def test_graph_refuses_a_model_changed_after_the_trace() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    graph = DependencyGraph(model, torch.zeros(1, 4))
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # values may change: they are read when asked
    assert graph.scores().shape == (6,)
    model[0] = nn.Linear(4, 6)  # same shapes, other parameters
    with pytest.raises(ValueError, match=r"'0\.weight' of Sequential was replaced"):
        graph.group_masks(0.5)
    with pytest.raises(ValueError, match="was replaced"):
        graph.masks_for([False] * 6)


def test_in_place_residual_addition_couples_channels() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            y += self.b(x)
            return self.head(y)

    graph = DependencyGraph(InPlace(), torch.zeros(1, 3))
    assert len(graph.groups) == 4 and all(set(g.producers) == {"a", "b"} for g in graph.groups)


class ChannelsLast(nn.Module):
    """permute/transpose move the channel dim; cat along the length keeps channels; a sum
    over channels pins them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)
        self.c1 = nn.Conv1d(4, 6, 1)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc(self.conv(x).permute(0, 2, 3, 1)))  # N H W 4
        y = y.flatten(1, 2).transpose(1, 2)  # N 4 HW
        z = F.relu(self.bn(self.c1(y)))
        z = torch.cat([z, z * 2], dim=2)
        return z.mean(dim=2).sum(dim=1, keepdim=True)


def test_permute_transpose_conv1d_and_a_channel_sum() -> None:
    torch.manual_seed(14)
    model = _randomise_norms(ChannelsLast())
    x = torch.randn(2, 3, 6, 6)
    graph, _, small = _mask_and_compact(model, x)
    assert {g.layer for g in graph.groups} == {"conv", "fc"}  # c1's channels are summed
    _assert_same_outputs(model, small, x)
    assert _params(small) == (3 * 9 * 4 + 4) + (4 * 2 + 2) + (2 * 6 + 6) + 2 * 6


class Shared(nn.Module):
    """One Linear applied to two branches, and one BatchNorm to both: the calls share
    weights, so their channels go together."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(5, 6)
        self.shared = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = self.bn(self.shared(F.relu(self.a(x))))
        v = self.bn(self.shared(torch.tanh(self.b(y))))
        return self.head(torch.cat([u, v], dim=1))


def test_a_layer_called_twice_couples_its_inputs_and_outputs() -> None:
    torch.manual_seed(15)
    model = _randomise_norms(Shared())
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    graph, _, small = _mask_and_compact(model, (x, y))
    # a's and b's outputs meet in shared's input columns: one group each, 6 in all
    assert sum(1 for g in graph.groups if set(g.producers) == {"a", "b"}) == 6
    _assert_same_outputs(model, small, (x, y))
    k, s = 3, 2  # half of the 6 coupled features, half of shared's 4 outputs
    by_hand = (3 * k + k) + (5 * k + k) + (k * s + s) + 2 * s + (2 * s * 2 + 2)
    assert _params(small) == by_hand


def test_gradual_group_pruning_through_a_pruner() -> None:
    torch.manual_seed(16)
    model = _randomise_norms(ConvBNStack())
    x = torch.randn(2, 3, 8, 8)
    graph = DependencyGraph(model, x)
    pruner = Pruner(model, targets=graph.param_names)
    first = None
    for amount in (0.25, 0.5):  # e.g. the updates of a schedule
        pruner.set_masks(graph.group_masks(amount, masks=pruner.masks))
        pruned = graph.pruned(pruner.masks)
        first = first or pruned
        with torch.no_grad():  # a little training between updates changes the ranking
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
            pruner.apply_masks()
    assert all(b for a, b in zip(first, pruned, strict=True) if a)  # masks only shrink
    layers = [g.layer for g in graph.groups]
    assert [
        sum(p for p, lay in zip(pruned, layers, strict=True) if lay == name)
        for name in ("conv1", "conv2")
    ] == [4, 6]
    _assert_same_outputs(model, compact(model, x, pruner=pruner), x)


# ------------------------------------------------------------------ torch.export fallback
class ShapeBranch(nn.Module):
    """fx cannot trace a branch on a shape; torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = F.avg_pool2d(x, 2)
        y = F.relu(self.bn(self.conv(x)), inplace=True)
        return self.fc(self.conv2(y).mean((2, 3)))


class ExportSort(nn.Module):
    """Traceable by torch.export only (a shape branch), then sorts the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x * 2
        return torch.sort(self.conv(x), dim=1).values.sum()


def test_export_fallback_traces_a_model_fx_cannot() -> None:
    model = _randomise_norms(ShapeBranch()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedModelError, match=r"torch\.fx cannot trace ShapeBranch"):
        DependencyGraph(model, x, tracer="fx")
    graph = DependencyGraph(model, x)
    assert graph.traced_by == "torch.export"
    assert len(graph.groups) == 8 + 6  # conv's channels, conv2's (read by fc after the mean)
    masks = graph.group_masks(0.5)
    Pruner(model, targets=list(masks)).set_masks(masks)
    small = compact(model, x, masks=masks)
    assert _params(small) == (4 * 3 * 9 + 4) + 2 * 4 + (3 * 4 * 9 + 3) + (4 * 3 + 4)
    for batch in (1, 5):  # the batch dim stays free (the branch does not read it)
        _assert_same_outputs(model, small, torch.randn(batch, 3, 8, 8))
    with pytest.raises(ValueError, match=r"traced by torch.export with \('\*', 3, 8, 8\)"):
        small(torch.randn(1, 3, 4, 4))  # would take the other branch: refused, not wrong


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conv4", "resnet20"])
def test_export_graph_gives_the_groups_and_compaction_of_fx(name: str) -> None:
    torch.manual_seed(5)
    model = _randomise_norms(build_model(name)).eval()
    x = torch.randn(2, 1, 28, 28)
    by_fx, by_export = DependencyGraph(model, x), DependencyGraph(model, x, tracer="export")
    assert by_export.traced_by == "torch.export" and by_fx.traced_by == "torch.fx"
    assert by_export.groups == by_fx.groups
    masks = by_fx.group_masks(0.5)
    Pruner(model, targets=list(masks)).set_masks(masks)
    small = compact(model, x, masks=masks)  # (through fx)
    through_export = compact(model, x, masks=masks, tracer="export")
    assert _params(through_export) == _params(small) == _count_from_masks(model, masks)
    _assert_same_outputs(model, through_export, x)


def test_export_fallback_refusals_name_the_reason() -> None:
    # neither tracer: the data-dependent branch, with both reasons
    with pytest.raises(
        UnsupportedModelError, match=r"torch\.fx cannot trace.*torch\.export cannot"
    ):
        DependencyGraph(DataDependent(), torch.zeros(1, 3))
    # exported, but an op the trace does not know on channels: named (aten.sort)
    with pytest.raises(UnsupportedModelError, match=r"'sort'.*not supported on tracked channels"):
        DependencyGraph(ExportSort(), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match="tracer='jit'"):
        DependencyGraph(ShapeBranch(), torch.zeros(1, 3, 8, 8), tracer="jit")
