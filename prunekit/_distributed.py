"""Sharded tensors (DTensor, as FSDP2 and tensor parallelism make them) for the engine.

A rank holds one rectangular block of each sharded tensor (:class:`Layout`). Selection
ranks the blocks of all ranks as one process would rank the full tensors: histograms
and counts are summed across ranks (:meth:`Sharding.reduce`), weights never move.
Tensors replicated over some mesh dimensions are counted once, by the ranks at
coordinate 0 of those dimensions (:attr:`Sharding.owns`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

#: Bytes this process has sent to all-reduces of the engine (benchmarks read it).
reduced_bytes = 0


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard, any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _strides(shape: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return strides[::-1]


@dataclass(frozen=True)
class Layout:
    """Where the entries a process holds sit in the full tensor: a block of shape
    ``local`` starting at ``offset`` (per dim) inside a tensor of shape ``shape``."""

    shape: tuple[int, ...]
    offset: tuple[int, ...]
    local: tuple[int, ...]

    @staticmethod
    def whole(shape: Sequence[int]) -> Layout:
        return Layout(tuple(shape), (0,) * len(shape), tuple(shape))

    @staticmethod
    def of(t: Tensor) -> Layout:
        if not isinstance(t, DTensor):
            return Layout.whole(t.shape)
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return Layout(tuple(t.shape), tuple(offset), tuple(shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def index(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Global flat indices (int64) of the local flat entries ``start:stop``."""
        flat = torch.arange(start, stop, dtype=torch.int64, device=device)
        strides = _strides(self.shape)
        dims = len(self.shape)
        partial = [d for d in range(dims) if self.local[d] != self.shape[d]]
        if len(partial) <= 1 and all(
            self.local[d] == 1 for d in range(partial[0] if partial else 0)
        ):
            # one run of consecutive global entries (e.g. rows of a row-sharded matrix)
            base = sum(o * st for o, st in zip(self.offset, strides, strict=True))
            return flat.add_(base)
        out = torch.zeros_like(flat)
        for size, off, stride in reversed(list(zip(self.local, self.offset, strides, strict=True))):
            out += (flat % size + off) * stride
            flat = flat.div_(size, rounding_mode="floor")
        return out

    def block(self, full: Tensor) -> Tensor:
        """This process's block of the full tensor ``full``."""
        for d, (off, size) in enumerate(zip(self.offset, self.local, strict=True)):
            full = full.narrow(d, off, size)
        return full


