"""Adversarial tests of compaction, compressed checkpoints and ``prunekit export``: inputs
a user can plausibly hand over (masks not yet applied, tied weights, damaged files, run
folders whose files do not belong together) must give the right model or a clear error,
never a silently different one. Expected values come from the masked model or a count
by hand, not from the code under test."""

from __future__ import annotations

import copy
import json
import random
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from prunekit.experiments import cli
from prunekit.experiments.models import build_model
from torch import nn

from prunekit import (
    DependencyGraph,
    GroupPruner,
    Pruner,
    compact,
    compress_state_dict,
    decompress_state_dict,
    load_sparse,
    save_sparse,
)
from tests.test_export import _run_folder

ATOL = 1e-5


def _masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The masked model, by hand: every masked entry set to zero."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in masks.items():
            ref.get_parameter(name).masked_fill_(~m, 0.0)
    return ref.eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------ compact
def test_masks_not_yet_applied_to_the_weights_give_the_masked_model() -> None:
    """compact(model, x, masks=...) with masks the weights do not hold yet (a kept group
    with a masked entry): the compacted model must compute the masked model, not a mix
    of the masked groups removed and the unmasked entries kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    masks = DependencyGraph(model, x).group_masks(0.5)
    kept_row = next(i for i in range(6) if masks["0.weight"][i].all())
    masks["0.weight"][kept_row, 0] = False  # one entry of a kept channel
    masks["2.weight"][0, kept_row] = False
    expected = _outputs(_masked_copy(model, masks), x)
    small = compact(model, x, masks=masks)
    assert small.get_submodule("0").weight.shape == (3, 4)
    torch.testing.assert_close(_outputs(small, x), expected, atol=ATOL, rtol=0)
    assert float(model[0].weight.detach()[kept_row, 0]) != 0.0  # the model itself is unchanged


def test_masks_are_applied_without_turning_a_non_finite_weight_into_nan() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(2, 3)
    masks = {"0.weight": torch.ones(4, 3, dtype=torch.bool)}
    masks["0.weight"][1, 2] = False
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")  # masked away: must become 0, not inf * 0
    small = compact(model, x, masks=masks)
    assert torch.isfinite(_outputs(small, x)).all()
    assert float(small.get_submodule("0").weight.detach()[1, 2]) == 0.0


def test_a_masked_nan_in_a_removed_group_does_not_block_compaction() -> None:
    """A NaN or inf weight under a False mask is pruned (the masked model holds 0 there):
    the completeness check must not read it as a live entry."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    graph = DependencyGraph(model, x)
    masks = graph.masks_for([i in (0, 3) for i in range(len(graph.groups))])
    with torch.no_grad():
        model[0].weight[0, 1] = float("nan")
        model[0].bias[3] = float("inf")
    small = compact(model, x, masks=masks)
    assert small.get_submodule("0").weight.shape == (4, 4)
    expected = _outputs(_masked_copy(model, masks), x)
    torch.testing.assert_close(_outputs(small, x), expected, atol=ATOL, rtol=0)


class TiedChain(nn.Module):
    """Two Linear layers sharing one weight: removing a channel of one removes an input
    of the other, so compaction cannot be done layer by layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_tied_weights_are_refused_naming_both_names() -> None:
    model = TiedChain()
    x = torch.randn(3, 4)
    masks = {"a.weight": torch.ones(4, 4, dtype=torch.bool)}
    masks["a.weight"][1] = False
    with pytest.raises(ValueError, match=r"a\.weight.*b\.weight.*(shared|tied)"):
        compact(model, x, masks=masks, complete=True)


def test_tied_weights_outside_every_group_keep_their_tie() -> None:
    """An output head tied to an input projection, neither in a group (LayerNorms pin
    their channels) is not touched: the compacted model keeps one parameter for both, as
    the original has."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.hidden, self.out = nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 4)
            self.norm1, self.norm2 = nn.LayerNorm(4), nn.LayerNorm(4)
            self.head = nn.Linear(4, 4)
            self.head.weight = self.inp.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.hidden(self.norm1(self.inp(x))))
            return self.head(self.norm2(self.out(h)))

    torch.manual_seed(2)
    model = Tied()
    x = torch.randn(3, 4)
    graph = DependencyGraph(model, x)
    assert {g.layer for g in graph.groups} == {"hidden"}
    masks = graph.group_masks(0.5)
    Pruner(model, targets=list(masks)).set_masks(masks)
    small = compact(model, x, masks=masks)
    torch.testing.assert_close(_outputs(small, x), _outputs(model, x), atol=ATOL, rtol=0)
    assert small.get_submodule("head").weight is small.get_submodule("inp").weight
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == before - 4 * (4 + 1) - 4 * 4


