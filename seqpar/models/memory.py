"""Activation memory of a training step under each recompute policy, and the choice of ``activation_checkpointing="auto"``.

Bytes per token and layer that a TNL block keeps for its backward, with ``a`` = the activations' itemsize (2 under
bf16 autocast), ``r`` = the residual stream's (4 with ``residual_dtype="param"``: the embedding output and the
residual adds stay fp32 under autocast; 2 with "autocast"), d = d_model, i = n_heads * head_dim, g = glu_dim:

    policy      compiled block (``compile_blocks``)         eager block (Triton attention)
    none        2 r d + a (d + 8 i + 3 g) + 12              2 r d + a (6 d + 10 i + 3 g) + 12
    selective   r d + a (d + 5 i + 2 g)                     r d + a (2 d + 5 i + 2 g)
    full        r d                                         r d

With the residual in the activations' dtype (r = a, ``residual_dtype="autocast"``) "none" keeps a d more when
compiled (the partitioner saves a normed input instead of recomputing it) and 2 a d less eager (the norms'
outputs are already bf16: autocast casts no copy per projection): 2 r d + a (2 d + 8 i + 3 g) + 12 compiled,
2 r d + a (4 d + 10 i + 3 g) + 12 eager.

"none" keeps the block input and the residual after the token mixer (fp32), the GEMM inputs / outputs, the
activations and the norms' statistics (eager also keeps one bf16 copy of the normed input per projection:
autocast casts it per GEMM); "selective" keeps the block input, the GEMM outputs (q, k, v, u, o_proj, w1, w2;
eager also w3) and the attention output o; "full" keeps the block input. These were counted with
:func:`saved_activation_bytes` on the CPU (slope between two lengths, bf16 autocast, tnl-0.4b's block and two
other widths; compiled with the partitioner inductor uses) and ``tests/models/test_activation_policy.py``
checks them.

A step's peak (:func:`step_memory_bytes`) = model state (parameters + gradients + AdamW's two moments) + L layers'
saved activations + the larger of the loss head's transient (fused linear + cross entropy: the final norm's
output and its gradient, the fp32 weight gradient, one chunk of logits) and the working set of the block being
back-propagated (its recomputed part and the gradients in flight). Against the H200 peaks of tnl-0.4b, B1 T32K,
compiled blocks, fused head (``benchmarks/results/profile_train_h200_tnl04b_T32768.md``): none 36.1 GiB
estimated vs 36.8 measured, full 10.6 vs 10.3.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, Optional, Tuple

import torch

from .config import TNLConfig

__all__ = [
    "POLICIES", "activation_bytes_per_token", "model_state_bytes", "step_memory_bytes", "choose_activation_policy",
    "device_budget_bytes", "saved_activation_bytes", "SAFETY_MARGIN",
]

POLICIES = ("none", "selective", "full")  # fastest first
SAFETY_MARGIN = 0.10  # fraction of the device memory kept free (allocator fragmentation, workspaces, the CUDA graph pool)

def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _residual(config: TNLConfig, dtype: torch.dtype, residual_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The residual stream's dtype: ``residual_dtype`` when given, else that of ``config.residual_dtype`` with
    activations in ``dtype`` (a low-precision dtype means autocast over fp32 parameters)."""
    if residual_dtype is not None:
        return residual_dtype
    if _itemsize(dtype) < 4 and config.residual_dtype != "autocast":
        return torch.float32
    return dtype


