"""Exact sequence-chunked training (TNLConfig.seq_chunk, seqpar.models.chunked) on the CPU.

The chunked forward/backward must give the loss and every parameter gradient of the whole-sequence
path (not truncated back-propagation): plain, packed documents across and on chunk boundaries, masked
labels, learnable slopes, initial/final states, dropout (RNG replay), bf16 autocast (re-entered in the
backward), eval and generation; its saved activations must not grow with T at a fixed chunk.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from seqpar.models import TNLConfig, TransNormerLLM
from seqpar.models import chunked as chunked_mod
from seqpar.models.chunked import boundary_state_bytes, chunk_plan, chunked_prefill
from seqpar.models.offload import (
    HostMemoryError, check_offload_fits, host_offload_stats, offload_host_bytes, reset_host_offload_stats,
)

T = 1000
RTOL = 1e-5


def _model(seq_chunk=None, **kw):
    torch.manual_seed(0)  # same weights for every seq_chunk
    return TransNormerLLM(TNLConfig.preset("tiny", seq_chunk=seq_chunk, **kw))


def _batch(B=1, T=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    labels = torch.randint(0, 256, (B, T), generator=g)
    labels[:, 100:140] = -100  # masked span inside chunk 0
    labels[:, 380:390] = -100  # masked span across the chunk boundary 384
    labels[:, -1] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, return_logits=False, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_close(a, b, rtol=RTOL, what=""):
    scale = b.abs().max().clamp(min=1e-30)
    err = (a - b).abs().max()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol} x {scale:.3g}"


def _assert_grads(g, g_ref, rtol=RTOL):
    assert g.keys() == g_ref.keys()
    for n in g_ref:
        _assert_close(g[n], g_ref[n], rtol, n)


# ------------------------------------------------------------------------------------------ plan / config
def test_chunk_plan_splits_documents():
    p = chunk_plan(10, 4)
    assert p.bounds == [(0, 4), (4, 8), (8, 10)] and p.continues == [False, True, True] and p.cu == [None] * 3
    # a document boundary exactly on the chunk boundary 4, one inside chunk 1, an empty document at 8
    p = chunk_plan(10, 4, [0, 4, 6, 8, 8, 10])
    assert p.cu == [[0, 4], [0, 2, 4], [0, 2]]
    assert p.continues == [False, False, False]
    p = chunk_plan(10, 4, [0, 3, 10])
    assert p.cu == [[0, 3, 4], [0, 4], [0, 2]] and p.continues == [False, True, True]
    with pytest.raises(ValueError, match="cu_seqlens must start at 0, end at T = 10"):
        chunk_plan(10, 4, [0, 3, 9])


@pytest.mark.parametrize("bad", [0, -4, 1.5, True, "64"])
def test_seq_chunk_is_validated(bad):
    with pytest.raises(ValueError, match="TNLConfig.seq_chunk must be a positive int"):
        TNLConfig.preset("tiny", seq_chunk=bad)


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("case", ["plain", "packed_learnable_slopes"])
def test_chunked_loss_and_grads_equal_whole_sequence(case):
    kw = {"learnable_slopes": True} if case != "plain" else {}
    B = 2 if case == "plain" else 1
    ids, labels = _batch(B)
    extra = {}
    if case != "plain":
        # documents straddling chunk boundaries (192, 576), one ending exactly on the boundary 384, an empty
        # document, a one-token document; labels at document ends are masked as packing does
        cu = torch.tensor([0, 150, 384, 384, 700, 701, T], dtype=torch.int32)
        labels[0, cu[1:-1].long() - 1] = -100
        extra["cu_seqlens"] = cu
    loss0, g0 = _loss_and_grads(_model(None, **kw), ids, labels, **extra)
    for C in (192, 1000, 333):  # not a divisor; one chunk (the whole-sequence path); three chunks + 1 token
        loss, g = _loss_and_grads(_model(C, **kw), ids, labels, **extra)
        _assert_close(loss, loss0, what=f"loss C={C}")
        _assert_grads(g, g0)
    if case != "plain":
        assert g0["layers.0.token_mixer.log_slopes"].abs().max() > 0


def test_chunked_with_block_checkpointing_and_no_valid_label():
    ids, labels = _batch(T=300)
    loss0, g0 = _loss_and_grads(_model(None), ids, labels)
    loss, g = _loss_and_grads(_model(64, activation_checkpointing=True), ids, labels)
    _assert_close(loss, loss0, what="loss")
    _assert_grads(g, g0)
    out = _model(64)(ids, labels=torch.full_like(labels, -100), return_logits=False)
    assert out.loss.item() == 0.0 and int(out.num_tokens) == 0
    out.loss.backward()


def test_chunked_states_and_logits_with_grad():
    """initial_states / final_states / logits through the chunked Function: values and all gradients."""
    ids, labels = _batch(B=2, T=300)
    c = TNLConfig.preset("tiny")
    g = torch.Generator().manual_seed(3)
    h0 = [0.1 * torch.randn(2, c.n_heads, c.head_dim, c.head_dim, generator=g) for _ in range(c.n_layers)]
    w = torch.randn(2, 300, 256, generator=g)
    results = []
    for C in (None, 64):
        model = _model(C)
        init = [h.clone().requires_grad_(True) for h in h0]
        out = model(ids, labels=labels, initial_states=init, output_final_states=True, return_logits=True)
        total = out.loss + (out.logits * w).sum() * 1e-3 + sum((S * S).sum() for S in out.final_states)
        total.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}, [h.grad for h in init]))
    (o0, g0, d0), (o1, g1, d1) = results
    _assert_close(o1.loss.detach(), o0.loss.detach(), what="loss")
    _assert_close(o1.logits.detach(), o0.logits.detach(), what="logits")
    for a, b in zip(o1.final_states, o0.final_states):
        _assert_close(a.detach(), b.detach(), what="final state")
    _assert_grads(g1, g0)
    for a, b in zip(d1, d0):
        _assert_close(a, b, what="d initial_state")


def _eager_chunk_loop(model, ids, labels, C):
    """Reference: the same chunk loop with the whole graph kept (no recompute)."""
    S = [None] * len(model.layers)
    total = 0.0
    for s in range(0, ids.shape[1], C):
        x = model.embed(ids[:, s:s + C])
        new = []
        for layer, h0 in zip(model.layers, S):
            x, ht = layer(x, initial_state=h0, output_final_state=True)
            new.append(ht)
        S = new
        total = total + model._chunked_ce_sum(model.final_norm(x), labels[:, s:s + C])  # the model's own head
    return total / (labels != -100).sum()


def test_dropout_rng_is_replayed_per_chunk():
    ids, labels = _batch(T=300)
    ref = _model(None, dropout=0.2).train()
    torch.manual_seed(5)
    loss0 = _eager_chunk_loop(ref, ids, labels, 64)
    loss0.backward()
    g0 = {n: p.grad for n, p in ref.named_parameters()}
    model = _model(64, dropout=0.2).train()
    torch.manual_seed(5)
    loss, g = _loss_and_grads(model, ids, labels)
    _assert_close(loss, loss0.detach(), what="loss")
    _assert_grads(g, g0)
    torch.manual_seed(6)  # other masks: another loss (the test sees the dropout)
    assert abs(_loss_and_grads(model, ids, labels)[0] - loss) > 1e-4


def test_bf16_autocast_is_reentered_in_the_backward():
    ids, labels = _batch(T=300)
    ref = _model(None)
    # no autocast cache: each chunk casts the weights afresh, so their gradients sum in fp32 as in the
    # chunked backward (a cached bf16 weight copy would sum the chunks' gradients in bf16)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        loss0 = _eager_chunk_loop(ref, ids, labels, 64)
    loss0.backward()
    g0 = {n: p.grad for n, p in ref.named_parameters()}
    model = _model(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels, return_logits=False)
    out.loss.backward()
    g = {n: p.grad for n, p in model.named_parameters()}
    _assert_close(out.loss.detach(), loss0.detach(), 1e-6, "loss")
    _assert_grads(g, g0, 1e-4)  # bf16 recompute == the forward's ops; only the sum order differs
    _, g_fp32 = _loss_and_grads(_model(None), ids, labels)  # the fp32 gradient is measurably different
    assert max(((g[n] - g_fp32[n]).abs().max() / g_fp32[n].abs().max()).item() for n in g) > 1e-3


# ------------------------------------------------------------------------------------------ inference
def test_eval_and_generation_prefill_use_the_chunks():
    ids, labels = _batch(T=300)
    whole, chunk = _model(None).eval(), _model(64).eval()
    with torch.no_grad():
        a = whole(ids, labels=labels, output_final_states=True)
        b = chunk(ids, labels=labels, output_final_states=True)
    _assert_close(b.loss, a.loss, what="loss")
    _assert_close(b.logits, a.logits, what="logits")
    for x, y in zip(b.final_states, a.final_states):
        _assert_close(x, y, what="final state")
    last, states = chunked_prefill(chunk, ids)
    _assert_close(last, a.logits[:, -1], what="prefill logits")
    for x, y in zip(states, a.final_states):
        _assert_close(x, y, what="prefill state")
    ids_a, lg_a = whole.generate(ids, 8, temperature=0, return_logits=True)
    ids_b, lg_b = chunk.generate(ids, 8, temperature=0, return_logits=True)
    assert torch.equal(ids_a, ids_b)
    _assert_close(lg_b, lg_a, what="generation logits")


# ------------------------------------------------------------------------------------------ memory
class _LiveSaved(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of saved tensors alive in autograd graphs (freed when the graph is)."""

    def __init__(self):
        self.live = self.peak = 0

        class Box:
            def __init__(box, t):
                box.t = t

        def free(n):
            self.live -= n

        def pack(t):
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            box = Box(t)
            weakref.finalize(box, free, n)
            return box

        super().__init__(pack, lambda box: box.t)


