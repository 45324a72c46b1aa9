"""Sequence-parallel Lightning Attention-2 (DESIGN section 2).

Rank r of an SP group of P ranks holds the contiguous shard ``[off_r, off_r + L_r)`` of every
sequence. The state entering rank r is

    H_0 = 0,   H_{r+1} = a_r H_r + M_r

with ``M_r`` the state of the shard's last document segment (zero initial state) and
``a_r = lambda^{L_r}`` (0 when a document starts inside the shard or exactly at its start). Then

    o_t = o0_t + scale * lambda^(t+1) q_t H_r      for local t before the first local document start,

where ``o0`` is the local kernel with zero initial state. The layout of one call:

    M_r, a_r          torch, fp32 (fp64 for fp64 inputs), differentiable (custom Function, no big temporaries kept)
    _Start            launches the exchange of (M_r, a_r) asynchronously (all-gather, or ring irecv)
    o0                seqpar.lightning_attn on the shard  <- overlaps the exchange
    _Finish           waits, returns H_r (all-gather: local prefix combine; ring: recv, send a_r H_r + M_r)
    correction        o = o0 + scale lambda^(t+1) q_t H_r  (custom Function)

Backward mirrors it: _Finish.backward launches the reverse exchange of dH_r (suffix scan
G_r = dH_r + a_r G_{r+1}), autograd runs the local kernel's backward meanwhile, and _Start.backward
waits and returns dM_r = G_{r+1}, da_r = <G_{r+1}, H_r>. Gradients of q, k, v, slopes are exact.

Shard lengths may differ between ranks: the exchanged states are [B, H, D, E] whatever the length.
With ``cu_seqlens`` each rank must know its global offset: by default shards are taken to be equal
(offset = rank * T_local, checked against ``cu_seqlens[-1] == P * T_local`` with a ValueError that
says how to pad); pass ``shard_offset`` for unequal shards.

Under torch.compile (``torch.compiler.is_compiling()``) the op takes the traced path :func:`_sp_traced`: the
exchange is the custom op ``seqpar::sp_state_exchange`` (:mod:`seqpar.distributed.sp_ops`, synchronous, with a
registered backward), the document structure is computed on the device (no host read of ``cu_seqlens`` in the
graph), and the header check and the cu_seqlens validation run inside the op at run time. Eager calls keep the
overlapped path above unchanged.

Every rank of the group must call the op the same number of times in the same order, and must use
its output in the loss (a rank that does not backpropagate through it leaves the others waiting).
The slopes gradient on each rank is that rank's contribution: sum (or, in DDP, average) it over the
group like any replicated parameter.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..kernels.lightning_attn import lightning_attn
from ..kernels.lightning_attn import varlen
from ..kernels.lightning_attn.interface import check_static, check_values, fwd_op
from . import comm
from .sp_ops import check_global_cu_seqlens, sp_state_exchange

__all__ = ["sp_lightning_attn", "local_cu_seqlens"]

_MODES = ("allgather", "ring")
_CHUNK = 4096  # tokens per step in the torch state helpers: bounds fp32 temporaries


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ranges(n: int, c: int = _CHUNK):
    return [(i, min(i + c, n)) for i in range(0, n, c)]


# --------------------------------------------------------------------------------------------
# Local state helpers (differentiable, recompute in backward: they keep only q/k/v references,
# which the kernel saves anyway)
# --------------------------------------------------------------------------------------------


def _acc_sum(parts, none) -> torch.Tensor:
    """Sum of a list of tensors, out of place; ``none()`` (the zeros it stands for) for an empty list."""
    total = None
    for p in parts:
        total = p if total is None else total + p
    return none() if total is None else total


def _cat_rows(parts, none) -> torch.Tensor:
    """Chunks along T concatenated; ``none()`` (an empty-T result) for no chunks."""
    return torch.cat(parts, 1) if parts else none()


# The helpers below build their results from per-chunk pieces, out of place: a traced (torch.compile)
# backward that wrote chunks into a fresh buffer gave zero gradients on CUDA (torch 2.11).
class _SegmentState(torch.autograd.Function):
    """M = sum_j lambda^(L-1-j) k_j^T v_j over a segment of L tokens -> [B, H, D, E] (acc dtype)."""

    @staticmethod
    def forward(ctx, k, v, slopes):
        B, L, H, D = k.shape
        E = v.shape[-1]
        acc = _acc(k.dtype)
        s = slopes.detach().to(acc)
        parts = []
        for a, b in _ranges(L):
            j = torch.arange(a, b, device=k.device, dtype=acc)
            w = torch.exp(-s[None, :] * (L - 1 - j)[:, None])  # [c, H]
            kw = k[:, a:b].to(acc) * w[None, :, :, None]
            parts.append(torch.einsum("bthd,bthe->bhde", kw, v[:, a:b].to(acc)))
        ctx.save_for_backward(k, v, slopes)
        return _acc_sum(parts, lambda: torch.zeros(B, H, D, E, dtype=acc, device=k.device))

    @staticmethod
    def backward(ctx, dM):
        k, v, slopes = ctx.saved_tensors
        B, L, H, D = k.shape
        acc = dM.dtype
        s = slopes.detach().to(acc)
        need_k, need_v, need_s = ctx.needs_input_grad[:3]
        dks, dvs, dss = [], [], []
        for a, b in _ranges(L):
            j = torch.arange(a, b, device=k.device, dtype=acc)
            e = (L - 1 - j)[:, None]
            w = torch.exp(-s[None, :] * e)[None, :, :, None]  # [1, c, H, 1]
            kc, vc = k[:, a:b].to(acc), v[:, a:b].to(acc)
            vdm = torch.einsum("bthe,bhde->bthd", vc, dM)  # (dM v_j)
            if need_k:
                dks.append((vdm * w).to(k.dtype))
            if need_v:
                dvs.append((torch.einsum("bthd,bhde->bthe", kc, dM) * w).to(v.dtype))
            if need_s:
                # d/ds lambda^e = -e lambda^e
                dss.append(-((kc * vdm).sum(-1) * w[..., 0] * e[None]).sum((0, 1)))
        dk = _cat_rows(dks, lambda: torch.empty_like(k)) if need_k else None
        dv = _cat_rows(dvs, lambda: torch.empty_like(v)) if need_v else None
        ds = _acc_sum(dss, lambda: torch.zeros_like(s)).to(slopes.dtype) if need_s else None
        return dk, dv, ds


class _StateCorrection(torch.autograd.Function):
    """corr_t = scale * lambda^(t+1) q_t H for the given (leading) tokens -> [B, T, H, E] in q's dtype."""

    @staticmethod
    def forward(ctx, q, Hs, slopes, scale):
        B, T, H, D = q.shape
        E = Hs.shape[-1]
        acc = Hs.dtype
        s = slopes.detach().to(acc)
        parts = []
        for a, b in _ranges(T):
            t = torch.arange(a, b, device=q.device, dtype=acc)
            w = torch.exp(-s[None, :] * (t + 1)[:, None])[None, :, :, None]  # [1, c, H, 1]
            parts.append((torch.einsum("bthd,bhde->bthe", q[:, a:b].to(acc), Hs) * (w * scale)).to(q.dtype))
        ctx.save_for_backward(q, Hs, slopes)
        ctx.scale = scale
        return _cat_rows(parts, lambda: torch.empty(B, T, H, E, dtype=q.dtype, device=q.device))

    @staticmethod
    def backward(ctx, dout):
        q, Hs, slopes = ctx.saved_tensors
        scale = ctx.scale
        B, T, H, D = q.shape
        acc = Hs.dtype
        s = slopes.detach().to(acc)
        need_q, need_h, need_s = ctx.needs_input_grad[:3]
        dqs, dHs, dss = [], [], []
        for a, b in _ranges(T):
            t = torch.arange(a, b, device=q.device, dtype=acc)
            e = (t + 1)[:, None]
            w = torch.exp(-s[None, :] * e)[None, :, :, None] * scale  # [1, c, H, 1]
            do = dout[:, a:b].to(acc)
            qc = q[:, a:b].to(acc)
            if need_q:
                dqs.append((torch.einsum("bthe,bhde->bthd", do, Hs) * w).to(q.dtype))
            if need_h:
                dHs.append(torch.einsum("bthd,bthe->bhde", qc * w, do))
            if need_s:
                qh = torch.einsum("bthd,bhde->bthe", qc, Hs)
                dss.append(-((qh * do).sum(-1) * w[..., 0] * e[None]).sum((0, 1)))
        dq = _cat_rows(dqs, lambda: torch.empty_like(q)) if need_q else None
        dH = _acc_sum(dHs, lambda: torch.zeros_like(Hs)) if need_h else None
        ds = _acc_sum(dss, lambda: torch.zeros_like(s)).to(slopes.dtype) if need_s else None
        return dq, dH, ds, None


