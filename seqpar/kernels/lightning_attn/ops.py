"""The operator as torch.library custom ops (``seqpar::lightning_attn_fwd`` / ``seqpar::lightning_attn_bwd``)
with fake implementations and a registered autograd formula, so that torch.compile traces a model that
calls :func:`seqpar.lightning_attn` without a graph break (FlashAttention's pattern).

:func:`lightning_attn` routes through these ops while torch.compile traces; eager calls keep the direct
path. On the Triton backend the forward op also returns the segment states its backward reads (a buffer
whose shape follows from the input shapes, :func:`chunk.op_segments`), so the backward op runs only the
backward kernels, as the eager autograd.Function does. The torch backend's backward op recomputes the
forward under torch.func.vjp.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .torch_chunk import torch_chunk_lightning_attn


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _local_cu(cu_seqlens: Optional[torch.Tensor], cu_offset: int, T: int) -> Optional[torch.Tensor]:
    """The offsets the kernels run on: ``cu_seqlens`` itself (cu_offset < 0), or for global offsets of a shard
    starting at token ``cu_offset``, ``clamp(cu_seqlens - cu_offset, 0, T)`` [N+1], built on the device once per
    (tensor, cu_offset, T) and kept on the tensor (:mod:`.varlen`): every layer of a step and its backward get
    the same local tensor, so its offsets are read and its plan is built once."""
    if cu_seqlens is None or cu_offset < 0:
        return cu_seqlens
    from . import varlen

    def build(_offs):
        return (cu_seqlens.to(torch.int64) - cu_offset).clamp(0, T).to(cu_seqlens.dtype)

    return varlen.cached(cu_seqlens, ("local", int(cu_offset), int(T)), build)


def _forward(q, k, v, slopes, scale, initial_state, cu_seqlens, backend):
    if backend == "torch":
        return torch_chunk_lightning_attn(q, k, v, slopes, scale, initial_state, True, cu_seqlens)
    from .chunk import chunk_lightning_attn

    return chunk_lightning_attn(q, k, v, slopes, scale, initial_state, True, cu_seqlens)


@torch.library.custom_op("seqpar::lightning_attn_fwd", mutates_args=())
def lightning_attn_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float,
    initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], backend: str,
    slope_grad: bool = False, cu_offset: int = -1,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """o [B, T, H, E] (q's dtype), ht [N, H, D, E] (fp32; fp64 for fp64 inputs), hbuf: the Triton forward's
    segment states [rows, H, D, E] fp32 for the backward ([0] on the torch backend). Inputs validated.
    slope_grad: the slopes will need a gradient (the state products then keep the fp32 state exact).
    cu_offset >= 0: cu_seqlens are global offsets and this call holds tokens [cu_offset, cu_offset + T) of
    them (documents outside are empty; see :func:`_local_cu`)."""
    cu_seqlens = _local_cu(cu_seqlens, cu_offset, q.shape[1])
    if backend == "triton":
        from .chunk import chunk_lightning_attn_fwd_saved

        with torch.no_grad():
            o, ht, hbuf = chunk_lightning_attn_fwd_saved(q, k, v, slopes, scale, initial_state, cu_seqlens,
                                                         slope_grad)
        return (o.clone() if o is v else o.contiguous()), ht.contiguous(), hbuf.contiguous()
    with torch.no_grad():
        o, ht = _forward(q, k, v, slopes, scale, initial_state, cu_seqlens, backend)
    # contiguous outputs: the fake implementation promises contiguous strides to the compiler
    return (o.clone() if o is v else o.contiguous()), ht.to(_state_dtype(q)).clone(), q.new_empty(0, dtype=torch.float32)


@lightning_attn_fwd_op.register_fake
def _(q, k, v, slopes, scale, initial_state, cu_seqlens, backend, slope_grad=False, cu_offset=-1):
    B, T, H, D = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if backend == "triton":
        from .chunk import op_segments
        from .tuning import from_env

        hshape = op_segments(q, v, cu_seqlens, from_env())[1]
    else:
        hshape = (0,)
    return (v.new_empty(v.shape, dtype=q.dtype), q.new_empty((N, H, D, v.shape[-1]), dtype=_state_dtype(q)),
            q.new_empty(hshape, dtype=torch.float32))


@torch.library.custom_op("seqpar::lightning_attn_bwd", mutates_args=())
def lightning_attn_bwd_op(
    do: torch.Tensor, dht: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
    scale: float, initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], backend: str,
    need_dslopes: bool, hbuf: torch.Tensor, ht: torch.Tensor, cu_offset: int = -1,
) -> List[torch.Tensor]:
    """[dq, dk, dv, dslopes, dh0] (dh0 empty [0] without an initial state; dslopes zeros when not
    need_dslopes). Triton: from the forward's segment states hbuf and final state ht (the forward is
    recomputed when hbuf is empty); torch: the forward is recomputed under torch.func.vjp. cu_offset: as
    for the forward op."""
    cu_seqlens = _local_cu(cu_seqlens, cu_offset, q.shape[1])
    if backend == "triton":
        from .chunk import chunk_lightning_attn_bwd_saved, chunk_lightning_attn_grads

        if hbuf.numel():
            dq, dk, dv, ds, dh0 = chunk_lightning_attn_bwd_saved(q, k, v, do, dht, slopes, scale, initial_state,
                                                                 cu_seqlens, hbuf, ht, need_dslopes)
        else:
            dq, dk, dv, ds, dh0 = chunk_lightning_attn_grads(q, k, v, slopes, scale, initial_state, cu_seqlens, do,
                                                             dht, need_dslopes=need_dslopes)
        ds = ds if ds is not None else torch.zeros_like(slopes)
        return [dq.contiguous(), dk.contiguous(), dv.contiguous(), ds, dh0 if dh0 is not None else q.new_empty(0)]
    # a custom op runs below the autograd dispatch key: the vjp is taken with torch.func, which carries
    # its own autograd levels
    inputs = [q, k, v, slopes] + ([initial_state] if initial_state is not None else [])

    def fwd(*xs):
        h0 = xs[4] if len(xs) > 4 else None
        return _forward(*xs[:4], scale, h0, cu_seqlens, backend)

    (o, ht), vjp = torch.func.vjp(fwd, *inputs)
    grads = list(vjp((do.to(o.dtype), dht.to(ht.dtype))))
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    grads = [g.contiguous() for g in grads]  # the fake implementation's contiguous strides
    if initial_state is None:
        grads.append(q.new_empty(0))
    return grads


@lightning_attn_bwd_op.register_fake
def _(do, dht, q, k, v, slopes, scale, initial_state, cu_seqlens, backend, need_dslopes, hbuf, ht, cu_offset=-1):
    dh0 = torch.empty_like(initial_state) if initial_state is not None else q.new_empty(0)
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(slopes), dh0]


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, scale, initial_state, cu_seqlens, backend, *rest = inputs
    _, ht, hbuf = output
    ctx.save_for_backward(q, k, v, slopes, initial_state, cu_seqlens, hbuf, ht)
    ctx.scale, ctx.backend = scale, backend
    ctx.cu_offset = rest[1] if len(rest) > 1 else -1
    ctx.has_h0, ctx.has_cu = initial_state is not None, cu_seqlens is not None


def _backward(ctx, do, dht, _dhbuf):
    q, k, v, slopes, initial_state, cu_seqlens, hbuf, ht = ctx.saved_tensors
    o_shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    if do is None:
        do = q.new_zeros(o_shape)
    if dht is None:
        N = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        dht = q.new_zeros((N, q.shape[2], q.shape[3], v.shape[-1]), dtype=_state_dtype(q))
    dq, dk, dv, ds, dh0 = lightning_attn_bwd_op(
        do, dht, q, k, v, slopes, ctx.scale, initial_state if ctx.has_h0 else None,
        cu_seqlens if ctx.has_cu else None, ctx.backend, bool(ctx.needs_input_grad[3]), hbuf, ht, ctx.cu_offset,
    )
    return dq, dk, dv, ds, None, (dh0 if ctx.has_h0 else None), None, None, None, None


torch.library.register_autograd("seqpar::lightning_attn_fwd", _backward, setup_context=_setup_context)