def _peak_saved(model, T):
    ids, labels = _batch(T=T)
    h = _LiveSaved()
    with h:
        out = model(ids, labels=labels, return_logits=False)
        out.loss.backward()
        del out
    assert h.live == 0
    return h.peak


def test_saved_activations_stay_constant_as_T_grows():
    C, T1, T2 = 64, 256, 1024
    chunked, whole = _model(C), _model(None)
    p1, p2 = _peak_saved(chunked, T1), _peak_saved(chunked, T2)
    cfg = chunked.config
    # the peak grows by the boundary states only ((n-1) x L x B x H x D x E fp32): no per-token activation
    assert p2 - p1 == boundary_state_bytes(cfg, 1, T2) - boundary_state_bytes(cfg, 1, T1)
    w1, w2 = _peak_saved(whole, T1), _peak_saved(whole, T2)
    assert w2 - w1 > 20 * (p2 - p1)  # the whole-sequence path saves O(T) activations
    assert p1 < w1


# ------------------------------------------------------------------------------------------ offload
def test_offload_host_bytes_measured_equal_formula_and_fit_check():
    cfg = TNLConfig.preset("tiny", activation_checkpointing=True, activation_offload=True)
    torch.manual_seed(0)
    model = TransNormerLLM(cfg).train()
    ids, labels = _batch(B=2, T=200)
    reset_host_offload_stats()
    out = model(ids, labels=labels, return_logits=False)
    during = host_offload_stats()["current"]
    out.loss.backward()
    assert during == offload_host_bytes(cfg, 2, 200, torch.float32) == 2 * 2 * 200 * 64 * 4
    assert host_offload_stats()["current"] == 0
    assert check_offload_fits(cfg, 2, 200, torch.float32, available=10 ** 9) == during
    big = TNLConfig.preset("tnl-0.4b")
    with pytest.raises(HostMemoryError, match=r"needs 96.0 GiB of pinned host memory .* only 100.0 GiB"):
        check_offload_fits(big, 1, 1 << 20, torch.float32, available=100 * 2 ** 30)
    check_offload_fits(big, 1, 1 << 20, torch.bfloat16, available=100 * 2 ** 30)  # 48 GiB fits


