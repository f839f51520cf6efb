"""Compressed checkpoints for sparse weights, and 2:4 weights for sparse GPU kernels.

A compressed state_dict stores each sparse floating-point tensor as a bitmask of its
non-zero entries (8 per byte, :func:`pack_mask`) plus the non-zero values in order.
At 90 % sparsity a float32 tensor takes ``0.1 + 1/32 = 0.131`` of its dense size;
torch's own CSR format needs ``0.1 * (4 + 8) / 4 = 0.30`` (int64 column indices, plus the
row pointers), COO ``0.1 * (4 + 2 * 8) / 4 = 0.50``: the bitmask is smaller at any
sparsity up to about 97 %, and is read back with ``torch.load(weights_only=True)``.
All masks share one buffer and all values of a dtype another, so a model of many small
tensors does not pay a file record (about 270 bytes) per tensor.
NaN counts as a value, and a tensor holding negative zeros (``w * mask`` makes them;
prunekit's own zeroing does not) gets a second bitmask marking them, so loading gives
the dense tensors back bit for bit.

``torch.load`` does not check the CRCs of the zip records it reads, so a damaged byte in
a values buffer would load as a wrong weight: the file holds a CRC-32 of every buffer and
of the entries (version 3), checked on loading. (Accidental damage, not tampering: CRC-32
is no cryptographic hash.) Version 2 files, written before the checks, still load.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunekit._state import pack_mask, unpack_mask

FORMAT = "prunekit-sparse"
VERSION = 3
#: versions :func:`decompress_state_dict` reads (2: without checksums)
READABLE = (2, 3)
_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _values(t: Tensor) -> Tensor:
    """Entries stored as values: non-zero or NaN."""
    return (t != 0) | t.isnan()


def _key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plain(t: Tensor) -> bool:
    return t.layout == torch.strided and not t.is_quantized


def _crc(t: Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes."""
    head = zlib.crc32(f"{t.dtype}:{list(t.shape)}".encode())
    flat = t.detach().cpu().reshape(-1).contiguous()
    return zlib.crc32(flat.view(torch.uint8).numpy(), head) if flat.numel() else head


def _checksums(packed: Mapping[str, Any]) -> dict[str, int]:
    """The CRC-32s stored with (and checked against) a compressed state_dict."""
    entries = json.dumps(packed["entries"], sort_keys=True).encode()
    sums = {"entries": zlib.crc32(entries), "bits": _crc(packed["bits"])}
    sums.update({f"values.{k}": _crc(v) for k, v in packed["values"].items()})
    sums.update(
        {f"raw.{k}": _crc(v) for k, v in packed["raw"].items() if _plain(v)}
    )  # (sparse and quantized tensors, stored whole, are not checked)
    return sums


def compress_state_dict(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """A compressed copy of ``state``. Each floating tensor for which it saves space is
    stored as its non-zero values plus a bitmask; the rest are stored whole. All bitmasks
    share one uint8 buffer and all values of a dtype one buffer (each tensor would
    otherwise cost a file record of about 270 bytes); ``entries`` holds the offsets.

    >>> w = torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0]] * 8)
    >>> packed = compress_state_dict({"w": w})
    >>> packed["entries"]["w"], packed["values"]["float32"][:3].tolist(), packed["bits"].numel()
    ({'shape': [16, 4], 'dtype': 'float32', 'values': 0, 'count': 24, 'bits': 0}, [1.5, 3.0, 2.0], 8)
    """
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise TypeError("state must be a state_dict: a mapping of names (str) to tensors")
    bits: list[Tensor] = []
    values: dict[str, list[Tensor]] = {}
    sizes = {"bits": 0}
    raw: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}

    def put_values(flat: Tensor) -> int:
        key = _key(flat.dtype)
        offset = sizes.get(key, 0)
        values.setdefault(key, []).append(flat)
        sizes[key] = offset + flat.numel()
        return offset

    def put_bits(mask: Tensor) -> int:
        packed, offset = pack_mask(mask), sizes["bits"]
        bits.append(packed)
        sizes["bits"] = offset + packed.numel()
        return offset

    for name, t in state.items():
        t = t.detach().cpu()
        if not _plain(t):
            raw[name] = t.clone()
            entries[name] = {"raw": True}
            continue
        entry: dict[str, Any] = {"shape": list(t.shape), "dtype": _key(t.dtype)}
        # (one-byte floats are stored whole: torch has no != or signbit for them)
        keep = _values(t) if t.is_floating_point() and t.element_size() > 1 else None
        if keep is not None:
            negative = ~keep & t.signbit()
            count, has_negative = int(keep.sum()), bool(negative.any())
            mask_bytes = (t.numel() + 7) // 8 * (2 if has_negative else 1)
            if count * t.element_size() + mask_bytes < t.numel() * t.element_size():
                entry["values"] = put_values(t.reshape(-1)[keep.reshape(-1)])
                entry["count"] = count
                entry["bits"] = put_bits(keep)
                if has_negative:
                    entry["negative_zeros"] = put_bits(negative)
                entries[name] = entry
                continue
        entry["dense"] = put_values(t.reshape(-1).clone())
        entries[name] = entry
    packed = {
        "format": FORMAT,
        "version": VERSION,
        "entries": entries,
        "bits": torch.cat(bits) if bits else torch.zeros(0, dtype=torch.uint8),
        "values": {k: torch.cat(v) for k, v in values.items()},
        "raw": raw,
    }
    packed["checksums"] = _checksums(packed)
    return packed


