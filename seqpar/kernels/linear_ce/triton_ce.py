"""Triton row kernel: per row of logits, the cross-entropy loss and, in place, its gradient.

For a row x [V] with label y: loss = logsumexp(x) - x[y]; dx = softmax(x) - onehot(y). Rows whose label is
``ignore_index`` get loss 0 and dx 0. Two passes over the row (online max / sum of exponentials, then the
gradient), fp32 arithmetic, the gradient written over x in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_fwd_bwd_kernel(x_ptr, stride_x, labels_ptr, loss_ptr, V, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    if y == ignore_index:
        for start in range(0, V, BLOCK):
            c = start + cols
            tl.store(x_row + c, tl.zeros([BLOCK], dtype=tl.float32).to(x_ptr.dtype.element_ty), mask=c < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # lanes that saw only masked columns keep m = -inf: shift by 0 there (exp(-inf) = 0, no inf - inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
            m = m_new
        m_row = tl.max(m, 0)
        s_row = tl.sum(s * tl.exp(m - m_row), 0)
        lse = m_row + tl.log(s_row)
        x_y = tl.load(x_row + y).to(tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(c == y, 1.0, 0.0)
            tl.store(x_row + c, g.to(x_ptr.dtype.element_ty), mask=c < V)
        tl.store(loss_ptr + row, lse - x_y)


def ce_fwd_bwd_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Row losses [n] fp32 of logits [n, V]; overwrites logits with d(sum of losses)/d(logits)."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous in the vocabulary dimension")
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    BLOCK = min(4096, triton.next_power_of_2(V))
    _ce_fwd_bwd_kernel[(n,)](logits, logits.stride(0), labels, loss, V, ignore_index, BLOCK=BLOCK, num_warps=8)
    return loss
