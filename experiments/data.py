"""Datasets for the experiments: a registry of LightningDataModules, IDX image folders.

Register a data module class (or factory) with :func:`register_dataset`, list names with
:func:`list_datasets`, build with :func:`build_datamodule`; :func:`datamodule_from_config`
also takes a user's own class by import path (``_target_``). Every data module the
runners use says what it holds, before loading anything: ``input_shape`` (channels,
height, width) and ``num_classes``; the models are built from those.

``fashion_mnist`` (the default) comes from Debian's ``dataset-fashion-mnist`` package
(four gzipped IDX files in :data:`DEFAULT_DATA_DIR`); any folder holding the same four
files, gzipped or not, works. A new IDX dataset is one subclass of
:class:`IDXDataModule` with its folder, image size, classes and normalisation. Nothing
is ever downloaded.

>>> FILES["train_images"]
'train-images-idx3-ubyte'
>>> list_datasets()
['fashion_mnist']
"""

from __future__ import annotations

import difflib
import functools
import gzip
import inspect
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import lightning as L
import numpy as np
import torch
from prunekit.experiments.imports import import_object, registering
from torch.utils.data import DataLoader, Sampler, TensorDataset

__all__ = [
    "DEFAULT_DATA_DIR",
    "FILES",
    "MEAN",
    "NUM_CLASSES",
    "STD",
    "EpochShuffleSampler",
    "FashionMNIST",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "ImageData",
    "build_datamodule",
    "data_shape",
    "datamodule_from_config",
    "describe_datasets",
    "list_datasets",
    "load_fashion_mnist",
    "load_idx_folder",
    "read_idx",
    "register_dataset",
]

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

#: The four IDX files, by role (each may also be stored as ``name + ".gz"``).
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Mean and (population) standard deviation of all 60,000 x 784 training pixels after
# scaling to [0, 1], computed from the Debian files: 0.28604 and 0.35302.
MEAN = 0.2860
STD = 0.3530

NUM_CLASSES = 10
NUM_TRAIN = 60_000
IMAGE_SHAPE = (28, 28)

_INSTALL_HINT = (
    "Install the data with `apt-get install dataset-fashion-mnist` (the files land in "
    f"{DEFAULT_DATA_DIR}), or point `data.root` at any folder holding the four IDX files "
    f"({', '.join(FILES.values())}, each optionally gzipped)."
)
_IDX_HINT = (
    f"Point `data.root` at a folder holding the four IDX files "
    f"({', '.join(FILES.values())}, each optionally gzipped)."
)

# IDX type codes: https://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT"); data are
# big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _resolve_idx_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` if it exists, else its ``.gz`` twin (or the name without ``.gz``)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    twin = path.with_name(path.name[:-3]) if path.name.endswith(".gz") else Path(f"{path}.gz")
    if twin.is_file():
        return twin
    raise FileNotFoundError(f"IDX file not found: {path} (nor {twin.name}). {_INSTALL_HINT}")


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":  # not gzip: a plain IDX file
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"corrupt or truncated gzip file {path}: {err}") from err


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (gzipped or not) into a tensor of its stored type and shape.

    ``path`` may name either ``file`` or ``file.gz``; whichever exists is read, and gzip
    is recognised by its magic bytes, not the suffix. The header (two zero bytes, a type
    code, the number of dimensions, then big-endian uint32 sizes) is validated and the
    payload must hold exactly ``prod(sizes)`` items; otherwise a ``ValueError`` names
    the file.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "tiny-idx2-ubyte"
    >>> _ = p.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6)))
    >>> read_idx(p)
    tensor([[0, 1, 2],
            [3, 4, 5]], dtype=torch.uint8)
    """
    path = _resolve_idx_path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file: only {len(data)} bytes")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number 0x{data[:4].hex()} "
            f"(expected 0x0000TTNN, TT a type code in "
            f"{[hex(c) for c in _IDX_DTYPES]}, NN >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, header alone needs {header}")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {what}: {len(data)} bytes, expected {expected} for shape {shape} "
            f"of {dtype.name}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


@dataclass(frozen=True)
class ImageData:
    """Decoded images: normalised float32 (N, C, H, W) and int64 labels (N,), train and test.

    The tensors are shared by every caller of the cached loaders with the same folder:
    index them, never modify them in place.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


