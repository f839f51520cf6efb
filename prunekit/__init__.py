"""prunekit: pruning as a normal part of PyTorch training.

The mask engine: tensor-level mask functions, the model-level :class:`Pruner`, sparsity
reports and activation pruning. Schedules, Lightning callbacks and experiment runners
live in ``prunekit.schedules``, ``prunekit.callbacks`` and ``prunekit.experiments``.
"""

from prunekit._activations import ActivationPruning
from prunekit._compact import (
    CompactionReport,
    ModelCost,
    PrunedAttention,
    compact,
    compaction_report,
    model_cost,
)
from prunekit._groups import (
    GROUP_OPTIONS,
    STRUCTURES,
    DependencyGraph,
    Group,
    GroupPruner,
    UnsupportedModelError,
    check_group_arguments,
)
from prunekit._loop import SparsityScheduler
from prunekit._masks import (
    Method,
    get_method,
    global_magnitude_masks,
    list_methods,
    ln_structured_mask,
    magnitude_mask,
    nm_mask,
    prune,
    prune_,
    random_mask,
    random_structured_mask,
    register_method,
)
from prunekit._methods import (
    activation_based_mask,
    activation_mask,
    movement_mask,
    snip_mask,
    taylor_mask,
    wanda_mask,
)
from prunekit._pruner import DEFAULT_MODULE_TYPES, SCOPES, Pruner, Targets
from prunekit._report import SparsityReport, TargetSparsity
from prunekit._sparse import (
    compress_state_dict,
    decompress_state_dict,
    load_sparse,
    save_sparse,
    to_semi_structured,
)
from prunekit._state import pack_mask, unpack_mask

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "GROUP_OPTIONS",
    "SCOPES",
    "STRUCTURES",
    "ActivationPruning",
    "CompactionReport",
    "DependencyGraph",
    "Group",
    "GroupPruner",
    "Method",
    "ModelCost",
    "PrunedAttention",
    "Pruner",
    "SparsityReport",
    "SparsityScheduler",
    "TargetSparsity",
    "Targets",
    "UnsupportedModelError",
    "activation_based_mask",
    "activation_mask",
    "check_group_arguments",
    "compact",
    "compaction_report",
    "compress_state_dict",
    "decompress_state_dict",
    "get_method",
    "global_magnitude_masks",
    "list_methods",
    "ln_structured_mask",
    "load_sparse",
    "magnitude_mask",
    "model_cost",
    "movement_mask",
    "nm_mask",
    "pack_mask",
    "prune",
    "prune_",
    "random_mask",
    "random_structured_mask",
    "register_method",
    "save_sparse",
    "snip_mask",
    "taylor_mask",
    "to_semi_structured",
    "unpack_mask",
    "wanda_mask",
]
