"""qk_act: o = LA(phi(q), phi(k), v) with phi applied inside the Triton kernels (silu, relu) equals phi applied in
torch before the operator: o, ht and every gradient against the float64 reference, on each kernel path (look-back
forward + scan backward, scan forward, look-back backward, unfused dk), with varlen, through the custom op under
torch.compile, and in the model (fused_qk_act on / off)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from seqpar import lightning_attn
from seqpar.kernels.lightning_attn import activations, naive_quadratic_lightning_attn
from seqpar.kernels.lightning_attn.interface import lightning_attn_as_op
from seqpar.kernels.lightning_attn.tuning import DEFAULT

chunk = importlib.import_module("seqpar.kernels.lightning_attn.chunk")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFG = DEFAULT.replace(poison=True, seg_chunks=1, fp32_precision="ieee")
PATHS = {
    "lookback-fwd": CFG,
    "scan": CFG.replace(lookback=False),
    "lookback": CFG.replace(lookback=True),
    "unfused-dk": CFG.replace(lookback=False, fuse_dkdv=False),
}


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, D, E, dtype, N=None, g=0):
    gen = torch.Generator().manual_seed(g)
    q, k = (torch.randn(B, T, H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, E, generator=gen)
    s = torch.linspace(0.02, 0.3, H)
    h0 = torch.randn(N or B, H, D, E, generator=gen)
    return [x.to(dtype) for x in (q, k, v)] + [s, h0]


def _grads_ref(q, k, v, s, h0, act, do, dht, cu=None):
    """float64 reference: phi in torch, then the quadratic form; grads of <o, do> + <ht, dht>."""
    xs = [x.detach().double().requires_grad_() for x in (q, k, v, s, h0)]
    o, ht = naive_quadratic_lightning_attn(activations.apply(xs[0], act), activations.apply(xs[1], act), xs[2], xs[3],
                                           initial_state=xs[4], output_final_state=True, cu_seqlens=cu)
    grads = torch.autograd.grad((o * do.double()).sum() + (ht * dht.double()).sum(), xs)
    return o, ht, grads


@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("path", list(PATHS))
def test_fused_act_matches_reference_every_path(act, path):
    q, k, v, s, h0 = (x.to(DEV) for x in _inputs(1, 150, 2, 32, 16, torch.float32))
    xs = [x.clone().requires_grad_() for x in (q, k, v, s, h0)]
    o, ht = chunk.chunk_lightning_attn(*xs[:4], 32 ** -0.5, xs[4], True, None, config=PATHS[path], qk_act=act)
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), xs)
    o_r, ht_r, grads_r = _grads_ref(q.cpu(), k.cpu(), v.cpu(), s.cpu(), h0.cpu(), act, do.cpu(), dht.cpu())
    assert rel(o.cpu(), o_r) < 1e-5 and rel(ht.cpu(), ht_r) < 1e-5
    for name, g, g_r in zip(("dq", "dk", "dv", "dslopes", "dh0"), grads, grads_r):
        assert rel(g.cpu(), g_r) < 1e-4, (name, rel(g.cpu(), g_r))


def test_fused_silu_bf16_varlen_equals_unfused():
    """bf16 with documents: the fused kernels round phi(q), phi(k) as torch's silu does, so o matches the unfused
    call to the bf16 rounding of the output, and every gradient agrees with the float64 reference as well as the
    unfused call does (within 2x, floor 1e-2)."""
    cu = torch.tensor([0, 7, 7, 90, 130], dtype=torch.int32, device=DEV)
    q, k, v, s, h0 = (x.to(DEV) for x in _inputs(1, 130, 2, 32, 32, torch.bfloat16, N=4))
    do = torch.randn(1, 130, 2, 32, device=DEV).to(torch.bfloat16)
    dht = torch.randn(4, 2, 32, 32, device=DEV)
    out = {}
    for fused in (True, False):
        xs = [x.clone().requires_grad_() for x in (q, k, v, s, h0)]
        if fused:
            o, ht = lightning_attn(*xs[:4], initial_state=xs[4], output_final_state=True, cu_seqlens=cu,
                                   backend="triton", qk_act="silu")
        else:
            o, ht = lightning_attn(F.silu(xs[0]), F.silu(xs[1]), *xs[2:4], initial_state=xs[4],
                                   output_final_state=True, cu_seqlens=cu, backend="triton")
        out[fused] = (o, ht) + torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), xs)
    o_r, ht_r, grads_r = _grads_ref(q.cpu(), k.cpu(), v.cpu(), s.cpu(), h0.cpu(), "silu", do.cpu(), dht.cpu(),
                                    cu.cpu())
    assert rel(out[True][0].cpu(), out[False][0].cpu()) < 1e-2
    for i, ref in enumerate((o_r, ht_r) + tuple(grads_r)):
        e_fused, e_unfused = rel(out[True][i].cpu(), ref), rel(out[False][i].cpu(), ref)
        assert e_fused < max(1e-2, 2 * e_unfused), (i, e_fused, e_unfused)


@pytest.mark.parametrize("act", ["elu1", "sigmoid"])
def test_activations_the_kernels_do_not_fuse_run_in_torch(act):
    """phi(0) != 0 (elu1, sigmoid): applied in torch before the kernels; equals the torch backend."""
    q, k, v, s, _ = (x.to(DEV) for x in _inputs(1, 70, 2, 16, 16, torch.float32))
    o, _ = lightning_attn(q, k, v, s, backend="triton", qk_act=act)
    o_t, _ = lightning_attn(q, k, v, s, backend="torch", qk_act=act)
    o_r, _ = naive_quadratic_lightning_attn(activations.apply(q.double(), act), activations.apply(k.double(), act),
                                            v.double(), s.double())
    assert rel(o, o_r) < 1e-5 and rel(o_t, o_r) < 1e-5


def test_bad_qk_act_names_the_argument():
    q, k, v, s, _ = _inputs(1, 8, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="qk_act must be one of"):
        lightning_attn(q, k, v, s[:1], backend="torch", qk_act="gelu")
    with pytest.raises(ValueError, match="qk_act of the Triton kernels"):
        chunk.chunk_lightning_attn(q.to(DEV), k.to(DEV), v.to(DEV), s[:1].to(DEV), 0.25, qk_act="sigmoid")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_op_with_qk_act_equals_eager(backend):
    torch._dynamo.reset()
    q, k, v, s, h0 = (x.to(DEV) for x in _inputs(1, 80, 2, 16, 16, torch.float32))

    def f(q, k, v):
        o, ht = lightning_attn_as_op(q, k, v, s, initial_state=h0, output_final_state=True, backend=backend,
                                     qk_act="silu")
        return o.square().sum() + ht.square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if DEV == "cuda" else "aot_eager")
    res = {}
    for name, fn in (("eager", f), ("compiled", compiled)):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*xs)
        res[name] = [loss] + list(torch.autograd.grad(loss, xs))
    for a, b in zip(res["compiled"], res["eager"]):
        assert rel(a, b) < 1e-5


def test_model_fused_qk_act_equals_unfused():
    from seqpar.models import TNLConfig, TransNormerLLM

    ids = torch.randint(0, 256, (1, 96))
    res = {}
    for fused in (True, False):
        torch.manual_seed(0)
        cfg = TNLConfig.preset("tiny", vocab_size=256, n_layers=2, n_heads=2, head_dim=16, glu_dim=64,
                               attn_backend="triton", fused_qk_act=fused)
        model = TransNormerLLM(cfg).to(DEV)
        loss = model(ids.to(DEV), labels=ids.to(DEV)).loss
        loss.backward()
        res[fused] = [loss.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(res[True], res[False]):
        assert rel(a, b) < 1e-5


@pytest.mark.gpu
def test_gpu_bf16_fused_silu_at_length():
    """CUDA, bf16, T=4099 with automatic segments: fused silu within the unfused call's error to float64."""
    q, k, v, s, h0 = (x.cuda() for x in _inputs(2, 4099, 4, 128, 128, torch.bfloat16))
    do = torch.randn(2, 4099, 4, 128, device="cuda").to(torch.bfloat16)
    dht = torch.randn(2, 4, 128, 128, device="cuda")
    res = {}
    for fused in (True, False):
        xs = [x.clone().requires_grad_() for x in (q, k, v, s, h0)]
        qa, ka = (xs[0], xs[1]) if fused else (F.silu(xs[0]), F.silu(xs[1]))
        o, ht = lightning_attn(qa, ka, *xs[2:4], initial_state=xs[4], output_final_state=True,
                               qk_act="silu" if fused else None)
        res[fused] = (o, ht) + torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), xs)
    o_r, ht_r, grads_r = _grads_ref(q, k, v, s, h0, "silu", do, dht)
    for i, ref in enumerate((o_r, ht_r) + tuple(grads_r)):
        e_fused, e_unfused = rel(res[True][i], ref), rel(res[False][i], ref)
        assert e_fused < max(1e-2, 2 * e_unfused), (i, e_fused, e_unfused)
