"""Chunked Lightning Attention-2 in pure torch: the CPU path (differentiable by autograd).

The sequence is cut into chunks of ``chunk_size`` tokens. Inside a chunk the output is the
masked, decayed attention form; across chunks it flows through the running state
``S_{c+1} = lambda^C S_c + sum_j lambda^(C-1-j) k_j^T v_j``. Cost O(T C D + T D E); the only
sequential part is the scan over T/C chunk states. Gradients (q, k, v, initial_state, slopes)
come from autograd.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import varlen

DEFAULT_CHUNK_SIZE = 64


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(q, k, v, s, scale, h0, C):
    """Process n full chunks of length C.

    q, k: [B, H, n, C, D]; v: [B, H, n, C, E]; s: [H] slopes; h0: [B, H, D, E] or None.
    Returns o [B, H, n, C, E] and the final state [B, H, D, E].
    """
    B, H, n, _, D = q.shape
    E = v.shape[-1]
    pos = torch.arange(C, device=q.device, dtype=q.dtype)
    diff = pos[:, None] - pos[None, :]
    causal = diff >= 0
    sH = s[:, None, None]
    # lambda^(i-j) on and below the diagonal, exactly 0 above (exponent masked before exp).
    decay = torch.exp(-sH * torch.where(causal, diff, torch.zeros_like(diff)))
    decay = decay * causal.to(q.dtype)  # [H, C, C]
    wq = torch.exp(-sH * (pos[None, :, None] + 1))  # [H, C, 1]: lambda^(i+1)
    wk = torch.exp(-sH * (C - 1 - pos[None, :, None]))  # [H, C, 1]: lambda^(C-1-j)

    scores = torch.matmul(q, k.transpose(-1, -2)) * decay[None, :, None]
    o = torch.matmul(scores, v)  # intra-chunk
    kv = torch.matmul((k * wk[None, :, None]).transpose(-1, -2), v)  # [B, H, n, D, E]

    h0 = h0 if h0 is not None else torch.zeros(B, H, D, E, dtype=q.dtype, device=q.device)
    S_in, S = _scan_states(kv, s * C, h0)
    o = o + torch.matmul(q * wq[None, :, None], S_in)  # inter-chunk
    return o * scale, S


def _scan_states(kv, log_a, h0, block=32):
    """States entering each chunk: S_0 = h0, S_{c+1} = a S_c + kv_c, with a = exp(-log_a) per head.

    kv: [B, H, n, D, E]; log_a: [H]; h0: [B, H, D, E]. Returns S_in [B, H, n, D, E] and S_n.
    Two levels so the sequential part is n / block steps: inside a block of chunks the prefix is a
    decay-weighted matmul, across blocks a short loop carries the state.
    """
    B, H, n, D, E = kv.shape
    m = min(block, n)
    nb = -(-n // m)
    pad = nb * m - n
    if pad:
        kv = torch.cat([kv, kv.new_zeros(B, H, pad, D, E)], 2)
    idx = torch.arange(m, device=kv.device, dtype=kv.dtype)
    diff = idx[:, None] - 1 - idx[None, :]  # i - 1 - j
    strict = diff >= 0
    W = torch.exp(-log_a[:, None, None] * torch.where(strict, diff, torch.zeros_like(diff))) * strict
    kvb = kv.reshape(B, H, nb, m, D * E)
    P = torch.matmul(W[None, :, None], kvb)  # [B, H, nb, m, D*E]: prefix inside each block
    total = torch.exp(-log_a[:, None] * (m - 1 - idx[None, :]))  # [H, m]: a^(m-1-j)
    tot = torch.einsum("hj,bhnjx->bhnx", total, kvb)  # [B, H, nb, D*E]: block contribution
    am = torch.exp(-log_a * m)[None, :, None]  # [1, H, 1]
    S = h0.reshape(B, H, D * E)
    carry = []
    for b in range(nb):
        carry.append(S)
        S = am * S + tot[:, :, b]
    Cin = torch.stack(carry, 2)  # [B, H, nb, D*E]: state entering each block
    ai = torch.exp(-log_a[:, None] * idx[None, :])  # [H, m]: a^i
    S_in = ai[None, :, None, :, None] * Cin[:, :, :, None] + P
    S_in = S_in.reshape(B, H, nb * m, D, E)[:, :, :n]
    # the final state is exact from the carried blocks only when no padding was added
    if pad:
        last = S_in[:, :, n - 1]
        S_fin = torch.exp(-log_a)[None, :, None, None] * last + kv[:, :, n - 1]
    else:
        S_fin = S.reshape(B, H, D, E)
    return S_in, S_fin


def _dense(q, k, v, s, scale, h0, chunk_size):
    """q, k [B, T, H, D] (acc dtype) -> o [B, T, H, E], ht [B, H, D, E]."""
    B, T, H, D = q.shape
    E = v.shape[-1]
    q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, *]
    n_full, tail = divmod(T, chunk_size)
    outs = []
    S = h0
    if n_full:
        Tf = n_full * chunk_size
        qf = q[:, :, :Tf].reshape(B, H, n_full, chunk_size, D)
        kf = k[:, :, :Tf].reshape(B, H, n_full, chunk_size, D)
        vf = v[:, :, :Tf].reshape(B, H, n_full, chunk_size, E)
        of, S = _chunks(qf, kf, vf, s, scale, S, chunk_size)
        outs.append(of.reshape(B, H, Tf, E))
    if tail:
        qt, kt, vt = (x[:, :, T - tail:].unsqueeze(2) for x in (q, k, v))
        ot, S = _chunks(qt, kt, vt, s, scale, S, tail)
        outs.append(ot.reshape(B, H, tail, E))
    if S is None:  # T == 0
        S = torch.zeros(B, H, D, E, dtype=q.dtype, device=q.device)
    o = torch.cat(outs, 2) if outs else q.new_zeros(B, H, 0, E)
    return o.permute(0, 2, 1, 3), S


def torch_chunk_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunked torch forward (autograd gives the backward). Inputs are assumed validated.

    q, k: [B, T, H, D]; v: [B, T, H, E]; slopes: [H]; initial_state: [N, H, D, E].
    Returns o [B, T, H, E] in q's dtype and ht [N, H, D, E] or None. The state is kept in the
    accumulation dtype: fp32 for fp16 / bf16 / fp32 inputs, fp64 for fp64 inputs (so that fp64 runs
    stay an fp64 reference end to end; the Triton backend takes no fp64).
    """
    in_dtype = q.dtype
    acc = _acc_dtype(in_dtype)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    s = slopes.to(acc)
    h0 = initial_state.to(acc) if initial_state is not None else None
    if cu_seqlens is None:
        o, ht = _dense(qa, ka, va, s, scale, h0, chunk_size)
    else:
        bounds = varlen.offsets(cu_seqlens)
        outs, states = [], []
        for n in range(len(bounds) - 1):
            a, b = bounds[n], bounds[n + 1]
            h0n = h0[n : n + 1] if h0 is not None else None
            on, hn = _dense(qa[:, a:b], ka[:, a:b], va[:, a:b], s, scale, h0n, chunk_size)
            outs.append(on)
            states.append(hn)
        o = torch.cat(outs, 1)
        ht = torch.cat(states, 0)
    if q.shape[1] == 0:
        # no token: o and ht do not depend on q, k, v, slopes; a zero term keeps them in the graph so that
        # their gradients are zeros (as the Triton backend returns), not None
        zero = (qa.sum() + ka.sum() + va.sum() + s.sum()) * 0
        o, ht = o + zero, ht + zero
    return o.to(in_dtype), (ht if output_final_state else None)