@dataclass
class Sharding:
    """How a list of tensors (some DTensors) is spread over the ranks."""

    layouts: list[Layout]
    owns: list[bool]  # whether this rank counts the tensor (one replica of each block does)
    device: torch.device  # where the all-reduced histograms live

    @staticmethod
    def of(tensors: Sequence[Tensor]) -> Sharding | None:
        """None unless some tensor is a DTensor."""
        if not any(isinstance(t, DTensor) for t in tensors):
            return None
        if not dist.is_initialized():
            raise RuntimeError("DTensor masks need an initialised torch.distributed process group")
        world, rank = dist.get_world_size(), dist.get_rank()
        layouts, owns, device = [], [], None
        for t in tensors:
            if not isinstance(t, DTensor):
                layouts.append(Layout.whole(t.shape))
                owns.append(rank == 0)
                continue
            mesh = t.device_mesh
            if mesh.size() != world:
                raise NotImplementedError(
                    f"a DTensor on a device mesh of {mesh.size()} ranks in a world of {world}: "
                    "prunekit ranks sharded tensors over the whole world only"
                )
            for p in t.placements:
                if type(p) not in (Shard, Replicate):
                    raise NotImplementedError(
                        f"DTensor placement {p} is not supported (only Shard(dim) and Replicate)"
                    )
            coordinate = mesh.get_coordinate() or [0] * mesh.ndim
            owns.append(
                all(
                    c == 0
                    for c, p in zip(coordinate, t.placements, strict=True)
                    if type(p) is Replicate
                )
            )
            layouts.append(Layout.of(t))
            device = device or t.to_local().device
        assert device is not None
        return Sharding(layouts, owns, device)

    def reduce(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over all ranks (every rank must call)."""
        global reduced_bytes
        t = t.to(self.device)
        dist.all_reduce(t)
        reduced_bytes += t.numel() * t.element_size()
        return t


def full_mask(mask: Tensor) -> Tensor:
    """The whole bool mask on the CPU (gathered from all ranks if it is a DTensor)."""
    if isinstance(mask, DTensor):
        return mask.full_tensor().cpu()
    return mask.cpu()


def like(full: Tensor, ref: Tensor) -> Tensor:
    """``full`` (the whole tensor) placed as ``ref`` is: ``ref``'s block of it, as a DTensor
    with ``ref``'s mesh and placements, when ``ref`` is a DTensor."""
    if not isinstance(ref, DTensor):
        return full.to(ref.device)
    block = Layout.of(ref).block(full).to(ref.to_local().device).contiguous()
    return DTensor.from_local(
        block, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride()
    )


def place_mask(mask: Tensor, ref: Tensor, what: str = "mask") -> Tensor:
    """A bool ``mask`` given for a target, laid out as the target's mask ``ref`` is.

    For a sharded ``ref`` (DTensor), a whole (unsharded) mask becomes this rank's block of
    it, after checking that every rank was given the same whole mask (a collective: every
    rank must call; a mask that differs between ranks raises ``ValueError`` naming
    ``what`` on every rank, rather than making a patchwork of blocks); a DTensor mask is
    redistributed to ``ref``'s placements. For an unsharded ``ref``, a DTensor mask is
    gathered whole. Nothing else is checked here (dtype and shape: the caller's).

    >>> place_mask(torch.tensor([True, False]), torch.ones(2, dtype=torch.bool))
    tensor([ True, False])
    """
    if not isinstance(ref, DTensor):
        return (mask.full_tensor() if isinstance(mask, DTensor) else mask).to(ref.device)
    if isinstance(mask, DTensor):
        if mask.device_mesh != ref.device_mesh:
            raise ValueError(f"{what} is a DTensor on another device mesh than its parameter's")
        if mask.placements != ref.placements:
            mask = mask.redistribute(ref.device_mesh, ref.placements)
        return mask
    if not same_on_every_rank(mask, Sharding.of([ref])):
        raise ValueError(
            f"{what} is a whole (unsharded) mask that differs between ranks; give every "
            "rank the same whole mask, or a DTensor mask placed as the parameter"
        )
    return like(mask, ref)


def same_on_every_rank(t: Tensor, sharding: Sharding | None) -> bool:
    """Whether the bool tensor ``t`` is the same on every rank (by a 62-bit digest of its
    True positions, and its shape; one all-reduce)."""
    if sharding is None:
        return True
    flat = t.detach().reshape(-1).to(sharding.device)
    pos = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device)
    # an odd-multiplier hash of each True position, summed (wrapping): equal on all ranks
    # for equal masks; unequal masks collide with probability about 2**-62
    digest = ((pos * 0x1E3779B97F4A7C15) ^ (pos >> 7)).mul_(0x2545F4914F6CDD1D)
    value = torch.stack(
        [
            digest[flat].sum() & ((1 << 62) - 1),
            flat.count_nonzero(),
            torch.tensor(flat.numel(), device=flat.device),
        ]
    )
    both = torch.cat([value, -value])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool((both[:3] == -both[3:]).all())


def new_mask(param: Tensor) -> Tensor:
    """An all-True contiguous bool mask laid out as ``param`` is (a DTensor for a DTensor:
    each rank holds the mask of its own shard only)."""
    if not isinstance(param, DTensor):
        return torch.ones(param.shape, dtype=torch.bool, device=param.device)
    shard = torch.ones(param.to_local().shape, dtype=torch.bool, device=param.to_local().device)
    return DTensor.from_local(
        shard, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
    )


