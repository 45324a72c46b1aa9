"""``linear_cross_entropy``: summed cross entropy of ``h @ weight^T`` computed chunk by chunk.

Per chunk of ``chunk_tokens`` rows the logits are formed in the compute dtype, one pass turns them into the
row losses and (in place) into their gradient ``softmax - onehot``, and the two gradient GEMMs run at once:
``dh = dlogits @ weight`` (written into its rows of dh) and ``dweight += dlogits^T @ h``. On CUDA with bf16 /
fp16 compute the second GEMM accumulates into the fp32 ``dweight`` itself (aten's ``addmm`` with an fp32
``out_dtype``), so no bf16 partial product, fp32 copy of it or separate add is made. Nothing of size [N, V]
outlives the chunk, the head's GEMM is not recomputed in the backward, and no fp32 copy of the logits is made.
The backward only scales the stored ``dh`` / ``dweight`` by the incoming scalar gradient.

Compute dtype: the autocast dtype when autocast is on for the inputs' device, else the inputs' dtype.
The row pass is the Triton kernel of :mod:`.triton_ce` on CUDA (or on CPU tensors under
``TRITON_INTERPRET=1`` with ``backend="triton"``) and the same math in torch otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


_FP32_ACC_MM = {}


def _fp32_accumulating_mm(device: torch.device, cdtype: torch.dtype) -> bool:
    """Whether ``aten::addmm.dtype_out`` (a ``cdtype`` GEMM accumulating into an fp32 C in place) runs here:
    CUDA with bf16 / fp16 compute, probed once per device."""
    if device.type != "cuda" or cdtype not in (torch.bfloat16, torch.float16):
        return False
    key = (device.index, cdtype)
    if key not in _FP32_ACC_MM:
        try:
            a = torch.zeros(16, 16, device=device, dtype=cdtype)
            c = torch.zeros(16, 16, device=device, dtype=torch.float32)
            torch.ops.aten.addmm.dtype_out(c, a, a, torch.float32, out=c)
            _FP32_ACC_MM[key] = True
        except (AttributeError, NotImplementedError, RuntimeError):
            _FP32_ACC_MM[key] = False
    return _FP32_ACC_MM[key]


def _linear_ce(h, weight, labels, ignore_index, chunk_tokens, backend, cdtype, need_dh, need_dw):
    """Loss sum and the stored gradients (dh [N, d] in h's dtype, dw [V, d] fp32/fp64; empty [0] when not
    needed) of the chunked head."""
    N, d = h.shape
    w = weight.to(cdtype)
    acc = torch.float64 if cdtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty_like(h) if need_dh else h.new_empty(0)
    fp32_mm = acc == torch.float32 and _fp32_accumulating_mm(h.device, cdtype)
    fused_dw = need_dw and N > 0 and fp32_mm
    dh_out = need_dh and (dh.dtype == cdtype or (dh.dtype == torch.float32 and fp32_mm))  # GEMM writes dh's rows
    if not need_dw:
        dw = weight.new_empty(0, dtype=acc)
    else:  # the fused path's first chunk overwrites dw
        dw = (torch.empty if fused_dw else torch.zeros)(weight.shape, dtype=acc, device=weight.device)
    use_triton = backend == "triton" or (backend == "auto" and h.is_cuda)
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
            if dh_out and dh.dtype == cdtype:  # into dh's rows (contiguous): no copy
                torch.mm(logits, w, out=dh[s : s + chunk_tokens])
            elif dh_out:
                torch.ops.aten.mm.dtype_out(logits, w, torch.float32, out=dh[s : s + chunk_tokens])
            elif need_dh:
                dh[s : s + chunk_tokens] = logits @ w
            if fused_dw and s == 0:
                torch.ops.aten.mm.dtype_out(logits.t(), hc, acc, out=dw)
            elif fused_dw:
                torch.ops.aten.addmm.dtype_out(dw, logits.t(), hc, acc, out=dw)
            elif need_dw:
                dw += (logits.t() @ hc).to(acc)
    return total, dh, dw


# A torch.library custom op (with a fake implementation), so torch.compile traces the head without a
# graph break; the chunk loop and the Triton row pass run inside it.
@torch.library.custom_op("seqpar::linear_ce", mutates_args=())
def linear_ce_op(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_tokens: int,
                 backend: str, cdtype: torch.dtype, need_dh: bool, need_dw: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss sum [] fp32/fp64, dh [N, d] or [0], dw [V, d] fp32/fp64 or [0]); inputs validated."""
    with torch.no_grad():
        return _linear_ce(h, weight, labels, ignore_index, chunk_tokens, backend, cdtype, need_dh, need_dw)


@linear_ce_op.register_fake
def _(h, weight, labels, ignore_index, chunk_tokens, backend, cdtype, need_dh, need_dw):
    acc = torch.float64 if cdtype == torch.float64 else torch.float32
    dh = h.new_empty(h.shape) if need_dh else h.new_empty(0)
    dw = weight.new_empty(weight.shape, dtype=acc) if need_dw else weight.new_empty(0, dtype=acc)
    return h.new_empty((), dtype=acc), dh, dw


def _setup_context(ctx, inputs, output):
    _, dh, dw = output
    ctx.save_for_backward(dh, dw)
    ctx.weight_dtype = inputs[1].dtype
    ctx.need_dh, ctx.need_dw = inputs[7], inputs[8]


def _backward(ctx, g, _gdh, _gdw):
    dh, dw = ctx.saved_tensors
    gh = dh * g.to(dh.dtype) if ctx.need_dh else None
    gw = (dw * g.to(dw.dtype)).to(ctx.weight_dtype) if ctx.need_dw else None
    return gh, gw, None, None, None, None, None, None, None


torch.library.register_autograd("seqpar::linear_ce", _backward, setup_context=_setup_context)


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
    grad = torch.is_grad_enabled()  # no gradient GEMMs under no_grad
    total, _, _ = linear_ce_op(h, weight, labels.contiguous(), int(ignore_index), chunk_tokens, backend or "auto",
                               cdtype, grad and h.requires_grad, grad and weight.requires_grad)
    return total
