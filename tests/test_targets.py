"""Default targets (docs/targets.md), weight layouts (HF Conv1D) and Pruner.describe()."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prunekit.experiments.models import build_model
from torch import nn

from prunekit import Pruner, ln_structured_mask, nm_mask

DOC = Path(__file__).resolve().parents[1] / "docs" / "targets.md"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hf(build: Callable[[object], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        tf = pytest.importorskip("transformers")
        torch.manual_seed(0)
        return build(tf)

    return make


def tiny_bert(tf: object) -> nn.Module:
    config = tf.BertConfig(  # type: ignore[attr-defined]
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return tf.BertForSequenceClassification(config)  # type: ignore[attr-defined]


def tiny_gpt2(tf: object) -> nn.Module:
    config = tf.GPT2Config(  # type: ignore[attr-defined]
        vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return tf.GPT2LMHeadModel(config)  # type: ignore[attr-defined]


def tiny_llama(tf: object) -> nn.Module:
    config = tf.LlamaConfig(  # type: ignore[attr-defined]
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config)  # type: ignore[attr-defined]


def tiny_vit(tf: object) -> nn.Module:
    config = tf.ViTConfig(  # type: ignore[attr-defined]
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=37, num_labels=3,
    )  # fmt: skip
    return tf.ViTForImageClassification(config)  # type: ignore[attr-defined]


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": lambda: build_model("lenet_300_100"),
    "CNN": lambda: build_model("conv4"),
    "ResNet": lambda: build_model("resnet20"),
    "BERT": _hf(tiny_bert),
    "GPT-2": _hf(tiny_gpt2),
    "Llama": _hf(tiny_llama),
    "ViT": _hf(tiny_vit),
}


def doc_table() -> dict[str, tuple[list[str], list[str]]]:
    """architecture -> (targeted globs, dense globs), read from docs/targets.md."""
    text = DOC.read_text()
    table = text[text.index("<!-- targets table") :]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("architecture", "---"):
            continue
        globs = [[g for g in re.findall(r"`([^`]+)`", c) if "." in g] for c in cells[2:]]
        rows[cells[0]] = (globs[0], globs[1])
    return rows


def test_doc_table_covers_every_architecture() -> None:
    assert list(doc_table()) == list(MODELS)


@pytest.mark.parametrize("arch", list(MODELS))
def test_default_targets_are_the_documented_ones(arch: str) -> None:
    model = MODELS[arch]()
    targeted_globs, dense_globs = doc_table()[arch]
    names = [n for n, _ in model.named_parameters()]

    def matching(globs: list[str]) -> set[str]:
        for g in globs:
            assert any(fnmatch.fnmatchcase(n, g) for n in names), f"{g!r} matches nothing"
        return {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)}

    pruner = Pruner(model)
    assert set(pruner.names) == matching(targeted_globs)
    matrices = {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert matrices - set(pruner.names) == matching(dense_globs)
    line = pruner.describe()
    assert f"{len(pruner.names)} targets" in line and "\n" not in line


def test_classic_output_layer_is_pruned_and_embeddings_are_not() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert Pruner(model).names == ["1.weight", "3.weight"]  # the output layer included
    # asked for, an embedding is pruned like any other target
    assert Pruner(model, targets=[nn.Embedding, nn.Linear]).names == [
        "0.weight",
        "1.weight",
        "3.weight",
    ]
    line = Pruner(model).describe()
    assert line == (
        "Sequential: 2 targets, 88 of 499 parameters (17.6%); matrices left dense: 0.weight 50x8"
    )


def test_hf_model_nested_in_a_wrapper_keeps_its_heads_dense() -> None:
    class Wrapper(nn.Module):  # e.g. a LightningModule holding the HF model
        def __init__(self) -> None:
            super().__init__()
            self.net = MODELS["BERT"]()
            self.extra = nn.Linear(4, 4)

    model = Wrapper()
    names = Pruner(model).names
    assert "net.classifier.weight" not in names and "extra.weight" in names
    assert not any("embeddings" in n for n in names)


# ---------------------------------------------------------------- HF Conv1D layout
def _conv1d_model() -> tuple[nn.Module, nn.Module]:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf=12, nx=8)  # weight (in=8, out=12)
    nn.init.normal_(layer.weight)
    return nn.Sequential(layer), layer


def test_conv1d_is_a_default_target() -> None:
    model, layer = _conv1d_model()
    assert tuple(layer.weight.shape) == (8, 12)
    assert Pruner(model).names == ["0.weight"]


def test_ln_structured_dim0_prunes_conv1d_output_features() -> None:
    model, layer = _conv1d_model()
    weight = layer.weight.detach().clone()
    pruner = Pruner(model, method="ln_structured", scope="layer", n=2, dim=0)
    pruner.prune_to(1 / 3)  # 4 of the 12 output features
    mask = pruner.masks["0.weight"]
    # the 4 output features (columns of the (in, out) weight) of smallest L2 norm
    norms = weight.norm(dim=0)
    expected_cols = set(torch.argsort(norms)[:4].tolist())
    pruned_cols = {j for j in range(12) if not mask[:, j].any()}
    assert pruned_cols == expected_cols
    assert int((~mask).sum()) == 4 * 8
    # same as a Linear holding the transposed weight, pruned with dim=0
    assert torch.equal(mask, ln_structured_mask(weight.T, 4, n=2, dim=0).T)


def test_nm_groups_conv1d_along_input_features_like_linear() -> None:
    model, layer = _conv1d_model()
    weight = layer.weight.detach().clone()
    pruner = Pruner(model, method="nm", scope="layer")  # default dim=-1: inputs of a Linear
    pruner.prune_to(0.5)
    assert torch.equal(pruner.masks["0.weight"], nm_mask(weight.T, 2, 4).T)


def test_conv1d_dim_out_of_range_is_refused() -> None:
    model, _ = _conv1d_model()
    with pytest.raises(ValueError, match="dim"):
        Pruner(model, method="ln_structured", scope="layer", dim=2)


def test_lightning_callback_verbose_prints_the_target_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from prunekit.callbacks import Pruning
    from prunekit.schedules import Constant

    from tests.lit_helpers import TinyNet, loader, trainer

    model = TinyNet()
    expected = Pruner(TinyNet()).describe()  # same architecture, same line
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            trainer(max_steps=2, callbacks=[Pruning(Constant(0.5), verbose=True)]).fit(
                model, loader()
            )
    finally:
        logger.removeHandler(caplog.handler)
    assert f"prunekit: {expected}" in caplog.messages
