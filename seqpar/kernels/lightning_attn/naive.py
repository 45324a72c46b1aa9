"""Reference implementations of Lightning Attention (pure torch, slow, exact).

Math (per batch b and head h, lambda = exp(-slope_h)):

    S_t = lambda * S_{t-1} + k_t^T v_t        (S_{-1} = h0, zero when not given)
    o_t = scale * q_t S_t
    ht  = S_{T-1}

These are the definitions every other backend is tested against (in float64).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def _split_docs(cu_seqlens: Optional[torch.Tensor], B: int, T: int):
    """Yield (batch index, start, end, state index) for every independent sequence."""
    if cu_seqlens is None:
        for b in range(B):
            yield b, 0, T, b
    else:
        cu = cu_seqlens.tolist()
        for n in range(len(cu) - 1):
            yield 0, cu[n], cu[n + 1], n


def naive_recurrent_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-by-token recurrence, computed in the dtype of q.

    q, k: [B, T, H, D]; v: [B, T, H, E]; slopes: [H]; initial_state: [N, H, D, E]
    (N = B, or the number of documents with cu_seqlens). Returns o [B, T, H, E] and
    ht [N, H, D, E] (or None).
    """
    B, T, H, D = q.shape
    E = v.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    dtype = q.dtype
    lam = torch.exp(-slopes.to(dtype))[:, None, None]  # [H, 1, 1]
    o = torch.zeros(B, T, H, E, dtype=dtype, device=q.device)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    states = []
    for b, start, end, n in _split_docs(cu_seqlens, B, T):
        S = torch.zeros(H, D, E, dtype=dtype, device=q.device)
        if initial_state is not None:
            S = S + initial_state[n].to(dtype)
        rows = []
        for t in range(start, end):
            S = lam * S + k[b, t, :, :, None].to(dtype) * v[b, t, :, None, :].to(dtype)
            rows.append(scale * torch.einsum("hd,hde->he", q[b, t].to(dtype), S))
        if rows:
            o[b, start:end] = torch.stack(rows, 0)
        states.append(S)
    ht = torch.stack(states, 0) if output_final_state else None
    assert ht is None or ht.shape[0] == N
    return o, ht


def naive_quadratic_lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Masked quadratic ("attention") form, differentiable by autograd, in the dtype of q
    (decay weights formed in fp32 at least, then rounded to that dtype).

    o_t = scale * (lambda^(t+1) q_t h0 + sum_{j<=t} lambda^(t-j) (q_t . k_j) v_j).
    Shapes as in :func:`naive_recurrent_lightning_attn`. O(T^2) memory: small T only.
    """
    B, T, H, D = q.shape
    E = v.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    dtype = q.dtype
    # decay weights: positions and exponents in fp32 at least (bf16 holds integers exactly only up to
    # 256), then rounded to the compute dtype like every other operand
    wdtype = torch.promote_types(dtype, torch.float32)
    s = slopes.to(wdtype)
    outs = []
    states = []
    for b, start, end, n in _split_docs(cu_seqlens, B, T):
        L = end - start
        qb, kb, vb = (x[b, start:end].to(dtype) for x in (q, k, v))  # [L, H, *]
        pos = torch.arange(L, device=q.device, dtype=wdtype)
        diff = pos[:, None] - pos[None, :]  # [L, L]: t - j
        causal = diff >= 0
        expo = torch.where(causal, diff, torch.zeros_like(diff))
        decay = torch.where(causal[None], torch.exp(-s[:, None, None] * expo[None]), torch.zeros((), dtype=wdtype, device=q.device))
        scores = torch.einsum("thd,jhd->htj", qb, kb) * decay.to(dtype)
        ob = scale * torch.einsum("htj,jhe->the", scores, vb)
        wq = torch.exp(-s[None, :] * (pos[:, None] + 1)).to(dtype)  # [L, H]: lambda^(t+1)
        wk = torch.exp(-s[None, :] * (L - 1 - pos[:, None])).to(dtype)  # [L, H]: lambda^(L-1-j)
        ht = torch.einsum("jhd,jhe->hde", kb * wk[..., None], vb)
        if initial_state is not None:
            h0 = initial_state[n].to(dtype)
            ob = ob + scale * torch.einsum("thd,hde->the", qb * wq[..., None], h0)
            ht = ht + torch.exp(-s * L).to(dtype)[:, None, None] * h0
        outs.append((b, start, end, ob))
        states.append(ht)
    o = torch.zeros(B, T, H, E, dtype=dtype, device=q.device)
    o = o.clone()
    pieces = {}
    for b, start, end, ob in outs:
        pieces.setdefault(b, []).append(ob)
    rows = [torch.cat(pieces[b], 0) if b in pieces else o[b] for b in range(B)]
    o = torch.stack(rows, 0)
    return o, (torch.stack(states, 0) if output_final_state else None)