def test_offload_error_comes_before_the_forward(monkeypatch):
    from seqpar.models import offload

    monkeypatch.setattr(offload, "available_host_bytes", lambda: 10_000)
    ids, labels = _batch(T=200)
    for C in (None, 64):  # whole sequence: T tokens; chunked: one chunk's worth
        model = _model(C, activation_checkpointing=True, activation_offload=True).train()
        with pytest.raises(HostMemoryError, match="use TNLConfig.seq_chunk"):
            model(ids, labels=labels, return_logits=False)


# ------------------------------------------------------------------------------------------ SP > 1
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.new_group(list(range(world)))
        model = TransNormerLLM(TNLConfig.preset("tiny", seq_chunk=16), sp_group=group)
        ids = torch.randint(0, 256, (1, 32))
        try:
            model(ids, labels=ids)
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        Path(out_dir, f"rank{rank}.txt").write_text(msg)
    finally:
        dist.destroy_process_group()


def test_seq_chunk_with_sp_is_a_clear_error(tmp_path):
    mp.spawn(_sp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert "seq_chunk=16 does not compose with sequence parallelism (SP group of size 2)" in msg, msg


def test_packed_states_are_rejected():
    ids = torch.randint(0, 256, (1, 100))
    cu = torch.tensor([0, 50, 100])
    with pytest.raises(ValueError, match="seq_chunk with cu_seqlens does not take initial_states"):
        _model(32)(ids, cu_seqlens=cu, output_final_states=True)


# ------------------------------------------------------------------------------------------ train.py
def _train_module():
    root = Path(__file__).resolve().parents[2]
    name = "seqpar_train_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "train.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name], root


