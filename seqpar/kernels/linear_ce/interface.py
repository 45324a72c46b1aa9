"""``linear_cross_entropy``: summed cross entropy of ``h @ weight^T`` computed chunk by chunk.

Per chunk of ``chunk_tokens`` rows the logits are formed in the compute dtype, one pass turns them into the
row losses and (in place) into their gradient ``softmax - onehot``, and the two gradient GEMMs run at once:
``dh = dlogits @ weight`` and ``dweight += dlogits^T @ h``. Nothing of size [N, V] outlives the chunk, the
head's GEMM is not recomputed in the backward, and no fp32 copy of the logits is made. The backward only
scales the stored ``dh`` / ``dweight`` by the incoming scalar gradient.

Compute dtype: the autocast dtype when autocast is on for the inputs' device, else the inputs' dtype.
The row pass is the Triton kernel of :mod:`.triton_ce` on CUDA (or on CPU tensors under
``TRITON_INTERPRET=1`` with ``backend="triton"``) and the same math in torch otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["linear_cross_entropy"]

_BACKENDS = (None, "triton", "torch")


def _ce_fwd_bwd_torch_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Torch version of the Triton row pass: row losses [n] fp32; logits overwritten with their gradient."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(acc)
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    loss = (lse - x.gather(1, safe[:, None])[:, 0]) * valid
    g = torch.exp(x - lse[:, None])
    g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
    g *= valid[:, None]
    logits.copy_(g)
    return loss.to(acc)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index, chunk_tokens, backend, cdtype, grad_enabled):
        N, d = h.shape
        # no gradient GEMMs under no_grad (needs_input_grad only reflects requires_grad)
        need_dh, need_dw = (grad_enabled and ctx.needs_input_grad[0]), (grad_enabled and ctx.needs_input_grad[1])
        w = weight.to(cdtype)
        acc = torch.float64 if cdtype == torch.float64 else torch.float32
        total = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        use_triton = backend == "triton" or (backend is None and h.is_cuda)
        if use_triton:
            from .triton_ce import ce_fwd_bwd_
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, N, chunk_tokens):
                hc = h[s : s + chunk_tokens].to(cdtype)
                lc = labels[s : s + chunk_tokens]
                logits = hc @ w.t()
                if use_triton:
                    rows = ce_fwd_bwd_(logits, lc, ignore_index)
                else:
                    rows = _ce_fwd_bwd_torch_(logits, lc, ignore_index)
                total += rows.sum().to(acc)
                if need_dh:
                    dh[s : s + chunk_tokens] = logits @ w
                if need_dw:
                    dw += (logits.t() @ hc).to(acc)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        dh, dw = ctx.saved_tensors
        gh = (dh * g.to(dh.dtype)) if dh is not None else None
        gw = (dw * g.to(dw.dtype)).to(ctx.weight_dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         chunk_tokens: int = 8192, backend: Optional[str] = None) -> torch.Tensor:
    """Summed cross entropy of ``h @ weight^T`` over rows whose label is not ``ignore_index``.

    Args:
        h: [N, d] hidden states (any float dtype). weight: [V, d] (the LM head, no bias).
        labels: [N] int targets in ``[0, V)`` or ``ignore_index``.
        chunk_tokens: rows per chunk (bounds the [chunk, V] logits buffer).
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, torch otherwise).
    Returns:
        scalar fp32 (fp64 for fp64 inputs) sum of the row losses, differentiable w.r.t. h and weight.
    """
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a 2-D tensor [N, d], got {getattr(h, 'shape', type(h).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be [V, d={h.shape[1]}], got {tuple(getattr(weight, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != h.shape[:1]:
        raise ValueError(f"labels must be [N={h.shape[0]}], got {tuple(getattr(labels, 'shape', ()))}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton" and not h.is_cuda and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if h.device != weight.device or h.device != labels.device:
        raise ValueError(f"h, weight and labels must be on one device, got {h.device}, {weight.device}, {labels.device}")
    cdtype = _compute_dtype(h, weight)
    return _LinearCE.apply(h, weight, labels.contiguous(), int(ignore_index), chunk_tokens, backend, cdtype,
                          torch.is_grad_enabled())
