"""seqpar: sequence-parallel training of Lightning Attention-2 language models.

``import seqpar`` registers the Lightning strategy ``"lightning_sp"`` (in ``lightning.pytorch`` and
``pytorch_lightning``, whichever are installed).
"""
from .distributed import sp_lightning_attn
from .kernels.lightning_attn import lightning_attn

__version__ = "0.1.0"
__all__ = ["lightning_attn", "sp_lightning_attn", "__version__"]

try:  # registration needs Lightning, a hard dependency; keep the operator importable without it
    from . import strategies as _strategies  # noqa: F401
except ImportError as _err:  # pragma: no cover
    import warnings

    warnings.warn(f"seqpar: Lightning strategy 'lightning_sp' not registered ({_err})")
