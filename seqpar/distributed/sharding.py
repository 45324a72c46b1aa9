"""Split a sequence into contiguous per-rank shards and gather it back."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from . import comm

__all__ = ["shard_bounds", "shard_sequence", "gather_sequence"]


def shard_bounds(T: int, rank: int, size: int, dim: int = 1) -> Tuple[int, int]:
    """``[lo, hi)`` of shard ``rank`` of ``size`` contiguous equal shards of a length-``T`` sequence.

    The one slicing rule of sequence parallelism (rank r holds tokens ``[r*L, (r+1)*L)``, ``L = T // size``),
    used by :func:`shard_sequence` and the Lightning strategy's ``shard_batch``.
    Raises ValueError when ``T`` is not divisible by ``size`` (pad it first).
    """
    if T % size:
        Tp = -(-T // size) * size
        raise ValueError(
            f"sequence length T={T} is not divisible by sp_size={size} (dim {dim}): pad it to a multiple of "
            f"{size}, e.g. T={Tp}, padding labels with -100 (or add a padding document to cu_seqlens), or choose "
            f"a seq_len divisible by {size}"
        )
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    L = T // size
    return rank * L, (rank + 1) * L


def shard_sequence(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of ``x`` along ``dim`` (group rank i gets slice i of P).

    Raises ValueError when the length is not divisible by the group size (pad it first).
    Returns a contiguous tensor (a copy when the slice is not contiguous).
    """
    g = comm.as_group(group)
    P, r = comm.group_size(g), comm.group_rank(g)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} out of range for a tensor of shape {tuple(x.shape)}")
    lo, hi = shard_bounds(x.shape[dim], r, P, dim)
    return x.narrow(dim, lo, hi - lo).contiguous()


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, dim):
        P, r = comm.group_size(g), comm.group_rank(g)
        dev = comm.comm_device(g, x.device)
        xs = x.contiguous().to(dev)
        parts = [torch.empty_like(xs) for _ in range(P)]
        dist.all_gather(parts, xs, group=g)
        ctx.dim, ctx.r, ctx.L = dim, r, x.shape[dim]
        return torch.cat(parts, dim).to(x.device)

    @staticmethod
    def backward(ctx, dy):
        return dy.narrow(ctx.dim, ctx.r * ctx.L, ctx.L), None, None


def gather_sequence(x_local: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """All-gather equal-length shards along ``dim`` back into the full sequence (on every rank).

    Differentiable: the gradient of a rank's shard is its slice of the incoming gradient, which is
    exact when every rank computes the same function of the gathered tensor (e.g. a replicated loss).
    """
    g = comm.as_group(group)
    if not -x_local.dim() <= dim < x_local.dim():
        raise ValueError(f"dim {dim} out of range for a tensor of shape {tuple(x_local.shape)}")
    dim = dim % x_local.dim()
    return _GatherSeq.apply(x_local, g, dim)
