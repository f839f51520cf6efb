"""Every file a run writes, in one place, and atomic writes for them.

A run folder is named from the experiment name and a hash of its resolved config
(``runs/lenet-gmp-90-3f2a9c1b``), so the same config always lands in the same folder
and a re-run can reuse what is finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

#: Top-level keys left out of the run folder's hash. ``out_dir`` says where, not what.
#: ``rounds`` (lottery runs): round r's masks and results do not depend on how many rounds
#: follow it (the plan's sparsity after r rounds, the seeds and the training of a round
#: are all independent of the total), so raising ``rounds`` extends a finished run in its
#: own folder, reusing the rounds already done, instead of starting over elsewhere.
UNHASHED_KEYS = ("out_dir", "rounds")


def config_hash(cfg: DictConfig) -> str:
    """8 hex digits identifying a resolved config (``UNHASHED_KEYS`` excluded).

    >>> a = OmegaConf.create({"name": "x", "lr": 0.1, "out_dir": "runs"})
    >>> b = OmegaConf.create({"name": "x", "lr": 0.1, "out_dir": "elsewhere"})
    >>> config_hash(a) == config_hash(b), len(config_hash(a))
    (True, 8)
    >>> config_hash(OmegaConf.create({"name": "x", "rounds": 2})) == config_hash(
    ...     OmegaConf.create({"name": "x", "rounds": 12}))
    True
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    for key in UNHASHED_KEYS:
        plain.pop(key, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:8]


class RunPaths:
    """The files of one run folder.

    >>> p = RunPaths(Path("runs/demo-0000abcd"))
    >>> p.summary.name, p.round_dir(3).name
    ('summary.json', 'round_03')
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_config(cls, cfg: DictConfig) -> RunPaths:
        return cls(Path(cfg.out_dir) / f"{cfg.name}-{config_hash(cfg)}")

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.csv")
    summary = property(lambda self: self.root / "summary.json")
    dense_weights = property(lambda self: self.root / "dense.pt")
    final_weights = property(lambda self: self.root / "final.pt")
    masks = property(lambda self: self.root / "masks.pt")
    sparsity_plot = property(lambda self: self.root / "sparsity.png")
    accuracy_plot = property(lambda self: self.root / "accuracy.png")
    logs = property(lambda self: self.root / "logs")
    #: ``prunekit export``: the compacted model, the compressed weights, and the
    #: before/after record of each export mode
    compact_model = property(lambda self: self.root / "compact.pt")
    sparse_weights = property(lambda self: self.root / "final.sparse.pt")

    def export_record(self, mode: str) -> Path:
        return self.root / f"export_{mode}.json"

    #: lottery runs: the initial weights (the state_dict every round-0 start and
    #: rewind=init round loads) and, for rewind=step, the Lightning checkpoint taken
    #: after rewind_step steps of round 0 (weights, optimizer, LR scheduler, loop state).
    initial_weights = property(lambda self: self.root / "init.pt")
    rewind_checkpoint = property(lambda self: self.root / "rewind.ckpt")

    def round_dir(self, round: int) -> Path:
        return self.root / f"round_{round:02d}"

    def round_result(self, round: int, variant: str) -> Path:
        """The finished-round record; its presence means the round is done."""
        return self.round_dir(round) / f"{variant}.json"

    def round_state(self, round: int, variant: str) -> Path:
        """Masks and final weights of a finished round."""
        return self.round_dir(round) / f"{variant}.pt"


def check_writable(folder: Path) -> None:
    """Fail early, naming the folder, if a run cannot write there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write the run folder {folder}: {e.strerror}") from None


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_torch(path: Path, data: Any) -> None:
    """``torch.save`` atomically."""
    _atomic(path, lambda tmp: torch.save(data, tmp))


def write_config(path: Path, cfg: DictConfig) -> None:
    """Write the resolved config as YAML, atomically."""
    _atomic(path, lambda tmp: tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True)))