def structured_mask(
    method: str, param: DTensor, amount: float | int, mask: Tensor, options: dict
) -> Tensor:
    """A structured method's new mask for a sharded parameter, equal to one process's.

    Slices along ``dim`` are scored from each rank's block: when a rank holds whole
    slices (sharded along ``dim`` only) its norms are exactly one process's (the same
    ``_masks._slice_norms`` on the same values, in float64 for float64 weights).
    Otherwise each slice is split across ranks: n = inf (max) and n = 0 (counts) are
    exact; for n = 1 and 2 each rank adds ``|w|`` or ``w**2`` of its part exactly
    (integer digit sums, :func:`power_sums`), the sums are all-reduced and rounded once:
    the correctly rounded norm, the same bits on any number of ranks (float64 weights:
    float64 sums instead). One process computes the same correctly rounded float32 norms
    (``_masks._slice_norms``), so the masks agree bit for bit. The per-slice scores are
    all-reduced into one small vector on every rank, which is ranked as one process ranks
    it. N:M needs every group of ``m`` on one rank (:func:`check_groups` raises
    otherwise).
    """
    from prunekit import _masks

    layout, block, local_mask = Layout.of(param), param.to_local().detach(), mask.to_local()
    sharding = Sharding.of([param])
    assert sharding is not None
    options = dict(options)
    dim = _masks.check_dim(options.pop("dim", -1 if method == "nm" else 0), param.ndim)
    if "scores" in options and options["scores"] is not None:
        options["scores"] = _local_scores(options["scores"], param, method)
    if method == "nm":
        check_groups(param, dim, options.get("m", 4))
        new = _masks.nm_mask(block, dim=dim, **options) & local_mask
        return _as_like(new, mask)
    if method not in ("ln_structured", "random_structured"):
        raise NotImplementedError(f"method={method!r} on sharded (DTensor) parameters")
    size, off, here = param.shape[dim], layout.offset[dim], layout.local[dim]
    others = [d for d in range(param.ndim) if d != dim]
    whole = all(layout.local[d] == layout.shape[d] for d in others)
    own = float(sharding.owns[0])
    alive = torch.zeros(size, dtype=torch.int64, device=sharding.device)
    part = local_mask.any(dim=others) if others else local_mask
    alive[off : off + here] = part.to(torch.int64).to(sharding.device) * int(own)
    alive = sharding.reduce(alive) > 0
    slices = torch.empty((size, 1))
    if method == "random_structured":
        new_alive = _masks.random_structured_mask(
            slices, amount, dim=0, mask=alive.view(-1, 1).cpu(), **options
        )
    else:
        n = options.pop("n", 2)
        scores = options.pop("scores", None)
        if scores is None:
            weights = block * local_mask
            scores = _slice_scores(weights, n, dim, others, whole, size, off, here, own, sharding)
        else:
            scores = scores.cpu()
        new_alive = _masks.ln_structured_mask(
            slices, amount, n=n, dim=0, mask=alive.view(-1, 1).cpu(), scores=scores, **options
        )
    keep = new_alive.view(-1)[off : off + here].to(local_mask.device)
    shape = [1] * param.ndim
    shape[dim] = -1
    return _as_like(local_mask & keep.view(shape), mask)


