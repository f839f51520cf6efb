"""Compressed sparse checkpoints: bit-exact round trips, sizes against a count by hand,
and the guarded conversion to 2:4 semi-structured tensors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from prunekit.experiments.models import build_model
from torch import nn

from prunekit import (
    Pruner,
    compress_state_dict,
    decompress_state_dict,
    load_sparse,
    nm_mask,
    save_sparse,
    to_semi_structured,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def _assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            assert torch.equal(_bits(a[k]), _bits(b[k])), k
        else:
            assert torch.equal(a[k], b[k]), k


def _saved_size(obj: object) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer().nbytes


def test_round_trip_is_bit_exact_for_awkward_values_and_dtypes() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g) * (torch.rand(40, 30, generator=g) > 0.9)
    w[0, :3] = torch.tensor([-0.0, float("nan"), float("-inf")])
    state = {
        "w32": w,
        "w16": w.half(),
        "wbf16": w.bfloat16(),
        "w64": w.double(),
        "dense": torch.randn(5, 5, generator=g),
        "count": torch.tensor(7),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(0.0),
        "flags": torch.rand(9, generator=g) > 0.5,
    }
    packed = compress_state_dict(state)
    entries = packed["entries"]
    assert "count" in entries["w32"] and "dense" in entries["dense"]  # the latter would not pay
    # values by hand: the non-zero entries and the NaN; -0.0 (from the multiplication by
    # the mask, and the one set above) marked in a second bitmask
    kept = sum(1 for v in w.flatten().tolist() if v != 0 or v != v)
    assert entries["w32"]["count"] == kept and "negative_zeros" in entries["w32"]
    # one shared bitmask buffer: 2 masks (values, negative zeros) per compressed tensor
    compressed = [n for n, e in entries.items() if "count" in e]
    assert sorted(compressed) == ["scalar", "w16", "w32", "w64", "wbf16"]  # 0.0: 1 byte < 4
    assert packed["bits"].numel() == 4 * 2 * ((40 * 30 + 7) // 8) + 1
    back = decompress_state_dict(packed)
    _assert_bit_exact(state, back)
    assert _bits(back["w32"])[0, 0] == _bits(torch.tensor(-0.0))  # the sign of zero


def test_state_dict_is_not_modified_and_round_trips_through_a_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("resnet20")
    Pruner(model).prune_to(0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = save_sparse(model, tmp_path / "sparse.pt")
    assert size == (tmp_path / "sparse.pt").stat().st_size
    _assert_bit_exact(before, model.state_dict())
    again = build_model("resnet20")
    again.load_state_dict(load_sparse(tmp_path / "sparse.pt"))
    _assert_bit_exact(before, again.state_dict())
    # a plain torch.load reads it too (no pickled code)
    assert torch.load(tmp_path / "sparse.pt", weights_only=True)["format"] == "prunekit-sparse"


def test_size_at_90_percent_unstructured() -> None:
    torch.manual_seed(2)
    model = build_model("lenet_300_100")
    Pruner(model, targets=None).prune_to(0.9)
    state = model.state_dict()
    dense, sparse = _saved_size(state), _saved_size(compress_state_dict(state))
    # by hand: 10 % of the weights as float32 + 1 bit per weight; biases stay dense
    weights = sum(v.numel() for k, v in state.items() if k.endswith("weight"))
    biases = sum(v.numel() for k, v in state.items() if k.endswith("bias"))
    payload = round(0.1 * weights) * 4 + weights / 8 + biases * 4
    assert sparse == pytest.approx(payload, rel=0.03)  # plus a few hundred bytes of zip
    assert sparse / dense <= 0.15


def test_n_m_masks_compress_to_about_half() -> None:
    torch.manual_seed(3)
    w = torch.randn(128, 256)
    w = w.masked_fill(~nm_mask(w, 2, 4), 0.0)
    packed = compress_state_dict({"w": w})
    values = packed["values"]["float32"]
    assert values.numel() == packed["entries"]["w"]["count"] == w.numel() // 2
    ratio = (values.numel() * 4 + packed["bits"].numel()) / (w.numel() * 4)
    assert ratio == pytest.approx(0.5 + 1 / 32)
    _assert_bit_exact({"w": w}, decompress_state_dict(packed))


def test_bad_checkpoints_are_refused() -> None:
    with pytest.raises(ValueError, match="not a prunekit-sparse"):
        decompress_state_dict({"weight": torch.zeros(2)})
    packed = compress_state_dict({"w": torch.eye(32)})
    packed["version"] = 99
    with pytest.raises(ValueError, match="version=99"):
        decompress_state_dict(packed)
    packed = compress_state_dict({"w": torch.eye(32)})
    packed["entries"]["w"]["count"] = 31
    with pytest.raises(ValueError, match="marks 32 values but 31"):
        decompress_state_dict(packed)
    packed = compress_state_dict({"w": torch.eye(32)})
    packed["values"]["float32"] = packed["values"]["float32"][:-1]
    with pytest.raises(ValueError, match="values buffer is short"):
        decompress_state_dict(packed)
    del packed["entries"]["w"]["bits"]
    with pytest.raises(ValueError, match="entry 'w' is damaged: KeyError"):
        decompress_state_dict(packed)
    with pytest.raises(TypeError, match="state_dict"):
        compress_state_dict({"w": [1.0]})


def test_semi_structured_is_guarded_off_gpu() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.mul_(nm_mask(model[0].weight, 2, 4))
    with pytest.raises(ValueError, match=r"'2'.*not 2:4"):
        to_semi_structured(model, targets=["2"])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"0\.weight is on cpu.*CUDA"):
            to_semi_structured(model)
        assert model[0].weight.layout == torch.strided  # unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_on_gpu_matches_dense() -> None:
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip("GPU without 2:4 sparse kernels")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(128, 128)).half().cuda()
    with torch.no_grad():
        model[0].weight.mul_(nm_mask(model[0].weight, 2, 4))
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    expected = model(x)
    assert to_semi_structured(model) == ["0"]
    torch.testing.assert_close(model(x), expected, atol=1e-2, rtol=1e-2)


def test_many_small_tensors_share_buffers() -> None:
    # ResNet-20: 174 tensors of which many are small (BatchNorm); one file record per
    # tensor cost ~270 bytes each, 0.17x of dense in all. Shared buffers: under 0.15x.
    torch.manual_seed(5)
    model = build_model("resnet20")
    Pruner(model).prune_to(0.9)
    state = model.state_dict()
    packed = compress_state_dict(state)
    assert len(packed["values"]) == 2  # float32 and int64 (num_batches_tracked)
    assert _saved_size(packed) / _saved_size(state) <= 0.15
    _assert_bit_exact(state, decompress_state_dict(packed))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_refusal_leaves_every_layer_unchanged() -> None:
    """torch refuses 2:4 tensors too small for its kernels (8 rows here): the layer before
    it must not have been swapped already."""
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip("GPU without 2:4 sparse kernels")
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 8)).half().cuda()
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    with pytest.raises(RuntimeError):
        to_semi_structured(model)
    assert all(layer.weight.layout == torch.strided for layer in model)
    assert all(type(layer.weight.data) is torch.Tensor for layer in model)
