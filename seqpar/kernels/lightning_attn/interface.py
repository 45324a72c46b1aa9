"""Public functional API of the Lightning Attention-2 operator: validation and backend dispatch."""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from . import varlen
from .torch_chunk import torch_chunk_lightning_attn

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_check_finite = os.environ.get("SEQPAR_CHECK_FINITE", "0") not in ("", "0", "false", "False")


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/inf check of q, k, v, initial_state on or off (default: env SEQPAR_CHECK_FINITE).

    The check costs one pass over the inputs and a host sync; use it to find where bad values come from.
    """
    global _check_finite
    _check_finite = bool(enabled)


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _bad_slope_message(slopes: torch.Tensor) -> Optional[str]:
    """None if every slope is finite and >= 0, else a message naming the first bad value (host sync)."""
    with torch.no_grad():
        bad = ~(torch.isfinite(slopes) & (slopes >= 0))
        if not bool(bad.any()):
            return None
        i = int(bad.nonzero()[0, 0])
        return (f"slopes must be finite and non-negative (decay lambda = exp(-slope) in (0, 1]); got "
                f"slopes[{i}] = {slopes[i].item()} ({int(bad.sum())} bad of {slopes.numel()})")


def _check_slopes_nonnegative(slopes: torch.Tensor) -> None:
    """CPU: checked on every call. CUDA: a slopes tensor is checked once per in-place version (marked on the
    tensor object); slopes computed in the graph (learnable: a new tensor every step) are checked on the
    device with an asynchronous assert, so a training step has no host sync; nothing under graph capture."""
    if slopes.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return
        if getattr(slopes, "_seqpar_slopes_ok", None) == slopes._version:
            return
        if slopes.requires_grad:
            with torch.no_grad():
                ok = (torch.isfinite(slopes) & (slopes >= 0)).all()
            torch._assert_async(ok, "slopes must be finite and non-negative")
            return
    msg = _bad_slope_message(slopes)
    if msg is not None:
        raise ValueError(msg)
    if slopes.is_cuda:
        slopes._seqpar_slopes_ok = slopes._version


def check_static(q, k, v, slopes, scale, cu_seqlens, backend) -> str:
    """The checks of :func:`validate_inputs` that read no tensor values: argument types, shapes, dtypes, devices,
    the backend's limits. Safe while torch.compile traces (they become guards); returns the resolved backend."""
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    B, T, H, D = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q [B, T, H, D] = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, E] with B, T, H = {tuple(q.shape[:3])} as in q, got {tuple(v.shape)}"
        )
    E = v.shape[3]
    if D == 0 or E == 0 or H == 0:
        raise ValueError(f"head dims and head count must be positive, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"slopes must be a torch.Tensor of shape [H] = [{H}], got {type(slopes).__name__}")
    if slopes.shape != (H,):
        raise ValueError(f"slopes must have shape [H] = [{H}], got {tuple(slopes.shape)}")
    if not slopes.is_floating_point():
        raise TypeError(f"slopes must be a floating-point tensor, got {slopes.dtype}")
    if slopes.device != q.device:
        raise ValueError(f"slopes must be on q's device {q.device}, got {slopes.device}")

    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None (None means D**-0.5), got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")

    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"cu_seqlens must be an int32/int64 torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D int32/int64 tensor [N+1] of document offsets, got "
                f"dtype {cu_seqlens.dtype}, shape {tuple(cu_seqlens.shape)}"
            )
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch must be packed into B == 1, got B = {B}")

    if backend is None:
        backend = "triton" if q.is_cuda else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton":
        if q.dtype not in _TRITON_DTYPES:
            raise TypeError(f"the triton backend takes float16, bfloat16 or float32 inputs, got {q.dtype}")
        if D > MAX_HEAD_DIM or E > MAX_HEAD_DIM:
            raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got D={D}, E={E}")
    return backend


def validate_inputs(q, k, v, slopes, scale, initial_state, cu_seqlens, backend) -> Tuple[int, str]:
    """Check every argument of :func:`lightning_attn`: :func:`check_static`, then :func:`check_values`;
    return (number of states N, resolved backend)."""
    backend = check_static(q, k, v, slopes, scale, cu_seqlens, backend)
    return check_values(q, k, v, slopes, initial_state, cu_seqlens, backend), backend