class _Attach(torch.autograd.Function):
    """Returns o unchanged but keeps H in the graph (zero gradient): H's backward exchange still runs."""

    @staticmethod
    def forward(ctx, o, Hs):
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        return do, None


# --------------------------------------------------------------------------------------------
# The exchange: _Start (launch) and _Finish (wait), sharing one Python object
# --------------------------------------------------------------------------------------------


class _Exchange:
    """State shared by the _Start/_Finish pair of one call (work handles, a's, H_r)."""

    def __init__(self, group, mode: str, rank: int, size: int, device: torch.device):
        self.group, self.mode, self.rank, self.P = group, mode, rank, size
        self.device = device  # where the state math lives
        self.cdev = comm.comm_device(group, device)  # where the comm buffers live
        self.work = None
        self.buf = None
        self.sendbuf = None
        self.sends: List = []
        self.M = None
        self.a = None
        self.a_all = None
        self.H = None
        self.dH = None
        self.shape = None

    def to_comm(self, x):
        return x if x.device == self.cdev else x.to(self.cdev)

    def from_comm(self, x):
        return x if x.device == self.device else x.to(self.device, non_blocking=False)

    def wait_sends(self):
        for w in self.sends:
            if w is not None:
                w.wait()
        self.sends = []


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, a, ex: _Exchange):
        ex.shape = M.shape
        r, P = ex.rank, ex.P
        if ex.mode == "allgather":
            ex.sendbuf = ex.to_comm(torch.cat([M.reshape(-1), a.reshape(-1)]))  # alive until the wait
            ex.buf, ex.work = comm.all_gather_flat(ex.sendbuf, ex.group, async_op=True)
        else:
            ex.M, ex.a = M, a
            if r > 0:
                ex.buf = torch.empty(M.shape, dtype=M.dtype, device=ex.cdev)
                ex.work = comm.irecv(ex.buf, ex.group, r - 1)
            elif P > 1:  # H_0 = 0: rank 0 sends M_0 right away
                ex.sends.append(comm.isend(ex.to_comm(M), ex.group, 1))
        ctx.ex = ex
        return M.new_empty(0)

    @staticmethod
    def backward(ctx, _ddummy):
        ex: _Exchange = ctx.ex
        r, P = ex.rank, ex.P
        if ex.mode == "allgather":
            ex.work.wait()
            dH_all = ex.from_comm(ex.buf).view(P, *ex.shape)
            G = torch.zeros_like(ex.H)
            for j in range(P - 1, r, -1):  # G_j = dH_j + a_j G_{j+1}; want G_{r+1}
                G = dH_all[j] + ex.a_all[j].view(1, -1, 1, 1) * G
        else:
            if r < P - 1:
                ex.work.wait()
                G = ex.from_comm(ex.buf)
            else:
                G = torch.zeros_like(ex.H)
            if 0 < r < P - 1:
                Gr = ex.dH + ex.a.view(1, -1, 1, 1) * G
                ex.sends.append(comm.isend(ex.to_comm(Gr), ex.group, r - 1))
            ex.wait_sends()
        da = (G * ex.H).sum((0, 2, 3))
        ex.buf = ex.work = ex.sendbuf = ex.dH = ex.H = ex.a_all = ex.M = ex.a = None
        return G, da, None