def _fit(tmp_path, tag, overrides, monkeypatch):
    train, root = _train_module()
    monkeypatch.chdir(root)
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    cfg = train.load_config([str(root / "configs/debug.yaml")], [
        "trainer.max_steps=3", "trainer.val_check_interval=null", "trainer.ckpt_every=0", "optim.grad_clip=0.5",
        "optim.lr=1e-3", f"trainer.out_dir={tmp_path / tag}", *overrides])
    trainer, lit, dm, ckpt, _ = train.build(cfg, train.resolve_layout(cfg))
    trainer.fit(lit, datamodule=dm)
    return lit.model


def test_train_py_override_reaches_the_model_and_trains(tmp_path, monkeypatch):
    """model.overrides.seq_chunk through train.py: Lightning's loss.backward() + clipping, same weights."""
    calls = []
    orig = chunked_mod._ChunkedLM.apply
    monkeypatch.setattr(chunked_mod._ChunkedLM, "apply", lambda *a: calls.append(1) or orig(*a))
    m_chunk = _fit(tmp_path, "chunk", ["model.overrides.seq_chunk=24"], monkeypatch)
    assert m_chunk.config.seq_chunk == 24 and len(calls) == 3  # seq_len 64: chunks 24, 24, 16
    m_whole = _fit(tmp_path, "whole", [], monkeypatch)
    # AdamW moves every weight by ~lr per step whatever the gradient's size: after 3 steps the two runs agree
    # to a small fraction of one step (a gradient error would show as a difference of order lr)
    for (n, a), (_, b) in zip(m_chunk.named_parameters(), m_whole.named_parameters()):
        assert (a - b).abs().max() <= 1e-2 * 1e-3, n


def test_dtensor_parameters_are_rejected():
    """FSDP's DTensor parameters: the chunked backward could not hand them their gradients -> clear error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = _model(32)
        mesh = init_device_mesh("cpu", (1,))
        w = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(w.detach(), mesh, [Replicate()]))
        ids = torch.randint(0, 256, (1, 100))
        with pytest.raises(ValueError, match="seq_chunk does not support FSDP / DTensor parameters"):
            model(ids, labels=ids)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ GPU (Triton)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunked_equals_whole_on_gpu_triton():
    """The Triton kernels with initial/final states and per-chunk cu_seqlens: fp32 chunked equals fp32 whole (1e-4);
    under bf16 autocast, chunked is as close to the fp32 whole step as the bf16 whole step is (each gradient within
    2% of its largest entry, or within 2x the bf16 whole step's own error: the learnable slopes' gradient is a sum
    of terms of both signs much larger than itself, whose bf16 rounding differs between chunkings)."""
    ids, labels = _batch()
    cu = torch.tensor([0, 150, 384, 700, 701, T], dtype=torch.int32, device="cuda")
    ids, labels = ids.cuda(), labels.cuda()
    runs = {}
    for autocast in (False, True):
        for C in (None, 192):
            model = _model(C, learnable_slopes=True).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(ids, labels=labels, cu_seqlens=cu, return_logits=False)
            out.loss.backward()
            runs[autocast, C] = {"loss": out.loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
    ref = runs[False, None]
    _assert_grads(runs[False, 192], ref, 1e-4)
    for n, r in ref.items():
        err = (runs[True, 192][n] - r).abs().max()
        own = (runs[True, None][n] - r).abs().max()
        assert err <= max(2e-2 * r.abs().max(), 2 * own), f"{n}: bf16 chunked error {err:.3g}, bf16 whole {own:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunked_peak_gpu_memory_is_flat_in_T():
    torch.manual_seed(0)

    def peak(C, T):
        model = TransNormerLLM(TNLConfig.preset("tiny", d_model=256, n_heads=4, glu_dim=512, n_layers=4,
                                                seq_chunk=C)).cuda()
        ids = torch.randint(0, 256, (1, T), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    C, T1, T2 = 2048, 8192, 65536
    chunk_growth = peak(C, T2) - peak(C, T1)
    whole_growth = peak(None, T2) - peak(None, T1)
    assert chunk_growth < 0.1 * whole_growth, (chunk_growth, whole_growth)
