"""Lightning Attention-2 in Triton: kernels -> launchers -> autograd Function -> chunk_lightning_attn.

Math (per sequence and head, lambda = exp(-s), s >= 0, fp32 state):

    S_t = lambda S_{t-1} + k_t^T v_t      (S_{-1} = h0 or 0),   o_t = scale q_t S_t,   ht = S_{T-1}

Work decomposition (parallel over T, no program walks a whole sequence):

* every sequence (a batch row, or a document of a packed batch) is cut into chunks of BT = 64 tokens,
  and runs of ``seg_chunks`` chunks form a *segment*; segments never cross a sequence boundary;
* forward
    1. ``_seg_state_kernel``   per (segment, head, D/E block): M_s = sum_j lambda^(end-1-j) k_j^T v_j
    2. ``_scan_kernel``        per (sequence, head, block): H_s = state entering segment s (in place
                               of M_s), ht = state after the last segment (h0 enters here)
    3. ``_fwd_out_kernel``     per (segment, head, E block): walks its chunks with the running state:
                               o = scale * [ (q k^T * decay) v + (lambda^(i+1) q) S ],  S <- lambda^C S + ...
  By default (CONFIG["lookback"] = "fwd") the three forward kernels are one ``_lb_walk_kernel`` launch:
  each segment's program sums M_s, takes the state entering it from its predecessor (a chained
  look-back through a flag per segment), publishes its own, stores H_s for the backward and walks.
* backward (mirror image, R = gradient flowing into the state from the right, R = dht at the end)
    1. ``_seg_state_kernel``   N_s = scale * sum_i lambda^(i-start+1) q_i^T do_i
    2. ``_scan_kernel``        reverse scan: G_s = R at the right edge of segment s, dh0 = R at 0
    3. ``_bwd_dqdk_kernel``    per (segment, head, D block): dq (forward walk with S), dk (reverse walk with R)
    4. ``_bwd_dv_kernel``      per (segment, head, E block): dv (reverse walk with R); with
                               CONFIG["fuse_dkdv"] (default) also dk, and 3. computes dq only; then
                               (CONFIG["dq_gstate"], default) 3. runs first and also sums N_s, which
                               replaces 1.: dq walk -> reverse scan -> dk/dv walk, three launches
  With slopes.requires_grad, 3. also writes the rowwise q.dq and k.dk (fp32, from the accumulators);
  dL/dG_t = q_t.dq_t - k_t.dk_t (+ <dht, ht> at each sequence end), dslope = -sum (t_local+1) dL/dG_t.

All decay factors are exp(-s * e) with a non-negative, masked exponent e: nothing is divided by a
decay power and nothing overflows for strong decay. T, the segment length and the offsets are runtime
arguments: a new T does not recompile. D and E are padded to powers of two (>= 16) with masks.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import varlen

CHUNK = 64  # tokens per chunk (BT)
# Debug aid: fill outputs with NaN before the kernels run, so an element no program writes shows up.
POISON = os.environ.get("SEQPAR_POISON", "0") not in ("", "0")
# Chunks per segment; None picks from the problem size and the number of SMs.
SEG_CHUNKS: Optional[int] = None
# fp32 inputs: "ieee" (exact fp32 dots) or "tf32" (tensor cores, ~1e-3 relative error).
FP32_PRECISION = os.environ.get("SEQPAR_FP32_PRECISION", "ieee")
# Launch configuration (GPU). BLK: the largest block of the split head dim (E for "fwd"/"dv", D for
# "dqdk", both for "seg"/"scan"); it is capped so that a register-resident fp32 state block has at most
# 128 x 128 elements. Segments get ``waves`` x SMs programs of the output kernel, at most ``seg_max`` chunks
# (``seg_long``: at most its ``seg_max`` chunks for its ``waves`` once the first rule is saturated).
CONFIG = {
    "seg": dict(BLK=64, num_warps=4, num_stages=2),
    "scan": dict(BLK=64, num_warps=4),
    "fwd": dict(BLK=64, num_warps=4, num_stages=2),
    "dqdk": dict(BLK=64, num_warps=4, num_stages=2),
    "dv": dict(BLK=64, num_warps=4, num_stages=2),
    "waves": 4,
    "seg_max": 32,
    # H200, segments of up to 64 chunks in 2 waves once 4 waves of 32-chunk segments are full (B4 H16 D128:
    # 16K 1.95 -> 1.90 ms, 32K 3.86 -> 3.79, 128K (B1) 4.03 -> 3.84; B2 H32 T32K D64 1.28 -> 1.22); at 4K-8K
    # the longer segments cost 4-7 % of kernel time, so smaller problems keep the rule above
    "seg_long": {"waves": 2, "seg_max": 64},
    # one-pass kernels with a chained look-back between segments (_lb_walk_kernel) instead of segment
    # states + scan + walk: "fwd" (default) for the forward only, which also saves the segment states for
    # the scan-path backward (H100, B4 H16 T32K D128: forward 1.48 -> 1.45 ms); True for the backward too
    # (slower there: 6.95 ms fwd+bwd), segments of lb_chunks chunks; False: no look-back
    # (benchmarks/NOTES_kernel.md)
    "lookback": "fwd",
    # state products of bf16 inputs (_state_mode): "split" (default), "tf32" or "bf16"
    "state_bf16": "split",
    "lb_chunks": 4,
    # compute dk in the dv kernel (one reverse walk instead of two) when one E block ("dv", or "dv_fused"
    # for D * E <= 128 * 128 at 8 warps) covers E (H100, B4 H16 T32K D128: 4.76 -> 4.37 ms fwd+bwd)
    "fuse_dkdv": True,
    "dv_fused": dict(BLK=128, num_warps=8, num_stages=2),
    # with fuse_dkdv: the dq walk (first backward kernel) also sums the segment states of (q, do) that
    # the reverse scan needs, instead of a separate _seg_state_kernel pass over q and do
    "dq_gstate": True,
    # GPU: launch through the compiled kernel once its launch signature has been seen (see _call)
    "fast_launch": True,
    # overrides when both head dims fit in 64 (H100, B2 H32 T32K D64: 2.19 -> 2.05 ms fwd+bwd; the same
    # settings at D=128 cost 5.7 -> 9.1 ms, see benchmarks/NOTES_kernel.md)
    "small": {
        "fuse_dkdv": True,  # H100, B2 H32 T32K D64: 2.05 -> 1.90 ms fwd+bwd
        "scan": dict(BLK=32),
        "fwd": dict(num_stages=3),
        "dqdk": dict(num_stages=3),
        "dv": dict(num_stages=3),
    },
}


def _apply_config(overrides: dict) -> None:
    for key, val in overrides.items():
        if isinstance(val, dict):
            CONFIG[key].update(val)
        else:
            CONFIG[key] = val


if os.environ.get("SEQPAR_LA_CONFIG"):  # e.g. '{"fwd": {"num_warps": 4}}', for tuning runs
    import json

    _apply_config(json.loads(os.environ["SEQPAR_LA_CONFIG"]))


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) (triton.cdiv is a JIT function: slow to call from Python)."""
    return -(-a // b)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UP: tl.constexpr):
    """tl.dot with fp32 accumulation; UP: upcast operands to fp32 first (the CPU interpreter of
    triton 3.9 computes bf16 dots on the raw uint16 bits)."""
    if UP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _sdot(a, b, STATE: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr):
    """a @ b for a state product: a is an input tile (exact in its dtype), b an fp32 tile (a state or
    decay-weighted rows). STATE: 0 rounds b to a's dtype; 1 fp32 operands (PREC: tf32 or ieee on GPU);
    2 splits b = hi + lo into two tiles of a's dtype (two dots, ~16 significant bits for bf16)."""
    if STATE == 2:
        hi = b.to(a.dtype)
        lo = (b - hi.to(tl.float32)).to(a.dtype)
        return _dot(a, hi, PREC, UP) + _dot(a, lo, PREC, UP)
    elif STATE == 1:
        return _dot(a.to(tl.float32), b, PREC, UP)
    else:
        return _dot(a, b.to(a.dtype), PREC, UP)


@triton.jit
def _sdot_l(a, b, STATE: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr):
    """a @ b with a the fp32 tile and b the input tile (see _sdot)."""
    if STATE == 2:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        return _dot(hi, b, PREC, UP) + _dot(lo, b, PREC, UP)
    elif STATE == 1:
        return _dot(a, b.to(tl.float32), PREC, UP)
    else:
        return _dot(a.to(b.dtype), b, PREC, UP)


@triton.jit
def _seg_bounds(pid_s, cu_ptr, segseq_ptr, segstart_ptr, T, NS, SEG_T, IS_VARLEN: tl.constexpr):
    """(sequence index, first token of the sequence, segment start, segment end) in flat tokens."""
    if IS_VARLEN:
        n = tl.load(segseq_ptr + pid_s).to(tl.int32)
        bos = tl.load(cu_ptr + n).to(tl.int32)
        eos = tl.load(cu_ptr + n + 1).to(tl.int32)
        start = tl.load(segstart_ptr + pid_s).to(tl.int32)
    else:
        n = pid_s // NS
        bos = n * T
        eos = bos + T
        start = bos + (pid_s % NS) * SEG_T
    end = tl.minimum(start + SEG_T, eos)
    return n, bos, start, end


@triton.jit(do_not_specialize=["T", "NS"])
def _seg_state_kernel(
    a_ptr, b_ptr, slopes_ptr, out_ptr, cu_ptr, segseq_ptr, segstart_ptr,
    T, H, D, E, NS, SEG_T, w_scale,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    FROM_END: tl.constexpr, IS_VARLEN: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
    STATE: tl.constexpr,
):
    """out[seg, h] = w_scale * sum_t w_t a_t^T b_t over the tokens of one segment.

    FROM_END: w_t = lambda^(end-1-t) (forward: k, v); else w_t = lambda^(t-start+1) (backward: q, do).
    a: [*, H, D], b: [*, H, E]; out: [NSEG, H, D, E] fp32.
    """
    pid = tl.program_id(0)
    NEB = tl.cdiv(E, BE)
    NDB = tl.cdiv(D, BD)
    i_e = pid % NEB
    i_d = (pid // NEB) % NDB
    rest = pid // (NEB * NDB)
    h = rest % H
    pid_s = rest // H
    n, bos, start, end = _seg_bounds(pid_s, cu_ptr, segseq_ptr, segstart_ptr, T, NS, SEG_T, IS_VARLEN)
    slope = tl.load(slopes_ptr + h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    o_e = i_e * BE + tl.arange(0, BE)
    m_d = o_d < D
    m_e = o_e < E
    acc = tl.zeros([BD, BE], dtype=tl.float32)
    for cs in range(start, end, BT):
        tok = cs + o_t
        m_t = tok < end
        tok64 = tok.to(tl.int64)
        # a^T tile [BD, BT], b tile [BT, BE]
        aT = tl.load(a_ptr + (tok64[None, :] * H + h) * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        bb = tl.load(b_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0)
        if FROM_END:
            ex = tl.where(m_t, end - 1 - tok, 0).to(tl.float32)
        else:
            ex = tl.where(m_t, tok - start + 1, 0).to(tl.float32)
        w = tl.exp(-slope * ex)
        acc += _sdot_l(aT.to(tl.float32) * w[None, :], bb, STATE, PREC, UP)
    acc = acc * w_scale
    base = (pid_s.to(tl.int64) * H + h) * D * E
    tl.store(out_ptr + base + o_d[:, None] * E + o_e[None, :], acc, mask=m_d[:, None] & m_e[None, :])


@triton.jit(do_not_specialize=["T", "NS"])
def _scan_kernel(
    buf_ptr, init_ptr, fin_ptr, slopes_ptr, cu_ptr, segoff_ptr,
    T, H, D, E, NS, SEG_T,
    BD: tl.constexpr, BE: tl.constexpr,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FIN: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    """Sequential combine over the segments of one sequence, in place.

    buf[s] holds the contribution of segment s on entry and the state entering it (forward) or the
    gradient entering it from the right (REVERSE) on exit. fin = state after the last segment (ht), or
    after the first one going backwards (dh0). init: h0 (forward) or dht (reverse), [N, H, D, E].
    """
    pid = tl.program_id(0)
    NEB = tl.cdiv(E, BE)
    NDB = tl.cdiv(D, BD)
    i_e = pid % NEB
    i_d = (pid // NEB) % NDB
    rest = pid // (NEB * NDB)
    h = rest % H
    n = rest // H
    if IS_VARLEN:
        bos = tl.load(cu_ptr + n).to(tl.int32)
        eos = tl.load(cu_ptr + n + 1).to(tl.int32)
        s0 = tl.load(segoff_ptr + n).to(tl.int32)
        s1 = tl.load(segoff_ptr + n + 1).to(tl.int32)
    else:
        bos = n * T
        eos = bos + T
        s0 = n * NS
        s1 = s0 + NS
    slope = tl.load(slopes_ptr + h).to(tl.float32)
    o_d = i_d * BD + tl.arange(0, BD)
    o_e = i_e * BE + tl.arange(0, BE)
    msk = (o_d[:, None] < D) & (o_e[None, :] < E)
    off = o_d[:, None] * E + o_e[None, :]
    nh = (n.to(tl.int64) * H + h) * D * E
    if HAS_INIT:
        state = tl.load(init_ptr + nh + off, mask=msk, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BD, BE], dtype=tl.float32)
    for i in range(0, s1 - s0):
        if REVERSE:
            s = s1 - 1 - i
        else:
            s = s0 + i
        seg_start = bos + (s - s0) * SEG_T
        seg_len = tl.minimum(SEG_T, eos - seg_start)
        p = buf_ptr + (s.to(tl.int64) * H + h) * D * E + off
        m = tl.load(p, mask=msk, other=0.0)
        tl.store(p, state, mask=msk)
        state = state * tl.exp(-slope * seg_len.to(tl.float32)) + m
    if STORE_FIN:
        tl.store(fin_ptr + nh + off, state, mask=msk)


@triton.jit(do_not_specialize=["T", "NS"])
def _fwd_out_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, hbuf_ptr, slopes_ptr, cu_ptr, segseq_ptr, segstart_ptr,
    scale, T, H, D, E, NS, SEG_T,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    IS_VARLEN: tl.constexpr, STATE: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
):
    pid = tl.program_id(0)
    NEB = tl.cdiv(E, BE)
    i_e = pid % NEB
    rest = pid // NEB
    h = rest % H
    pid_s = rest // H
    n, bos, start, end = _seg_bounds(pid_s, cu_ptr, segseq_ptr, segstart_ptr, T, NS, SEG_T, IS_VARLEN)
    slope = tl.load(slopes_ptr + h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = i_e * BE + tl.arange(0, BE)
    m_d = o_d < D
    m_e = o_e < E
    S = tl.load(hbuf_ptr + (pid_s.to(tl.int64) * H + h) * D * E + o_d[:, None] * E + o_e[None, :],
                mask=m_d[:, None] & m_e[None, :], other=0.0)
    diff = o_t[:, None] - o_t[None, :]
    causal = diff >= 0
    decay = tl.where(causal, tl.exp(-slope * tl.where(causal, diff, 0).to(tl.float32)), 0.0)
    q_w = tl.exp(-slope * (o_t + 1).to(tl.float32))
    for cs in range(start, end, BT):
        L = tl.minimum(end - cs, BT)
        tok = cs + o_t
        m_t = o_t < L
        tok64 = tok.to(tl.int64)
        q = tl.load(q_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        kT = tl.load(k_ptr + (tok64[None, :] * H + h) * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        v = tl.load(v_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0)
        A = _dot(q, kT, PREC, UP) * decay
        o = _dot(A.to(v.dtype), v, PREC, UP)
        # decay weights scale the rows of the small [BT, BE] operands / results, never a [BT, D] tile
        # (fp32 copies of those spill registers at D = 128)
        k_w = tl.exp(-slope * tl.where(m_t, L - 1 - o_t, 0).to(tl.float32))
        vd = v.to(tl.float32) * k_w[:, None]
        o += _sdot(q, S, STATE, PREC, UP) * q_w[:, None]
        S = S * tl.exp(-slope * L.to(tl.float32)) + _sdot(kT, vd, STATE, PREC, UP)
        o = o * scale
        tl.store(o_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_e[None, :])


@triton.jit(do_not_specialize=["T", "NS", "NTOK"])
def _bwd_dqdk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, hbuf_ptr, gbuf_ptr, dgq_ptr, dgk_ptr,
    slopes_ptr, cu_ptr, segseq_ptr, segstart_ptr,
    scale, T, H, D, E, NS, SEG_T, NTOK,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    IS_VARLEN: tl.constexpr, STATE: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr, COMPUTE_DG: tl.constexpr,
    DO_DK: tl.constexpr, STORE_G: tl.constexpr,
):
    """dq (forward walk with the state S) and dk (reverse walk with R) for one D block of one segment.

    dq_i = scale * [ sum_{j<=i} lambda^(i-j) (do_i.v_j) k_j + lambda^(i+1) do_i S_in^T ]
    dk_j = scale * sum_{i>=j} lambda^(i-j) (do_i.v_j) q_i + lambda^(L-1-j) v_j R^T
    STORE_G (with DO_DK off): the forward walk also sums the segment's backward contribution
    N_s = scale * sum_i lambda^(i-start+1) q_i^T do_i (its D block) into gbuf, in place of a separate
    _seg_state_kernel pass over q and do.
    """
    pid = tl.program_id(0)
    NDB = tl.cdiv(D, BD)
    i_d = pid % NDB
    rest = pid // NDB
    h = rest % H
    pid_s = rest // H
    n, bos, start, end = _seg_bounds(pid_s, cu_ptr, segseq_ptr, segstart_ptr, T, NS, SEG_T, IS_VARLEN)
    slope = tl.load(slopes_ptr + h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    m_e = o_e < E
    sbase = (pid_s.to(tl.int64) * H + h) * D * E
    diff = o_t[:, None] - o_t[None, :]
    causal = diff >= 0
    decay = tl.where(causal, tl.exp(-slope * tl.where(causal, diff, 0).to(tl.float32)), 0.0)
    q_w = tl.exp(-slope * (o_t + 1).to(tl.float32))

    # ---- dq: forward walk, ST = S^T block [BE, BD]
    ST = tl.load(hbuf_ptr + sbase + o_d[None, :] * E + o_e[:, None], mask=m_e[:, None] & m_d[None, :], other=0.0)
    if STORE_G:
        G = tl.zeros([BD, BE], dtype=tl.float32)
    for cs in range(start, end, BT):
        L = tl.minimum(end - cs, BT)
        tok = cs + o_t
        m_t = o_t < L
        tok64 = tok.to(tl.int64)
        do = tl.load(do_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0)
        vT = tl.load(v_ptr + (tok64[None, :] * H + h) * E + o_e[:, None], mask=m_e[:, None] & m_t[None, :], other=0.0)
        k = tl.load(k_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        if STORE_G:
            # N_s += q^T (lambda^(t-start+1) do): the weight scales the rows of the [BT, BD] q block
            qT = tl.load(q_ptr + (tok64[None, :] * H + h) * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
            g_w = tl.exp(-slope * tl.where(m_t, tok - start + 1, 0).to(tl.float32))
            G += _sdot_l(qT.to(tl.float32) * g_w[None, :], do, STATE, PREC, UP)
        A2 = _dot(do, vT, PREC, UP) * decay  # [i, j]
        dq = _dot(A2.to(k.dtype), k, PREC, UP)
        k_w = tl.exp(-slope * tl.where(m_t, L - 1 - o_t, 0).to(tl.float32))
        kd = k.to(tl.float32) * k_w[:, None]
        dq += _sdot(do, ST, STATE, PREC, UP) * q_w[:, None]
        ST = ST * tl.exp(-slope * L.to(tl.float32)) + _sdot(vT, kd, STATE, PREC, UP)
        dq = dq * scale
        m_td = m_t[:, None] & m_d[None, :]
        tl.store(dq_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=m_td)
        if COMPUTE_DG:
            q = tl.load(q_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], mask=m_td, other=0.0)
            g = tl.sum(q.to(tl.float32) * dq, axis=1)
            tl.store(dgq_ptr + i_d.to(tl.int64) * NTOK * H + tok64 * H + h, g, mask=m_t)
    if STORE_G:
        tl.store(gbuf_ptr + sbase + o_d[:, None] * E + o_e[None, :], G * scale, mask=m_d[:, None] & m_e[None, :])

    if DO_DK:
        # ---- dk: reverse walk, RT = R^T block [BE, BD]
        RT = tl.load(gbuf_ptr + sbase + o_d[None, :] * E + o_e[:, None], mask=m_e[:, None] & m_d[None, :], other=0.0)
        nch = tl.cdiv(end - start, BT)
        for c in range(0, nch):
            cs = start + (nch - 1 - c) * BT
            L = tl.minimum(end - cs, BT)
            tok = cs + o_t
            m_t = o_t < L
            tok64 = tok.to(tl.int64)
            m_td = m_t[:, None] & m_d[None, :]
            doT = tl.load(do_ptr + (tok64[None, :] * H + h) * E + o_e[:, None], mask=m_e[:, None] & m_t[None, :], other=0.0)
            v = tl.load(v_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0)
            q = tl.load(q_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], mask=m_td, other=0.0)
            A2T = _dot(v, doT, PREC, UP) * tl.trans(decay)  # [j, i]
            dk = _dot(A2T.to(q.dtype), q, PREC, UP) * scale
            k_w = tl.exp(-slope * tl.where(m_t, L - 1 - o_t, 0).to(tl.float32))
            qd = q.to(tl.float32) * (q_w * scale)[:, None]
            dk += _sdot(v, RT, STATE, PREC, UP) * k_w[:, None]
            RT = RT * tl.exp(-slope * L.to(tl.float32)) + _sdot(doT, qd, STATE, PREC, UP)
            tl.store(dk_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=m_td)
            if COMPUTE_DG:
                k = tl.load(k_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], mask=m_td, other=0.0)
                g = tl.sum(k.to(tl.float32) * dk, axis=1)
                tl.store(dgk_ptr + i_d.to(tl.int64) * NTOK * H + tok64 * H + h, g, mask=m_t)


@triton.jit(do_not_specialize=["T", "NS"])
def _bwd_dv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dv_ptr, dk_ptr, dgk_ptr, gbuf_ptr, slopes_ptr, cu_ptr, segseq_ptr, segstart_ptr,
    scale, T, H, D, E, NS, SEG_T,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
    IS_VARLEN: tl.constexpr, STATE: tl.constexpr, PREC: tl.constexpr, UP: tl.constexpr,
    DO_DK: tl.constexpr, COMPUTE_DG: tl.constexpr,
):
    """dv_j = scale * sum_{i>=j} lambda^(i-j) (q_i.k_j) do_i + lambda^(L-1-j) k_j R, one E block.

    DO_DK (only when one E block covers E): also dk_j = scale * sum_{i>=j} lambda^(i-j) (do_i.v_j) q_i
    + lambda^(L-1-j) v_j R^T in the same reverse walk (and k.dk for the slope gradient).
    """
    pid = tl.program_id(0)
    NEB = tl.cdiv(E, BE)
    i_e = pid % NEB
    rest = pid // NEB
    h = rest % H
    pid_s = rest // H
    n, bos, start, end = _seg_bounds(pid_s, cu_ptr, segseq_ptr, segstart_ptr, T, NS, SEG_T, IS_VARLEN)
    slope = tl.load(slopes_ptr + h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = i_e * BE + tl.arange(0, BE)
    m_d = o_d < D
    m_e = o_e < E
    R = tl.load(gbuf_ptr + (pid_s.to(tl.int64) * H + h) * D * E + o_d[:, None] * E + o_e[None, :],
                mask=m_d[:, None] & m_e[None, :], other=0.0)
    diff = o_t[:, None] - o_t[None, :]  # [j, i] used as i - j below
    causalT = diff <= 0  # j <= i
    decayT = tl.where(causalT, tl.exp(-slope * tl.where(causalT, -diff, 0).to(tl.float32)), 0.0)
    q_w = tl.exp(-slope * (o_t + 1).to(tl.float32)) * scale
    nch = tl.cdiv(end - start, BT)
    for c in range(0, nch):
        cs = start + (nch - 1 - c) * BT
        L = tl.minimum(end - cs, BT)
        tok = cs + o_t
        m_t = o_t < L
        tok64 = tok.to(tl.int64)
        k = tl.load(k_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        qT = tl.load(q_ptr + (tok64[None, :] * H + h) * D + o_d[:, None], mask=m_d[:, None] & m_t[None, :], other=0.0)
        do = tl.load(do_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0)
        AT = _dot(k, qT, PREC, UP) * decayT  # [j, i]
        dv = _dot(AT.to(do.dtype), do, PREC, UP) * scale
        k_w = tl.exp(-slope * tl.where(m_t, L - 1 - o_t, 0).to(tl.float32))
        # dv is finished and stored before dk starts (one [BT, BE] fp32 accumulator live at a time)
        dv += _sdot(k, R, STATE, PREC, UP) * k_w[:, None]
        tl.store(dv_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=m_t[:, None] & m_e[None, :])
        if DO_DK:
            m_td = m_t[:, None] & m_d[None, :]
            v = tl.load(v_ptr + (tok64[:, None] * H + h) * E + o_e[None, :], mask=m_t[:, None] & m_e[None, :], other=0.0)
            A2T = _dot(v, tl.trans(do), PREC, UP) * decayT  # [j, i]
            dk = _dot(A2T.to(qT.dtype), tl.trans(qT), PREC, UP) * scale
            dk += _sdot(v, tl.trans(R), STATE, PREC, UP) * k_w[:, None]
            tl.store(dk_ptr + (tok64[:, None] * H + h) * D + o_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=m_td)
            if COMPUTE_DG:
                g = tl.sum(k.to(tl.float32) * dk, axis=1)
                tl.store(dgk_ptr + tok64 * H + h, g, mask=m_t)
        dod = do.to(tl.float32) * q_w[:, None]
        R = R * tl.exp(-slope * L.to(tl.float32)) + _sdot(qT, dod, STATE, PREC, UP)


@triton.jit(do_not_specialize=["T", "N", "NP", "PF_T", "NTOK"])
def _lb_walk_kernel(
    a_ptr, b_ptr, c_ptr, out_ptr, x_ptr, g_ptr, init_ptr, fin_ptr, chain_ptr, sync_ptr, slopes_ptr,
    cu_ptr, tab_ptr, sbuf_ptr, segoff_ptr,
    alpha, gamma, beta, T, H, DA, DC, N, NP, PF_T, NTOK,
    BT: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
    REVERSE: tl.constexpr, TRANS_INIT: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FIN: tl.constexpr,
    STORE_SBUF: tl.constexpr, COMPUTE_DG: tl.constexpr, IS_VARLEN: tl.constexpr, STATE: tl.constexpr, PREC: tl.constexpr,
    UP: tl.constexpr,
):
    """One-pass chunk walk with a chained look-back between consecutive segments of a sequence.

    Computes, for one segment, one head and one block of the value dim (a, b: [*, H, DA]; c, out: [*, H, DC]):

        forward (REVERSE=False):  out_t = alpha * sum_{s<=t} lambda^(t-s) (a_t.b_s) c_s  + gamma * lambda^(..) a_t S
        reverse (REVERSE=True):   out_t = alpha * sum_{s>=t} lambda^(s-t) (a_t.b_s) c_s  + gamma * lambda^(..) a_t R

    where S (R) is the [DA, DC] state carried from the left (right): S_t = lambda S_{t-1} + beta * b_t^T c_t,
    starting from init (or 0). o = LA(q, k, v) forward; dq = LA(do, v, k) forward; dk = LA(v, do, q) and
    dv = LA(k, q, do) reverse.

    Programs take tickets in launch order (an atomic counter), walk position-major, so a segment's
    predecessor always holds an earlier ticket. Each program (1) sums its segment's own contribution M
    (reads b, c; skipped in the last segment of a sequence, whose final state is the walk's), (2) waits
    for its predecessor's inclusive state in a two-slot per-lane buffer (flag = position + 1), publishes
    its own (lambda^len S_in + M) for its successor, (3) walks its chunks from S_in and writes out. Two
    slots suffice: the successor of a slot's next writer has read the slot.
    STORE_SBUF: also store the state entering each segment, sbuf [NSEG, H, DA, DC] (forward: the
    segment states the scan-path backward reads).
    """
    NCB = tl.cdiv(DC, BC)
    t = tl.atomic_add(sync_ptr, 1)
    i_c = t % NCB
    r = t // NCB
    h = r % H
    r = r // H
    if IS_VARLEN:
        n = tl.load(tab_ptr + 2 * r).to(tl.int32)
        p = tl.load(tab_ptr + 2 * r + 1).to(tl.int32)
        bos = tl.load(cu_ptr + n).to(tl.int32)
        eos = tl.load(cu_ptr + n + 1).to(tl.int32)
    else:
        n = r % N
        p = r // N
        bos = n * T
        eos = bos + T
    nseg = tl.cdiv(eos - bos, PF_T)
    if REVERSE:
        seg = nseg - 1 - p
    else:
        seg = p
    start = bos + seg * PF_T
    end = tl.minimum(start + PF_T, eos)
    slope = tl.load(slopes_ptr + h).to(tl.float32)
    lane = (n * H + h) * NCB + i_c

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_cl = tl.arange(0, BC)
    o_c = i_c * BC + o_cl
    m_k = o_k < DA
    m_c = o_c < DC
    m_kc = m_k[:, None] & m_c[None, :]

    # (1) the segment's own contribution; the last segment of a sequence has no successor to publish to,
    # and its final state (STORE_FIN) is the walk's own final state, so it skips this pass
    M = tl.zeros([BK, BC], dtype=tl.float32)
    end1 = end
    if p == nseg - 1:
        end1 = start
    for cs in range(start, end1, BT):
        tok = cs + o_t
        m_t = tok < end
        tok64 = tok.to(tl.int64)
        bT = tl.load(b_ptr + (tok64[None, :] * H + h) * DA + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        cc = tl.load(c_ptr + (tok64[:, None] * H + h) * DC + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0)
        if REVERSE:
            ex = tl.where(m_t, tok - start + 1, 0).to(tl.float32)
        else:
            ex = tl.where(m_t, end - 1 - tok, 0).to(tl.float32)
        w = tl.exp(-slope * ex)
        M += _sdot(bT, cc.to(tl.float32) * w[:, None], STATE, PREC, UP)
    M = M * beta

    # (2) state entering the segment; publish the state leaving it
    if TRANS_INIT:
        ioff = o_k[:, None] + o_c[None, :] * DA
    else:
        ioff = o_k[:, None] * DC + o_c[None, :]
    nh = (n.to(tl.int64) * H + h) * DA * DC
    if p == 0:
        if HAS_INIT:
            S = tl.load(init_ptr + nh + ioff, mask=m_kc, other=0.0).to(tl.float32)
        else:
            S = tl.zeros([BK, BC], dtype=tl.float32)
    else:
        slot = (p - 1) % 2
        flag_ptr = sync_ptr + 1 + 2 * lane + slot
        f = tl.atomic_cas(flag_ptr, p, p)
        while f != p:
            f = tl.atomic_cas(flag_ptr, p, p)
        S = tl.load(chain_ptr + ((2 * lane + slot).to(tl.int64) * BK + o_k[:, None]) * BC + o_cl[None, :],
                    cache_modifier=".cg")
    incl = S * tl.exp(-slope * (end - start).to(tl.float32)) + M
    if p < nseg - 1:
        slot = p % 2
        tl.store(chain_ptr + ((2 * lane + slot).to(tl.int64) * BK + o_k[:, None]) * BC + o_cl[None, :], incl)
        tl.debug_barrier()
        tl.atomic_xchg(sync_ptr + 1 + 2 * lane + slot, p + 1)
    if STORE_SBUF:
        if IS_VARLEN:
            sidx = tl.load(segoff_ptr + n).to(tl.int32) + seg
        else:
            sidx = n * NP + seg
        tl.store(sbuf_ptr + (sidx.to(tl.int64) * H + h) * DA * DC + ioff, S, mask=m_kc)

    # (3) the chunk walk from S
    diff = o_t[:, None] - o_t[None, :]
    if REVERSE:
        causal = diff <= 0
        decay = tl.where(causal, tl.exp(-slope * tl.where(causal, -diff, 0).to(tl.float32)), 0.0)
    else:
        causal = diff >= 0
        decay = tl.where(causal, tl.exp(-slope * tl.where(causal, diff, 0).to(tl.float32)), 0.0)
    w_in = tl.exp(-slope * (o_t + 1).to(tl.float32))
    nch = tl.cdiv(end - start, BT)
    for c in range(0, nch):
        if REVERSE:
            cs = start + (nch - 1 - c) * BT
        else:
            cs = start + c * BT
        L = tl.minimum(end - cs, BT)
        tok = cs + o_t
        m_t = o_t < L
        tok64 = tok.to(tl.int64)
        m_tc = m_t[:, None] & m_c[None, :]
        a = tl.load(a_ptr + (tok64[:, None] * H + h) * DA + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        bT = tl.load(b_ptr + (tok64[None, :] * H + h) * DA + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        cc = tl.load(c_ptr + (tok64[:, None] * H + h) * DC + o_c[None, :], mask=m_tc, other=0.0)
        A = _dot(a, bT, PREC, UP) * decay
        out = _dot(A.to(cc.dtype), cc, PREC, UP) * alpha
        w_L = tl.exp(-slope * tl.where(m_t, L - 1 - o_t, 0).to(tl.float32))
        if REVERSE:
            aw = w_L * gamma
            bw = w_in * beta
        else:
            aw = w_in * gamma
            bw = w_L * beta
        cd = cc.to(tl.float32) * bw[:, None]
        out += _sdot(a, S, STATE, PREC, UP) * aw[:, None]
        S = S * tl.exp(-slope * L.to(tl.float32)) + _sdot(bT, cd, STATE, PREC, UP)
        tl.store(out_ptr + (tok64[:, None] * H + h) * DC + o_c[None, :], out.to(out_ptr.dtype.element_ty), mask=m_tc)
        if COMPUTE_DG:
            x = tl.load(x_ptr + (tok64[:, None] * H + h) * DC + o_c[None, :], mask=m_tc, other=0.0)
            g = tl.sum(x.to(tl.float32) * out, axis=1)
            tl.store(g_ptr + i_c.to(tl.int64) * NTOK * H + tok64 * H + h, g, mask=m_t)
    if STORE_FIN:
        if p == nseg - 1:
            tl.store(fin_ptr + nh + ioff, S, mask=m_kc)

# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


class _Plan:
    """Segment layout of one call: sequences, segments and the tables the kernels read."""

    def __init__(self, B: int, T: int, H: int, D: int, E: int, cu_seqlens, device, seg_chunks=None):
        self.B, self.T, self.H, self.D, self.E = B, T, H, D, E
        self.is_varlen = cu_seqlens is not None
        self._lens_t = self._t_local = None
        if self.is_varlen:
            offs = varlen.offsets(cu_seqlens)
            self.N = len(offs) - 1
            lens = [b - a for a, b in zip(offs, offs[1:])]
        else:
            self.N = B
            lens = [T] * B
        self.lens = lens
        n_chunks = sum(_cdiv(L, CHUNK) for L in lens)
        if seg_chunks is None:
            seg_chunks = SEG_CHUNKS
        explicit_seg = seg_chunks
        if seg_chunks is None:
            if device.type == "cuda":
                sms = _num_sms(device)
                neb = _cdiv(E, _blk("fwd", E, D))
                # enough programs for CONFIG["waves"] waves of the output kernel; problems that fill those
                # waves with seg_max-chunk segments get longer segments and fewer waves (CONFIG["seg_long"])
                work = n_chunks * H * neb
                seg_chunks = min(CONFIG["seg_max"], work // (CONFIG["waves"] * sms))
                long = CONFIG.get("seg_long")
                if long and seg_chunks == CONFIG["seg_max"]:
                    seg_chunks = min(long["seg_max"], work // (long["waves"] * sms))
                seg_chunks = max(1, seg_chunks)
            else:
                seg_chunks = 4
        self.seg_chunks = int(seg_chunks)
        self.SEG_T = self.seg_chunks * CHUNK
        # segments of the look-back walks: the scan's in the default "fwd" mode (its segment states are
        # stored for the backward), else the given segment length or CONFIG["lb_chunks"] chunks
        if CONFIG["lookback"] == "fwd":
            self.lb_chunks = self.seg_chunks
        else:
            self.lb_chunks = int(explicit_seg) if explicit_seg is not None else int(CONFIG["lb_chunks"])
        self._lb = None
        if self.is_varlen:
            nseg = [_cdiv(L, self.SEG_T) for L in lens]
            segoff = [0]
            for x in nseg:
                segoff.append(segoff[-1] + x)
            self.NSEG = segoff[-1]
            self.NS = 0
            seq, st = [], []
            for n_, (a, m) in enumerate(zip(offs[:-1], nseg)):
                seq += [n_] * m
                st += [a + i * self.SEG_T for i in range(m)]
            self.cu = cu_seqlens.to(device=device, dtype=torch.int32)
            self.segoff = torch.tensor(segoff, dtype=torch.int32, device=device)
            self.segseq = torch.tensor(seq if seq else [0], dtype=torch.int32, device=device)
            self.segstart = torch.tensor(st if st else [0], dtype=torch.int32, device=device)
        else:
            self.NS = _cdiv(T, self.SEG_T)
            self.NSEG = B * self.NS
            self.cu = self.segoff = self.segseq = self.segstart = None

    def lb_layout(self, device):
        """Walk positions of the look-back kernels: (PF_T, NP, table, n_pos, empty).

        PF_T tokens per segment; non-varlen: NP segments per sequence, n_pos = N * NP, table None;
        varlen: table [n_pos, 2] int32 of (sequence, position), position-major, NP = 0.
        empty: indices of empty sequences (their final state is the initial one), or None.
        """
        if self._lb is None:
            pf_t = self.lb_chunks * CHUNK
            nps = [_cdiv(L, pf_t) for L in self.lens]
            empty = [n_ for n_, m in enumerate(nps) if m == 0]
            empty = torch.tensor(empty, dtype=torch.long, device=device) if empty else None
            if not self.is_varlen:
                self._lb = (pf_t, nps[0] if nps else 0, None, sum(nps), empty)
            else:
                rows = [(n_, p_) for p_ in range(max(nps, default=0)) for n_, m in enumerate(nps) if p_ < m]
                tab = torch.tensor(rows if rows else [(0, 0)], dtype=torch.int32, device=device)
                self._lb = (pf_t, 0, tab, len(rows), empty)
        return self._lb

    def t_local(self, device) -> torch.Tensor:
        """[B*T] position of each token inside its sequence (fp32), built once per plan."""
        if self._t_local is None:
            if not self.is_varlen:
                self._t_local = torch.arange(self.T, device=device, dtype=torch.float32).repeat(self.B)
            else:
                ids = torch.repeat_interleave(torch.arange(self.N, device=device), self.lens_t(device).long(),
                                              output_size=self.T)
                self._t_local = (torch.arange(self.T, device=device) - self.cu.long()[ids]).float()
        return self._t_local

    def lens_t(self, device) -> torch.Tensor:
        """[N] sequence lengths (fp32) on the device, built once per plan."""
        if self._lens_t is None:
            self._lens_t = torch.tensor(self.lens, dtype=torch.float32).to(device, non_blocking=True)
        return self._lens_t


# Plans of dense calls by shape and settings (varlen plans live on their cu_seqlens tensor).
_DENSE_PLANS: dict = {}


def _plan_key(B, T, H, D, E, device, seg_chunks) -> tuple:
    """Everything a plan depends on: the shape, the device and the segment settings."""
    return (B, T, H, D, E, str(device), seg_chunks, SEG_CHUNKS, str(CONFIG["lookback"]), CONFIG["lb_chunks"],
            CONFIG["waves"], CONFIG["seg_max"], str(CONFIG.get("seg_long")), CONFIG["fwd"]["BLK"])


def get_plan(B, T, H, D, E, cu_seqlens, device, seg_chunks=None) -> "_Plan":
    """The plan of one call, built once per shape (dense) or per cu_seqlens tensor (varlen): every
    layer of a step, and the backward, reuse it without reading cu_seqlens again."""
    key = _plan_key(B, T, H, D, E, device, seg_chunks)
    if cu_seqlens is not None:
        return varlen.cached(cu_seqlens, ("plan",) + key,
                             lambda _: _Plan(B, T, H, D, E, cu_seqlens, device, seg_chunks))
    plan = _DENSE_PLANS.get(key)
    if plan is None:
        if len(_DENSE_PLANS) > 256:
            _DENSE_PLANS.clear()
        plan = _DENSE_PLANS[key] = _Plan(B, T, H, D, E, None, device, seg_chunks)
    return plan


_DUMMIES: dict = {}


def _dummy(device):
    """A 1-element int32 tensor for pointer arguments a launch does not use (one per device)."""
    d = _DUMMIES.get(device)
    if d is None:
        d = _DUMMIES[device] = torch.empty(1, dtype=torch.int32, device=device)
    return d


def _up(x) -> bool:
    return x.dtype == torch.bfloat16 and not x.is_cuda


_STATE_MODES = {"bf16": 0, "tf32": 1, "split": 2}


def _state_mode(dtype) -> int:
    """STATE constexpr of the kernels (see _sdot): fp32 and fp16 inputs take fp32 operands (fp16 cannot
    hold a large state); bf16 inputs follow CONFIG["state_bf16"]: "split" (hi + lo bf16 tiles, default),
    "tf32" (fp32 operands) or "bf16" (state and decayed rows rounded to bf16: the least work, an output
    error ~3x and a state error ~1e4x the fp32 path's, and a slope gradient that degrades with T)."""
    if dtype != torch.bfloat16:
        return 1
    mode = CONFIG.get("state_bf16", "split")
    if mode not in _STATE_MODES:
        raise ValueError(f'CONFIG["state_bf16"] must be one of {sorted(_STATE_MODES)}, got {mode!r}')
    return _STATE_MODES[mode]


def _prec(dtype) -> str:
    return FP32_PRECISION if dtype == torch.float32 else "tf32"


def _blk(kind, x, other):
    """Block of the split dim x (the other dim `other` is held whole, or is split the same way)."""
    return max(16, min(CONFIG[kind]["BLK"], _p2(x), 16384 // _p2(other)))


def _cfg(kind, D, E) -> dict:
    c = dict(CONFIG[kind])
    if _p2(D) <= 64 and _p2(E) <= 64:
        c.update(CONFIG.get("small", {}).get(kind, {}))
    return c


def _fuse_dkdv(D, E) -> bool:
    """dk in the dv kernel's reverse walk: CONFIG["fuse_dkdv"], or CONFIG["small"]["fuse_dkdv"] for D, E <= 64."""
    if _p2(D) <= 64 and _p2(E) <= 64 and "fuse_dkdv" in CONFIG.get("small", {}):
        return bool(CONFIG["small"]["fuse_dkdv"])
    return bool(CONFIG.get("fuse_dkdv", False))


def _blocks_state(D, E, kind="seg"):
    blk = _cfg(kind, D, E)["BLK"]
    return min(blk, _p2(D)), min(blk, _p2(E))


def _launch(kind, D, E):
    c = _cfg(kind, D, E)
    c.pop("BLK")
    return c


# Launches whose tiles did not fit in shared memory with the configured pipeline depth (e.g. fp32
# inputs with D = 256): they are re-launched, and from then on launched, with num_stages = 1.
_SINGLE_STAGE: set = set()


def _stage_key(kernel, args, kwargs) -> tuple:
    """A launch's kernel, constexprs / launch options (num_stages aside) and first tensor's dtype."""
    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
    opts = tuple((k, str(v)) for k, v in sorted(kwargs.items()) if isinstance(v, (bool, int, str)) and k != "num_stages")
    return (name,) + opts + tuple(str(a.dtype) for a in args[:1] if isinstance(a, torch.Tensor))


# Compiled kernels by launch signature, for launching without JITFunction.run's per-call argument binding
# (CONFIG["fast_launch"]): {(kernel, device, kwargs, _signature(args)): (CompiledKernel, constexpr values)}.
_COMPILED: dict = {}


def _signature(args) -> tuple:
    """What Triton specialises a launch on, per positional argument: a tensor's dtype and 16-byte alignment,
    an int's width and whether it is 1 or a multiple of 16 (a superset of Triton's key: never too coarse)."""
    return tuple([
        (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
        else (a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF) if type(a) is int
        else type(a)
        for a in args
    ])


def _call(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), falling back to num_stages=1 when the tiles exceed shared memory.

    On a GPU (CONFIG["fast_launch"]) a launch whose signature was seen before goes straight to the compiled
    kernel's own launcher (``CompiledKernel[grid](*args, stream=...)``, which runs Triton's launch hooks as
    JITFunction.run does): JITFunction.run re-binds and re-specialises every argument on every call, which
    costs the host 40-120 us per launch inside a training step on an H200 machine, 25-50 % more than this
    path (benchmarks/results/host_overhead_h200.md).
    """
    if _SINGLE_STAGE and _stage_key(kernel, args, kwargs) in _SINGLE_STAGE:  # no key work on the usual path
        kwargs["num_stages"] = 1
    key = None
    if CONFIG.get("fast_launch") and args[0].is_cuda:
        dev = args[0].get_device()  # a compiled kernel's function handle belongs to one device
        key = (kernel, dev, tuple(kwargs.items()), _signature(args))
        hit = _COMPILED.get(key)
        if hit is not None:
            ck, tail = hit
            ck[(tuple(grid) + (1, 1))[:3]](*args, *tail, stream=torch._C._cuda_getCurrentRawStream(dev))
            return ck
    try:
        ck = kernel[grid](*args, **kwargs)
    except OutOfResources:
        if kwargs.get("num_stages", 1) <= 1:
            raise
        _SINGLE_STAGE.add(_stage_key(kernel, args, kwargs))
        kwargs["num_stages"] = 1
        ck = kernel[grid](*args, **kwargs)
        key = None  # the next call takes the single-stage path above and caches under its own kwargs
    names = getattr(kernel, "arg_names", ())[len(args):]
    if key is not None and hasattr(ck, "__getitem__") and all(name in kwargs for name in names):
        _COMPILED[key] = (ck, tuple(kwargs[name] for name in names))  # constexprs, in declaration order
    return ck


def _new(shape, dtype, device):
    x = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        x.fill_(float("nan"))
    return x


def _seg_states(a, b, slopes, plan, w_scale, from_end, prec):
    """[NSEG, H, D, E] fp32 segment contributions."""
    H, D, E = plan.H, plan.D, plan.E
    dev = a.device
    out = torch.empty(plan.NSEG, H, D, E, dtype=torch.float32, device=dev)
    if plan.NSEG == 0:
        return out
    BD, BE = _blocks_state(D, E)
    grid = (plan.NSEG * H * _cdiv(D, BD) * _cdiv(E, BE),)
    d = _dummy(dev)
    _call(
        _seg_state_kernel, grid,
        a, b, slopes, out, plan.cu if plan.is_varlen else d, plan.segseq if plan.is_varlen else d,
        plan.segstart if plan.is_varlen else d,
        plan.T, H, D, E, plan.NS, plan.SEG_T, float(w_scale),
        BT=CHUNK, BD=BD, BE=BE, FROM_END=from_end, IS_VARLEN=plan.is_varlen, PREC=prec, UP=_up(a),
        STATE=_state_mode(a.dtype),
        **_launch("seg", D, E),
    )
    return out


def _scan(buf, init, slopes, plan, reverse, store_fin):
    H, D, E = plan.H, plan.D, plan.E
    dev = buf.device
    fin = torch.empty(plan.N, H, D, E, dtype=torch.float32, device=dev) if store_fin else None
    BD, BE = _blocks_state(D, E, "scan")
    grid = (plan.N * H * _cdiv(D, BD) * _cdiv(E, BE),)
    d = _dummy(dev)
    _call(
        _scan_kernel, grid,
        buf, init if init is not None else d, fin if fin is not None else d, slopes,
        plan.cu if plan.is_varlen else d, plan.segoff if plan.is_varlen else d,
        plan.T, H, D, E, plan.NS, plan.SEG_T,
        BD=BD, BE=BE, REVERSE=reverse, HAS_INIT=init is not None, STORE_FIN=store_fin,
        IS_VARLEN=plan.is_varlen, **_launch("scan", D, E),
    )
    return fin


def _seg_args(plan, dev):
    d = _dummy(dev)
    if plan.is_varlen:
        return plan.cu, plan.segseq, plan.segstart
    return d, d, d


def lightning_attn_fwd(q, k, v, slopes, scale, h0, plan):
    """Returns o, ht [N, H, D, E] fp32, hbuf (state entering each segment, for the backward)."""
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    prec = _prec(q.dtype)
    state_mode = _state_mode(q.dtype)
    hbuf = _seg_states(k, v, slopes, plan, 1.0, True, prec)
    ht = _scan(hbuf, h0, slopes, plan, reverse=False, store_fin=True)
    o = _new(v.shape, q.dtype, dev)
    if plan.NSEG > 0:
        BD = _p2(D)
        BE = _blk("fwd", E, D)
        grid = (plan.NSEG * H * _cdiv(E, BE),)
        _call(
            _fwd_out_kernel, grid,
            q, k, v, o, hbuf, slopes, *_seg_args(plan, dev),
            float(scale), plan.T, H, D, E, plan.NS, plan.SEG_T,
            BT=CHUNK, BD=BD, BE=BE, IS_VARLEN=plan.is_varlen, STATE=state_mode, PREC=prec, UP=_up(q),
            **_launch("fwd", D, E),
        )
    return o, ht, hbuf


def lightning_attn_bwd(q, k, v, do, dht, slopes, scale, h0_given, hbuf, plan, compute_dg):
    """Returns dq, dk, dv, dh0 (or None), dG [B*T, H] fp32 (or None).

    Fused path (dk in the dv kernel): dq walk (+ backward segment states) -> reverse scan -> dk/dv walk.
    Unfused: segment states of (q, do) -> reverse scan -> dq/dk walks -> dv walk.
    """
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    prec = _prec(q.dtype)
    state_mode = _state_mode(q.dtype)
    dq = _new(q.shape, q.dtype, dev)
    dk = _new(k.shape, k.dtype, dev)
    dv = _new(v.shape, v.dtype, dev)
    ntok = q.shape[0] * q.shape[1]
    if plan.NSEG == 0:
        gbuf = torch.empty(0, H, D, E, dtype=torch.float32, device=dev)
        dh0 = _scan(gbuf, dht, slopes, plan, reverse=True, store_fin=h0_given)
        dG = torch.zeros(ntok, H, dtype=torch.float32, device=dev) if compute_dg else None
        return dq, dk, dv, dh0, dG
    BE = _p2(E)
    BDq = _blk("dqdk", D, E)
    NDB = _cdiv(D, BDq)
    BD = _p2(D)
    BEv = _blk("dv", E, D)
    kind_v = "dv"
    # dk in the dv kernel's reverse walk when one E block covers E (CONFIG["fuse_dkdv"])
    fuse = _fuse_dkdv(D, E)
    if fuse and BEv < E:
        if _p2(E) <= CONFIG["dv_fused"]["BLK"] and _p2(D) * _p2(E) <= 128 * 128:
            BEv, kind_v = _p2(E), "dv_fused"
        else:
            fuse = False
    # the dq walk also sums the backward segment states when it runs before the scan (fused path)
    g_in_dq = fuse and bool(CONFIG["dq_gstate"])
    if compute_dg:
        dgq = torch.empty(NDB, ntok, H, dtype=torch.float32, device=dev)
        dgk = torch.empty(1 if fuse else NDB, ntok, H, dtype=torch.float32, device=dev)
    else:
        dgq = dgk = _dummy(dev)

    def dq_walk(gbuf):
        _call(
            _bwd_dqdk_kernel, (plan.NSEG * H * NDB,),
            q, k, v, do, dq, dk, hbuf, gbuf, dgq, dgk, slopes, *_seg_args(plan, dev),
            float(scale), plan.T, H, D, E, plan.NS, plan.SEG_T, ntok,
            BT=CHUNK, BD=BDq, BE=BE, IS_VARLEN=plan.is_varlen, STATE=state_mode, PREC=prec, UP=_up(q),
            COMPUTE_DG=compute_dg, DO_DK=not fuse, STORE_G=g_in_dq, **_launch("dqdk", D, E),
        )

    if g_in_dq:
        gbuf = torch.empty(plan.NSEG, H, D, E, dtype=torch.float32, device=dev)
        dq_walk(gbuf)
        dh0 = _scan(gbuf, dht, slopes, plan, reverse=True, store_fin=h0_given)
    else:
        gbuf = _seg_states(q, do, slopes, plan, scale, False, prec)
        dh0 = _scan(gbuf, dht, slopes, plan, reverse=True, store_fin=h0_given)
        dq_walk(gbuf)
    _call(
        _bwd_dv_kernel, (plan.NSEG * H * _cdiv(E, BEv),),
        q, k, v, do, dv, dk, dgk, gbuf, slopes, *_seg_args(plan, dev),
        float(scale), plan.T, H, D, E, plan.NS, plan.SEG_T,
        BT=CHUNK, BD=BD, BE=BEv, IS_VARLEN=plan.is_varlen, STATE=state_mode, PREC=prec, UP=_up(q),
        DO_DK=fuse, COMPUTE_DG=compute_dg, **_launch(kind_v, D, E),
    )
    dG = dgq.sum(0) - dgk.sum(0) if compute_dg else None
    return dq, dk, dv, dh0, dG


# ---- look-back walks (CONFIG["lookback"]): the forward ("fwd", default), or every output (True)


def _lb_walk(a, b, c, out, slopes, plan, kind, reverse, init, trans_init, fin, alpha, gamma, beta, sync,
             x=None, g=None, sbuf=None):
    """Launch _lb_walk_kernel: out = LA(a, b, c) (see its docstring); sync: zeroed int32 [1 + 2 * lanes]."""
    H = plan.H
    DA, DC = a.shape[-1], c.shape[-1]
    dev = a.device
    pf_t, NP, tab, n_pos, _ = plan.lb_layout(dev)
    BK = _p2(DA)
    BC = _blk(kind, DC, DA)
    NCB = _cdiv(DC, BC)
    lanes = plan.N * H * NCB
    chain = torch.empty(2 * lanes * BK * BC, dtype=torch.float32, device=dev)
    d = _dummy(dev)
    _call(
        _lb_walk_kernel, (n_pos * H * NCB,),
        a, b, c, out, x if x is not None else d, g if g is not None else d,
        init if init is not None else d, fin if fin is not None else d, chain, sync, slopes,
        plan.cu if plan.is_varlen else d, tab if tab is not None else d,
        sbuf if sbuf is not None else d, plan.segoff if (plan.is_varlen and sbuf is not None) else d,
        float(alpha), float(gamma), float(beta), plan.T, H, DA, DC, plan.N, NP, pf_t, a.shape[0] * a.shape[1],
        BT=CHUNK, BK=BK, BC=BC, REVERSE=reverse, TRANS_INIT=trans_init, HAS_INIT=init is not None,
        STORE_FIN=fin is not None, STORE_SBUF=sbuf is not None, COMPUTE_DG=g is not None, IS_VARLEN=plan.is_varlen,
        STATE=_state_mode(a.dtype), PREC=_prec(a.dtype), UP=_up(a), **_launch(kind, DA, DC),
    )


def _lb_lanes(plan, kind, DA, DC) -> int:
    return plan.N * plan.H * _cdiv(DC, _blk(kind, DC, DA))


def _fill_empty(fin, init, empty):
    """Final state of empty sequences = their initial state (or 0)."""
    if empty is not None and fin is not None:
        fin[empty] = init[empty] if init is not None else 0.0


def lightning_attn_fwd_lb(q, k, v, slopes, scale, h0, plan, store_states=False):
    """Look-back forward: returns o, ht [N, H, D, E] fp32 and, with store_states (plan.lb_chunks must
    equal plan.seg_chunks), hbuf [NSEG, H, D, E] fp32: the state entering each segment (else None)."""
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    o = _new(v.shape, q.dtype, dev)
    ht = torch.empty(plan.N, H, D, E, dtype=torch.float32, device=dev)
    hbuf = None
    if store_states:
        assert plan.lb_chunks == plan.seg_chunks, "segment states need look-back segments = scan segments"
        hbuf = torch.empty(plan.NSEG, H, D, E, dtype=torch.float32, device=dev)
    _, _, _, n_pos, empty = plan.lb_layout(dev)
    if n_pos > 0:
        sync = torch.zeros(1 + 2 * _lb_lanes(plan, "fwd", D, E), dtype=torch.int32, device=dev)
        _lb_walk(q, k, v, o, slopes, plan, "fwd", False, h0, False, ht, scale, scale, 1.0, sync, sbuf=hbuf)
    _fill_empty(ht, h0, empty)
    return o, ht, hbuf


def lightning_attn_bwd_lb(q, k, v, do, dht, slopes, scale, h0, plan, compute_dg):
    """Look-back backward: dq = LA(do, v, k), dk = LA_rev(v, do, q), dv = LA_rev(k, q, do).

    Returns dq, dk, dv, dh0 (or None), dG [B*T, H] fp32 (or None)."""
    H, D, E = plan.H, plan.D, plan.E
    dev = q.device
    dq = _new(q.shape, q.dtype, dev)
    dk = _new(k.shape, k.dtype, dev)
    dv = _new(v.shape, v.dtype, dev)
    dh0 = torch.empty(plan.N, H, D, E, dtype=torch.float32, device=dev) if h0 is not None else None
    ntok = q.shape[0] * q.shape[1]
    _, _, _, n_pos, empty = plan.lb_layout(dev)
    dG = None
    if n_pos == 0:
        _fill_empty(dh0, dht, empty)
        if compute_dg:
            dG = torch.zeros(ntok, H, dtype=torch.float32, device=dev)
        return dq, dk, dv, dh0, dG
    nq = _cdiv(D, _blk("dqdk", D, E))
    if compute_dg:
        dgq = torch.empty(nq, ntok, H, dtype=torch.float32, device=dev)
        dgk = torch.empty(nq, ntok, H, dtype=torch.float32, device=dev)
    else:
        dgq = dgk = None
    lq = lk = _lb_lanes(plan, "dqdk", E, D)  # dq and dk: value dim D in "dqdk" blocks, key dim E
    lv = _lb_lanes(plan, "dv", D, E)
    sync = torch.zeros(3 + 2 * (lq + lk + lv), dtype=torch.int32, device=dev)
    s_q, s_k, s_v = sync[: 1 + 2 * lq], sync[1 + 2 * lq: 2 + 2 * (lq + lk)], sync[2 + 2 * (lq + lk):]
    _lb_walk(do, v, k, dq, slopes, plan, "dqdk", False, h0, True, None, scale, scale, 1.0, s_q, x=q, g=dgq)
    _lb_walk(v, do, q, dk, slopes, plan, "dqdk", True, dht, True, None, scale, 1.0, scale, s_k, x=k, g=dgk)
    _lb_walk(k, q, do, dv, slopes, plan, "dv", True, dht, False, dh0, scale, 1.0, scale, s_v)
    _fill_empty(dh0, dht, empty)
    if compute_dg:
        dG = dgq.sum(0) - dgk.sum(0)
    return dq, dk, dv, dh0, dG

def _on(device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, initial_state, cu_seqlens, seg_chunks):
        B, T, H, D = q.shape
        E = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        s = slopes.detach().float().contiguous()
        h0 = initial_state.detach().float().contiguous() if initial_state is not None else None
        plan = get_plan(B, T, H, D, E, cu_seqlens, q.device, seg_chunks)
        mode = CONFIG["lookback"]
        if mode not in (True, False, "fwd"):
            raise ValueError(f'CONFIG["lookback"] must be True, False or "fwd", got {mode!r}')
        ctx.lookback = mode is True  # look-back backward too
        with _on(q.device):
            if mode is True:
                o, ht, _ = lightning_attn_fwd_lb(q, k, v, s, scale, h0, plan)
                hbuf = h0  # the backward recomputes the states; it needs h0 for dq
            elif mode == "fwd":
                o, ht, hbuf = lightning_attn_fwd_lb(q, k, v, s, scale, h0, plan, store_states=True)
            else:
                o, ht, hbuf = lightning_attn_fwd(q, k, v, s, scale, h0, plan)
        ctx.save_for_backward(q, k, v, s, hbuf, ht)
        ctx.plan = plan
        ctx.scale = scale
        ctx.h0_given = initial_state is not None
        ctx.h0_dtype = initial_state.dtype if initial_state is not None else None
        ctx.slopes_dtype = slopes.dtype
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, s, hbuf, ht = ctx.saved_tensors
        plan = ctx.plan
        compute_dg = ctx.needs_input_grad[3]
        if do is None:
            do = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        do = do.contiguous()
        dht_f = dht.float().contiguous() if dht is not None else None
        with _on(q.device):
            if ctx.lookback:
                dq, dk, dv, dh0, dG = lightning_attn_bwd_lb(q, k, v, do, dht_f, s, ctx.scale, hbuf, plan, compute_dg)
            else:
                dq, dk, dv, dh0, dG = lightning_attn_bwd(
                    q, k, v, do, dht_f, s, ctx.scale, ctx.h0_given, hbuf, plan, compute_dg
                )
        dslopes = None
        if compute_dg:
            w = plan.t_local(q.device) + 1.0  # [B*T]
            ds = -(w[:, None] * dG).sum(0)
            if dht_f is not None:
                lens = plan.lens_t(q.device)
                ds = ds - (lens[:, None] * (dht_f * ht).sum((-1, -2))).sum(0)
            dslopes = ds.to(ctx.slopes_dtype)
        if dh0 is not None:
            dh0 = dh0.to(ctx.h0_dtype)
        return dq, dk, dv, dslopes, None, dh0, None, None


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


def chunk_lightning_attn_grads(q, k, v, slopes, scale, initial_state, cu_seqlens, do, dht, seg_chunks=None):
    """Forward then backward of the kernels without autograd: (dq, dk, dv, dslopes, dh0 or None).

    Shapes as in :func:`chunk_lightning_attn`; do [B, T, H, E], dht [N, H, D, E] (or None)."""
    ctx = _Ctx((True, True, True, True, False, initial_state is not None, False, False))
    LightningAttnFunction.forward(ctx, q, k, v, slopes, float(scale), initial_state, cu_seqlens, seg_chunks)
    dq, dk, dv, ds, _, dh0, _, _ = LightningAttnFunction.backward(ctx, do, dht)
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
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Triton Lightning Attention-2 (inputs validated by :func:`lightning_attn`).

    q, k: [B, T, H, D]; v: [B, T, H, E]; slopes [H]; initial_state [N, H, D, E].
    Returns o [B, T, H, E] (input dtype) and ht [N, H, D, E] fp32 (or None).
    seg_chunks: chunks of 64 tokens per segment (None: chosen from the size and the GPU).
    """
    o, ht = LightningAttnFunction.apply(q, k, v, slopes, float(scale), initial_state, cu_seqlens, seg_chunks)
    return o, (ht if output_final_state else None)
