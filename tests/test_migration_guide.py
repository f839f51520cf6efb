"""docs/migrating-from-modelpruning.md: every ModelPruning argument is mapped, and every
Python block runs (in order, in one namespace), so the guide shows what prunekit does."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelPruning

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "migrating-from-modelpruning.md"
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)


def test_every_modelpruning_argument_is_mapped() -> None:
    arguments = [p for p in inspect.signature(ModelPruning.__init__).parameters if p != "self"]
    table = [line for line in GUIDE.read_text().splitlines() if line.startswith("| `")]
    mapped = {m for line in table for m in re.findall(r"`(\w+)[=`(]", line.split(" | ")[0])}
    assert len(arguments) == 13
    assert [a for a in arguments if a not in mapped] == []


def test_the_guides_snippets_run() -> None:
    code = blocks()
    assert len(code) >= 8
    namespace: dict[str, object] = {"__name__": "migration_guide"}
    for i, block in enumerate(code):
        exec(compile(block, f"{GUIDE.name}[block {i}]", "exec"), namespace)