def test_weights_computed_by_torch_prune_or_a_parametrization_are_refused() -> None:
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as torch_prune

    x = torch.randn(5, 6)
    masks = {"2.weight": torch.ones(3, 6, dtype=torch.bool)}
    pruned = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    torch_prune.l1_unstructured(pruned[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"0\.weight is not a parameter.*prune\.remove"):
        compact(pruned, x, masks=masks)

    class Symmetric(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w.triu() + w.triu(1).transpose(0, 1)

    param = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    parametrize.register_parametrization(param[0], "weight", Symmetric())
    with pytest.raises(ValueError, match=r"0\.weight is not a parameter.*parametrization"):
        compact(param, x, masks=masks)


def test_dependency_graph_refuses_computed_weights_clearly() -> None:
    """(It raised KeyError('0.weight').)"""
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as torch_prune

    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"0\.weight is not a parameter.*prune\.remove"):
        DependencyGraph(model, torch.randn(5, 6)).group_masks(0.5)
    torch_prune.remove(model[0], "weight")  # made permanent: fine
    assert len(DependencyGraph(model, torch.randn(5, 6)).groups) == 6

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    param = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    parametrize.register_parametrization(param[2], "weight", Double())
    with pytest.raises(ValueError, match=r"2\.weight is not a parameter.*remove_parametrizations"):
        DependencyGraph(param, torch.randn(5, 6)).group_masks(0.5)


class AttentionWithWeights(nn.Module):
    """Returns the attention weights too (need_weights=True, nn.MultiheadAttention's
    default): with heads removed they must still be the masked model's."""

    def __init__(self, average: bool) -> None:
        super().__init__()
        self.average = average
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, pad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(x)
        out, w = self.attn(
            h, h, h, attn_mask=mask, key_padding_mask=pad, average_attn_weights=self.average
        )
        return self.head(out), w


@pytest.mark.parametrize("average", [True, False])
def test_attention_weights_of_removed_heads_are_the_masked_models(average: bool) -> None:
    torch.manual_seed(4)
    model = AttentionWithWeights(average).eval()
    x = torch.randn(2, 5, 6)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)  # causal
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 4] = True
    graph = DependencyGraph(model, (x, mask, pad))
    masks = graph.group_masks(0.5)
    Pruner(model, targets=list(masks)).set_masks(masks)
    small = compact(model, (x, mask, pad), masks=masks)
    assert small.get_submodule("attn").num_heads == 2
    with torch.no_grad():
        (y, w), (y2, w2) = model(x, mask, pad), small(x, mask, pad)
    torch.testing.assert_close(y2, y, atol=ATOL, rtol=0)
    assert w2.shape == w.shape == ((2, 5, 5) if average else (2, 4, 5, 5))
    torch.testing.assert_close(w2, w, atol=ATOL, rtol=0)