def decompress_state_dict(packed: Mapping[str, Any]) -> dict[str, Tensor]:
    """The dense state_dict back from :func:`compress_state_dict`, bit for bit.

    >>> w = torch.randn(6, 8) * (torch.rand(6, 8) > 0.8)
    >>> torch.equal(decompress_state_dict(compress_state_dict({"w": w}))["w"], w)
    True
    """
    if not isinstance(packed, Mapping) or packed.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} checkpoint (no format={FORMAT!r} entry)")
    version = packed.get("version")
    if version not in READABLE:
        raise ValueError(f"{FORMAT} version={version!r}; this prunekit reads {READABLE}")
    entries = packed.get("entries")
    if not isinstance(entries, Mapping) or not all(isinstance(k, str) for k in entries):
        raise ValueError(f"{FORMAT} checkpoint is damaged: 'entries' is not a dict of names")
    out: dict[str, Tensor] = {}
    for name, entry in entries.items():
        try:
            out[name] = _entry(packed, name, entry)
        except (KeyError, IndexError, RuntimeError, AttributeError, TypeError) as e:
            raise ValueError(
                f"{FORMAT} entry {name!r} is damaged: {type(e).__name__}: {e}"
            ) from None
    if version >= 3 or "checksums" in packed:  # (a version damaged to 2 is still checked)
        stored = packed.get("checksums")
        try:
            now = _checksums(packed)
        except (KeyError, AttributeError, TypeError, RuntimeError) as e:
            raise ValueError(f"{FORMAT} checkpoint is damaged: {type(e).__name__}: {e}") from None
        if not isinstance(stored, Mapping):
            raise ValueError(f"{FORMAT} checkpoint is damaged: no 'checksums' dict")
        bad = sorted(
            str(k) for k in set(now) ^ set(stored) | {k for k in now if stored.get(k) != now[k]}
        )
        if bad:
            raise ValueError(
                f"{FORMAT} checkpoint is damaged: checksum mismatch in {bad} (the file was "
                "changed or corrupted after it was written)"
            )
    return out


def _entry(packed: Mapping[str, Any], name: str, entry: Mapping[str, Any]) -> Tensor:
    if entry.get("raw"):
        return packed["raw"][name]
    shape, dtype = tuple(entry["shape"]), entry["dtype"]
    if not all(isinstance(size, int) and size >= 0 for size in shape):
        raise TypeError(f"shape {list(shape)} is not a list of sizes")
    for key in ("dense", "values", "count", "bits", "negative_zeros"):
        if key in entry and (not isinstance(entry[key], int) or entry[key] < 0):
            raise TypeError(f"{key}={entry[key]!r} is not an offset or count")
    numel = 1
    for size in shape:
        numel *= size
    buffer = packed["values"][dtype]
    if "dense" in entry:
        start = entry["dense"]
        if start + numel > buffer.numel():
            raise IndexError(f"values {start}..{start + numel} past the end ({buffer.numel()})")
        return buffer[start : start + numel].clone().reshape(shape)
    nbytes = (numel + 7) // 8
    keep = unpack_mask(packed["bits"][entry["bits"] : entry["bits"] + nbytes], shape)
    count, start = entry["count"], entry["values"]
    if int(keep.sum()) != count or start + count > buffer.numel():
        raise ValueError(
            f"{name}: the bitmask marks {int(keep.sum())} values but {count} are stored "
            f"(or the values buffer is short)"
        )
    dense = torch.zeros(shape, dtype=buffer.dtype)
    dense.reshape(-1)[keep.reshape(-1)] = buffer[start : start + count]
    if "negative_zeros" in entry:
        offset = entry["negative_zeros"]
        dense.masked_fill_(unpack_mask(packed["bits"][offset : offset + nbytes], shape), -0.0)
    return dense


