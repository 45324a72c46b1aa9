"""Lightning Attention-2 in Triton: kernels -> launchers -> autograd Function -> chunk_lightning_attn.

Math (per sequence and head, lambda = exp(-s), s >= 0, fp32 state):

    S_t = lambda S_{t-1} + k_t^T v_t      (S_{-1} = h0 or 0),   o_t = scale q_t S_t,   ht = S_{T-1}

Modules: :mod:`.kernels` (the Triton kernels), :mod:`.launch` (their launchers), :mod:`.plan` (the
segment layout of a call), :mod:`.tuning` (the launch values, :class:`LaunchConfig`); this module holds
the autograd Function and the entry points, which take ``config`` (None: :func:`tuning.from_env`).

Work decomposition (parallel over T, no program walks a whole sequence):

* every sequence (a batch row, or a document of a packed batch) is cut into chunks of BT = 64 tokens,
  and runs of ``seg_chunks`` chunks form a *segment*; segments never cross a sequence boundary;
* forward
    1. ``_seg_state_kernel``   per (segment, head, D/E block): M_s = sum_j lambda^(end-1-j) k_j^T v_j
    2. ``_scan_kernel``        per (sequence, head, block): H_s = state entering segment s (in place
                               of M_s), ht = state after the last segment (h0 enters here)
    3. ``_fwd_out_kernel``     per (segment, head, E block): walks its chunks with the running state:
                               o = scale * [ (q k^T * decay) v + (lambda^(i+1) q) S ],  S <- lambda^C S + ...
  With ``config.lookback = "fwd"`` (the default) the three forward kernels are one ``_lb_walk_kernel``
  launch: each segment's program sums M_s, takes the state entering it from its predecessor (a chained
  look-back through a flag per segment), publishes its own, stores H_s for the backward and walks.
* backward (mirror image, R = gradient flowing into the state from the right, R = dht at the end)
    1. ``_seg_state_kernel``   N_s = scale * sum_i lambda^(i-start+1) q_i^T do_i
    2. ``_scan_kernel``        reverse scan: G_s = R at the right edge of segment s, dh0 = R at 0
    3. ``_bwd_dqdk_kernel``    per (segment, head, D block): dq (forward walk with S), dk (reverse walk with R)
    4. ``_bwd_dv_kernel``      per (segment, head, E block): dv (reverse walk with R); with
                               ``config.fuse_dkdv`` also dk, and 3. computes dq only; then (with
                               ``config.dq_gstate``) 3. runs first and also sums N_s, which replaces 1.:
                               dq walk -> reverse scan -> dk/dv walk, three launches
  ``config.lookback = True`` runs the backward as look-back walks too (``lightning_attn_bwd_lb``).
  With slopes.requires_grad (``config.dslopes = "state"``, the default): ``_dslopes_kernel`` per
  (segment, head, D/E block) walks the segment's chunks with the state S (from the forward's segment
  states) and its derivative S' = sum_j (c-1-j) lambda^(c-1-j) k_j^T v_j in fp32:
      dslope = -scale * sum_{j<=t} (t-j) lambda^(t-j) (q_t.k_j)(do_t.v_j) - <dht, S'_end>,
  the pairs inside a chunk directly, those across chunks as <S, sum r lambda^r q^T do> +
  <S', sum lambda^r q^T do> (r = position in the chunk + 1); the part of S' that enters a segment from the
  earlier ones is met from the other side: each segment's S'_end against G_s (step 2's reverse scan).
  One launch after step 4. ``dslopes = "rowsum"`` (and lookback True): 3.
  also writes the rowwise q.dq and k.dk (fp32, from the accumulators); dL/dG_t = q_t.dq_t - k_t.dk_t
  (+ <dht, ht> at each sequence end), dslope = -sum (t_local+1) dL/dG_t, whose terms cancel.

All decay factors are exp(-s * e) with a non-negative, masked exponent e: nothing is divided by a
decay power and nothing overflows for strong decay. T, the segment length and the offsets are runtime
arguments: a new T does not recompile. D and E are padded to powers of two (>= 16) with masks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .launch import (  # noqa: F401  (re-exported: the launch layer)
    _on,
    lightning_attn_bwd,
    lightning_attn_bwd_lb,
    lightning_attn_fwd,
    lightning_attn_fwd_lb,
)
from .plan import CHUNK, _cdiv, _Plan, _seg_chunks_auto, get_plan  # noqa: F401  (re-exported)
from .tuning import DEFAULT, LaunchConfig, from_env, resolve  # noqa: F401  (re-exported)


def _keep(ctx, plan, cfg, scale, initial_state, slopes) -> None:
    """The non-tensor state the backward reads (besides ctx.lookback and the saved tensors)."""
    ctx.plan, ctx.cfg, ctx.scale = plan, cfg, scale
    ctx.h0_given = initial_state is not None
    ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
    ctx.slopes_dtype = slopes.dtype


class LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, initial_state, cu_seqlens, seg_chunks, cfg):
        B, T, H, D = q.shape
        E = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        s = slopes.detach().float().contiguous()
        h0 = initial_state.detach().float().contiguous() if initial_state is not None else None
        plan = get_plan(B, T, H, D, E, cu_seqlens, q.device, cfg, seg_chunks)
        mode = cfg.lookback  # checked when cfg was built
        ctx.lookback = mode is True  # look-back backward too
        with _on(q.device):
            if mode is True:
                o, ht, _ = lightning_attn_fwd_lb(q, k, v, s, scale, h0, plan, cfg)
                hbuf = h0  # the backward recomputes the states; it needs h0 for dq
            elif mode == "fwd":
                o, ht, hbuf = lightning_attn_fwd_lb(q, k, v, s, scale, h0, plan, cfg, store_states=True)
            else:
                o, ht, hbuf = lightning_attn_fwd(q, k, v, s, scale, h0, plan, cfg)
        ctx.save_for_backward(q, k, v, s, hbuf, ht)
        _keep(ctx, plan, cfg, scale, initial_state, slopes)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, s, hbuf, ht = ctx.saved_tensors
        plan, cfg = ctx.plan, ctx.cfg
        need_ds = ctx.needs_input_grad[3]
        ds_state = need_ds and not ctx.lookback and cfg.dslopes == "state"
        compute_dg = need_ds and not ds_state
        if do is None:
            do = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        do = do.contiguous()
        dht_f = dht.float().contiguous() if dht is not None else None
        with _on(q.device):
            if ctx.lookback:
                dq, dk, dv, dh0, dG = lightning_attn_bwd_lb(q, k, v, do, dht_f, s, ctx.scale, hbuf, plan, cfg,
                                                            compute_dg)
            else:
                dq, dk, dv, dh0, dG = lightning_attn_bwd(
                    q, k, v, do, dht_f, s, ctx.scale, ctx.h0_given, hbuf, plan, cfg, compute_dg, ds_state
                )
        dslopes = None
        if ds_state:
            dslopes = dG.to(ctx.slopes_dtype)
        elif compute_dg:
            w = plan.t_local(q.device) + 1.0  # [B*T]
            ds = -(w[:, None] * dG).sum(0)
            if dht_f is not None:
                lens = plan.lens_t(q.device)
                ds = ds - (lens[:, None] * (dht_f * ht).sum((-1, -2))).sum(0)
            dslopes = ds.to(ctx.slopes_dtype)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dslopes, None, dh0, None, None, None


class _Ctx:
    """The parts of an autograd context LightningAttnFunction uses, to run its forward and backward as
    plain functions (inside a custom op, below the autograd dispatch key)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *xs):
        self.saved_tensors = xs

    def set_materialize_grads(self, value):
        pass