FashionMNIST = ImageData  # the name this dataclass had when Fashion-MNIST was the only dataset


def _check_images_labels(
    images: torch.Tensor,
    labels: torch.Tensor,
    where: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
) -> None:
    shape = tuple(images.shape[1:])
    expected = (
        (input_shape[1:], "(N, H, W)") if images.dim() == 3 else (input_shape, "(N, C, H, W)")
    )
    if images.dim() not in (3, 4) or shape != expected[0]:
        raise ValueError(
            f"{where}: images have shape {tuple(images.shape)}, expected {expected[1]} with "
            f"{expected[0]} per image (input_shape={input_shape})"
        )
    if images.dtype != torch.uint8:
        raise ValueError(f"{where}: images have dtype {images.dtype}, expected uint8")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        n = images.shape[0]
        raise ValueError(f"{where}: labels of shape {tuple(labels.shape)} for {n} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{where}: labels must lie in [0, {num_classes - 1}]")


def _normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W), ``(x / 255 - mean) / std``."""
    out = (images.unsqueeze(1) if images.dim() == 3 else images).to(torch.float32)
    return out.div_(255.0).sub_(mean).div_(std)


@functools.lru_cache(maxsize=4)
def _load_cached(
    root: Path, input_shape: tuple[int, int, int], num_classes: int, mean: float, std: float
) -> ImageData:
    tensors = {role: read_idx(root / name) for role, name in FILES.items()}
    split: dict[str, torch.Tensor] = {}
    for part in ("train", "test"):
        images, labels = tensors[f"{part}_images"], tensors[f"{part}_labels"]
        _check_images_labels(images, labels, f"{root} ({part})", input_shape, num_classes)
        split[f"{part}_images"] = _normalise(images, mean, std)
        split[f"{part}_labels"] = labels.to(torch.int64)
    return ImageData(**split)


def load_idx_folder(
    root: str | os.PathLike[str],
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: float = 0.0,
    std: float = 1.0,
) -> ImageData:
    """Decode the four IDX files (:data:`FILES`) under ``root``, cached per folder.

    Images are uint8, stored (N, H, W) for one channel or (N, C, H, W), and must match
    ``input_shape``; they become ``(x / 255 - mean) / std`` in float32, (N, C, H, W).
    Labels must lie in ``[0, num_classes)`` and become int64.

    >>> load_idx_folder("/no/such/dir", input_shape=(1, 8, 8), num_classes=3)
    Traceback (most recent call last):
    FileNotFoundError: data folder not found: /no/such/dir
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data folder not found: {path}")
    shape = tuple(int(s) for s in input_shape)
    return _load_cached(path.resolve(), shape, int(num_classes), float(mean), float(std))  # type: ignore[arg-type]