class Unbatched(nn.Module):
    """nn.MultiheadAttention on an unbatched (L, E) sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(5, 8), nn.Linear(8, 2)
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.proj(x))
        out, w = self.attn(h, h, h, key_padding_mask=pad)
        return self.head(out), w


def test_attention_on_an_unbatched_sequence() -> None:
    torch.manual_seed(7)
    model = Unbatched().eval()
    x, pad = torch.randn(4, 5), torch.tensor([False, False, False, True])
    masks = DependencyGraph(model, (x, pad)).group_masks(0.5)
    Pruner(model, targets=list(masks)).set_masks(masks)
    small = compact(model, (x, pad), masks=masks)
    with torch.no_grad():
        (y, w), (y2, w2) = model(x, pad), small(x, pad)
    assert y2.shape == y.shape == (4, 2) and w2.shape == w.shape == (4, 4)
    torch.testing.assert_close(y2, y, atol=ATOL, rtol=0)
    torch.testing.assert_close(w2, w, atol=ATOL, rtol=0)


def test_cost_of_attention_on_an_unbatched_sequence() -> None:
    from prunekit import model_cost

    x, pad = torch.randn(4, 5), torch.zeros(4, dtype=torch.bool)
    # by hand, L = 4, E = 8, one sequence: proj 4*8*5; attention q k^T and w v 2*4*4*8;
    # in-projections (4*8 + 4*(8+8))*8; out_proj 4*8*8; head 4*2*8
    by_hand = 4 * 8 * 5 + 2 * 4 * 4 * 8 + (4 * 8 + 4 * 16) * 8 + 4 * 8 * 8 + 4 * 2 * 8
    assert model_cost(Unbatched(), (x, pad)).macs == by_hand


def test_cost_of_a_transposed_convolution() -> None:
    """Each input position meets out_channels / groups * prod(kernel) weights."""
    from prunekit import model_cost

    up = nn.ConvTranspose2d(8, 4, kernel_size=2, stride=2)
    x = torch.randn(1, 8, 4, 4)
    assert model_cost(up, x).macs == (8 * 4 * 4) * 4 * (2 * 2)  # 2,048
    grouped = nn.ConvTranspose1d(6, 4, kernel_size=3, stride=2, groups=2)
    assert model_cost(grouped, torch.randn(2, 6, 5)).macs == (2 * 6 * 5) * (4 // 2) * 3


class ReadsWeight(nn.Module):
    """Reads a weight of the fc1 -> fc2 chain outside its layer's forward (fc1's rows,
    or fc2's columns, which are fc1's channels): pruning fc1's channels would change an
    output's shape (fc1) or values (fc2). The g1 -> g2 branch is read only through its
    layers: g1's 5 channels stay prunable."""

    def __init__(self, read: str = "fc1") -> None:
        super().__init__()
        self.read = read
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.g1, self.g2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc2(F.relu(self.fc1(x))) + self.g2(F.relu(self.g1(x)))
        if self.read == "fc1":
            return y, x @ self.fc1.weight.t()
        return y, self.fc2.weight.abs().sum(dim=0)


def test_a_layer_whose_weight_is_read_directly_is_not_compacted() -> None:
    """Masks that zero one of fc1's channels by hand: fc1 is in no group (pinned), so
    compaction keeps its 8 rows, and the result computes the masked model."""
    torch.manual_seed(5)
    model = ReadsWeight()
    x = torch.randn(2, 4)
    masks = {
        "fc1.weight": torch.ones(8, 4, dtype=torch.bool),
        "fc1.bias": torch.ones(8, dtype=torch.bool),
        "fc2.weight": torch.ones(3, 8, dtype=torch.bool),
    }
    masks["fc1.weight"][1] = False
    masks["fc1.bias"][1] = False
    masks["fc2.weight"][:, 1] = False
    small = compact(model, x, masks=masks)
    assert small.get_submodule("fc1").weight.shape == (8, 4)
    ref = _masked_copy(model, masks)
    with torch.no_grad():
        for a, b in zip(ref(x), small(x), strict=True):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("read", ["fc1", "fc2"])