def chunk_lightning_attn_grads(q, k, v, slopes, scale, initial_state, cu_seqlens, do, dht, seg_chunks=None,
                               config: Optional[LaunchConfig] = None, need_dslopes: bool = True):
    """Forward then backward of the kernels without autograd: (dq, dk, dv, dslopes or None, dh0 or None).

    Shapes as in :func:`chunk_lightning_attn`; do [B, T, H, E], dht [N, H, D, E] (or None).
    config: launch values (None: :func:`tuning.from_env`). need_dslopes: False skips the slope gradient."""
    cfg = resolve(config).for_grads(need_dslopes)
    ctx = _Ctx((True, True, True, bool(need_dslopes), False, initial_state is not None, False, False, False))
    LightningAttnFunction.forward(ctx, q, k, v, slopes, float(scale), initial_state, cu_seqlens, seg_chunks, cfg)
    dq, dk, dv, ds, _, dh0, _, _, _ = LightningAttnFunction.backward(ctx, do, dht)
    return dq, dk, dv, ds, dh0


def op_segments(q, v, cu_seqlens, cfg: LaunchConfig):
    """(seg_chunks, hbuf shape) of a call through the custom op, from shapes alone (fake tensors too): the
    segment length, chosen as for a dense call of this shape, and the shape of the segment-state buffer the
    forward hands to the backward: [rows, H, D, E] with rows = B * segments per sequence (with cu_seqlens an
    upper bound: segments of the whole length + N), or (0,) with cfg.lookback True (the backward then
    recomputes the states). q [B, T, H, D], v [B, T, H, E], cu_seqlens [N+1] or None."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    seg = cfg.seg_chunks if cfg.seg_chunks is not None else _seg_chunks_auto(cfg, B * _cdiv(T, CHUNK), H, D, E,
                                                                               q.device)
    if cfg.lookback is True:
        return seg, (0,)
    n_seg = _cdiv(T, seg * CHUNK)
    rows = n_seg + cu_seqlens.shape[0] - 1 if cu_seqlens is not None else B * n_seg
    return seg, (rows, H, D, E)


def chunk_lightning_attn_fwd_saved(q, k, v, slopes, scale, initial_state, cu_seqlens, slope_grad: bool,
                                   config: Optional[LaunchConfig] = None):
    """Forward for the custom op: (o [B, T, H, E], ht [N, H, D, E] fp32, hbuf fp32 of the shape
    :func:`op_segments` gives), hbuf the segment states the backward reads. slope_grad: the slopes will
    need a gradient (state_bf16 "auto")."""
    cfg = resolve(config).for_grads(slope_grad)
    seg, shape = op_segments(q, v, cu_seqlens, cfg)
    ctx = _Ctx((True, True, True, bool(slope_grad), False, initial_state is not None, False, False, False))
    o, ht = LightningAttnFunction.forward(ctx, q, k, v, slopes, float(scale), initial_state, cu_seqlens, seg, cfg)
    if shape == (0,):
        return o, ht, ht.new_empty(0)
    hbuf = ctx.saved_tensors[4]
    if hbuf.shape[0] != shape[0]:  # varlen: pad to the shape-derived bound
        full = hbuf.new_zeros(shape)
        full[: hbuf.shape[0]] = hbuf
        hbuf = full
    return o, ht, hbuf


def chunk_lightning_attn_bwd_saved(q, k, v, do, dht, slopes, scale, initial_state, cu_seqlens, hbuf, ht,
                                   need_dslopes: bool, config: Optional[LaunchConfig] = None):
    """Backward for the custom op from the forward's hbuf / ht (see :func:`chunk_lightning_attn_fwd_saved`):
    (dq, dk, dv, dslopes or None, dh0 or None); do [B, T, H, E], dht [N, H, D, E] or None."""
    cfg = resolve(config).for_grads(need_dslopes)
    seg, _ = op_segments(q, v, cu_seqlens, cfg)
    B, T, H, D = q.shape
    plan = get_plan(B, T, H, D, v.shape[-1], cu_seqlens, q.device, cfg, seg)
    ctx = _Ctx((True, True, True, bool(need_dslopes), False, initial_state is not None, False, False, False))
    s = slopes.detach().float().contiguous()
    ctx.saved_tensors = (q.contiguous(), k.contiguous(), v.contiguous(), s, hbuf[: plan.NSEG], ht)
    ctx.lookback = False
    _keep(ctx, plan, cfg, float(scale), initial_state, slopes)
    dq, dk, dv, ds, _, dh0, _, _, _ = LightningAttnFunction.backward(ctx, do, dht)
    return dq, dk, dv, ds, dh0


def chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    seg_chunks: Optional[int] = None,
    config: Optional[LaunchConfig] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Triton Lightning Attention-2 (inputs validated by :func:`lightning_attn`).

    q, k: [B, T, H, D]; v: [B, T, H, E]; slopes [H]; initial_state [N, H, D, E].
    Returns o [B, T, H, E] (input dtype) and ht [N, H, D, E] fp32 (or None).
    seg_chunks: chunks of 64 tokens per segment (None: config.seg_chunks, else chosen from the size and the GPU).
    config: launch values, a :class:`LaunchConfig` (None: :func:`tuning.from_env`, i.e. DEFAULT with the
    environment's SEQPAR_LA_CONFIG overrides).
    """
    cfg = resolve(config).for_grads(torch.is_grad_enabled() and slopes.requires_grad)
    o, ht = LightningAttnFunction.apply(q, k, v, slopes, float(scale), initial_state, cu_seqlens, seg_chunks, cfg)
    return o, (ht if output_final_state else None)