def activation_bytes_per_token(config: TNLConfig, policy: str, dtype: torch.dtype = torch.bfloat16,
                               residual_dtype: Optional[torch.dtype] = None, compiled: bool = True) -> Dict[str, float]:
    """Activation bytes per token per layer of ``policy`` ("none" | "selective" | "full"):
    ``{"saved": kept from the forward to the backward, "working": the transient of the block being
    back-propagated}`` (the formulas of the module docstring).

    dtype: the activations' dtype (the autocast dtype, or the model's); residual_dtype: the residual stream's
    (None: from ``config.residual_dtype``: fp32 with fp32 parameters under autocast for "param", the autocast
    dtype for "autocast"); compiled: blocks under torch.compile.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    a, r = _itemsize(dtype), _itemsize(_residual(config, dtype, residual_dtype))
    d, i, g = config.d_model, config.inner_dim, config.glu_dim
    same = r == a  # the residual in the activations' dtype: the norms' outputs need no cast per GEMM
    if compiled:
        none = 2 * r * d + a * ((2 if same else 1) * d + 8 * i + 3 * g) + 12
        selective = r * d + a * (d + 5 * i + 2 * g)
    else:
        none = 2 * r * d + a * ((4 if same else 6) * d + 10 * i + 3 * g) + 12
        selective = r * d + a * (2 * d + 5 * i + 2 * g)
    full = r * d
    # gradients in flight while a block is back-propagated: the residual gradient both ways and the widest
    # activation gradients (the GLU's two branches, or q and k)
    grads = 2 * r * d + 2 * a * max(g, 2 * i)
    saved = {"none": none, "selective": selective, "full": full}[policy]
    return {"saved": float(saved), "working": float(grads + none - saved)}


def model_state_bytes(model_or_config, optimizer_states: int = 2) -> int:
    """Parameters + gradients + ``optimizer_states`` moments (AdamW: 2), each in the parameters' dtype.

    A model counts its local parameter bytes (a DTensor / FSDP shard counts its local part); a TNLConfig
    counts fp32 parameters on the meta device."""
    if isinstance(model_or_config, TNLConfig):
        from .transnormer import TransNormerLLM

        with torch.device("meta"):
            model_or_config = TransNormerLLM(model_or_config)
    total = 0
    seen = set()
    for p in model_or_config.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return int(total * (2 + optimizer_states))


def _head_bytes(config: TNLConfig, tokens: int, a: int, r: int) -> float:
    """The loss head's transient (fused linear + cross entropy): the final norm's output and its gradient, the
    fp32 weight gradient, and one chunk of ``loss_chunk_tokens`` logits in the activation dtype."""
    chunk = min(tokens, config.loss_chunk_tokens)
    return 2 * r * config.d_model * tokens + 4 * config.vocab_size * config.d_model + a * chunk * config.vocab_size


def step_memory_bytes(config: TNLConfig, policy: str, batch_size: int, seq_len: int,
                      dtype: torch.dtype = torch.bfloat16, residual_dtype: Optional[torch.dtype] = None,
                      state_bytes: Optional[int] = None, compiled: bool = True) -> int:
    """Estimated peak device bytes of one training step of [batch_size, seq_len] tokens under ``policy``:
    model state + L layers' saved activations + max(loss head transient, one block's working set).
    ``state_bytes`` defaults to :func:`model_state_bytes` of the config (fp32 parameters, AdamW);
    ``residual_dtype`` None: from ``config.residual_dtype`` (:func:`activation_bytes_per_token`)."""
    tokens = int(batch_size) * int(seq_len)
    residual_dtype = _residual(config, dtype, residual_dtype)
    act = activation_bytes_per_token(config, policy, dtype, residual_dtype, compiled)
    if state_bytes is None:
        state_bytes = model_state_bytes(config)
    a, r = _itemsize(dtype), _itemsize(residual_dtype)
    return int(state_bytes + tokens * config.n_layers * act["saved"]
               + max(_head_bytes(config, tokens, a, r), tokens * act["working"]))


def choose_activation_policy(config: TNLConfig, batch_size: int, seq_len: int, budget_bytes: int,
                             dtype: torch.dtype = torch.bfloat16, residual_dtype: Optional[torch.dtype] = None,
                             state_bytes: Optional[int] = None, compiled: bool = True) -> str:
    """The fastest policy (none > selective > full) whose :func:`step_memory_bytes` fits ``budget_bytes``;
    "full" when none fits (the least memory there is). residual_dtype None: from ``config.residual_dtype``
    (fp32 for a low-precision ``dtype`` under "param": autocast over fp32 parameters; else ``dtype``)."""
    if not isinstance(budget_bytes, (int, float)) or isinstance(budget_bytes, bool) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be a non-negative number of bytes, got {budget_bytes!r}")
    for policy in POLICIES:  # step_memory_bytes resolves residual_dtype None from the config
        if step_memory_bytes(config, policy, batch_size, seq_len, dtype, residual_dtype, state_bytes,
                             compiled) <= budget_bytes:
            return policy
    return "full"


def device_budget_bytes(device, margin: float = SAFETY_MARGIN) -> Optional[int]:
    """Bytes this process may use on a CUDA ``device``: (free + what its caching allocator already reserved)
    x (1 - margin); None for a non-CUDA device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    usable = min(total, free + torch.cuda.memory_reserved(device))
    return int(usable * (1.0 - margin))


def _storage_key(t: torch.Tensor) -> Tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_activation_bytes(fn: Callable[[], object], exclude=()) -> Tuple[object, int]:
    """Run ``fn()`` (a forward with grad enabled) and count the activation bytes kept for its backward:
    the tensors the autograd graph saves (through ``torch.autograd.graph.saved_tensors_hooks``) plus the
    outputs that selective checkpointing caches; unique storages, ``exclude`` (e.g. the parameters) left out.
    Returns (fn's result, bytes)."""
    skip = {_storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
    seen: Dict[Tuple[int, int], int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = _storage_key(t)
            if key not in skip:
                seen[key] = key[1]
        return t

    try:
        from torch.utils.checkpoint import _VersionWrapper
    except ImportError:  # pragma: no cover - older torch
        _VersionWrapper = None
    gc.collect()
    before = set()
    if _VersionWrapper is not None:
        before = {id(o) for o in gc.get_objects() if type(o) is _VersionWrapper}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    if _VersionWrapper is not None:  # selective checkpointing's cache of kept op outputs
        for o in gc.get_objects():
            if type(o) is _VersionWrapper and id(o) not in before and isinstance(o.val, torch.Tensor):
                key = _storage_key(o.val)
                if key not in skip:
                    seen[key] = key[1]
    return out, int(sum(seen.values()))