def load_fashion_mnist(root: str | os.PathLike[str] = DEFAULT_DATA_DIR) -> ImageData:
    """Decode the four IDX files under ``root`` into normalised tensors (cached per root).

    Images become ``(x / 255 - 0.2860) / 0.3530`` in float32, shaped (N, 1, 28, 28);
    labels int64. The result is cached in-process on the resolved root, so a second call
    costs nothing; the tensors are shared, so do not modify them in place.
    A missing folder or file raises ``FileNotFoundError`` saying how to install the data.

    >>> load_fashion_mnist("/no/such/dir")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    FileNotFoundError: Fashion-MNIST folder not found: /no/such/dir. Install ...
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder not found: {path}. {_INSTALL_HINT}")
    return load_idx_folder(
        path, input_shape=(1, *IMAGE_SHAPE), num_classes=NUM_CLASSES, mean=MEAN, std=STD
    )


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` drawn from ``seed + epoch``.

    Lightning calls :meth:`set_epoch` before every epoch, so a resumed run sees the same
    order as an uninterrupted one. Without it (a plain loop), each pass advances the epoch.

    >>> s = EpochShuffleSampler(5, seed=0)
    >>> first = list(s); s.set_epoch(0)
    >>> list(s) == first, sorted(first)
    (True, [0, 1, 2, 3, 4])
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=generator).tolist())


class _BatchTensorDataset(TensorDataset):
    """A TensorDataset that DataLoader reads a whole batch at a time (one gather per tensor)."""

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return tuple(t[index] for t in self.tensors)


def _collate_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The batch is already stacked by ``_BatchTensorDataset.__getitems__``."""
    return batch


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}={value!r} must be an int")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {bound}")
    return int(value)


class IDXDataModule(L.LightningDataModule):
    """An image-classification dataset held in memory, read from four IDX files.

    A dataset is a subclass that sets the class attributes: ``default_root`` (its
    folder), ``input_shape`` (channels, height, width), ``num_classes``, ``mean`` and
    ``std`` (the normalisation) and, when known, ``num_train`` (training images, so that
    ``val_size`` and ``subset`` are checked before loading). Override :meth:`load` to
    read other files; everything else (split, loaders) is shared.

    The validation images are a seeded random draw (``torch.Generator().manual_seed(seed)``)
    from the training images; ``subset`` keeps only the first ``subset`` remaining
    training images (in that random order) for quick runs. The training loader reshuffles
    every epoch from ``seed + epoch``, so runs (and resumed runs) are deterministic;
    validation and test loaders keep a fixed order and read ``eval_batch_size`` images at
    a time (evaluation has no gradients, so large batches cost little memory and save
    most of the per-batch overhead). ``val_size=0`` disables validation (Lightning then
    warns that the validation loader list is empty).

    Batches are gathered from the in-memory tensors with one indexing call each, so
    ``num_workers=0`` is the right default.

    >>> class Tiny(IDXDataModule):
    ...     input_shape, num_classes = (1, 8, 8), 3
    >>> dm = Tiny("/some/folder", batch_size=4, val_size=2)
    >>> dm.input_shape, dm.num_classes, dm.eval_batch_size
    ((1, 8, 8), 3, 1000)
    """

    default_root: ClassVar[str | None] = None
    input_shape: ClassVar[tuple[int, int, int]] = (1, 28, 28)
    num_classes: ClassVar[int] = 10
    mean: ClassVar[float] = 0.0
    std: ClassVar[float] = 1.0
    num_train: ClassVar[int | None] = None

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        batch_size: int = 60,
        val_size: int = 5000,
        seed: int = 0,
        subset: int | None = None,
        num_workers: int = 0,
        eval_batch_size: int = 1000,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if root is None:
            root = self.default_root
            if root is None:
                raise ValueError(f"root=None: {name} has no default folder; give data.root")
        if not isinstance(root, str | os.PathLike):
            raise TypeError(f"root={root!r} must be a path")
        self.root = root
        self.batch_size = _check_int("batch_size", batch_size, 1)
        n = self.num_train
        self.val_size = _check_int("val_size", val_size, 0, None if n is None else n - 1)
        self.seed = _check_int("seed", seed, 0)
        self.subset = None if subset is None else _check_int("subset", subset, 1)
        if self.subset is not None and n is not None and self.subset > n - self.val_size:
            raise ValueError(
                f"subset={subset} must be at most the {n - self.val_size} training "
                f"images left after val_size={val_size}"
            )
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.eval_batch_size = _check_int("eval_batch_size", eval_batch_size, 1)
        # plain builtins only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(
            {
                "root": os.fspath(root),
                "batch_size": self.batch_size,
                "val_size": self.val_size,
                "seed": self.seed,
                "subset": self.subset,
                "num_workers": self.num_workers,
                "eval_batch_size": self.eval_batch_size,
            }
        )
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def load(self) -> ImageData:
        """The decoded train and test tensors (the four IDX files under ``root``)."""
        return load_idx_folder(
            self.root,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load the tensors (cached) and make the seeded train/validation split."""
        if self.train_set is not None:
            return
        data = self.load()
        train_idx, val_idx = self.split_indices(data.train_labels.shape[0])
        self.train_set = _BatchTensorDataset(
            data.train_images[train_idx], data.train_labels[train_idx]
        )
        self.val_set = _BatchTensorDataset(data.train_images[val_idx], data.train_labels[val_idx])
        self.test_set = _BatchTensorDataset(data.test_images, data.test_labels)

    def split_indices(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into the ``n`` training images: (train, validation), from ``seed``.

        >>> train, val = FashionMNISTDataModule(val_size=2, seed=0).split_indices(6)
        >>> len(train), len(val), sorted(train.tolist() + val.tolist())
        (4, 2, [0, 1, 2, 3, 4, 5])
        """
        if n is None:
            if self.num_train is None:
                raise ValueError(f"n=None: {type(self).__name__} does not know its size")
            n = self.num_train
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} must be below the {n} training images")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        train, val = perm[self.val_size :], perm[: self.val_size]
        if self.subset is not None:
            if self.subset > train.numel():
                raise ValueError(
                    f"subset={self.subset} exceeds the {train.numel()} training images"
                )
            train = train[: self.subset]
        return train, val

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.val_size == 0:
            return []
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


