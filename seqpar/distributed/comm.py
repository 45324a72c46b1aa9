"""Small communication helpers shared by the sequence-parallel ops.

All helpers take the process group explicitly (``None`` = the default group) and map group ranks to
global ranks with ``dist.get_global_rank`` for point-to-point ops, so they work on any subgroup,
contiguous or not.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "group_size",
    "group_rank",
    "global_rank",
    "comm_device",
    "all_gather_flat",
    "isend",
    "irecv",
]


def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) "
            "(torchrun sets the environment for it) before using seqpar.distributed"
        )
    return group if group is not None else dist.group.WORLD


def group_size(group=None) -> int:
    return dist.get_world_size(_group(group))


def group_rank(group=None) -> int:
    r = dist.get_rank(_group(group))
    if r < 0:
        raise ValueError("this process is not a member of the given process group")
    return r


def global_rank(group, group_rank_: int) -> int:
    """Global rank of ``group_rank_`` inside ``group`` (identity for the default group)."""
    g = _group(group)
    if g is dist.group.WORLD or g is None:
        return group_rank_
    return dist.get_global_rank(g, group_rank_)


def backend_name(group=None) -> str:
    return str(dist.get_backend(_group(group))).lower()


def comm_device(group, device: torch.device) -> torch.device:
    """Device on which tensors for ``group`` must live: CPU for a pure gloo group, else ``device``."""
    b = backend_name(group)
    if device.type != "cpu" and "gloo" in b and "nccl" not in b and device.type not in b:
        return torch.device("cpu")
    return device


# all_gather_single (torch >= 2.13) replaces the deprecated all_gather_into_tensor; older torch
# (the GPU machines run 2.11) only has the latter. Gloo implements both in current releases; if a
# backend rejects the single-tensor form we fall back to the list form (decided once per backend).
_SINGLE_OK: dict = {}


class _ListGatherWork:
    """Wraps an ``all_gather`` (list form) so that ``wait()`` also packs the result into one tensor."""

    def __init__(self, work, out: torch.Tensor, parts: List[torch.Tensor]):
        self.work, self.out, self.parts = work, out, parts

    def wait(self):
        self.work.wait()
        torch.stack(self.parts, 0, out=self.out.view(len(self.parts), -1))
        self.parts = []
        return True


def all_gather_flat(x: torch.Tensor, group=None, async_op: bool = True):
    """All-gather a 1-D tensor: returns ``(out [P, n], work)``; read ``out`` only after ``work.wait()``.

    With ``async_op=False`` the gather has completed on return (``work`` is None).
    """
    g = _group(group)
    P = dist.get_world_size(g)
    x = x.contiguous().view(-1)
    out = x.new_empty(P, x.numel())
    b = backend_name(g)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if _SINGLE_OK.get(b, True):
        try:
            work = fn(out.view(-1), x, group=g, async_op=async_op)
            _SINGLE_OK[b] = True
            return out, work
        except (RuntimeError, NotImplementedError) as e:  # backend without the single-tensor form
            if "not supported" not in str(e).lower() and "not implemented" not in str(e).lower():
                raise
            _SINGLE_OK[b] = False
    parts = [torch.empty_like(x) for _ in range(P)]
    work = dist.all_gather(parts, x, group=g, async_op=async_op)
    if async_op:
        return out, _ListGatherWork(work, out, parts)
    torch.stack(parts, 0, out=out)
    return out, None


def isend(t: torch.Tensor, group, dst_group_rank: int):
    return dist.isend(t.contiguous(), dst=global_rank(group, dst_group_rank), group=_group(group))


def irecv(t: torch.Tensor, group, src_group_rank: int):
    return dist.irecv(t, src=global_rank(group, src_group_rank), group=_group(group))


def as_group(group: Optional[object]):
    """The group itself, or the default group for ``None`` (after checking dist is initialised)."""
    return _group(group)
