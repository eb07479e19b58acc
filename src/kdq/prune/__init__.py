"""Pruning: unstructured magnitude masks (magnitude.py), the sparse file that stores them (sparse.py),
and structured channel removal (channels.py)."""

from kdq.prune.magnitude import (
    GradualSchedule,
    Magnitude,
    attach_masks,
    effective_state,
    make_permanent,
    masked_layers,
    prune_magnitude,
    sparsity_of,
    target_layers,
    update_masks,
)
from kdq.prune.sparse import load_sparse, read_manifest, save_sparse, sparse_sizes
from kdq.prune.channels import Channels, prune_channels

__all__ = [
    "GradualSchedule", "Magnitude", "attach_masks", "effective_state", "make_permanent", "masked_layers",
    "prune_magnitude", "sparsity_of", "target_layers", "update_masks",
    "load_sparse", "read_manifest", "save_sparse", "sparse_sizes",
    "Channels", "prune_channels",
]
