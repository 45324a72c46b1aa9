"""torch.compile(fullgraph=True) through the seqpar::lightning_attn_fwd / _bwd custom ops (ops.py): no graph
break, and loss and every gradient equal eager, with cu_seqlens, initial states and learnable slopes."""
import dataclasses
import os

import pytest
import torch

from seqpar import lightning_attn

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])
# CPU: aot_eager traces forward and backward (inductor's C++ compile is too slow for CI); GPU: inductor
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _two_layers(x, log_s, h0, cu, backend):
    s = log_s.exp()  # learnable slopes: a new tensor every call
    o, ht = lightning_attn(x * 2, x.sin(), x, s, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                           backend=backend)
    o2, _ = lightning_attn(o, o.cos(), o, s, cu_seqlens=cu, backend=backend)
    return o2.square().mean() + ht.square().mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_compiles_without_graph_break_and_equals_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    H, D = 2, 16
    x = torch.randn(1, 100, H, D, generator=g).to(DEV)
    cu = torch.tensor([0, 30, 30, 100], dtype=torch.int32, device=DEV)
    h0 = torch.randn(3, H, D, D, generator=g).to(DEV)
    log_s = torch.tensor([-2.0, -1.0], device=DEV)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (x, log_s, h0)]

    eager = leaves()
    l0 = _two_layers(*eager[:2], eager[2], cu, backend)
    g0 = torch.autograd.grad(l0, eager)
    explain = torch._dynamo.explain(_two_layers)(*leaves()[:2], h0, cu, backend)
    assert explain.graph_break_count == 0, explain.break_reasons
    comp = torch.compile(_two_layers, backend=COMPILE_BACKEND, fullgraph=True)
    lv = leaves()
    l1 = comp(*lv[:2], lv[2], cu, backend)
    g1 = torch.autograd.grad(l1, lv)
    assert _rel(l1, l0) < 1e-6
    for a, b in zip(g1, g0):
        assert _rel(a, b) < 1e-5


def test_model_blocks_compile_fullgraph_and_equal_eager():
    """A stack of TransNormerLLM blocks (the part of the model the operator sits in) with packed documents and
    learnable slopes: forward + backward under torch.compile(fullgraph=True) equals eager."""
    from seqpar.models import TNLConfig
    from seqpar.models.transnormer import TNLBlock

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = dataclasses.replace(TNLConfig.preset("tiny"), learnable_slopes=True)
    blocks = torch.nn.ModuleList([TNLBlock(cfg, i) for i in range(cfg.n_layers)]).to(DEV)
    x = torch.randn(1, 64, cfg.d_model, device=DEV)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32, device=DEV)

    def run(x):
        for blk in blocks:
            x, _ = blk(x, cu_seqlens=cu)
        return x.square().mean()

    def grads(fn):
        blocks.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in blocks.parameters()]

    l0, g0 = grads(run)
    l1, g1 = grads(torch.compile(run, backend=COMPILE_BACKEND, fullgraph=True))
    assert _rel(l1, l0) < 1e-5
    names = [n for n, _ in blocks.named_parameters()]
    assert any("log_slopes" in n for n in names)
    for n, a, b in zip(names, g1, g0):
        assert _rel(a, b) < 1e-4, n


@pytest.mark.gpu
def test_whole_model_compiles_fullgraph_on_gpu_and_equals_eager():
    """compile_model() with inductor on the GPU (Triton attention and fused head inside custom ops): one graph
    for forward + backward with packed documents and learnable slopes; loss and gradients equal eager."""
    from seqpar.models import TNLConfig, TransNormerLLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = dataclasses.replace(TNLConfig.preset("tiny"), learnable_slopes=True)
    eager = TransNormerLLM(cfg).cuda()
    comp = TransNormerLLM(cfg).cuda()
    comp.load_state_dict(eager.state_dict())
    comp.compile_model(fullgraph=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda", generator=g)
    y = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda", generator=g)
    cu = torch.tensor([0, 100, 300, 512], dtype=torch.int32, device="cuda")
    losses = []
    for m in (eager, comp):
        loss = m(x, labels=y, cu_seqlens=cu, return_logits=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert _rel(losses[1], losses[0]) < 1e-5
    for (n, pe), pc in zip(eager.named_parameters(), comp.parameters()):
        assert _rel(pc.grad, pe.grad) < 1e-4, n


@pytest.mark.skipif(not TRITON_OK, reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("varlen", [False, True])
def test_custom_op_backward_reuses_forward_states(monkeypatch, varlen):
    """Through the custom ops (Triton), the backward reads the segment states the forward op returned (no
    second forward), and every gradient equals the autograd.Function path bit for bit; with cu_seqlens the
    shape-derived state buffer is padded."""
    from seqpar.kernels.lightning_attn import chunk
    from seqpar.kernels.lightning_attn.ops import lightning_attn_fwd_op

    g = torch.Generator().manual_seed(0)
    H, D, T = 2, 16, 300
    q, k, v = (torch.randn(1, T, H, D, generator=g).to(DEV) for _ in range(3))
    cu = torch.tensor([0, 70, 70, 300], dtype=torch.int32, device=DEV) if varlen else None
    N = 3 if varlen else 1
    h0 = torch.randn(N, H, D, D, generator=g).to(DEV)
    s = torch.tensor([0.05, 0.3], device=DEV)
    do = torch.randn(1, T, H, D, generator=g).to(DEV)
    dht = torch.randn(N, H, D, D, generator=g).to(DEV)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (q, k, v, s, h0)]

    ref = leaves()
    o0, ht0 = chunk.chunk_lightning_attn(*ref[:4], D ** -0.5, ref[4], True, cu)
    g0 = torch.autograd.grad((o0 * do).sum() + (ht0 * dht).sum(), ref)
    calls = []
    real = chunk.LightningAttnFunction.forward
    monkeypatch.setattr(chunk.LightningAttnFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    lv = leaves()
    o1, ht1, hbuf = lightning_attn_fwd_op(*lv[:4], D ** -0.5, lv[4], cu, "triton", True)
    assert hbuf.dim() == 4 and hbuf.shape[1:] == (H, D, D)
    g1 = torch.autograd.grad((o1 * do).sum() + (ht1 * dht).sum(), lv)
    assert len(calls) == 1  # the forward op only
    # the same segments on the CPU (bit-equal); on a GPU the op sizes varlen segments from the shape alone
    same = (lambda a, b: torch.equal(a, b)) if DEV == "cpu" else (lambda a, b: _rel(a, b) < 1e-5)
    assert same(o1, o0) and same(ht1, ht0)
    for a, b in zip(g1, g0):
        assert same(a, b)
