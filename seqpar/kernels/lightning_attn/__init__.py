"""Lightning Attention-2 operator: references, torch chunked path, Triton kernels."""
from .interface import lightning_attn, set_check_finite
from .naive import naive_quadratic_lightning_attn, naive_recurrent_lightning_attn

__all__ = [
    "lightning_attn",
    "set_check_finite",
    "naive_recurrent_lightning_attn",
    "naive_quadratic_lightning_attn",
]