class _Finish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dummy, ex: _Exchange):
        r, P = ex.rank, ex.P
        shape = ex.shape
        if ex.mode == "allgather":
            ex.work.wait()
            allbuf = ex.from_comm(ex.buf)
            n = allbuf.shape[1] - shape[1]
            M_all = allbuf[:, :n].view(P, *shape)
            a_all = allbuf[:, n:]  # [P, H]
            Hs = torch.zeros(shape, dtype=allbuf.dtype, device=allbuf.device)
            for j in range(r):
                Hs = a_all[j].view(1, -1, 1, 1) * Hs + M_all[j]
            ex.a_all = a_all.clone()
            ex.buf = ex.work = ex.sendbuf = None
        else:
            if r > 0:
                ex.work.wait()
                Hs = ex.from_comm(ex.buf)
                ex.buf = ex.work = None
            else:
                Hs = torch.zeros(shape, dtype=ex.M.dtype, device=ex.M.device)
            if 0 < r < P - 1:
                nxt = ex.a.view(1, -1, 1, 1) * Hs + ex.M
                ex.sends.append(comm.isend(ex.to_comm(nxt), ex.group, r + 1))
            ex.wait_sends()
            ex.M = None
            ex.a = ex.a.detach()
        ex.H = Hs
        ctx.ex = ex
        return Hs.clone()

    @staticmethod
    def backward(ctx, dH):
        ex: _Exchange = ctx.ex
        r, P = ex.rank, ex.P
        dH = dH.contiguous()
        if ex.mode == "allgather":
            ex.sendbuf = ex.to_comm(dH.reshape(-1))
            ex.buf, ex.work = comm.all_gather_flat(ex.sendbuf, ex.group, async_op=True)
        else:
            ex.dH = dH
            if r < P - 1:
                ex.buf = torch.empty(dH.shape, dtype=dH.dtype, device=ex.cdev)
                ex.work = comm.irecv(ex.buf, ex.group, r + 1)
            elif P > 1:  # G_{P-1} = dH_{P-1}
                ex.sends.append(comm.isend(ex.to_comm(dH), ex.group, r - 1))
        return dH.new_empty(0), None


