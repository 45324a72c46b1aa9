"""Fused linear + cross-entropy for the LM head: no [N, V] logits kept, no fp32 copy of them."""
from .interface import linear_cross_entropy
from .naive import naive_linear_cross_entropy

__all__ = ["linear_cross_entropy", "naive_linear_cross_entropy"]
