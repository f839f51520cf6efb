"""Every file a run writes, in one place: atomic writes, checked reads, the run lock.

A run folder is named from the experiment name and a hash of its resolved config
(``runs/lenet-gmp-90-3f2a9c1b``), so the same config always lands in the same folder
and a re-run can reuse what is finished. The name is a single plain path component, so
a run folder is always directly inside ``out_dir``. One process at a time works in a
run folder (:func:`locked`). A file of a run folder that cannot be read (truncated,
corrupt) or written (disk full) raises :class:`RunFolderError` naming it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import pickle
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from prunekit.experiments.config import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no run lock
    fcntl = None  # type: ignore[assignment]

#: Top-level keys left out of the run folder's hash. ``out_dir`` says where, not what.
#: ``rounds`` (lottery runs): round r's masks and results do not depend on how many rounds
#: follow it (the plan's sparsity after r rounds, the seeds and the training of a round
#: are all independent of the total), so raising ``rounds`` extends a finished run in its
#: own folder, reusing the rounds already done, instead of starting over elsewhere.
#: ``checkpoint_every`` (gradual runs) says how often a resumable checkpoint is saved,
#: which changes no result.
UNHASHED_KEYS = ("out_dir", "rounds", "checkpoint_every")

#: What an experiment ``name`` may be: one plain folder-name component.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as it is: a file in it is truncated or corrupt,
    a write to it failed (disk full), or another process is running in it. The message
    names the file or the folder."""


def check_name(name: object) -> str:
    """``name`` if it is a plain folder name (so a run folder stays inside ``out_dir``).

    >>> check_name("gmp-lenet300-90")
    'gmp-lenet300-90'
    >>> check_name("../x")
    Traceback (most recent call last):
    ValueError: name='../x' must be a plain folder name: 1-100 letters, digits, '.', '_' or '-', not starting with '.' or '-' (no '/', no '..')
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"name={name!r} must be a plain folder name: 1-100 letters, digits, '.', '_' or "
            "'-', not starting with '.' or '-' (no '/', no '..')"
        )
    return name


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
        """``out_dir/<name>-<hash>``; a ``name`` that is not a plain folder name raises
        ``ConfigError``, and so does a run folder that resolves outside ``out_dir``
        (a symbolic link pointing elsewhere)."""
        try:
            name = check_name(cfg.name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        out_dir = Path(cfg.out_dir)
        root = out_dir / f"{name}-{config_hash(cfg)}"
        if root.resolve().parent != out_dir.resolve():
            raise ConfigError(
                f"the run folder {root} resolves to {root.resolve()}, outside "
                f"out_dir={cfg.out_dir!r} (a symbolic link?): a run writes only inside out_dir"
            )
        return cls(root)

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

    #: many runs at once (``prunekit run --jobs`` / ``--cluster``): the output of the
    #: run's process, and the folder of submitit's job files
    job_log = property(lambda self: self.root / "job.log")
    cluster_logs = property(lambda self: self.root / "cluster")
    #: the run lock: holds the pid, host and start time of the process running here
    lock = property(lambda self: self.root / "run.lock")
    #: gradual runs: the dense phase's record (its wall time), written before dense.pt
    dense_record = property(lambda self: self.root / "dense.json")
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

    def resume_checkpoint(self, phase: str) -> Path:
        """Gradual runs: the latest resumable Lightning checkpoint of a phase (``dense``
        or ``pruning``), deleted once the phase's results are written."""
        return self.root / f"resume_{phase}.ckpt"


def check_writable(folder: Path) -> None:
    """Fail early, naming the folder, if a run cannot write there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write the run folder {folder}: {e.strerror}") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a hidden temporary file next to ``path``, then move it to
    ``path``: readers see the old file or the whole new one, never a part. A failed write
    (``OSError``, or torch's ``RuntimeError`` such as "basic_ios::clear: iostream error"
    on a full disk) raises :class:`RunFolderError` naming ``path``; nothing is left.

    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "a.txt", lambda tmp: tmp.write_text("hi"))
    >>> sorted(p.name for p in folder.iterdir())
    ['a.txt']
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RunFolderError(f"cannot write {path}: {_reason(e)}") from e
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise RunFolderError(
            f"cannot write {path}: {_reason(e)} (is the disk full or the folder read-only?)"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write(
        path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    )


def save_torch(path: Path, data: Any) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def write_config(path: Path, cfg: DictConfig) -> None:
    """Write the resolved config as YAML, atomically (a file already holding it is left
    untouched)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    if path.is_file() and path.read_text() == text:
        return
    atomic_write(path, lambda tmp: tmp.write_text(text))


