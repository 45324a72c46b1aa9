"""TransNormerLLM-style language model on Lightning Attention-2 (+ its LightningModule)."""
from .config import TNLConfig
from .transnormer import (
    IGNORE_INDEX,
    GatedLinearAttention,
    LMOutput,
    SGLU,
    SimpleRMSNorm,
    TNLBlock,
    TransNormerLLM,
    alibi_slopes,
    layer_slopes,
)


def __getattr__(name):  # LitLM imports pytorch_lightning: load it only when asked for
    if name == "LitLM":
        from .lit import LitLM

        return LitLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TNLConfig",
    "TransNormerLLM",
    "LitLM",
    "LMOutput",
    "TNLBlock",
    "GatedLinearAttention",
    "SGLU",
    "SimpleRMSNorm",
    "alibi_slopes",
    "layer_slopes",
    "IGNORE_INDEX",
]