# --------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------


def local_cu_seqlens(
    cu_seqlens, offset: int, length: int
) -> Tuple[Optional[torch.Tensor], int, int, bool]:
    """Local view of global document offsets for the shard ``[offset, offset + length)``.

    Returns ``(local_cu or None, first, last, resets)``: ``local_cu`` are the local offsets (None if
    the shard lies inside one document), ``first`` the local position of the first document start
    in the shard (``length`` if none: all tokens continue the incoming state), ``last`` that of the
    last one (0 if none: the whole shard feeds the outgoing state), ``resets`` whether any document
    starts in the shard (then the incoming state does not flow through it: a_r = 0).
    """
    cu_list = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    bounds = [int(b) - offset for b in cu_list]
    starts = sorted({b for b in bounds if 0 <= b < length})
    inner = sorted({b for b in starts if b > 0})
    local = None
    if inner:
        like = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.empty(0, dtype=torch.int32)
        local = torch.tensor([0] + inner + [length], dtype=like.dtype, device=like.device)
    first = starts[0] if starts else length
    last = starts[-1] if starts else 0
    return local, first, last, bool(starts)


def _local_cu_on(cu_seqlens: torch.Tensor, offs, offset: int, length: int):
    """local_cu_seqlens of host offsets, its tensor moved to cu_seqlens' device and dtype without a sync."""
    local, first, last, resets = local_cu_seqlens(list(offs), offset, length)
    if local is not None:
        local = local.to(cu_seqlens.dtype).to(cu_seqlens.device, non_blocking=True)
    return local, first, last, resets