def test_dependency_graph_pins_a_layer_whose_weight_is_read_directly(
    read: str, tracer: str
) -> None:
    """(It pruned fc1's channels, a model compaction could not build.)"""
    torch.manual_seed(5)
    model = ReadsWeight(read)
    x = torch.randn(2, 4)
    graph = DependencyGraph(model, x, tracer=tracer)
    assert graph.traced_by == ("torch.fx" if tracer == "fx" else "torch.export")
    # by hand: fc1's channels are pinned, the outputs' too: only g1's 5 channels remain
    assert [g.producers for g in graph.groups] == [("g1",)] * 5
    masks = graph.group_masks(0.4)
    assert set(masks) == {"g1.weight", "g1.bias", "g2.weight"}
    assert int(masks["g1.weight"].all(dim=1).sum()) == 3
    Pruner(model, targets=list(masks)).set_masks(masks)
    small = compact(model, x, masks=masks, tracer=tracer)
    assert small.get_submodule("g1").weight.shape == (3, 4)
    with torch.no_grad():
        for a, b in zip(model(x), small(x), strict=True):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


# ------------------------------------------------------------------ compressed checkpoints
def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.reshape(-1).contiguous().view(torch.uint8)
    return t.reshape(-1)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {
        "w": torch.randn(64, 64) * (torch.rand(64, 64) > 0.9),
        "h": (torch.randn(32, 16) * (torch.rand(32, 16) > 0.8)).half(),
        "b": torch.randn(64),
        "n": torch.tensor(7),
    }


