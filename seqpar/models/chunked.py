"""Exact sequence-chunked forward/backward of :class:`~seqpar.models.TransNormerLLM` (``TNLConfig.seq_chunk``).

Every TNL operation except the token mixer is token-local, and the token mixer sees earlier tokens only
through its state ``S [B, H, D, E]`` (fp32). So T tokens are split into chunks c = 0..n-1 of C tokens
(the last one shorter when C does not divide T):

    forward   for c in order: run all layers on chunk c, layer l starting from S[l, c] and producing
              S[l, c+1] = its ``ht``; keep only the boundary states S[., c] and the chunk's loss sum.
    backward  for c in reverse: recompute chunk c from S[., c] with grad enabled and back-propagate
              loss_c + <S[., c+1], dS[., c+1]> (+ <logits_c, dlogits_c>) into the parameters and into
              S[., c]; dS[., c] (the layers' ``dh0``) goes to chunk c-1.

This is DESIGN.md section 8 (the ring of sequence parallelism run sequentially on one device): the loss
and gradients equal the whole-sequence ones (not truncated back-propagation). The whole loop is one
``torch.autograd.Function`` whose inputs are the parameters, so a plain ``loss.backward()`` (Lightning's
automatic optimisation) works and every parameter receives its gradient once (DDP's hooks fire once).

Details that keep it exact:
- packed documents (``cu_seqlens``, B == 1): the global offsets are split per chunk; a chunk's first
  (partial) document starts from the carried state, later ones from zero; a chunk whose first token
  starts a document gets no carried state (a document boundary exactly on a chunk boundary).
- the loss is the global mean over all valid (non -100) tokens of the sequence: each chunk contributes
  its cross-entropy sum divided by the whole sequence's count.
- dropout: the RNG state before each chunk is saved and replayed in its recomputation (as
  ``torch.utils.checkpoint`` does); autocast: its state at the forward is re-entered in the backward.

Memory: the boundary states, ``(n - 1) x n_layers x B x H x D x E x 4`` bytes, plus one chunk's
activations (with ``activation_checkpointing`` "selective" / "full" the chunk's blocks are checkpointed inside its
recompute; "auto" chooses for the chunk's shape [B, C]).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .transnormer import IGNORE_INDEX, LMOutput, _ce_sum, run_block

__all__ = ["chunk_plan", "ChunkPlan", "chunked_forward", "chunked_prefill", "boundary_state_bytes"]


# ----------------------------------------------------------------------------------------- plan
@dataclass
class ChunkPlan:
    """How T tokens split into chunks.

    bounds: [(start, end)] per chunk; cu: per chunk the local ``cu_seqlens`` (python ints) or None;
    continues: per chunk whether its first token continues the previous chunk's state (False for a
    chunk whose first token starts a document, and for chunk 0).
    """

    bounds: List[Tuple[int, int]]
    cu: List[Optional[List[int]]] = field(default_factory=list)
    continues: List[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.bounds)


def chunk_plan(T: int, C: int, cu_seqlens: Optional[Sequence[int]] = None) -> ChunkPlan:
    """Split ``T`` tokens into chunks of ``C`` (the last one holds the rest), splitting ``cu_seqlens``.

    ``cu_seqlens`` are the global document offsets ``[0, ..., T]`` (non-decreasing); per chunk
    ``[s, e)`` the local offsets are ``0``, every global offset strictly inside, and ``e - s``.
    """
    if not isinstance(T, int) or T <= 0 or not isinstance(C, int) or C <= 0:
        raise ValueError(f"chunk_plan needs positive int T and C, got T={T!r}, C={C!r}")
    bounds = [(s, min(s + C, T)) for s in range(0, T, C)]
    if cu_seqlens is None:
        return ChunkPlan(bounds, [None] * len(bounds), [c > 0 for c in range(len(bounds))])
    offs = [int(o) for o in cu_seqlens]
    if not offs or offs[0] != 0 or offs[-1] != T or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"cu_seqlens must start at 0, end at T = {T} and be non-decreasing, got {offs[:8]}...")
    starts = set(offs)
    cus, cont = [], []
    for s, e in bounds:
        cus.append([0] + sorted({o - s for o in offs if s < o < e}) + [e - s])
        cont.append(s not in starts)
    return ChunkPlan(bounds, cus, cont)


def boundary_state_bytes(config, batch_size: int, seq_len: int) -> int:
    """Bytes of the boundary states the chunked training forward keeps: (n_chunks - 1) x L x B x H x D x E x 4."""
    n = -(-seq_len // config.seq_chunk)
    return (n - 1) * config.n_layers * batch_size * config.n_heads * config.head_dim * config.head_dim * 4


# ----------------------------------------------------------------------------------------- one chunk
def _local_h0(S: Optional[torch.Tensor], n_docs: Optional[int]) -> Optional[torch.Tensor]:
    """Initial state of one layer for a chunk: S [B|1, H, D, E] (or None); packed: [n_docs, H, D, E]."""
    if S is None or n_docs is None or n_docs == 1:
        return S
    return torch.cat([S, S.new_zeros((n_docs - 1,) + tuple(S.shape[1:]))], 0)


def _run_layers(model, ids_c, cu_c, states_in, want_ht: bool, ckpt: str):
    """Embedding + all blocks on one chunk: (x [B, Tc, d], per-layer final states or Nones).

    ckpt: the blocks' recompute policy ("none" | "selective" | "full").

    states_in: per layer the carried state or None (zero); with cu_c the states are those of the
    chunk's first document ([1, H, D, E]) and the returned ones those of its last document.
    """
    x = model.embed_tokens(ids_c)
    n_docs = None
    if cu_c is not None:
        n_docs = cu_c.numel() - 1
    out_states = []
    for layer, S in zip(model.layers, states_in):
        h0 = _local_h0(S, n_docs)
        x, ht = run_block(layer, ckpt, x, cu_c, h0, want_ht, True, offload=model.config.activation_offload)
        if ht is not None and n_docs is not None:
            ht = ht[-1:]
        out_states.append(ht if want_ht else None)
    return x, out_states


def _head(model, x, labels_c, want_logits: bool):
    """(cross-entropy sum over the chunk's valid labels or None, logits [B, Tc, V] or None)."""
    h = model.final_norm(x)
    logits = model.lm_head(h) if want_logits else None
    if labels_c is None:
        return None, logits
    if logits is not None:
        return _ce_sum(logits, labels_c), logits
    return model._chunked_ce_sum(h, labels_c), None


# ----------------------------------------------------------------------------------------- autograd
def _autocast_state(device_type: str):
    kinds = [device_type] if device_type == "cpu" else [device_type, "cpu"]
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds], \
        torch.is_autocast_cache_enabled()


