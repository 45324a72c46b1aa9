"""A LLaMA-style baseline LM with softmax attention through torch SDPA (flash on GPU).

Used only by the benchmarks, side by side with TransNormerLLM of the same width and depth:
RMSNorm, rotary embeddings, causal SDPA, SwiGLU MLP sized to match the TNL block's parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.models.transnormer import residual_stream_input


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [B, T, H, D] (D even)."""
    T, D = x.shape[1], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    ang = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv)  # [T, D/2]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
    return out.to(x.dtype)


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, hidden: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.w12 = nn.Linear(d, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k = rotary(q), rotary(k)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(o.transpose(1, 2).reshape(B, T, d))
        a, b = self.w12(self.norm2(x)).chunk(2, -1)
        return x + self.w3(F.silu(a) * b)


class LlamaLM(nn.Module):
    """input_ids [B, T] -> loss against labels [B, T] (already shifted, -100 ignored)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, hidden: int,
                 activation_checkpointing: bool = False, residual_dtype: str = "param"):
        """residual_dtype: as TNLConfig.residual_dtype ("param" | "autocast": the residual stream in the
        autocast dtype while autocast is on)."""
        super().__init__()
        self.residual_dtype = residual_dtype
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_tokens = 8192
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, input_ids, labels):
        x = residual_stream_input(self.embed(input_ids), self.residual_dtype)
        for blk in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        h = self.norm(x).flatten(0, 1)
        labels = labels.flatten()
        # lm head + cross entropy in chunks, recomputed in backward: the [B*T, V] logits never exist in full
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], self.loss_chunk_tokens):
            total = total + torch.utils.checkpoint.checkpoint(
                self._ce_sum, h[i:i + self.loss_chunk_tokens], labels[i:i + self.loss_chunk_tokens],
                use_reentrant=False)
        return total / (labels != -100).sum().clamp(min=1)

    def _ce_sum(self, h, labels):
        return F.cross_entropy(self.head(h).float(), labels, ignore_index=-100, reduction="sum")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def attention_flops_per_token(n_layers: int, d_model: int, seq_len: int) -> float:
    """Causal softmax attention fwd+bwd FLOPs per token (QK^T and PV, halved by causality, x3 for bwd)."""
    return 3 * n_layers * 2 * 2 * d_model * seq_len / 2


def matched_hidden(d_model: int, tnl_params_per_block: int) -> int:
    """SwiGLU hidden size giving a LLaMA block about the TNL block's parameter count."""
    hidden = (tnl_params_per_block - 4 * d_model * d_model) / (3 * d_model)
    return max(64, int(math.ceil(hidden / 64) * 64))