def _data_records(path: Path) -> list[tuple[str, int, int]]:
    """(name, first byte, size) of each tensor data record in a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        out = []
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                # the local header: 30 bytes + file name + extra field
                with open(path, "rb") as f:
                    f.seek(info.header_offset + 26)
                    name_len = int.from_bytes(f.read(2), "little")
                    extra_len = int.from_bytes(f.read(2), "little")
                start = info.header_offset + 30 + name_len + extra_len
                out.append((info.filename, start, info.file_size))
    return out


def test_a_flipped_byte_in_any_tensor_record_is_refused(tmp_path: Path) -> None:
    """torch.load does not check the zip's CRCs: without a checksum of its own a damaged
    values or bitmask byte loads as a wrong weight."""
    state = _state()
    path = tmp_path / "s.pt"
    save_sparse(state, path)
    raw = path.read_bytes()
    records = _data_records(path)
    assert len(records) >= 3  # bitmask, float32 values, float16 values (and int64)
    rng = random.Random(0)
    for _name, start, size in records:
        for pos in {start, start + size - 1, start + rng.randrange(size)}:
            damaged = bytearray(raw)
            damaged[pos] ^= 0x04
            bad = tmp_path / "bad.pt"
            bad.write_bytes(bytes(damaged))
            with pytest.raises(ValueError, match=r"checksum|damaged|bitmask marks"):
                load_sparse(bad)
    back = load_sparse(path)
    assert all(torch.equal(_bits(back[k]), _bits(v)) for k, v in state.items())


def test_damaged_entries_are_refused_even_when_they_still_decode() -> None:
    """An entry whose shape shrank (dense) still decodes to a tensor: the checksum of the
    entries must catch it."""
    packed = compress_state_dict(_state())
    packed["entries"]["b"]["shape"] = [32]
    with pytest.raises(ValueError, match="checksum"):
        decompress_state_dict(packed)
    packed = compress_state_dict(_state())
    packed["values"]["float32"][-1] += 1.0  # the last dense value of 'b'
    with pytest.raises(ValueError, match="checksum"):
        decompress_state_dict(packed)
    packed = compress_state_dict(_state())
    packed["checksums"][("a", "tuple")] = 1  # (one bit flip in the pickle made this)
    with pytest.raises(ValueError, match="checksum"):
        decompress_state_dict(packed)
    packed = compress_state_dict(_state())
    packed["version"] = 2  # damaged too: the checksums that are there are still checked
    packed["values"]["float32"][0] += 1.0
    with pytest.raises(ValueError, match="checksum"):
        decompress_state_dict(packed)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.__setitem__("entries", [1]),
        lambda p: p["entries"]["w"].__setitem__("shape", ["a"]),
        lambda p: p["entries"].__setitem__("w", 3),
        lambda p: p.__setitem__("values", None),
    ],
)
def test_malformed_checkpoints_raise_value_error(damage: object) -> None:
    packed = compress_state_dict(_state())
    damage(packed)  # type: ignore[operator]
    with pytest.raises(ValueError, match="prunekit-sparse"):
        decompress_state_dict(packed)


def test_truncated_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "s.pt"
    save_sparse(_state(), path)
    raw = path.read_bytes()
    for cut in (10, len(raw) // 2, len(raw) - 10):
        (tmp_path / "cut.pt").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"cut\.pt.*(truncated|corrupt)"):
            load_sparse(tmp_path / "cut.pt")


def test_scalars_empty_and_float8_tensors_round_trip_bit_exact() -> None:
    state = {
        "zero": torch.tensor(0.0),
        "negzero": torch.tensor(-0.0),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "f8": torch.zeros(64, dtype=torch.float8_e4m3fn),
        "f8b": torch.tensor([0.0, -0.0, 1.0] * 20).to(torch.float8_e5m2),
    }
    back = decompress_state_dict(compress_state_dict(state))
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(_bits(back[k]), _bits(v)), k


def test_views_and_nan_payloads_round_trip_bit_exact() -> None:
    g = torch.Generator().manual_seed(8)
    base = torch.randn(16, 12, generator=g) * (torch.rand(16, 12, generator=g) > 0.9)
    payload = torch.tensor([0x7FC01234, 0xFF800001], dtype=torch.int64).int().view(torch.float32)
    nan = torch.zeros(64)
    nan[[3, 40]] = payload  # a quiet NaN with a payload and a signalling one
    state = {
        "transposed": base.t(),
        "strided": base[::3, 1::2],
        "expanded": torch.zeros(1).expand(100),  # stride 0
        "nan": nan,
        "int8": torch.tensor([0, -1, 5], dtype=torch.int8),
    }
    back = decompress_state_dict(compress_state_dict(state))
    for k, v in state.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        assert torch.equal(_bits(back[k]), _bits(v)), k


def test_names_must_be_strings() -> None:
    with pytest.raises(TypeError, match=r"names \(str\)"):
        compress_state_dict({1: torch.zeros(2)})  # type: ignore[dict-item]


def test_version_2_checkpoints_still_load() -> None:
    """Files written before the checksums (version 2) load as they did."""
    packed = compress_state_dict(_state())
    packed["version"] = 2
    packed.pop("checksums")
    back = decompress_state_dict(packed)
    assert torch.equal(back["w"], _state()["w"])


# ------------------------------------------------------------------ prunekit export
EXAMPLE = torch.zeros(1, 1, 28, 28)


ARGS = ["--repeats", "1", "--test-limit", "100"]


@pytest.mark.parametrize("mode", ["--compact", "--sparse"])
def test_export_refuses_final_weights_that_do_not_hold_the_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """final.pt replaced by weights that are non-zero where masks.pt prunes: the table's
    'before' would not be the pruned model; refuse, write nothing."""
    _run_folder(tmp_path)
    torch.manual_seed(5)
    torch.save(build_model("lenet_300_100").state_dict(), tmp_path / "final.pt")
    assert cli.main(["export", str(tmp_path), mode, *ARGS]) == 2
    err = capsys.readouterr().err
    assert "final.pt" in err and "masks.pt" in err and "fc1.weight" in err
    assert not (tmp_path / "compact.pt").exists() and not (tmp_path / "final.sparse.pt").exists()


def test_export_refuses_weights_of_another_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_folder(tmp_path)
    torch.save(build_model("conv4").state_dict(), tmp_path / "final.pt")
    assert cli.main(["export", str(tmp_path), "--sparse", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "final.pt" in err and "lenet_300_100" in err


def test_export_sparse_refuses_masks_that_are_not_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_folder(tmp_path)
    torch.save({"x": torch.ones(2, dtype=torch.bool)}, tmp_path / "masks.pt")
    assert cli.main(["export", str(tmp_path), "--sparse", *ARGS]) == 2
    assert "'x'" in capsys.readouterr().err


def test_export_twice_gives_the_same_files_and_counts(tmp_path: Path) -> None:
    net = _run_folder(tmp_path)
    records, saved = [], []
    for _ in range(2):
        assert cli.main(["export", str(tmp_path), "--compact", *ARGS]) == 0
        records.append(json.loads((tmp_path / "export_compact.json").read_text()))
        saved.append(torch.load(tmp_path / "compact.pt", weights_only=True)["state_dict"])
    first, second = ({k: v for k, v in r.items() if k != "latency_ms"} for r in records)
    assert first == second
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    # by hand: LeNet-300-100 at half of each hidden layer; non-zero weights of final.pt
    h1, h2 = 150, 50
    kept = 784 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10
    nonzero = sum(int(t.count_nonzero()) for t in net.parameters())
    assert first["params"] == [266_610, kept]
    assert first["nonzero_params"][0] == nonzero
    sizes = [(tmp_path / f).stat().st_size for f in ("final.pt", "compact.pt")]
    assert first["file_bytes"] == sizes


def test_dependency_graph_refuses_tied_weights_clearly() -> None:
    """(It raised KeyError('b.weight'): named_parameters() drops a tied weight's second
    name.) A module registered under two names is one module, not a tie."""
    model = TiedChain()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"a\.weight and b\.weight are one shared \(tied\)"):
        DependencyGraph(model, torch.randn(3, 4)).group_masks(0.5)
    with pytest.raises(ValueError, match=r"a\.weight and b\.weight are one shared \(tied\)"):
        GroupPruner(model, torch.randn(3, 4))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Linear(4, 6), nn.Linear(6, 2)
            self.alias = self.a  # one module under two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(F.relu(self.alias(x)))

    torch.manual_seed(6)
    aliased, x = Aliased(), torch.randn(3, 4)
    masks = DependencyGraph(aliased, x).group_masks(0.5)
    assert int(masks["a.weight"].all(dim=1).sum()) == 3
    small = compact(aliased, x, masks=masks)
    assert small.get_submodule("a").weight.shape == (3, 4)
    torch.testing.assert_close(
        _outputs(small, x), _outputs(_masked_copy(aliased, masks), x), atol=ATOL, rtol=0
    )


def test_a_damaged_compact_file_is_refused(tmp_path: Path) -> None:
    """compact.pt is a plain torch.save: without its own CRC a flipped byte in a weight
    loaded silently (32 of 40 random flips did)."""
    from prunekit.experiments.config import ConfigError
    from prunekit.experiments.export import load_compact

    net = _run_folder(tmp_path)
    assert cli.main(["export", str(tmp_path), "--compact", *ARGS]) == 0
    path = tmp_path / "compact.pt"
    raw = path.read_bytes()
    records = _data_records(path)
    assert records
    rng = random.Random(1)
    for _name, start, size in records:
        for pos in {start, start + size - 1, start + rng.randrange(size)}:
            damaged = bytearray(raw)
            damaged[pos] ^= 0x08
            (tmp_path / "bad.pt").write_bytes(bytes(damaged))
            with pytest.raises(ConfigError, match=r"bad\.pt is damaged|cannot be loaded"):
                load_compact(tmp_path / "bad.pt", EXAMPLE)
    small = load_compact(path, EXAMPLE)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(_outputs(small, x), _outputs(net, x), atol=ATOL, rtol=0)
    # a file written before the CRC (no version) still loads
    old = torch.load(path, weights_only=True)
    del old["version"], old["crc32"]
    torch.save(old, tmp_path / "old.pt")
    torch.testing.assert_close(
        _outputs(load_compact(tmp_path / "old.pt", EXAMPLE), x), _outputs(net, x), atol=ATOL, rtol=0
    )
