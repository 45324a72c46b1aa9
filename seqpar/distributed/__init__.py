"""Sequence parallelism for Lightning Attention-2: SP op, the dp x sp layout, sharding, parallelize (SP + FSDP2)."""
from .mesh import ParallelDims
from .parallelize import parallelize, set_sp_context
from .sharding import gather_sequence, shard_bounds, shard_sequence
from .sp_attn import local_cu_seqlens, sp_lightning_attn

__all__ = ["sp_lightning_attn", "ParallelDims", "parallelize", "set_sp_context", "shard_sequence", "shard_bounds",
           "gather_sequence", "local_cu_seqlens"]
