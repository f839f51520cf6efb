"""`HoldMasks`: keep a fixed set of masks applied through a Lightning fit."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from prunekit.callbacks._pruning import follow_optimizers
from torch import nn
from typing_extensions import override

from prunekit import Pruner, pack_mask, unpack_mask


class HoldMasks(Callback):
    """Keep fixed masks applied through training: nothing is pruned, nothing regrows.

    The masks are applied at ``on_train_start``, which Lightning calls after it restored a
    checkpoint's weights and optimizer state (``fit(..., ckpt_path=...)``), so both are
    masked before the first step: pruned weights are zeroed, and so are their momentum /
    Adam moments. Then, through the engine's hooks (:meth:`prunekit.Pruner.attach`),
    gradients of pruned entries are zeroed and the weights re-masked after every
    optimizer step. This is what a lottery-ticket round trains under (the mask of the
    round, survivors rewound) and what a SNIP-at-initialisation network trains under.

    ``masks`` is either

    - a mapping from parameter name of the LightningModule (``"model.fc1.weight"``) to a
      ``torch.bool`` mask of the parameter's shape (True = kept): at every fit a
      :class:`prunekit.Pruner` over exactly those parameters is built on the module,
      attached to the trainer's optimizers and given the masks; at fit end it is removed,
      leaving plain weights with their zeros; or
    - a :class:`prunekit.Pruner` built on the LightningModule or on a submodule of it:
      it is attached to the trainer's optimizers and holds its current masks; it stays
      attached after the fit (call ``pruner.remove()`` to make the zeros permanent).

    Follow or raise: names that are not parameters of the module being fitted, or masks
    of another shape, raise ``ValueError`` naming them at setup, before any step; a
    Pruner built on a module outside the one being fitted raises too. Optimizers that
    appear during the fit (replaced, or holding targets through ``add_param_group``) are
    attached before the next step. The masks are saved in Lightning checkpoints (bit
    packed); resuming from a checkpoint written with other masks raises ``ValueError``
    naming the parameters whose masks differ (a run never silently changes its mask).

    >>> masks = {"model.fc1.weight": torch.ones(300, 784, dtype=torch.bool)}
    >>> HoldMasks(masks)
    HoldMasks(1 masks, 235200 of 235200 kept)
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | Pruner) -> None:
        if isinstance(masks, Pruner):
            self.pruner: Pruner | None = masks
            self._given: Pruner | None = masks
            self._masks: dict[str, torch.Tensor] | None = None
        elif isinstance(masks, Mapping):
            if not masks:
                raise ValueError("masks={} holds no mask; give at least one parameter's mask")
            for name, mask in masks.items():
                if not isinstance(name, str):
                    raise TypeError(f"masks key {name!r} must be a parameter name (str)")
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                    raise TypeError(
                        f"masks[{name!r}] must be a torch.bool tensor, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}"
                    )
            self.pruner = None
            self._given = None
            self._masks = {n: m.detach().clone() for n, m in masks.items()}
        else:
            raise TypeError(
                f"masks must be a mapping from parameter name to bool mask or a "
                f"prunekit.Pruner, got {type(masks).__name__}"
            )
        self._seen_optimizers: list[tuple[torch.optim.Optimizer, int]] = []
        self._state_key: str | None = None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The masks held, keyed by parameter name (of the Pruner's model for a Pruner)."""
        if self._given is not None:
            return self._given.masks
        assert self._masks is not None
        return self._masks

    @property
    @override
    def state_key(self) -> str:
        if self._state_key is None:  # read at every hook call: build it once
            digest = hashlib.sha256("\n".join(sorted(self.masks)).encode()).hexdigest()[:8]
            self._state_key = self._generate_state_key(targets=digest)
        return self._state_key

    # --------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_module(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._given is None:
            assert self._masks is not None
            self.pruner = Pruner(pl_module, targets=list(self._masks))
        self._seen_optimizers = []
        self._follow_optimizers(trainer)  # attach first: set_masks then clears their state
        assert self.pruner is not None
        if self._given is None:
            assert self._masks is not None
            self.pruner.set_masks(self._masks)
        else:  # the Pruner's own masks: zero weights and optimizer state where pruned
            self.pruner.set_masks(self.pruner.masks)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pruner is not None:
            self._follow_optimizers(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # an interrupted fit leaves no hooks behind either

    def _release(self) -> None:
        if self._given is None and self.pruner is not None:
            self.pruner.remove()  # leaves plain weights with zeros
            self.pruner = None

    # ---------------------------------------------------------- internals
    def _check_module(self, pl_module: nn.Module) -> None:
        if self._given is not None:
            model = self._given.model
            if model is not pl_module and not any(m is model for m in pl_module.modules()):
                raise ValueError(
                    f"HoldMasks holds a Pruner built on a {type(model).__name__} that is not "
                    f"part of the {type(pl_module).__name__} being fitted; build the Pruner "
                    "on that module (or pass the masks as a dict)"
                )
            return
        assert self._masks is not None
        params = dict(pl_module.named_parameters(remove_duplicate=False))
        missing = sorted(n for n in self._masks if n not in params)
        if missing:
            raise ValueError(
                f"HoldMasks masks name {missing}, not parameters of {type(pl_module).__name__} "
                f"(its parameters include {sorted(params)[:5]})"
            )
        wrong = {
            n: (tuple(m.shape), tuple(params[n].shape))
            for n, m in self._masks.items()
            if m.shape != params[n].shape
        }
        if wrong:
            raise ValueError(
                "HoldMasks masks do not fit their parameters (mask shape, parameter shape): "
                f"{wrong}"
            )

    def _follow_optimizers(self, trainer: pl.Trainer) -> None:
        assert self.pruner is not None
        self._seen_optimizers = follow_optimizers(self.pruner, trainer, self._seen_optimizers)

    # ------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {
                n: {"shape": list(m.shape), "packed": pack_mask(m.cpu())}
                for n, m in self.masks.items()
            }
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("masks")
        if not isinstance(saved, Mapping):
            raise ValueError("the checkpoint's HoldMasks entry holds no masks")
        mine = self.masks
        if set(saved) != set(mine):
            raise ValueError(
                f"the checkpoint was written by a HoldMasks over {sorted(saved)}; this one "
                f"holds {sorted(mine)}: resume with the same masks"
            )
        differ = []
        for name, entry in saved.items():
            shape = tuple(entry["shape"])
            if shape != tuple(mine[name].shape) or not torch.equal(
                unpack_mask(entry["packed"], shape), mine[name].cpu()
            ):
                differ.append(name)
        if differ:
            raise ValueError(
                f"the checkpoint was written with other masks for {sorted(differ)}; a resumed "
                "fit holds the masks it was written with: give HoldMasks those masks"
            )

    def __getstate__(self) -> dict[str, Any]:
        if self._given is None:
            return {**self.__dict__, "pruner": None, "_seen_optimizers": []}
        return {**self.__dict__, "_seen_optimizers": []}

    def __repr__(self) -> str:
        masks = self.masks
        kept = sum(int(m.count_nonzero()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        return f"HoldMasks({len(masks)} masks, {kept} of {total} kept)"