def check_values(q, k, v, slopes, initial_state, cu_seqlens, backend: str) -> int:
    """The checks that read values or the environment, on arguments that passed :func:`check_static` with the
    resolved ``backend``: non-negative slopes, the cu_seqlens offsets, ``initial_state`` against the number of
    states, finiteness (when switched on), the interpreter for Triton on the CPU. Returns the number of states N."""
    B, T, H, D = q.shape
    E = v.shape[3]
    _check_slopes_nonnegative(slopes)

    if cu_seqlens is not None:
        offs = varlen.offsets(cu_seqlens)  # one host read per tensor, shared by every layer
        if offs[0] != 0 or offs[-1] != T or any(b < a for a, b in zip(offs, offs[1:])):
            raise ValueError(f"cu_seqlens must start at 0, end at T = {T} and be non-decreasing, got {offs[:8]}...")
        N = len(offs) - 1
    else:
        N = B

    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if tuple(initial_state.shape) != (N, H, D, E):
            what = "number of documents" if cu_seqlens is not None else "B"
            raise ValueError(
                f"initial_state must have shape [N, H, D, E] = {(N, H, D, E)} (N = {what}), "
                f"got {tuple(initial_state.shape)}"
            )
        if not initial_state.is_floating_point():
            raise TypeError(f"initial_state must be floating point (fp32 recommended), got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device {q.device}, got {initial_state.device}")

    if _check_finite:
        for name, x in (("q", q), ("k", k), ("v", v), ("initial_state", initial_state)):
            if x is not None and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or inf")

    if backend == "triton" and not q.is_cuda and not triton_interpret_enabled():
        raise ValueError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, or use backend='torch'"
        )
    return N


def lightning_attn_as_op(q, k, v, slopes, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                         backend=None):
    """:func:`lightning_attn` (same arguments and returns) through the dispatched custom op
    ``seqpar::lightning_attn_fwd``: what torch.compile traces, and what selective checkpointing sees and keeps
    in eager mode. While torch.compile traces, only the checks that read no values run (:func:`check_static`;
    the others would break the graph; the op's implementation reads cu_seqlens); in eager mode the inputs are
    validated in full."""
    if torch.compiler.is_compiling():
        backend = check_static(q, k, v, slopes, scale, cu_seqlens, backend)
    else:
        _, backend = validate_inputs(q, k, v, slopes, scale, initial_state, cu_seqlens, backend)
    o, ht = fwd_op(q, k, v, slopes, scale, initial_state, cu_seqlens, backend)
    return o, (ht if output_final_state else None)


def fwd_op(q, k, v, slopes, scale, initial_state, cu_seqlens, backend: str, cu_offset: int = -1):
    """``seqpar::lightning_attn_fwd`` on checked inputs with a resolved backend: (o [B, T, H, E], ht [N, H, D, E]).
    scale None: D**-0.5; the slopes' gradient is requested when they require one under grad mode. cu_offset:
    see :func:`seqpar.kernels.lightning_attn.ops.lightning_attn_fwd_op` (global offsets of a shard)."""
    from .ops import lightning_attn_fwd_op

    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    slope_grad = torch.is_grad_enabled() and slopes.requires_grad
    o, ht, _ = lightning_attn_fwd_op(q, k, v, slopes, scale, initial_state, cu_seqlens, backend, slope_grad,
                                     cu_offset)
    return o, ht


def lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Lightning Attention-2: causal linear attention with per-head exponential decay.

    Args:
        q, k: [B, T, H, D]; v: [B, T, H, E] (fp16, bf16, fp32; fp64 on the torch backend).
        slopes: [H], non-negative; decay per step lambda_h = exp(-slopes[h]).
        scale: multiplies q k^T; None means D ** -0.5.
        initial_state: [N, H, D, E] state before the first token (N = B, or documents).
        output_final_state: also return the state after the last token.
        cu_seqlens: int [N+1] offsets of packed documents (B == 1); the state resets at each.
        backend: "triton", "torch" or None (triton for CUDA tensors, torch otherwise).
    Returns:
        o [B, T, H, E] in the input dtype, and ht [N, H, D, E] or None: fp32 (fp64 for fp64 inputs,
        torch backend only, which keeps fp64 computations an fp64 reference end to end).
    """
    if torch.compiler.is_compiling():
        return lightning_attn_as_op(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens, backend)
    _, backend = validate_inputs(q, k, v, slopes, scale, initial_state, cu_seqlens, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "torch":
        return torch_chunk_lightning_attn(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens)
    from .chunk import chunk_lightning_attn  # imports triton lazily

    return chunk_lightning_attn(q, k, v, slopes, scale, initial_state, output_final_state, cu_seqlens)
