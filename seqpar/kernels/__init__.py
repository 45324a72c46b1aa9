"""Kernels of seqpar."""
from .lightning_attn import lightning_attn

__all__ = ["lightning_attn"]
