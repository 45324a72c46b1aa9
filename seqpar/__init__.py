"""seqpar: sequence-parallel training of Lightning Attention-2 language models."""
from .kernels.lightning_attn import lightning_attn

__version__ = "0.1.0"
__all__ = ["lightning_attn", "__version__"]
