"""FLOP accounting of a TransNormerLLM training step: MFU (PaLM's definition) and HFU.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B): ``6 * N_matmul`` for the forward and
backward of every parameter used in a matrix product (the LM head included, the input-embedding lookup
not), plus the attention's own FLOPs, fwd + bwd (3x the forward). Recompute is not counted: that is the
difference between MFU (model FLOPs) and HFU (hardware FLOPs, recompute included).

The attention's forward per token, layer and head: the intra-chunk causal products ``q k^T`` and ``P v`` over
a chunk of ``chunk`` tokens (``2 * chunk * D`` on average, causal halves it) and the two state products
``k^T v`` and ``q S`` (``4 * D * E``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import TNLConfig

__all__ = [
    "matmul_params", "attention_flops_per_token", "model_flops_per_token", "hardware_flops_per_token",
    "peak_tflops", "mfu", "hfu", "recompute_of",
]

RECOMPUTE = ("none", "selective", "full")


def matmul_params(config: TNLConfig) -> int:
    """Parameters used in matrix products: every block's projections and the LM head (not the embedding)."""
    c = config
    per_layer = 5 * c.d_model * c.inner_dim + 3 * c.d_model * c.glu_dim
    if c.bias:
        per_layer += 4 * c.inner_dim + c.d_model + 2 * c.glu_dim + c.d_model
    return c.n_layers * per_layer + c.vocab_size * c.d_model


def attention_flops_per_token(config: TNLConfig, chunk: int = 64, backward: bool = True) -> float:
    """Lightning Attention FLOPs per token over all layers (fwd, x3 with ``backward``)."""
    D = E = config.head_dim
    fwd = 2 * chunk * D + 4 * D * E
    return (3 if backward else 1) * config.n_layers * config.n_heads * fwd


def model_flops_per_token(config: TNLConfig) -> float:
    """PaLM model FLOPs per trained token (fwd + bwd, no recompute)."""
    return 6.0 * matmul_params(config) + attention_flops_per_token(config)


def hardware_flops_per_token(config: TNLConfig, recompute: str = "none", seq_chunked: bool = False) -> float:
    """FLOPs the hardware runs per token: model FLOPs plus what is recomputed.

    ``recompute``: the blocks' policy, ``"none"``, ``"selective"`` (keeps the GEMM and attention outputs and
    recomputes elementwise work only, which adds no matmul FLOPs) or ``"full"`` (every block's forward runs
    again in the backward; the LM head is not recomputed by block checkpointing). ``seq_chunked``: the
    sequence-chunked path (``TNLConfig.seq_chunk``) recomputes each chunk's forward, blocks and head, in the
    backward, and a "full" policy inside it recomputes the blocks once more.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    flops = model_flops_per_token(config)
    block_fwd = 2.0 * (matmul_params(config) - config.vocab_size * config.d_model)
    block_fwd += attention_flops_per_token(config, backward=False)
    if seq_chunked:
        flops += block_fwd + 2.0 * config.vocab_size * config.d_model
    if recompute == "full":
        flops += block_fwd
    return flops


def recompute_of(model, batch_size: int, seq_len: int, like: Optional[torch.Tensor] = None) -> str:
    """The recompute policy a training forward of [batch_size, seq_len] tokens of ``model`` (a TransNormerLLM)
    runs: ``config.activation_checkpointing`` with "auto" resolved (per chunk of ``seq_chunk`` tokens when
    the sequence is chunked)."""
    C = model.config.seq_chunk
    return model.activation_policy(batch_size, min(seq_len, C) if C else seq_len, like)


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by substring of torch.cuda.get_device_name().
_PEAKS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
          ("A10G", 125.0), ("4090", 165.0))


def peak_tflops(device: Optional[torch.device] = None) -> Optional[float]:
    """Dense bf16 peak of a CUDA device in TFLOP/s; ``None`` for the CPU or an unknown GPU.

    The environment variable ``SEQPAR_PEAK_TFLOPS`` overrides the table.
    """
    import os

    if os.environ.get("SEQPAR_PEAK_TFLOPS"):
        return float(os.environ["SEQPAR_PEAK_TFLOPS"])
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in _PEAKS:
        if key in name:
            return value
    return None


def mfu(config: TNLConfig, tokens_per_gpu_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation in [0, 1] (``None`` without a known peak)."""
    if not peak:
        return None
    return model_flops_per_token(config) * tokens_per_gpu_per_s / (peak * 1e12)


def hfu(config: TNLConfig, tokens_per_gpu_per_s: float, peak: Optional[float], recompute: str = "none",
        seq_chunked: bool = False) -> Optional[float]:
    """Hardware FLOPs utilisation in [0, 1]: :func:`hardware_flops_per_token` at this rate (``None`` without a
    known peak)."""
    if not peak:
        return None
    return hardware_flops_per_token(config, recompute, seq_chunked) * tokens_per_gpu_per_s / (peak * 1e12)