def sp_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    group=None,
    scale: Optional[float] = None,
    mode: str = "allgather",
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    shard_offset: Optional[int] = None,
) -> torch.Tensor:
    """Sequence-parallel Lightning Attention-2 over the ranks of ``group``.

    Args:
        q, k: [B, T_local, H, D]; v: [B, T_local, H, E]: this rank's contiguous shard (group rank i
            holds shard i). B, H, D, E must match on all ranks; T_local may differ between ranks
            (without ``cu_seqlens``; with it see ``shard_offset``).
        slopes: [H] non-negative decay rates (replicated on all ranks).
        group: process group of the SP ranks (None: the default group).
        scale: None means D ** -0.5.
        mode: "allgather" (LASP-2: one all-gather of the per-rank states, local prefix combine) or
            "ring" (LASP: recv H_r from rank r-1, send a_r H_r + M_r to r+1). Same result.
        cu_seqlens: *global* packed-document offsets [N+1] (B == 1), identical on all ranks; the
            state resets at every document start, also across ranks.
        backend: passed to :func:`seqpar.lightning_attn` for the local kernel.
        shard_offset: global position of this rank's first token. Default ``rank * T_local``
            (equal shards; then ``cu_seqlens[-1]`` must equal ``P * T_local``). Pass it to use
            unequal shards with ``cu_seqlens``.
    Returns:
        o: [B, T_local, H, E], this rank's shard of the output, in q's dtype.

    Under torch.compile the call traces without a graph break (forward and backward, cu_seqlens, learnable
    slopes): the exchange is a synchronous custom op (no overlap with the local kernel), the consistency header
    (if :func:`comm.consistency_checks_enabled` at run time) and the cu_seqlens checks run inside it and raise
    the same ValueErrors; the checks of values done in eager mode before any collective (non-negative slopes)
    are skipped, and an argument error found while tracing is raised on that rank only (with
    ``fullgraph=True`` as dynamo's ``Unsupported`` wrapping the ValueError).
    """
    g = comm.as_group(group)
    P = comm.group_size(g)
    r = comm.group_rank(g)
    if torch.compiler.is_compiling():
        return _sp_traced(q, k, v, slopes, g, P, r, scale, mode, cu_seqlens, backend, shard_offset)
    checks = P > 1 and comm.consistency_checks_enabled()
    # With checks, every rank all-gathers a fixed-size header (shapes, dtype, mode, scale, checksums of slopes
    # and cu_seqlens) before the state exchange, the same collective in both modes: a disagreement, or invalid
    # inputs on one rank, is a ValueError on every rank, never a size mismatch inside the collective or a hang.
    try:
        scale, local_cu, first, last, resets, cu_list = _local_plan(
            q, k, v, slopes, scale, mode, cu_seqlens, backend, shard_offset, P, r)
    except (ValueError, TypeError):
        if checks:
            out, work = comm.start_header_exchange(comm.make_header(status=1, mode=mode, q=None, v=None,
                                                                    slopes=None, scale=None, cu_seqlens=None), g)
            work.wait()
            comm.check_headers(out, r)
        raise
    if P == 1:
        return lightning_attn(q, k, v, slopes, scale=scale, cu_seqlens=local_cu, backend=backend)[0]
    header = None
    if checks:  # launched now, checked before the state exchange starts (the local state M overlaps it)
        header = comm.start_header_exchange(
            comm.make_header(mode=mode, q=q, v=v, slopes=slopes, scale=scale, cu_seqlens=cu_list), g)
    return _sp_forward(q, k, v, slopes, g, P, r, scale, mode, local_cu, first, last, resets, backend, header)


def _local_plan(q, k, v, slopes, scale, mode, cu_seqlens, backend, shard_offset, P, r):
    """Validate this rank's arguments; ``(scale, local_cu, first, last, resets, global cu list or None)``."""
    backend = _static_checks(q, k, v, slopes, scale, mode, cu_seqlens, backend, shard_offset)
    check_values(q, k, v, slopes, None, None, backend)  # the local call's values; cu_seqlens is global
    B, L, H, D = q.shape
    E = v.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)

    local_cu, first, last, resets = None, L, 0, False
    if cu_seqlens is not None:
        cu_list = varlen.offsets(cu_seqlens)  # one host read per tensor, shared by every layer
        shard_offset = check_global_cu_seqlens(cu_list, P, r, L, shard_offset)
        # the local offsets tensor is built once per (cu_seqlens, shard): the same object in every layer,
        # so the local kernel's plan is cached on it too
        local_cu, first, last, resets = varlen.cached(
            cu_seqlens, ("sp_local", int(shard_offset), L), lambda offs: _local_cu_on(cu_seqlens, offs, int(shard_offset), L)
        )
    return scale, local_cu, first, last, resets, (cu_list if cu_seqlens is not None else None)


def _sp_forward(q, k, v, slopes, g, P, r, scale, mode, local_cu, first, last, resets, backend, header=None):
    """The P > 1 path of :func:`sp_lightning_attn`; ``header``: the pending header exchange (out, work) or None."""
    B, L, H, D = q.shape
    acc = _acc(q.dtype)
    # 1. this shard's contribution to the outgoing state, and the decay of the incoming one
    M = _SegmentState.apply(k[:, last:], v[:, last:], slopes)
    if resets:
        a = torch.zeros(H, dtype=acc, device=q.device)
    else:
        a = torch.exp(-slopes.to(acc) * L)
    if header is not None:  # all ranks agree (or all raise) before any state message is sent
        header[1].wait()
        comm.check_headers(header[0], r)
    # 2. launch the exchange
    ex = _Exchange(g, mode, r, P, q.device)
    dummy = _Start.apply(M, a, ex)
    # 3. local kernel with zero initial state: overlaps the exchange
    o0, _ = lightning_attn(q, k, v, slopes, scale=scale, cu_seqlens=local_cu, backend=backend)
    # 4. incoming state H_r
    Hs = _Finish.apply(dummy, ex)
    # 5. its contribution to the tokens before the first local document start (none on rank 0:
    # H_0 = 0). H_r always enters the graph, so every rank joins the backward exchange.
    n = 0 if r == 0 else first
    if n == 0:
        return _Attach.apply(o0, Hs)
    corr = _StateCorrection.apply(q[:, :n], Hs, slopes, scale)
    if n == L:
        return o0 + corr
    return torch.cat([o0[:, :n] + corr, o0[:, n:]], 1)