def check_groups(param: DTensor, dim: int, m: object) -> None:
    """Raise on every rank, before anything changes, unless every group of ``m``
    consecutive entries along ``dim`` of ``param`` lies on one rank (N:M needs whole
    groups: a group split between ranks would be ranked in two halves, silently wrong).

    A collective (one all-reduce of one number): every rank must call it.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0:
        return  # nm_mask names the bad value the same way on every rank
    size = param.shape[dim]
    if size % m:
        raise ValueError(f"m={m} does not divide the size {size} of dim={dim}")
    sharding = Sharding.of([param])
    assert sharding is not None
    layout = Layout.of(param)
    start, stop = layout.offset[dim], layout.offset[dim] + layout.local[dim]
    split = stop > start and bool(start % m or stop % m)
    # each rank adds its own bit: which ranks split a group, known to all of them
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=sharding.device)
    flags[dist.get_rank()] = int(split)
    splitting = [r for r, f in enumerate(sharding.reduce(flags).tolist()) if f]
    if splitting:
        raise ValueError(
            f"nm with m={m} along dim={dim} of a parameter of shape {tuple(param.shape)} "
            f"sharded as {list(param.placements)}: the shards of rank(s) {splitting} split a "
            f"group of {m} consecutive entries between ranks (this rank holds entries "
            f"{start}..{stop - 1} of dim {dim}); N:M needs every group on one rank: shard "
            f"another dim, or make each shard's size along dim {dim} a multiple of {m}"
        )


def _local_scores(scores: Tensor, param: DTensor, method: str) -> Tensor:
    """This rank's part of user scores given for a sharded parameter: per slice (one
    full vector, as one process takes them) for structured methods, else laid out as
    the parameter (a DTensor placed as it is, or the full tensor)."""
    if method != "nm":
        return full_mask(scores) if isinstance(scores, DTensor) else scores.cpu()
    if isinstance(scores, DTensor):
        if scores.placements != param.placements or scores.device_mesh != param.device_mesh:
            scores = scores.redistribute(param.device_mesh, param.placements)
        return scores.to_local()
    if tuple(scores.shape) != tuple(param.shape):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected {tuple(param.shape)}")
    return Layout.of(param).block(scores).to(param.to_local().device)


def _slice_scores(
    weights: Tensor,
    n: float,
    dim: int,
    others: list[int],
    whole: bool,
    size: int,
    off: int,
    here: int,
    own: float,
    sharding: Sharding,
) -> Tensor:
    from prunekit import _masks

    # the dtype one process takes norms in (ln_structured_mask): float64 for float64
    wide = torch.float64 if weights.dtype == torch.float64 else torch.float32
    scores = torch.zeros(size, dtype=torch.float64, device=sharding.device)
    if whole:  # whole slices here: exactly the norms one process computes
        norms = _masks._slice_norms(weights.to(wide), n, dim)
        scores[off : off + here] = norms.double().to(sharding.device) * own
        return sharding.reduce(scores).to(wide).cpu()
    w = weights.double()
    if n == math.inf:
        part = w.abs().amax(dim=others) if w.numel() else torch.zeros(here, dtype=torch.float64)
        scores[off : off + here] = part.to(sharding.device)
        dist.all_reduce(scores, op=dist.ReduceOp.MAX)
        return scores.to(wide).cpu()
    if n in (1, 2) and wide == torch.float32:  # exact integer sums: no rounding until the end
        sums = torch.zeros((size, _buckets(int(n))), dtype=torch.int64, device=sharding.device)
        sums[off : off + here] = power_sums(weights, int(n), dim).to(sharding.device) * int(own)
        return norms_from_sums(sharding.reduce(sums), int(n))
    power = (w != 0).double() if n == 0 else w.abs() if n == 1 else w.square()
    scores[off : off + here] = power.sum(dim=others).to(sharding.device) * own
    scores = sharding.reduce(scores)
    return (scores.sqrt() if n == 2 else scores).to(wide).cpu()


_DIGIT_BITS = 16  # exact sums: |w|**n split into 16-bit digits, one int64 bucket each
_SUM_CHUNK = 1 << 20


def _buckets(n: int) -> int:
    # float32 |w| = m * 2**e, m < 2**24, e in [-149, 104]: |w|**n spans n * 277 bits
    return (n * 277 + 2 * _DIGIT_BITS) // _DIGIT_BITS + 1


def power_sums(t: Tensor, n: int, dim: int) -> Tensor:
    """Exact sums of ``|t|**n`` (n = 1 or 2) over each slice of ``t`` along ``dim``, as
    int64 digit buckets: row ``i``, column ``b`` holds a sum of 16-bit digits weighing
    ``2**(16 * b)`` units of ``2**(-149 * n)``. Integer sums: they add up the same in any
    order, so partial sums from several ranks (all-reduced) equal the whole tensor's.

    ``t`` is float32 or narrower (widened exactly). Each slice may hold up to 2**31
    entries before a bucket could overflow.
    """
    if t.dtype == torch.float64 or not t.is_floating_point():
        raise TypeError(f"power_sums needs a float32 or narrower tensor, got {t.dtype}")
    size = t.shape[dim]
    flat = t.detach().movedim(dim, 0).reshape(-1)  # slice i: entries i*width .. (i+1)*width
    width = flat.numel() // size if size else 0
    buckets = _buckets(n)
    sums = torch.zeros(size * buckets, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _SUM_CHUNK):  # temporaries: a few chunk-sized ones
        stop = min(start + _SUM_CHUNK, flat.numel())
        piece = flat.narrow(0, start, stop - start).float().contiguous()
        bits = piece.view(torch.int32).to(torch.int64).bitwise_and_(0x7FFFFFFF)
        exponent = torch.bitwise_right_shift(bits, 23)
        normal = exponent.gt(0)
        mantissa = bits.bitwise_and_((1 << 23) - 1).bitwise_or_(normal.to(torch.int64) << 23)
        e = torch.where(normal, exponent, torch.ones_like(exponent)).sub_(150)  # m * 2**e
        if n == 1:
            value, position = mantissa, e.add_(149)  # m * 2**(e + 149) units of 2**-149
        else:
            value, position = mantissa.square(), e.mul_(2).add_(298)  # units of 2**-298
        low = position.remainder(_DIGIT_BITS)
        row = torch.arange(start, stop, device=flat.device).div_(width, rounding_mode="floor")
        base = position.div_(_DIGIT_BITS, rounding_mode="floor").add_(row.mul_(buckets))
        for k in range(3 if n == 2 else 2):  # 16-bit digits of m (24 bits) or m**2 (48)
            digit = torch.bitwise_right_shift(value, _DIGIT_BITS * k).bitwise_and_(0xFFFF)
            sums.index_add_(0, base + k, digit.bitwise_left_shift_(low))
    return sums.view(size, buckets)


def norms_from_sums(sums: Tensor, n: int) -> Tensor:
    """The float32 norms, correctly rounded (nearest, ties to even), of the exact sums
    :func:`power_sums` gives: ``sum |w|`` for n = 1, ``sqrt(sum w**2)`` for n = 2.
    One host read; the result is a CPU tensor."""
    out = []
    for row in sums.tolist():
        total = sum(v << (_DIGIT_BITS * b) for b, v in enumerate(row) if v)
        if n == 1:
            out.append(_round_f32(total, -149, sticky=False))
        else:  # sqrt(total * 2**-298) = sqrt(total) * 2**-149; 40 extra bits, then round
            root = math.isqrt(total << 80)
            out.append(_round_f32(root, -189, sticky=root * root != total << 80))
    return torch.tensor(out, dtype=torch.float32)


def _round_f32(q: int, scale: int, *, sticky: bool) -> float:
    """``q * 2**scale`` (``q`` >= 0, plus something below one unit of ``q`` if
    ``sticky``) rounded to float32: 24 significant bits, nothing below 2**-149."""
    if q == 0:
        return 0.0
    lsb = max(q.bit_length() - 24 + scale, -149)  # the weight of the result's last bit
    shift = lsb - scale
    if shift <= 0:
        return math.ldexp(q, scale)  # exact (never sticky: callers keep extra bits)
    q, rest = divmod(q, 1 << shift)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and (sticky or q & 1)):
        q += 1
    return math.ldexp(q, lsb)  # exact in float64; past float32's range it becomes inf


def exact_slice_norms(t: Tensor, n: int, dim: int) -> Tensor:
    """Correctly rounded float32 Ln norms (n = 1 or 2) of the slices of ``t`` along
    ``dim`` (float32 or narrower), computed with exact integer sums: the same bits
    however ``t`` is split, on one process or sharded across ranks.

    >>> exact_slice_norms(torch.tensor([[3.0, -4.0], [1.0, 0.0]]), 2, dim=0)
    tensor([5., 1.])
    """
    return norms_from_sums(power_sums(t, n, dim), n)


def _as_like(local_mask: Tensor, ref: DTensor) -> DTensor:
    return DTensor.from_local(
        local_mask.contiguous(),
        ref.device_mesh,
        ref.placements,
        shape=ref.shape,
        stride=ref.stride(),
    )
