"""Sequence parallelism for Lightning Attention-2: SP op, DP x SP mesh, sequence sharding."""
from .mesh import ParallelDims
from .sharding import gather_sequence, shard_sequence
from .sp_attn import local_cu_seqlens, sp_lightning_attn

__all__ = ["sp_lightning_attn", "ParallelDims", "shard_sequence", "gather_sequence", "local_cu_seqlens"]