# --------------------------------------------------------------------------- registry
DataFactory = Callable[..., L.LightningDataModule]
_D = TypeVar("_D", bound=DataFactory)

_REGISTRY: dict[str, DataFactory] = {}


def register_dataset(name: str) -> Callable[[_D], _D]:
    """Decorator registering a data module class (or factory) under ``name``.

    The runners call it with ``root`` (None: its own default), ``batch_size``,
    ``val_size``, ``seed``, ``subset`` and ``data.options``; the module must say what it
    holds in ``input_shape`` and ``num_classes`` (see :func:`data_shape`). A name may be
    registered once; a duplicate raises ``ValueError``.

    >>> @register_dataset("doctest_digits")
    ... class Digits(IDXDataModule):
    ...     default_root, input_shape, num_classes = "/data/digits", (1, 8, 8), 10
    >>> build_datamodule("doctest_digits", batch_size=32).root
    '/data/digits'
    >>> _ = _REGISTRY.pop("doctest_digits")  # keep the registry clean
    """
    return registering(_REGISTRY, "dataset", name)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted.

    >>> "fashion_mnist" in list_datasets()
    True
    """
    return sorted(_REGISTRY)


def describe_datasets() -> dict[str, str]:
    """Each registered name with the first line of its docstring, input shape, classes and
    default folder (what the class declares; nothing is loaded).

    >>> print(describe_datasets()["fashion_mnist"])  # doctest: +ELLIPSIS
    Fashion-MNIST held in memory: ... (input 1x28x28, 10 classes, folder /usr/share/datasets/fashion-mnist)
    """
    out = {}
    for name in list_datasets():
        factory = _REGISTRY[name]
        doc = (factory.__doc__ or "").strip()
        facts = []
        shape, classes = (
            getattr(factory, "input_shape", None),
            getattr(factory, "num_classes", None),
        )
        if isinstance(shape, tuple):
            facts.append("input " + "x".join(map(str, shape)))
        if isinstance(classes, int):
            facts.append(f"{classes} classes")
        if getattr(factory, "default_root", None):
            facts.append(f"folder {factory.default_root}")
        line = doc.splitlines()[0] if doc else ""
        out[name] = f"{line} ({', '.join(facts)})" if facts else line
    return out


def build_datamodule(name: str, **kwargs: Any) -> L.LightningDataModule:
    """Build the data module registered as ``name`` (nothing is loaded until ``setup``).

    An unknown name raises ``ValueError`` listing the valid names and the closest match.

    >>> build_datamodule("fashion_mnist", batch_size=8).input_shape
    (1, 28, 28)
    >>> build_datamodule("fashion")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown dataset name='fashion'; did you mean 'fashion_mnist'? Valid names: ...
    """
    try:
        factory = _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown dataset name={name!r}{hint} Valid names: {', '.join(list_datasets())}"
        ) from None
    return factory(**kwargs)


def data_shape(dm: object) -> tuple[tuple[int, ...], int]:
    """``(input_shape, num_classes)`` that ``dm`` declares, checked.

    >>> data_shape(FashionMNISTDataModule())
    ((1, 28, 28), 10)
    """
    name = type(dm).__name__
    shape, classes = getattr(dm, "input_shape", None), getattr(dm, "num_classes", None)
    if not (
        isinstance(shape, tuple | list)
        and shape
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise TypeError(
            f"{name}.input_shape={shape!r} must be a tuple of positive ints, e.g. (1, 28, 28) "
            "(channels, height, width): the model is built from it"
        )
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise TypeError(f"{name}.num_classes={classes!r} must be an int >= 2")
    return tuple(shape), classes


def datamodule_from_config(data: Mapping[str, Any], seed: int) -> L.LightningDataModule:
    """The data module a config's ``data`` section describes (nothing loaded yet).

    With ``_target_`` (an import path ``package.module.Class``), that class is called with
    ``options`` as keyword arguments, plus ``seed`` when it takes one; ``root``,
    ``batch_size``, ``val_size`` and ``subset`` are for registered datasets and are not
    passed. Otherwise the dataset registered as ``name`` is built from those fields
    and ``options``.

    >>> dm = datamodule_from_config({"name": "fashion_mnist", "batch_size": 8}, seed=3)
    >>> type(dm).__name__, dm.batch_size, dm.seed
    ('FashionMNISTDataModule', 8, 3)
    """
    options = dict(data.get("options") or {})
    target = data.get("_target_")
    if target is None:
        fields = {k: data[k] for k in ("root", "batch_size", "val_size", "subset") if k in data}
        dm = build_datamodule(data.get("name", "fashion_mnist"), **fields, seed=seed, **options)
    else:
        cls = import_object(target, "data._target_")
        params = _parameters(cls)
        if params is None or "seed" in params:
            options.setdefault("seed", seed)
        dm = cls(**options)
        if not isinstance(dm, L.LightningDataModule):
            raise TypeError(
                f"data._target_={target!r} made a {type(dm).__name__}, not a LightningDataModule"
            )
    data_shape(dm)
    return dm


def _parameters(cls: Callable[..., Any]) -> set[str] | None:
    """Names of ``cls``'s keyword parameters; None when it takes ``**kwargs``."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return set(signature.parameters)


@register_dataset("fashion_mnist")
class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST held in memory: 55,000 train / 5,000 validation / 10,000 test images.

    See :class:`IDXDataModule` for the split, the shuffling and the loaders. Measured on
    the 2-core dev box: one LeNet-300-100 epoch at batch 60 (917 steps) takes about 7 s
    with ``torch.set_num_threads(1)``; with 2 threads on a busy machine it was 10x slower.

    >>> dm = FashionMNISTDataModule(batch_size=60, subset=1000)
    >>> dm.batch_size, dm.val_size, dm.subset, dm.input_shape, dm.num_classes
    (60, 5000, 1000, (1, 28, 28), 10)
    """

    default_root = DEFAULT_DATA_DIR
    input_shape = (1, *IMAGE_SHAPE)
    num_classes = NUM_CLASSES
    mean, std = MEAN, STD
    num_train = NUM_TRAIN

    def load(self) -> ImageData:
        return load_fashion_mnist(self.root)