def save_sparse(state: Mapping[str, Tensor] | nn.Module, path: str | os.PathLike[str]) -> int:
    """Save a model's (or a state_dict's) weights compressed; returns the file size in bytes.

    Load with :func:`load_sparse` (example there). A plain
    ``torch.load(path, weights_only=True)`` reads it too (dicts of tensors and numbers).
    """
    if isinstance(state, nn.Module):
        state = state.state_dict()
    torch.save(compress_state_dict(state), path)
    return os.path.getsize(path)


def load_sparse(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The dense state_dict saved by :func:`save_sparse`.

    >>> import tempfile, pathlib
    >>> model = nn.Linear(128, 128)
    >>> with torch.no_grad():
    ...     _ = model.weight.masked_fill_(torch.rand(128, 128) > 0.1, 0.0)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     size = save_sparse(model, pathlib.Path(d) / "w.pt")
    ...     back = load_sparse(pathlib.Path(d) / "w.pt")
    >>> torch.equal(back["weight"], model.weight), size < 0.25 * 128 * 128 * 4
    (True, True)
    """
    try:
        packed = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, not a torch file, unpickling refused...
        raise ValueError(
            f"{os.fspath(path)} cannot be loaded (truncated or corrupt?): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    return decompress_state_dict(packed)


def _is_2_4(w: Tensor) -> bool:
    groups = (w != 0).reshape(w.shape[0], -1, 4)
    return bool((groups.sum(dim=-1) <= 2).all())


def to_semi_structured(model: nn.Module, targets: Iterable[str] | None = None) -> list[str]:
    """Swap the weights of ``model``'s Linear layers that follow 2:4 sparsity (at most
    2 non-zeros in every 4 consecutive inputs) for ``torch.sparse`` semi-structured
    tensors, in place, so the GPU's sparse kernels run them; returns the layers swapped.

    >>> model = nn.Sequential(nn.Linear(8, 4))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.masked_fill_(torch.arange(8) % 2 == 1, 0.0)  # 2:4 (and 1:2)
    >>> to_semi_structured(model)  # on the CPU: refused (model.half().cuda() first)
    Traceback (most recent call last):
    RuntimeError: 0.weight is on cpu: semi-structured (2:4) sparse tensors need a CUDA GPU (compute capability >= 8.0); move the model there first

    ``targets`` (Linear module names) defaults to every Linear whose weight is 2:4.
    Needs a CUDA GPU with sparse tensor cores (compute capability 8.0 or newer) and
    fp16/bf16 weights; anything else raises before the model is changed.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets is None:
        names = [n for n, m in linears.items() if m.in_features % 4 == 0 and _is_2_4(m.weight)]
    else:
        names = list(targets)
        for n in names:
            if n not in linears:
                raise ValueError(f"targets entry {n!r} is not a Linear layer of the model")
            if linears[n].in_features % 4 or not _is_2_4(linears[n].weight):
                raise ValueError(f"targets entry {n!r}: weight is not 2:4 sparse")
    if not names:
        raise ValueError("no Linear layer of the model has a 2:4 sparse weight")
    for n in names:
        w = linears[n].weight
        if w.device.type != "cuda":
            raise RuntimeError(
                f"{n}.weight is on {w.device.type}: semi-structured (2:4) sparse tensors need a "
                "CUDA GPU (compute capability >= 8.0); move the model there first"
            )
        major, _ = torch.cuda.get_device_capability(w.device)
        if major < 8:
            raise RuntimeError(
                f"{n}.weight: GPU compute capability {major}.x < 8.0 has no 2:4 kernels"
            )
        if w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{n}.weight is {w.dtype}; 2:4 kernels take float16 or bfloat16")
    from torch.sparse import to_sparse_semi_structured

    # convert every weight first: torch refuses some shapes (too small for the kernels),
    # and a refusal must leave the whole model unchanged, not half of it swapped
    swapped = {n: to_sparse_semi_structured(linears[n].weight.detach()) for n in names}
    for n, w in swapped.items():
        linears[n].weight = nn.Parameter(w, requires_grad=False)
    return names
