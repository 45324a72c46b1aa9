"""Split a sequence into contiguous per-rank shards and gather it back."""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import comm

__all__ = ["shard_sequence", "gather_sequence"]


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
    T = x.shape[dim]
    if T % P:
        Tp = -(-T // P) * P
        raise ValueError(
            f"sequence length {T} (dim {dim}) is not divisible by the sequence-parallel size {P}: pad it to "
            f"{Tp} (add {Tp - T} tokens, e.g. a padding document with cu_seqlens, or masked tokens ignored "
            f"by the loss) before sharding"
        )
    L = T // P
    return x.narrow(dim, r * L, L).contiguous()


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
