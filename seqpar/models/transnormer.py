"""TransNormerLLM-style language model on Lightning Attention-2, sequence-parallel aware.

Block (pre-norm, as TransNormerLLM, Qin et al. 2023):

    x = x + Dropout(GLA(SimpleRMSNorm(x)))            token mixer: gated linear attention
    x = x + Dropout(SGLU(SimpleRMSNorm(x)))           channel mixer: simple GLU, no activation

    GLA(x)  = W_o( SimpleRMSNorm(o) * u ),  o = lightning_attn(q, k, v, slopes)
              q = act(W_q x), k = act(W_k x), v = W_v x, u = gate_act(W_u x)
    SGLU(x) = W_3( W_1 x * W_2 x )

Projections are reshaped [B, T, H*D] -> [B, T, H, D] by a view (the operator's layout, no transpose).
Slopes are ALiBi-style per head, scaled per layer ``s_h * (1 - l/(L-1) + 1e-5)`` (layer 0 decays most).

Sequence parallelism: every attention layer holds its SP context (``sp_group``, ``sp_mode``), set by
``seqpar.distributed.parallelize(model, dims, sp_mode=...)`` (the Lightning strategy does it), by
``TransNormerLLM(config, sp_group=group)`` or by ``model.sp_group = group`` / ``model.sp_mode = mode`` (all
through ``seqpar.distributed.set_sp_context``). With a group of size > 1 the attention of every layer runs
``seqpar.distributed.sp_lightning_attn`` and the inputs are the rank's contiguous shard of T; the loss
contract is described in :meth:`TransNormerLLM.forward`.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..kernels.lightning_attn import lightning_attn
from ..kernels.lightning_attn.interface import lightning_attn_as_op
from ..kernels.linear_ce import linear_cross_entropy
from .config import TNLConfig

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------- helpers
def alibi_slopes(n_heads: int) -> List[float]:
    """ALiBi head slopes 2^(-8 i / n), i = 1..n, extended to non-powers of two as ALiBi does."""

    def pow2(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    if math.log2(n_heads).is_integer():
        return pow2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return pow2(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def layer_slopes(config: TNLConfig, layer_idx: int) -> List[float]:
    """Decay slopes [H] of one layer (python floats, non-negative)."""
    H, L = config.n_heads, config.n_layers
    if config.decay == "none":
        return [0.0] * H
    base = alibi_slopes(H)
    if config.decay == "alibi":
        return base
    # "tnl": TransNormerLLM's slope_rate * (1 - layer_idx / (num_layers - 1) + 1e-5); L == 1 keeps the base.
    rate = 1.0 if L == 1 else 1.0 - layer_idx / (L - 1) + 1e-5
    return [s * rate for s in base]


def _act(name: str):
    if name == "silu":
        return F.silu
    if name == "sigmoid":
        return torch.sigmoid
    if name == "relu":
        return F.relu
    if name == "elu1":
        return lambda x: 1.0 + F.elu(x)
    return lambda x: x


class SimpleRMSNorm(nn.Module):
    """RMS norm without a learnable gain (TransNormerLLM's SimpleRMSNorm); computed in fp32."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def residual_stream_input(x: torch.Tensor, residual_dtype: str) -> torch.Tensor:
    """The embedding output x [B, T, d] as the residual stream holds it (``TNLConfig.residual_dtype``): cast to
    the autocast dtype for "autocast" while autocast is enabled on x's device, else unchanged."""
    if residual_dtype == "autocast" and torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _offload_saved():
    """Saved-tensor hooks that keep saved tensors in (pinned, when CUDA is present) host memory, counted
    (:func:`seqpar.models.offload.host_offload_stats`)."""
    from .offload import save_on_host

    return save_on_host(pin_memory=torch.cuda.is_available())


# ----------------------------------------------------------------------------------------- recompute policy
def _saved_ops():
    """Ops whose outputs selective checkpointing keeps: the GEMMs and the Lightning Attention custom op."""
    from ..kernels.lightning_attn import ops as _la_ops  # noqa: F401  registers seqpar::lightning_attn_fwd

    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
           torch.ops.seqpar.lightning_attn_fwd.default}
    if hasattr(aten, "_scaled_mm"):
        ops.add(aten._scaled_mm.default)
    return frozenset(ops)


