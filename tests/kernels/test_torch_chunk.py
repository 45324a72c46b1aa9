"""The references agree with each other, and the chunked torch backend agrees with them (float64)."""
import pytest
import torch

from seqpar import lightning_attn
from seqpar.kernels.lightning_attn import naive_quadratic_lightning_attn, naive_recurrent_lightning_attn
from seqpar.kernels.lightning_attn.torch_chunk import torch_chunk_lightning_attn

SLOPES = {
    "zero": lambda H: torch.zeros(H),
    "weak": lambda H: torch.linspace(1e-3, 0.05, H),
    "strong": lambda H: torch.linspace(0.5, 8.0, H),
}


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make(B, T, H, D, E, dtype=torch.float64, h0=True, N=None):
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, E, dtype=dtype)
    state = torch.randn(N or B, H, D, E, dtype=torch.float64) if h0 else None
    return q, k, v, state


@pytest.mark.parametrize("T", [1, 9, 33])
@pytest.mark.parametrize("decay", ["zero", "weak", "strong"])
def test_references_agree(T, decay):
    H = 3
    q, k, v, h0 = make(2, T, H, 8, 5)
    s = SLOPES[decay](H).double()
    o1, h1 = naive_recurrent_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    o2, h2 = naive_quadratic_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    assert rel(o2, o1) < 1e-12 and rel(h2, h1) < 1e-12


@pytest.mark.parametrize("T", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("D,E", [(16, 16), (64, 96), (96, 32)])
@pytest.mark.parametrize("decay", ["zero", "weak", "strong"])
@pytest.mark.parametrize("with_h0", [False, True])
def test_torch_backend_matches_reference_fp64(T, D, E, decay, with_h0):
    H = 2
    q, k, v, h0 = make(1, T, H, D, E, h0=with_h0)
    s = SLOPES[decay](H).double()
    leaves = [q, k, v, s] + ([h0] if with_h0 else [])
    for x in leaves:
        x.requires_grad_(True)
    o, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True, backend="torch")
    do, dht = torch.randn_like(o), torch.randn_like(ht)
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)
    o_r, ht_r = naive_quadratic_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    grads_r = torch.autograd.grad((o_r * do).sum() + (ht_r * dht).sum(), leaves)
    assert rel(o, o_r) < 1e-10
    assert rel(ht, ht_r) < 1e-10
    for name, g, gr in zip(["dq", "dk", "dv", "dslopes", "dh0"], grads, grads_r):
        if decay == "zero" and name == "dslopes":
            # at slope 0 the gradient is a sum of large terms of both signs: compare in absolute terms
            assert (g - gr).abs().max() <= 1e-9 * gr.abs().max().clamp_min(1.0), name
        else:
            assert rel(g, gr) < 1e-9, name


def test_varlen_matches_reference_and_resets_state():
    H, D, E = 2, 16, 8
    cu = torch.tensor([0, 7, 7, 70, 71, 130], dtype=torch.int32)
    N = cu.numel() - 1
    q, k, v, h0 = make(1, 130, H, D, E, N=N)
    s = SLOPES["weak"](H).double().requires_grad_(True)
    for x in (q, k, v, h0):
        x.requires_grad_(True)
    o, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_r, ht_r = naive_recurrent_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel(o, o_r) < 1e-10 and rel(ht, ht_r) < 1e-10
    # the empty document passes its initial state through unchanged
    assert torch.equal(ht[1], h0[1])
    # documents are independent: the same document alone gives the same output
    o_doc, _ = lightning_attn(q[:, 7:70], k[:, 7:70], v[:, 7:70], s, initial_state=h0[2:3])
    assert rel(o[:, 7:70], o_doc) < 1e-12
    # gradients vs the quadratic reference
    do = torch.randn_like(o)
    g = torch.autograd.grad((o * do).sum() + ht.sum(), (q, k, v, s, h0))
    o_q, ht_q = naive_quadratic_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    gr = torch.autograd.grad((o_q * do).sum() + ht_q.sum(), (q, k, v, s, h0))
    for a, b in zip(g, gr):
        assert rel(a, b) < 1e-9


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 5e-3)])
def test_low_precision_against_fp64(dtype, tol):
    H, D, E, T = 4, 32, 48, 200
    q, k, v, h0 = make(2, T, H, D, E, dtype=torch.float64)
    s = SLOPES["weak"](H).double()
    o_r, ht_r = naive_quadratic_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True)
    o, ht = lightning_attn(q.to(dtype), k.to(dtype), v.to(dtype), s.float(), initial_state=h0.float(),
                           output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    # the error of rounding the inputs alone sets the scale for low precision
    assert rel(o, o_r) < tol and rel(ht, ht_r) < tol


def test_scale_default_and_explicit():
    q, k, v, _ = make(1, 20, 2, 16, 16, h0=False)
    s = SLOPES["weak"](2).double()
    o_default, _ = lightning_attn(q, k, v, s)
    o_explicit, _ = lightning_attn(q, k, v, s, scale=16 ** -0.5)
    o_one, _ = lightning_attn(q, k, v, s, scale=1.0)
    assert torch.allclose(o_default, o_explicit)
    assert torch.allclose(o_one * 16 ** -0.5, o_default)


def test_chunk_size_does_not_change_result():
    q, k, v, h0 = make(2, 150, 2, 16, 8)
    s = SLOPES["strong"](2).double()
    outs = [torch_chunk_lightning_attn(q, k, v, s, 0.25, h0, True, None, chunk_size=c) for c in (1, 16, 64, 256)]
    for o, ht in outs[1:]:
        assert rel(o, outs[0][0]) < 1e-12 and rel(ht, outs[0][1]) < 1e-12


def test_strong_decay_long_sequence_is_finite():
    """Decay powers underflow to 0 (never overflow): no NaN/inf at extreme slopes and lengths."""
    H = 2
    q, k, v, h0 = make(1, 4096, H, 8, 8, dtype=torch.float32)
    s = torch.tensor([30.0, 1e-4])
    for x in (q, k, v):
        x.requires_grad_(True)
    o, ht = lightning_attn(q, k, v, s, initial_state=h0.float(), output_final_state=True)
    (o.sum() + ht.sum()).backward()
    for t in (o, ht, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
