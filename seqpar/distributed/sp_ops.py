"""The SP state exchange as torch.library custom ops, for the path torch.compile traces.

``seqpar::sp_state_exchange(M, a, ...) -> H`` returns the state entering this rank,

    H_0 = 0,   H_{r+1} = a_r H_r + M_r,

and its registered backward ``seqpar::sp_state_exchange_bwd`` runs the reverse exchange (suffix scan
``G_r = dH_r + a_r G_{r+1}``) and returns ``dM_r = G_{r+1}``, ``da_r = <G_{r+1}, H_r>``: what
``_Start``/``_Finish`` of :mod:`seqpar.distributed.sp_attn` compute in eager mode. Both ops are opaque to the
compiler (fake implementations give the shapes), so a traced model has no graph break; the process group is
passed by name and resolved inside the op. Unlike the eager path the exchange is synchronous (it does not
overlap the local kernel): the traced graph has no place for a pending work handle.

The forward op also does what the eager path does before its exchange, at run time and with the same errors:
the consistency-header all-gather (when :func:`seqpar.distributed.comm.consistency_checks_enabled`, read at
each call) and the validation of the global ``cu_seqlens`` (its host offsets read once per tensor through
:mod:`seqpar.kernels.lightning_attn.varlen`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from . import comm

__all__ = ["sp_state_exchange", "sp_state_exchange_bwd", "check_global_cu_seqlens"]


def _resolve(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def check_global_cu_seqlens(cu_list, P: int, r: int, L: int, shard_offset: Optional[int]) -> int:
    """Check global document offsets (host ints) for the shard of length ``L`` of group rank ``r`` of ``P``;
    return the shard's global offset (``r * L`` when ``shard_offset`` is None: equal shards)."""
    total = cu_list[-1]
    if cu_list[0] != 0 or any(b < a for a, b in zip(cu_list, cu_list[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {list(cu_list[:8])}...")
    if shard_offset is None:
        if total != P * L:
            raise ValueError(
                f"cu_seqlens[-1] = {total} (global tokens) != group size {P} x local length {L}: "
                f"shards must be equal (pad the packed sequence to a multiple of {P}, e.g. with a "
                f"final padding document, before shard_sequence) or pass shard_offset="
            )
        return r * L
    if not (0 <= shard_offset and shard_offset + L <= total):
        raise ValueError(f"shard_offset {shard_offset} + T_local {L} exceeds cu_seqlens[-1] = {total}")
    return shard_offset


def _header(g, r, status, mode, shape, dtype, slopes, scale, cu_list):
    B, H, D, E = shape
    q = torch.empty(B, 0, H, D, dtype=dtype, device="meta")  # make_header reads shapes and dtype only
    v = torch.empty(B, 0, H, E, dtype=dtype, device="meta")
    if status:
        h = comm.make_header(status=1, mode=mode, q=None, v=None, slopes=None, scale=None, cu_seqlens=None)
    else:
        h = comm.make_header(mode=mode, q=q, v=v, slopes=slopes, scale=scale, cu_seqlens=cu_list)
    out, work = comm.start_header_exchange(h, g)
    work.wait()
    comm.check_headers(out, r)


def _bcast(a: torch.Tensor) -> torch.Tensor:
    return a.view(1, -1, 1, 1)


@torch.library.custom_op("seqpar::sp_state_exchange", mutates_args=())
def sp_state_exchange(
    M: torch.Tensor, a: torch.Tensor, slopes: torch.Tensor, cu_seqlens: Optional[torch.Tensor], scale: float,
    dtype: torch.dtype, L: int, shard_offset: int, group_name: str, mode: str, rank: int, size: int,
) -> torch.Tensor:
    """H_r [B, H, D, E] (M's dtype) from this rank's M_r [B, H, D, E] and a_r [H] over the group ``group_name``
    of ``size`` ranks (this one is ``rank``). slopes [H], scale, dtype (q's), L (local tokens), cu_seqlens
    (global offsets or None) and shard_offset (-1: equal shards) feed the header check and the cu_seqlens
    validation only. mode: "allgather" or "ring"."""
    g = _resolve(group_name)
    r, P = rank, size
    err = None
    cu_list = None
    if cu_seqlens is not None:
        from ..kernels.lightning_attn import varlen

        cu_list = varlen.offsets(cu_seqlens)  # one host read per tensor, shared by every layer
        try:
            check_global_cu_seqlens(cu_list, P, r, L, None if shard_offset < 0 else shard_offset)
        except ValueError as e:
            err = e
    if comm.consistency_checks_enabled():  # every rank agrees (or all raise) before a state message is sent
        _header(g, r, err is not None, mode, M.shape, dtype, slopes, scale, cu_list)
    if err is not None:
        raise err
    cdev = comm.comm_device(g, M.device)
    if mode == "allgather":
        send = torch.cat([M.reshape(-1), a.reshape(-1)]).to(cdev)
        allbuf, _ = comm.all_gather_flat(send, g, async_op=False)
        allbuf = allbuf.to(M.device)
        n = M.numel()
        M_all = allbuf[:, :n].view(P, *M.shape)
        a_all = allbuf[:, n:]
        Hs = M.new_zeros(M.shape)
        for j in range(r):
            Hs = _bcast(a_all[j]) * Hs + M_all[j]
        return Hs
    if r > 0:
        buf = torch.empty(M.shape, dtype=M.dtype, device=cdev)
        comm.irecv(buf, g, r - 1).wait()
        Hs = buf.to(M.device)
    else:
        Hs = M.new_zeros(M.shape)
    if r < P - 1:
        comm.isend((_bcast(a) * Hs + M).to(cdev), g, r + 1).wait()
    return Hs


@sp_state_exchange.register_fake
def _(M, a, slopes, cu_seqlens, scale, dtype, L, shard_offset, group_name, mode, rank, size):
    return M.new_empty(M.shape)  # contiguous, as the implementation's output


@torch.library.custom_op("seqpar::sp_state_exchange_bwd", mutates_args=())
def sp_state_exchange_bwd(
    dH: torch.Tensor, a: torch.Tensor, H: torch.Tensor, group_name: str, mode: str, rank: int, size: int,
) -> List[torch.Tensor]:
    """[dM_r [B, H, D, E], da_r [H]] from dH_r (the incoming state's gradient) by the reverse exchange:
    dM_r = G_{r+1}, da_r = <G_{r+1}, H_r>, with G_j = dH_j + a_j G_{j+1} (G_P = 0)."""
    g = _resolve(group_name)
    r, P = rank, size
    dH = dH.contiguous()
    cdev = comm.comm_device(g, dH.device)
    if mode == "allgather":
        send = torch.cat([dH.reshape(-1), a.reshape(-1).to(dH.dtype)]).to(cdev)
        allbuf, _ = comm.all_gather_flat(send, g, async_op=False)
        allbuf = allbuf.to(dH.device)
        n = dH.numel()
        dH_all = allbuf[:, :n].view(P, *dH.shape)
        a_all = allbuf[:, n:]
        G = torch.zeros_like(dH)
        for j in range(P - 1, r, -1):
            G = dH_all[j] + _bcast(a_all[j]) * G
    else:
        if r < P - 1:
            buf = torch.empty(dH.shape, dtype=dH.dtype, device=cdev)
            comm.irecv(buf, g, r + 1).wait()
            G = buf.to(dH.device)
        else:
            G = torch.zeros_like(dH)
        if r > 0:
            comm.isend((dH + _bcast(a.to(dH.dtype)) * G).to(cdev), g, r - 1).wait()
    da = (G * H).sum((0, 2, 3)).to(a.dtype).contiguous()
    return [G, da]


@sp_state_exchange_bwd.register_fake
def _(dH, a, H, group_name, mode, rank, size):
    return [dH.new_empty(dH.shape), a.new_empty(a.shape)]  # contiguous, as the implementation's outputs


def _setup_context(ctx, inputs, output):
    _, a, *_rest = inputs
    ctx.save_for_backward(a, output)
    ctx.group_name, ctx.mode, ctx.rank, ctx.size = inputs[8], inputs[9], inputs[10], inputs[11]


def _backward(ctx, dH):
    a, Hs = ctx.saved_tensors
    if dH is None:
        dH = torch.zeros_like(Hs)
    dM, da = sp_state_exchange_bwd(dH, a, Hs, ctx.group_name, ctx.mode, ctx.rank, ctx.size)
    return dM, da, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("seqpar::sp_state_exchange", _backward, setup_context=_setup_context)