SELECTIVE_SAVED_OPS = _saved_ops()


def selective_checkpoint_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Policy of ``activation_checkpointing="selective"``: keep the outputs of the GEMMs and of
    ``seqpar::lightning_attn_fwd``, recompute everything else (norms, activations, gates, products, adds)."""
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# context_fn of torch.utils.checkpoint; a functools.partial, the form torch.compile traces
selective_checkpoint_context = functools.partial(create_selective_checkpoint_contexts, selective_checkpoint_policy)


def _sp_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


# ----------------------------------------------------------------------------------------- layers
class GatedLinearAttention(nn.Module):
    """TNL token mixer: gated, RMS-normalised Lightning Attention with per-head decay."""

    def __init__(self, config: TNLConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        d, inner, b = config.d_model, config.inner_dim, config.bias
        self.q_proj = nn.Linear(d, inner, bias=b)
        self.k_proj = nn.Linear(d, inner, bias=b)
        self.v_proj = nn.Linear(d, inner, bias=b)
        self.u_proj = nn.Linear(d, inner, bias=b)
        self.o_proj = nn.Linear(inner, d, bias=b)
        self.o_proj._is_residual_out = True
        self.norm = SimpleRMSNorm(config.norm_eps)
        self.qk_act = _act(config.qk_act)
        self.gate_act = _act(config.gate_act)
        self.scale = config.attn_scale if config.attn_scale is not None else self.head_dim ** -0.5
        self._slope_values = layer_slopes(config, layer_idx)
        init = torch.tensor(self._slope_values, dtype=torch.float32)
        if config.learnable_slopes:
            self.log_slopes = nn.Parameter(init.log())
        else:
            self.register_buffer("slopes_buf", init, persistent=False)
        self._sp_group, self._sp_mode = None, config.sp_mode  # SP context, set by set_sp_context

    @property
    def sp_group(self):
        """SP process group of this layer (None: no SP); set by ``seqpar.distributed.set_sp_context``."""
        return self._sp_group

    @property
    def sp_mode(self) -> str:
        return self._sp_mode

    # The slopes stay fp32 even after model.to(bfloat16) (a buffer would otherwise be rounded).
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        buf = getattr(self, "slopes_buf", None)
        if buf is not None and buf.dtype != torch.float32:
            self.slopes_buf = torch.tensor(self._slope_values, dtype=torch.float32, device=buf.device)
        return out

    @property
    def slopes(self) -> torch.Tensor:
        if self.config.learnable_slopes:
            return self.log_slopes.float().exp()
        return self.slopes_buf

    def _qkvu(self, x: torch.Tensor):
        shape = x.shape[:-1] + (self.n_heads, self.head_dim)
        q = self.qk_act(self.q_proj(x)).view(shape)
        k = self.qk_act(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        u = self.gate_act(self.u_proj(x))
        return q, k, v, u

    def _out(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        o = o.reshape(o.shape[:-2] + (-1,))
        return self.o_proj(self.norm(o).to(u.dtype) * u)

    def forward(self, x, cu_seqlens=None, initial_state=None, output_final_state=False, use_sp=True,
                as_op=False):
        """x [B, T, d] -> (y [B, T, d], ht [B|N, H, D, E] or None). ``as_op``: run the operator as the
        dispatched custom op (what selective checkpointing keeps)."""
        q, k, v, u = self._qkvu(x)
        slopes = self.slopes
        sp_group = self._sp_group if use_sp else None
        if _sp_size(sp_group) > 1:
            if initial_state is not None or output_final_state:
                raise ValueError("initial/final states are not supported under sequence parallelism")
            from ..distributed import sp_lightning_attn  # lazy: the SP layer is optional at import time

            o = sp_lightning_attn(
                q, k, v, slopes, group=sp_group, scale=self.scale, mode=self._sp_mode,
                cu_seqlens=cu_seqlens, backend=self.config.attn_backend,
            )
            ht = None
        else:
            # as_op: the dispatched custom op, whose outputs selective checkpointing can keep (the Triton
            # autograd.Function's kernels write into allocations the dispatcher never sees)
            attn = lightning_attn_as_op if as_op else lightning_attn
            o, ht = attn(
                q, k, v, slopes, scale=self.scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, backend=self.config.attn_backend,
            )
        return self._out(o, u), ht

    def step(self, x: torch.Tensor, state: torch.Tensor):
        """One recurrent step: x [B, d], state [B, H, D, E] fp32 -> (y [B, d], new state)."""
        q, k, v, u = self._qkvu(x)  # q, k, v [B, H, D]
        acc = torch.promote_types(v.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        lam = torch.exp(-self.slopes.to(acc))[None, :, None, None]
        qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
        state = lam * state.to(acc) + kf.unsqueeze(-1) * vf.unsqueeze(-2)
        o = self.scale * torch.einsum("bhd,bhde->bhe", qf, state)
        return self._out(o.to(v.dtype), u), state


class SGLU(nn.Module):
    """Simple GLU channel mixer of TransNormerLLM: W3 (W1 x * W2 x), no activation."""

    def __init__(self, config: TNLConfig):
        super().__init__()
        d, g, b = config.d_model, config.glu_dim, config.bias
        self.w1 = nn.Linear(d, g, bias=b)
        self.w2 = nn.Linear(d, g, bias=b)
        self.w3 = nn.Linear(g, d, bias=b)
        self.w3._is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.w1(x) * self.w2(x))


class TNLBlock(nn.Module):
    def __init__(self, config: TNLConfig, layer_idx: int):
        super().__init__()
        self.token_norm = SimpleRMSNorm(config.norm_eps)
        self.token_mixer = GatedLinearAttention(config, layer_idx)
        self.channel_norm = SimpleRMSNorm(config.norm_eps)
        self.channel_mixer = SGLU(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cu_seqlens=None, initial_state=None, output_final_state=False, use_sp=True,
                recompute="none"):
        """x [B, T, d] -> (x [B, T, d], ht or None).

        ``recompute="selective"`` (with grad enabled) checkpoints the block with
        :func:`selective_checkpoint_policy` inside this forward, so that under ``compile_blocks`` the
        checkpoint lies inside the compiled graph (torch.compile then applies the policy when it partitions
        the forward and backward). "full" recompute is the caller's ``checkpoint(block, ...)``.
        """
        if recompute == "selective" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cu_seqlens, initial_state, output_final_state, use_sp, True,
                              use_reentrant=False, context_fn=selective_checkpoint_context)
        return self._forward(x, cu_seqlens, initial_state, output_final_state, use_sp, False)

    def _forward(self, x, cu_seqlens, initial_state, output_final_state, use_sp, as_op):
        a, ht = self.token_mixer(
            self.token_norm(x), cu_seqlens=cu_seqlens, initial_state=initial_state,
            output_final_state=output_final_state, use_sp=use_sp, as_op=as_op,
        )
        x = x + self.dropout(a)
        x = x + self.dropout(self.channel_mixer(self.channel_norm(x)))
        return x, ht

    def step(self, x, state):
        a, state = self.token_mixer.step(self.token_norm(x), state)
        x = x + a
        x = x + self.channel_mixer(self.channel_norm(x))
        return x, state


def run_block(layer: "TNLBlock", policy: str, x, cu_seqlens=None, initial_state=None, output_final_state=False,
              use_sp=True, offload: bool = False):
    """One block under a recompute policy ("none" | "selective" | "full"): x [B, T, d] -> (x, ht or None).

    "full" wraps the block in ``torch.utils.checkpoint`` (outside a compiled block), saving only its input,
    which with ``offload`` waits in host memory; "selective" checkpoints inside the block's forward."""
    if policy == "full":
        # the checkpoint saves its inputs under the saved-tensor hooks active here (its own hooks only
        # cover the block's internals): with activation_offload those hooks move them to host memory
        with _offload_saved() if offload else contextlib.nullcontext():
            return checkpoint(layer, x, cu_seqlens, initial_state, output_final_state, use_sp, use_reentrant=False)
    if policy == "selective":
        return layer(x, cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                     use_sp=use_sp, recompute="selective")
    if policy != "none":
        raise ValueError(f"policy must be 'none', 'selective' or 'full', got {policy!r}")
    return layer(x, cu_seqlens=cu_seqlens, initial_state=initial_state, output_final_state=output_final_state,
                 use_sp=use_sp)


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy over non-ignored tokens, in fp32 at least (fp64 logits stay fp64)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@dataclass
class LMOutput:
    """Output of :meth:`TransNormerLLM.forward`.

    loss: scalar (None without labels); logits: [B, T, V] (the rank's shard under SP; None when
    ``return_logits=False``); final_states: per-layer states [B, H, D, E] fp32 when requested;
    num_tokens: valid (non -100) label tokens of this rank (tensor) when labels are given.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    final_states: Optional[List[torch.Tensor]] = None
    num_tokens: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------------------- model
class TransNormerLLM(nn.Module):
    """Decoder-only LM: embedding, ``n_layers`` TNL blocks, final SimpleRMSNorm, lm head."""

    def __init__(self, config: TNLConfig, sp_group: Optional["dist.ProcessGroup"] = None,
                 sp_mode: Optional[str] = None):
        super().__init__()
        if not isinstance(config, TNLConfig):
            raise TypeError(f"config must be a TNLConfig, got {type(config).__name__}")
        self.config = config
        self._sp_group, self._sp_mode = None, config.sp_mode
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(TNLBlock(config, i) for i in range(config.n_layers))
        self.final_norm = SimpleRMSNorm(config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()
        if sp_group is not None or sp_mode is not None:
            self._set_sp(sp_group, sp_mode if sp_mode is not None else config.sp_mode)

    def _set_sp(self, group, mode) -> None:
        from ..distributed.parallelize import set_sp_context  # the one code path (parallelize uses it too)

        set_sp_context(self, group, mode)

    @property
    def sp_group(self):
        """SP process group of every attention layer (None: no SP)."""
        return self._sp_group

    @sp_group.setter
    def sp_group(self, group) -> None:
        self._set_sp(group, self._sp_mode)

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None, **config_overrides) -> "TransNormerLLM":
        """Load a directory written by ``seqpar export`` (model.safetensors + config.json), eval mode."""
        from .export import load_pretrained

        return load_pretrained(path, device=device, dtype=dtype, **config_overrides)

    @property
    def sp_mode(self) -> str:
        """How SP attention exchanges states ("allgather" | "ring"); defaults to ``config.sp_mode``."""
        return self._sp_mode

    @sp_mode.setter
    def sp_mode(self, mode: str) -> None:
        self._set_sp(self._sp_group, mode)

    def compile_blocks(self, **compile_kwargs) -> "TransNormerLLM":
        """``torch.compile`` each block in place (torchtitan style; parameter names unchanged).

        The Lightning Attention op (Triton / SP exchange) stays a graph break; the norms, activations,
        gates, GLU and residual adds around it are fused. H100, tnl-0.4b, 128K tokens per step:
        82K -> 120K tokens/s (benchmarks/results/train_throughput_h100.md). Default ``dynamic=False``:
        one static graph per sequence length (training uses a fixed length). Returns self.
        """
        compile_kwargs.setdefault("dynamic", False)
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        return self

    def compile_model(self, **compile_kwargs) -> "TransNormerLLM":
        """``torch.compile`` the whole model in place: embedding, blocks, final norm and the fused head in one
        graph (the attention op and the head are custom ops, so no graph break without SP). Parameter names
        are unchanged. Default ``dynamic=None``: static shapes first, a dimension that changes (e.g. the
        number of packed documents) becomes dynamic on the recompile. Returns self.

        The sequence-chunked path (``seq_chunk``) and ``activation_offload`` run their own autograd around
        the blocks; with them each block is compiled instead (:meth:`compile_blocks`).
        """
        if self.config.seq_chunk is not None or self.config.activation_offload:
            return self.compile_blocks(**compile_kwargs)
        self.compile(**compile_kwargs)
        return self

    # -- init / bookkeeping
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise every weight and the decay slopes (use after ``to_empty`` from meta)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers) if self.config.scaled_init else std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, out_std if getattr(m, "_is_residual_out", False) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
        # slopes too: after ``to_empty()`` (meta-device init) the non-persistent buffer is garbage
        for layer in self.layers:
            att = layer.token_mixer
            values = torch.tensor(att._slope_values, dtype=torch.float32)
            if self.config.learnable_slopes:
                att.log_slopes.copy_(values.log())
            else:
                att.slopes_buf.copy_(values)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of (distinct) parameters; works on the meta device."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    # -- activation memory policy
    def activation_policy(self, batch_size: int, seq_len: int, like: Optional[torch.Tensor] = None) -> str:
        """The recompute policy ("none" | "selective" | "full") of a training forward of [batch_size, seq_len]
        tokens: ``config.activation_checkpointing``, or for "auto" the fastest policy whose estimated step
        memory fits the device (:func:`seqpar.models.memory.choose_activation_policy`), chosen once per
        (B, T, device, dtype) and cached (``model._policy_cache``). ``like``: a tensor on the device (default: the
        embedding's)."""
        policy = self.config.activation_checkpointing
        if policy != "auto":
            return policy
        ref = like if like is not None else self.embed.weight
        autocast = torch.is_autocast_enabled(ref.device.type)
        dtype = torch.get_autocast_dtype(ref.device.type) if autocast else ref.dtype
        # the residual stream's dtype: fp32 under autocast with residual_dtype "param", else the activations'
        residual = torch.float32 if autocast and self.config.residual_dtype == "param" else dtype
        compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in (self, *self.layers))
        key = (int(batch_size), int(seq_len), str(ref.device), dtype, compiled)
        cache = self.__dict__.setdefault("_policy_cache", {})
        if key not in cache:
            from .memory import choose_activation_policy, device_budget_bytes, model_state_bytes

            budget = device_budget_bytes(ref.device)
            if budget is None:  # CPU: no device memory to fit
                cache[key] = "none"
            else:
                cache[key] = choose_activation_policy(self.config, batch_size, seq_len, budget, dtype=dtype,
                                                      residual_dtype=residual, state_bytes=model_state_bytes(self),
                                                      compiled=compiled)
        return cache[key]

    # -- input checks
    def _check_inputs(self, input_ids, labels, cu_seqlens) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [B, T], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"empty batch: input_ids must be [B, T] with B >= 1 and T >= 1, got {tuple(input_ids.shape)}")
        # CUDA tensors and compiled graphs: device-side asserts, no host sync (the data pipeline checks ids up
        # front); CPU tensors: a ValueError with the offending values
        deferred = input_ids.is_cuda or torch.compiler.is_compiling()
        if input_ids.numel() and deferred:
            V = self.config.vocab_size
            torch._assert_async(((input_ids >= 0) & (input_ids < V)).all(), f"input_ids must lie in [0, vocab_size={V})")
            if labels is not None and isinstance(labels, torch.Tensor) and labels.shape == input_ids.shape:
                ok = ((labels == IGNORE_INDEX) | ((labels >= 0) & (labels < V))).all()
                torch._assert_async(ok, f"labels must lie in [0, vocab_size={V}) or be {IGNORE_INDEX}")
        elif input_ids.numel() and input_ids.device.type != "meta":
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values in [{lo}, {hi}]"
                )
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
            if labels.numel() and labels.device.type != "meta" and not deferred:
                bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.config.vocab_size))
                if bool(bad.any()):
                    raise ValueError(
                        f"labels must lie in [0, vocab_size={self.config.vocab_size}) or be {IGNORE_INDEX} "
                        f"(ignored), got e.g. {int(labels[bad][0])}"
                    )
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs packed input_ids with B == 1, got B = {input_ids.shape[0]}")

    # -- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        initial_states: Optional[Sequence[torch.Tensor]] = None,
        output_final_states: bool = False,
        return_logits: bool = True,
        use_sp: bool = True,
    ) -> LMOutput:
        """Run the LM.

        Args:
            input_ids: [B, T] int token ids in ``[0, vocab_size)``. Under SP (``self.sp_group`` of size
                P > 1) the rank's contiguous shard of the sequence (rank r holds tokens
                ``[r*T, (r+1)*T)``).
            labels: [B, T] int, ALREADY shifted (``labels[:, t]`` is the target of position t), -100 is
                ignored; the same shard as input_ids under SP.
            cu_seqlens: packed-document offsets (B == 1), passed to the attention operator as is; under
                SP they are the *global* offsets of the whole packed sequence, identical on every rank
                (see :func:`seqpar.distributed.sp_lightning_attn`).
            initial_states / output_final_states: per-layer recurrent states [B, H, D, E] (not under SP).
            return_logits: False does not return the logits; with labels the loss is then computed in
                chunks of ``config.loss_chunk_tokens`` tokens (lm head + cross entropy recomputed per chunk
                in the backward), so the [B, T, V] logits are never materialised.
            use_sp: False ignores the SP context (every rank then holds whole sequences).

        Loss contract: ``loss`` is the mean cross entropy over all valid (non -100) tokens of the SP
        group's batch, the same value on every rank of the group (= the SP=1 loss of the whole
        sequences). Under SP each rank returns
        ``loss = local + (global - local).detach()`` with ``local = P * local_sum / global_count``
        (sum and count all-reduced, detached, over the SP group), so the value is the group mean while
        the gradient of rank r is that of ``P * local_sum_r / global_count``: averaged over the P ranks
        (what DDP does over dp x sp) the parameter gradients equal the single-process gradient.
        If a batch has no valid label the loss is 0 (with a zero gradient).
        """
        self._check_inputs(input_ids, labels, cu_seqlens)
        group = self.sp_group if use_sp else None
        P = _sp_size(group)
        if P == 1:
            group = None
        if initial_states is not None and len(initial_states) != len(self.layers):
            raise ValueError(f"initial_states must hold one state per layer ({len(self.layers)}), got {len(initial_states)}")
        if self.config.seq_chunk is not None:  # exact sequence-chunked path; None when T <= seq_chunk
            from .chunked import chunked_forward

            out = chunked_forward(self, input_ids, labels, cu_seqlens, initial_states, output_final_states,
                                  return_logits, sp_size=P)
            if out is not None:
                return out

        x = self.embed_tokens(input_ids)
        policy = "none"
        if self.training and torch.is_grad_enabled() and initial_states is None and not output_final_states:
            policy = self.activation_policy(x.shape[0], x.shape[1], x)
        if policy == "full" and self.config.activation_offload:  # a clear error instead of a process killed mid-forward
            from .offload import check_offload_fits

            check_offload_fits(self.config, x.shape[0], x.shape[1], x.dtype)
        final_states = [] if output_final_states else None
        for i, layer in enumerate(self.layers):
            h0 = initial_states[i] if initial_states is not None else None
            x, ht = run_block(layer, policy, x, cu_seqlens, h0, output_final_states, use_sp,
                              offload=self.config.activation_offload)
            if final_states is not None:
                final_states.append(ht)
        h = self.final_norm(x)
        logits = loss = num_tokens = None
        if return_logits or labels is None:
            logits = self.lm_head(h)
        if labels is not None:
            if logits is not None:
                local_sum = _ce_sum(logits, labels)
            else:
                local_sum = self._chunked_ce_sum(h, labels)
            loss, num_tokens = self._reduce_loss(local_sum, labels, group, P)
        return LMOutput(loss=loss, logits=logits if return_logits else None,
                        final_states=final_states, num_tokens=num_tokens)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> the residual stream's input x [B, T, d], in ``config.residual_dtype``'s dtype."""
        return residual_stream_input(self.embed(input_ids), self.config.residual_dtype)

    def _chunked_ce_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of token losses through the fused linear + cross entropy (chunks of ``loss_chunk_tokens``):
        the [N, V] logits are never kept and the head's GEMM is not recomputed in the backward."""
        hf, lf = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
        return linear_cross_entropy(hf, self.lm_head.weight, lf, ignore_index=IGNORE_INDEX,
                                    chunk_tokens=self.config.loss_chunk_tokens)

    @staticmethod
    def _reduce_loss(local_sum, labels, group, P):
        local_count = (labels != IGNORE_INDEX).sum()
        if group is None:
            return local_sum / local_count.clamp(min=1).to(local_sum.dtype), local_count
        stats = torch.stack([local_sum.detach().double(), local_count.double()])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        global_count = stats[1].clamp(min=1)
        global_loss = (stats[0] / global_count).to(local_sum.dtype)
        local_scaled = local_sum * (P / global_count.to(local_sum.dtype))
        return local_scaled + (global_loss - local_scaled).detach(), local_count

    # -- recurrent inference
    def init_states(self, batch_size: int, device=None) -> List[torch.Tensor]:
        c = self.config
        device = device if device is not None else self.embed.weight.device
        return [torch.zeros(batch_size, c.n_heads, c.head_dim, c.head_dim, dtype=torch.float32, device=device)
                for _ in self.layers]

    def step(self, input_ids: torch.Tensor, states: Sequence[torch.Tensor], check: bool = True):
        """Decode one token per sequence with O(1) state: input_ids [B] -> (logits [B, V], new states).

        ``states`` holds one fp32 [B, H, D, E] tensor per layer (``init_states`` or a prefill's
        ``final_states``); they are not modified in place. ``check=False`` skips the id range check.
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dim() == 2 and input_ids.shape[1] == 1:
            input_ids = input_ids[:, 0]
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids of step must be [B] or [B, 1], got shape {tuple(input_ids.shape)}")
        if len(states) != len(self.layers):
            raise ValueError(f"states must hold one state per layer ({len(self.layers)}), got {len(states)}")
        if check:
            self._check_inputs(input_ids[:, None], None, None)
        x = self.embed_tokens(input_ids)
        new_states = []
        for layer, S in zip(self.layers, states):
            x, S = layer.step(x, S)
            new_states.append(S)
        return self.lm_head(self.final_norm(x)), new_states

    @torch.no_grad()
    def forward_recurrent(self, input_ids: torch.Tensor, initial_states=None):
        """Logits [B, T, V] of a token-by-token recurrent decode (reference for the chunked forward)."""
        self._check_inputs(input_ids, None, None)
        states = list(initial_states) if initial_states is not None else self.init_states(input_ids.shape[0])
        out = []
        for t in range(input_ids.shape[1]):
            logits, states = self.step(input_ids[:, t], states)
            out.append(logits)
        return torch.stack(out, 1), states

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        return_logits: bool = False,
        top_p: Optional[float] = None,
        eos_id: Optional[int] = None,
        on_token=None,
    ):
        """Sample continuations: prefill with the chunked operator, then decode with O(1) state per layer.

        Args:
            prompt_ids: [B, T0] ints, T0 >= 1. Generation is single-process (``sp_group`` is ignored).
            max_new_tokens: number of tokens to append.
            temperature: softmax temperature; 0 means greedy (argmax).
            top_k: sample among the k most likely tokens only.
            generator: torch.Generator for reproducible sampling.
            return_logits: also return the logits [B, N, V] each new token was drawn from.
            top_p: nucleus sampling: among the most likely tokens whose probabilities sum to ``top_p``.
            eos_id: a sequence that drew ``eos_id`` is finished (it is padded with ``eos_id`` from then on);
                generation stops once every sequence is.
            on_token: called with each step's new ids [B] (streaming).
        Returns:
            ids [B, T0 + N], N = max_new_tokens or fewer when every sequence hit ``eos_id`` (and the logits
            when ``return_logits``).
        """
        self._check_inputs(prompt_ids, None, None)
        if prompt_ids.shape[1] < 1:
            raise ValueError("prompt_ids must hold at least one token per sequence")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be a float in (0, 1] or None, got {top_p!r}")
        if eos_id is not None and (not isinstance(eos_id, int) or not 0 <= eos_id < self.config.vocab_size):
            raise ValueError(f"eos_id must be an int in [0, {self.config.vocab_size}) or None, got {eos_id!r}")
        was_training = self.training
        self.eval()
        try:
            if self.config.seq_chunk is not None:  # bounded memory for any prompt length
                from .chunked import chunked_prefill

                logits, states = chunked_prefill(self, prompt_ids)
            else:
                out = self(prompt_ids, output_final_states=True, use_sp=False)
                states = out.final_states
                logits = out.logits[:, -1]
            ids, all_logits = [prompt_ids], []
            done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
            for i in range(max_new_tokens):
                all_logits.append(logits)
                nxt = self._sample(logits.float(), temperature, top_k, generator, top_p)
                if eos_id is not None:
                    nxt = nxt.masked_fill(done, eos_id)
                    done = done | (nxt == eos_id)
                ids.append(nxt[:, None])
                if on_token is not None:
                    on_token(nxt)
                if eos_id is not None and bool(done.all()):
                    break
                if i + 1 < max_new_tokens:
                    logits, states = self.step(nxt, states, check=False)  # sampled ids are in range
        finally:
            self.train(was_training)
        result = torch.cat(ids, 1)
        if return_logits:
            V = self.config.vocab_size
            lg = torch.stack(all_logits, 1) if all_logits else prompt_ids.new_zeros(prompt_ids.shape[0], 0, V).float()
            return result, lg
        return result

    @staticmethod
    def _sample(logits, temperature, top_k, generator, top_p=None):
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = torch.softmax(logits, -1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