def _autocast_ctx(state):
    kinds, cache = state
    stack = contextlib.ExitStack()
    for k, enabled, dtype in kinds:
        stack.enter_context(torch.autocast(k, dtype=dtype, enabled=enabled, cache_enabled=cache))
    return stack


def _needs_rng(model) -> bool:
    return model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


class _Run:
    """What the backward needs besides the saved boundary states (non-tensor bookkeeping)."""

    def __init__(self, model, plan, input_ids, labels, cu_tensors, count, want_logits, want_final, has_init,
                 n_params, ckpt):
        self.model, self.plan, self.input_ids, self.labels = model, plan, input_ids, labels
        self.cu, self.count, self.want_logits, self.want_final = cu_tensors, count, want_logits, want_final
        self.has_init, self.n_params, self.ckpt = has_init, n_params, ckpt
        self.rng: List = []
        self.autocast = None
        self.devices: List[int] = []
        self.state_index: List[Optional[int]] = []  # per chunk: offset of its L states in saved_tensors


class _ChunkedLM(torch.autograd.Function):
    """Inputs: (run, *params, *initial_states); outputs: (loss?, logits?, *final_states?)."""

    @staticmethod
    def forward(ctx, run: _Run, *tensors):
        model, plan = run.model, run.plan
        L = len(model.layers)
        init = list(tensors[run.n_params:]) if run.has_init else [None] * L
        run.autocast = _autocast_state(run.input_ids.device.type)
        need_rng = _needs_rng(model)
        if need_rng and run.input_ids.is_cuda:
            run.devices = [run.input_ids.device.index if run.input_ids.device.index is not None
                           else torch.cuda.current_device()]
        saved: List[torch.Tensor] = []
        S = init
        total, logits = None, []
        n = len(plan)
        for c, (s, e) in enumerate(plan.bounds):
            if c > 0 and not plan.continues[c]:
                S = [None] * L
            if S[0] is not None:
                run.state_index.append(len(saved))
                saved.extend(S)
            else:
                run.state_index.append(None)
            if need_rng:
                run.rng.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in run.devices]))
            last = c == n - 1
            want_ht = (not last and plan.continues[c + 1]) or (last and run.want_final)
            labels_c = run.labels[:, s:e] if run.labels is not None else None
            x, S = _run_layers(model, run.input_ids[:, s:e], run.cu[c], S, want_ht, ckpt="none")
            part, lg = _head(model, x, labels_c, run.want_logits)
            if part is not None:
                total = part if total is None else total + part
            if lg is not None:
                logits.append(lg)
        ctx.save_for_backward(*saved)
        ctx.run = run
        ctx.set_materialize_grads(False)
        outs = []
        if run.labels is not None:
            outs.append(total / run.count.clamp(min=1).to(total.dtype))
        if run.want_logits:
            outs.append(torch.cat(logits, 1))
        if run.want_final:
            outs.extend(S)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        run = ctx.run
        model, plan = run.model, run.plan
        L = len(model.layers)
        saved = ctx.saved_tensors
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == run.n_params, "the model's trainable parameters changed between forward and backward"
        i = 0
        g_loss = g_logits = None
        if run.labels is not None:
            g_loss, i = grads[0], 1
        if run.want_logits:
            g_logits, i = grads[i], i + 1
        dS: List[Optional[torch.Tensor]] = list(grads[i:i + L]) if run.want_final else [None] * L
        acc: List[Optional[torch.Tensor]] = [None] * len(params)
        d_init: List[Optional[torch.Tensor]] = [None] * L
        count = run.count.clamp(min=1) if run.count is not None else None
        for c in reversed(range(len(plan))):
            s, e = plan.bounds[c]
            gl = g_logits[:, s:e] if g_logits is not None else None
            idx = run.state_index[c]
            S_in = list(saved[idx: idx + L]) if idx is not None else [None] * L
            want_dS_in = idx is not None and (c > 0 or any(t.requires_grad for t in S_in))
            if g_loss is None and gl is None and all(d is None for d in dS):
                dS = [None] * L
                continue
            want_ht = any(d is not None for d in dS)
            rng = contextlib.nullcontext()
            if run.rng:
                rng = torch.random.fork_rng(devices=run.devices)
            with rng, torch.enable_grad(), _autocast_ctx(run.autocast):
                if run.rng:
                    cpu_state, dev_states = run.rng[c]
                    torch.set_rng_state(cpu_state)
                    for d, st in zip(run.devices, dev_states):
                        torch.cuda.set_rng_state(st, d)
                leaves = [t.detach().requires_grad_(want_dS_in) if t is not None else None for t in S_in]
                labels_c = run.labels[:, s:e] if run.labels is not None else None
                x, S_out = _run_layers(model, run.input_ids[:, s:e], run.cu[c], leaves, want_ht, ckpt=run.ckpt)
                part, lg = _head(model, x, labels_c if g_loss is not None else None, gl is not None)
                outs, gouts = [], []
                if part is not None and part.requires_grad:
                    outs.append(part)
                    gouts.append(g_loss / count.to(g_loss.dtype))
                if lg is not None:
                    outs.append(lg)
                    gouts.append(gl)
                for So, d in zip(S_out, dS):
                    if d is not None and So is not None and So.requires_grad:
                        outs.append(So)
                        gouts.append(d)
                inputs = params + ([t for t in leaves] if want_dS_in else [])
                del x, S_out, part, lg
                g = torch.autograd.grad(outs, inputs, gouts, allow_unused=True) if outs else [None] * len(inputs)
                del outs, gouts
            for j, gp in enumerate(g[: len(params)]):
                if gp is not None:
                    if acc[j] is None:
                        acc[j] = gp.contiguous()  # owned, dense: the later chunks add in place
                    else:
                        acc[j].add_(gp)
            dS = list(g[len(params):]) if want_dS_in else [None] * L
            if c == 0 and want_dS_in:
                d_init = dS
        return (None, *acc, *(d_init if run.has_init else []))


