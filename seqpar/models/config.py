"""Configuration of the TransNormerLLM-style language model (a plain dataclass, OmegaConf friendly)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

_DECAYS = ("tnl", "alibi", "none")
_GATE_ACTS = ("sigmoid", "silu", "none")
_QK_ACTS = ("silu", "relu", "elu1", "none")
_SP_MODES = ("allgather", "ring")
ACTIVATION_POLICIES = ("none", "selective", "full", "auto")


def normalize_activation_checkpointing(value: Any, name: str = "TNLConfig.activation_checkpointing") -> str:
    """The activation memory policy named by ``value``: "none" | "selective" | "full" | "auto".

    Booleans are the old spelling: False -> "none", True -> "full". Anything else is a ValueError naming
    ``name`` and the choices.
    """
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str) and value in ACTIVATION_POLICIES:
        return value
    raise ValueError(f"{name} must be one of {ACTIVATION_POLICIES} (or a bool: False = 'none', True = 'full'), "
                     f"got {value!r}")


# Architectures of the TransNormerLLM paper (Qin et al. 2023, arXiv 2307.14995, Table of model sizes):
# 385M: 24 layers d 1024, 1B: 16 layers d 2048, 3B: 32 layers d 2560, 15B: 42 layers d 5120 (40 heads),
# head dim 128 everywhere, vocabulary 64000, untied input/output embeddings. The paper does not list the
# SGLU width of every size; glu_dim below is chosen so that the total parameter count (embedding and
# lm head included) lands on the nominal size: 0.41B, 1.00B, 3.08B, 15.07B (see tests/models).
_PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, glu_dim=128, max_seq_len=256),
    "tnl-0.4b": dict(vocab_size=64000, d_model=1024, n_layers=24, n_heads=8, glu_dim=2048, residual_dtype="autocast"),
    "tnl-1b": dict(vocab_size=64000, d_model=2048, n_layers=16, n_heads=16, glu_dim=4096, residual_dtype="autocast"),
    "tnl-3b": dict(vocab_size=64000, d_model=2560, n_layers=32, n_heads=20, glu_dim=6912, residual_dtype="autocast"),
    "tnl-15b": dict(vocab_size=64000, d_model=5120, n_layers=42, n_heads=40, glu_dim=13824, residual_dtype="autocast"),
}
# The sized presets train with the residual stream in the autocast dtype (residual_dtype="autocast"); its loss against
# the fp32 residual: benchmarks/results/speed_parity_tnl-0.4b_T8192_200steps_lr0.0002_fast-residual-autocast.md.


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class TNLConfig:
    """Hyper-parameters of :class:`seqpar.models.TransNormerLLM`.

    Attributes:
        vocab_size: number of token ids (ids must lie in ``[0, vocab_size)``).
        d_model: width of the residual stream.
        n_layers: number of TNL blocks.
        n_heads: attention heads.
        head_dim: per-head dim D (= E); ``None`` derives ``d_model // n_heads`` (then d_model must be
            divisible by n_heads). The attention inner width is ``n_heads * head_dim``.
        glu_dim: hidden width of the SGLU channel mixer; ``None`` means 8/3 d_model rounded up to a
            multiple of 64.
        norm_eps: epsilon of SimpleRMSNorm.
        decay: "tnl" (ALiBi-style per-head slopes scaled per layer by ``1 - l/(L-1) + 1e-5``, as
            TransNormerLLM), "alibi" (the same per-head slopes in every layer) or "none" (no decay).
        learnable_slopes: make the slopes parameters (stored as log-slopes so they stay positive);
            otherwise they are a non-persistent fp32 buffer.
        qk_act: activation of q and k ("silu" as TNL, "relu", "elu1" = 1 + elu, "none").
        gate_act: activation of the output gate u ("sigmoid" by default: a bounded gate is benign in
            bf16 and is what Lightning-Attention models at scale use; "silu" or "none" as in TNL variants).
        attn_scale: scale of q k^T; ``None`` means head_dim ** -0.5 (the output is RMS-normalised, so
            this mainly sets the size relative to the norm's eps).
        dropout: residual dropout on the output of each token / channel mixer.
        bias: biases in the linear layers.
        tie_embeddings: share the input embedding with the lm head.
        activation_checkpointing: activation memory policy of the blocks in training (grad enabled):
            "none" keeps every activation; "selective" checkpoints each block with a selective policy that
            keeps the outputs of the GEMMs and of the Lightning Attention op and recomputes the cheap
            elementwise ops (norms, activations, gates, products, residual adds) in the backward; "full"
            recomputes each whole block from its input (torch.utils.checkpoint, use_reentrant=False);
            "auto" picks, once per (B, T) and device, the fastest of none > selective > full whose
            estimated step memory fits the device (:mod:`seqpar.models.memory`; "none" on the CPU).
            Booleans keep working: False = "none", True = "full" (stored normalised, as a string).
        activation_offload: with activation_checkpointing="full", keep each block's saved input (the fp32
            residual stream, 4 * d_model bytes per token and layer) in host memory, pinned, instead of on
            the GPU; it is copied back when the block is recomputed. Host memory: n_layers * B * T *
            d_model * itemsize, checked up front (:mod:`seqpar.models.offload`, ``HostMemoryError``).
        init_std: std of the normal init of all weights.
        scaled_init: divide the std of the residual output projections by sqrt(2 n_layers).
        max_seq_len: nominal training context (informational: the model has no position embedding
            and accepts any length).
        loss_chunk_tokens: tokens per chunk of the lm head + cross entropy when the forward is asked
            for the loss without the logits (``return_logits=False``, as LitLM does): the [B, T, V]
            logits are never materialised.
        residual_dtype: dtype of the residual stream: "param" (the embedding's dtype, so fp32 under bf16
            autocast over fp32 parameters) or "autocast" (the autocast dtype while autocast is enabled, as in
            Megatron's default and torchtitan's bf16 FSDP parameters; outside autocast the same as "param").
            "autocast" halves the residual's bytes through the norms and adds and the activation memory it
            keeps; the norms still reduce in fp32.
        seq_chunk: tokens per chunk of the exact sequence-chunked forward/backward (``None``: the whole
            sequence at once). The chunks run in order through all layers, each layer starting from the
            state the previous chunk left; training keeps only the per-layer states at chunk boundaries
            and recomputes each chunk in the backward (:mod:`seqpar.models.chunked`): activation memory
            is that of C tokens for any T, and the loss and gradients equal the whole-sequence ones.
            Inference (validation, generation's prefill) runs the same chunks. Not with SP > 1.
        sp_mode: how sequence-parallel attention exchanges states: "allgather" or "ring".
        attn_backend: backend of the operator (None: triton on CUDA, torch on CPU).
    """

    vocab_size: int = 64000
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 8
    head_dim: Optional[int] = None
    glu_dim: Optional[int] = None
    norm_eps: float = 1e-6
    decay: str = "tnl"
    learnable_slopes: bool = False
    qk_act: str = "silu"
    gate_act: str = "sigmoid"
    attn_scale: Optional[float] = None
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = False
    activation_checkpointing: Union[bool, str] = "none"
    activation_offload: bool = False
    init_std: float = 0.02
    scaled_init: bool = True
    max_seq_len: int = 2048
    loss_chunk_tokens: int = 8192
    seq_chunk: Optional[int] = None
    residual_dtype: str = "param"
    sp_mode: str = "allgather"
    attn_backend: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "loss_chunk_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"TNLConfig.{name} must be a positive int, got {v!r}")
        if self.seq_chunk is not None and (not _is_int(self.seq_chunk) or self.seq_chunk <= 0):
            raise ValueError(f"TNLConfig.seq_chunk must be a positive int (tokens per chunk) or None, got {self.seq_chunk!r}")
        if self.head_dim is None:
            if self.d_model % self.n_heads != 0:
                raise ValueError(
                    f"TNLConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                    f"when head_dim is not given"
                )
            self.head_dim = self.d_model // self.n_heads
        elif not _is_int(self.head_dim) or self.head_dim <= 0:
            raise ValueError(f"TNLConfig.head_dim must be a positive int or None, got {self.head_dim!r}")
        if self.glu_dim is None:
            self.glu_dim = -(-(8 * self.d_model) // (3 * 64)) * 64
        elif not _is_int(self.glu_dim) or self.glu_dim <= 0:
            raise ValueError(f"TNLConfig.glu_dim must be a positive int or None, got {self.glu_dim!r}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise ValueError(f"TNLConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TNLConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            raise ValueError(f"TNLConfig.init_std must be > 0, got {self.init_std!r}")
        if self.attn_scale is not None and (
            isinstance(self.attn_scale, bool) or not isinstance(self.attn_scale, (int, float)) or self.attn_scale <= 0
        ):
            raise ValueError(f"TNLConfig.attn_scale must be a positive float or None, got {self.attn_scale!r}")
        for name, allowed in (("decay", _DECAYS), ("qk_act", _QK_ACTS), ("gate_act", _GATE_ACTS), ("sp_mode", _SP_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TNLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.residual_dtype not in ("param", "autocast"):
            raise ValueError(f"TNLConfig.residual_dtype must be 'param' or 'autocast', got {self.residual_dtype!r}")
        if self.attn_backend not in (None, "triton", "torch"):
            raise ValueError(f"TNLConfig.attn_backend must be None, 'triton' or 'torch', got {self.attn_backend!r}")
        self.activation_checkpointing = normalize_activation_checkpointing(self.activation_checkpointing)
        if self.activation_offload and self.activation_checkpointing != "full":
            raise ValueError("TNLConfig.activation_offload needs activation_checkpointing=True ('full': it offloads "
                             f"the checkpointed block inputs), got {self.activation_checkpointing!r}")
        if self.learnable_slopes and self.decay == "none":
            raise ValueError("TNLConfig.learnable_slopes needs a decay ('tnl' or 'alibi'), got decay='none'")

    @property
    def inner_dim(self) -> int:
        return self.n_heads * self.head_dim

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TNLConfig":
        """A named configuration ("tiny", "tnl-0.4b", "tnl-1b", "tnl-3b", "tnl-15b") with overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown TNLConfig preset {name!r}; known: {sorted(_PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown TNLConfig fields {bad}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> tuple:
        return tuple(_PRESETS)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TNLConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - fields)
        if bad:
            raise ValueError(f"unknown TNLConfig fields {bad}")
        return cls(**dict(d))