_DAMAGED = "is truncated or corrupt"
_REDO = "delete it and run the experiment again to recompute it"


def read_json(path: Path) -> Any:
    """The JSON in ``path``; unreadable or invalid JSON raises :class:`RunFolderError`
    naming the file (a missing file raises ``FileNotFoundError``).

    >>> bad = Path(tempfile.mkdtemp()) / "summary.json"
    >>> _ = bad.write_text('{"kind": "grad')
    >>> try:
    ...     read_json(bad)
    ... except RunFolderError as e:
    ...     print(str(e).replace(str(bad.parent), "DIR")[:50])
    DIR/summary.json is truncated or corrupt (not JSON
    """
    try:
        text = Path(path).read_text()
        return json.loads(text)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path} {_DAMAGED} (not JSON: {_reason(e)}); {_REDO}") from None


def load_torch(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; a truncated or corrupt file raises
    :class:`RunFolderError` naming it (a missing file raises ``FileNotFoundError``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise RunFolderError(f"{path} {_DAMAGED} ({_reason(e)}); {_REDO}") from None


def state_dict_mismatch(state: Any, expected: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot be loaded where the state_dict ``expected`` is (other keys or
    shapes), or None when it can.

    >>> state_dict_mismatch({"w": torch.zeros(2)}, {"w": torch.ones(2)}) is None
    True
    >>> state_dict_mismatch({"w": torch.zeros(3)}, {"w": torch.ones(2), "b": torch.ones(1)})
    "missing ['b'], unexpected [], other shapes ['w']"
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "not a state_dict (a dict of tensors)"
    got = {k: tuple(v.shape) for k, v in state.items()}
    want = {k: tuple(v.shape) for k, v in expected.items()}
    if got == want:
        return None
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    other = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    return f"missing {missing}, unexpected {unexpected}, other shapes {other}"


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the run folder's lock (``run.lock``, ``fcntl.flock``) while the block runs.

    A second process asking for it fails at once with :class:`RunFolderError` naming the
    holder (pid, host, start time). The lock file stays; it is emptied on release, so a
    non-empty file that nobody holds was left by a killed process (the kernel releases
    the lock of a dead process by itself).

    >>> root = Path(tempfile.mkdtemp())
    >>> with locked(root):
    ...     try:
    ...         with locked(root):  # as a second process would
    ...             pass
    ...     except RunFolderError as e:
    ...         print(str(e).replace(str(root), "ROOT").split(" pid")[0])
    the run folder ROOT is in use by
    """
    path = RunPaths(root).lock
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
            raise RunFolderError(
                f"the run folder {root} is in use by {holder}: one process per run folder "
                f"(wait for it to finish, or stop it; {path.name} names it)"
            ) from None
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode(), 0
        )
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def check_locked_by(root: Path, pid: int) -> None:
    """Raise :class:`RunFolderError` unless process ``pid`` holds the run folder's lock
    now (:func:`locked`): a worker process of a run (``prunekit lottery --jobs N``) works
    in the folder under its parent's lock, and only then.

    >>> root = Path(tempfile.mkdtemp())
    >>> with locked(root):
    ...     check_locked_by(root, os.getpid())
    >>> try:
    ...     check_locked_by(root, os.getpid())
    ... except RunFolderError as e:
    ...     print(str(e).replace(str(root), "ROOT").split(" by process")[0])
    the run folder ROOT is not locked
    """
    path = RunPaths(root).lock
    if fcntl is None:
        return
    holder = path.read_text(errors="replace").strip() if path.is_file() else ""
    free = True
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except BlockingIOError:
                free = False
        finally:
            os.close(fd)
    if free or not holder.startswith(f"pid {pid} "):
        raise RunFolderError(
            f"the run folder {root} is not locked by process {pid} "
            f"({'nobody holds ' + path.name if free else 'held by ' + holder}): a worker "
            "process works only under its parent run's lock"
        )