# ----------------------------------------------------------------------------------------- entry points
def _check_cu(cu_seqlens, initial_states, output_final_states):
    if cu_seqlens is not None and (initial_states is not None or output_final_states):
        raise ValueError("TNLConfig.seq_chunk with cu_seqlens does not take initial_states or "
                         "output_final_states (per-document states); pass one of them only")


def _has_dtensor(params) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in params)


def chunked_forward(model, input_ids, labels=None, cu_seqlens=None, initial_states=None,
                    output_final_states=False, return_logits=True, sp_size: int = 1) -> Optional[LMOutput]:
    """``model.forward`` with ``model.config.seq_chunk``; None when T <= seq_chunk (the whole-sequence path).

    input_ids / labels [B, T] (labels shifted, -100 ignored), cu_seqlens int [N+1] (B == 1),
    initial_states per layer [B, H, D, E] (not with cu_seqlens). Returns :class:`LMOutput` as the
    whole-sequence forward: loss = mean cross entropy over the valid tokens of the whole sequence.
    """
    C = model.config.seq_chunk
    if sp_size > 1:
        raise ValueError(
            f"TNLConfig.seq_chunk={C} does not compose with sequence parallelism (SP group of size {sp_size}): "
            "each layer's state exchange needs the rank's whole shard; use seq_chunk=None with SP > 1, or SP = 1"
        )
    T = input_ids.shape[1]
    if T <= C:
        return None
    _check_cu(cu_seqlens, initial_states, output_final_states)
    plan = chunk_plan(T, C, cu_seqlens.tolist() if cu_seqlens is not None else None)
    cu_t = [torch.tensor(cu, dtype=cu_seqlens.dtype, device=cu_seqlens.device) if cu is not None else None
            for cu in plan.cu]
    L = len(model.layers)
    want_logits = bool(return_logits) or labels is None
    count = (labels != IGNORE_INDEX).sum() if labels is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if _has_dtensor(params):
        raise ValueError(
            "TNLConfig.seq_chunk does not support FSDP / DTensor parameters: the chunked backward returns the "
            "gradients of the model's parameters itself, FSDP's unsharded copies would get none; use seq_chunk=None"
        )
    init = list(initial_states) if initial_states is not None else None
    needs_grad = torch.is_grad_enabled() and (bool(params) or (init is not None and any(t.requires_grad for t in init)))
    ckpt = model.activation_policy(input_ids.shape[0], min(C, T)) if model.training else "none"
    if needs_grad:
        if ckpt == "full" and model.config.activation_offload:
            from .offload import check_offload_fits

            check_offload_fits(model.config, input_ids.shape[0], min(C, T), model.embed.weight.dtype)
        run = _Run(model, plan, input_ids, labels, cu_t, count, want_logits, output_final_states,
                   init is not None, len(params), ckpt)
        outs = list(_ChunkedLM.apply(run, *params, *(init or [])))
        loss = outs.pop(0) if labels is not None else None
        logits = outs.pop(0) if want_logits else None
        finals = outs if output_final_states else None
    else:
        S = init if init is not None else [None] * L
        total, parts = None, []
        for c, (s, e) in enumerate(plan.bounds):
            if c > 0 and not plan.continues[c]:
                S = [None] * L
            last = c == len(plan) - 1
            want_ht = (not last and plan.continues[c + 1]) or (last and output_final_states)
            x, S = _run_layers(model, input_ids[:, s:e], cu_t[c], S, want_ht, ckpt="none")
            part, lg = _head(model, x, labels[:, s:e] if labels is not None else None, want_logits)
            if part is not None:
                total = part if total is None else total + part
            if lg is not None:
                parts.append(lg)
        loss = total / count.clamp(min=1).to(total.dtype) if labels is not None else None
        logits = torch.cat(parts, 1) if want_logits else None
        finals = S if output_final_states else None
    return LMOutput(loss=loss, logits=logits if return_logits else None, final_states=finals,
                    num_tokens=count)


@torch.no_grad()
def chunked_prefill(model, prompt_ids: torch.Tensor, chunk: Optional[int] = None):
    """Prefill for generation in chunks: prompt_ids [B, T0] -> (logits of the last position [B, V],
    per-layer states [B, H, D, E] fp32). Memory: one chunk's activations, for any prompt length."""
    C = chunk or model.config.seq_chunk or prompt_ids.shape[1]
    plan = chunk_plan(prompt_ids.shape[1], C)
    S: List[Optional[torch.Tensor]] = [None] * len(model.layers)
    for s, e in plan.bounds:
        x, S = _run_layers(model, prompt_ids[:, s:e], None, S, True, ckpt="none")
    return model.lm_head(model.final_norm(x[:, -1])), S
