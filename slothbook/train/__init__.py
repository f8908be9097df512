"""Training: checkpointing modes, activation offload, tiled MLP, TRL glue and the finetune job (floor 3)."""

from .checkpointing import set_gradient_checkpointing
from .offload import (
    PinnedPool,
    PoolStats,
    disable_offloaded_checkpointing,
    enable_offloaded_checkpointing,
    find_decoder_layers,
    offloaded_bytes,
)
from .tiled_mlp import disable_tiled_mlp, enable_tiled_mlp

__all__ = [
    "PinnedPool", "PoolStats", "disable_offloaded_checkpointing", "disable_tiled_mlp", "enable_offloaded_checkpointing",
    "enable_tiled_mlp", "find_decoder_layers", "offloaded_bytes", "set_gradient_checkpointing",
]