# --------------------------------------------------------------------------------------------
# The path torch.compile traces
# --------------------------------------------------------------------------------------------


def _static_checks(q, k, v, slopes, scale, mode, cu_seqlens, backend, shard_offset) -> str:
    """The argument checks that read no tensor values (the rest run inside the exchange op): the operator's
    :func:`~seqpar.kernels.lightning_attn.interface.check_static` on this rank's shard and the SP arguments;
    returns the resolved backend."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    backend = check_static(q, k, v, slopes, scale, cu_seqlens, backend)
    if shard_offset is not None and (isinstance(shard_offset, bool) or not isinstance(shard_offset, int)):
        raise TypeError(f"shard_offset must be an int or None, got {type(shard_offset).__name__}")
    return backend


def _sp_traced(q, k, v, slopes, g, P, r, scale, mode, cu_seqlens, backend, shard_offset):
    """:func:`sp_lightning_attn` as torch.compile traces it: no host read of a tensor, no work handle.

    The state exchange is the custom op ``seqpar::sp_state_exchange`` (:mod:`seqpar.distributed.sp_ops`),
    which also runs the consistency-header check and the cu_seqlens validation at run time. The document
    structure of the shard is computed on the device from the global ``cu_seqlens``, with shapes that do not
    depend on its values: the local kernel gets ``clamp(cu_seqlens - offset, 0, T_local)`` (formed inside the
    op, N+1 offsets, documents outside the shard empty), the shard's outgoing state M masks the tokens before
    the last local document start, and the correction masks those from the first one on. Every rank applies the
    correction to all its tokens (zero where masked, and on rank 0, whose H_0 = 0), so every rank traces
    the same graph and runs its collectives in the same order.
    """
    backend = _static_checks(q, k, v, slopes, scale, mode, cu_seqlens, backend, shard_offset)
    B, L, H, D = q.shape
    acc = _acc(q.dtype)
    scale = D ** -0.5 if scale is None else float(scale)
    off = (r * L if shard_offset is None else int(shard_offset)) if cu_seqlens is not None else -1
    if P == 1:
        return fwd_op(q, k, v, slopes, scale, None, cu_seqlens, backend, off)[0]
    decay = torch.exp(-slopes.to(acc) * L)
    if cu_seqlens is None:
        M = _SegmentState.apply(k, v, slopes)
        a = decay
        qc = q
    else:
        rel = cu_seqlens.to(torch.int64) - off  # document starts relative to the shard
        start = (rel >= 0) & (rel < L)
        first = torch.where(start, rel, L).amin()  # L: no document starts in the shard
        last = torch.where(start, rel, 0).amax()
        t = torch.arange(L, device=q.device)
        M = _SegmentState.apply(k * (t >= last).to(k.dtype)[None, :, None, None], v, slopes)
        a = decay * (~start.any()).to(acc)  # a document starts in the shard: H_r does not flow through it
        qc = q * (t < first).to(q.dtype)[None, :, None, None]
    Hs = sp_state_exchange(M, a, slopes, cu_seqlens, scale, q.dtype, L,
                           -1 if shard_offset is None else int(shard_offset), g.group_name, mode, r, P)
    # the local kernel gets the global offsets and the shard's first token: the op derives the local offsets
    # once per cu_seqlens tensor and keeps them on it, so every layer and its backward share one plan
    o0, _ = fwd_op(q, k, v, slopes, scale, None, cu_seqlens, backend, off)
    return o0 + _StateCorrection.apply(qc, Hs, slopes, scale)
