"""Contracts of the functional API shared by both backends: state dtype, T = 0, cu_seqlens planning."""
import importlib
import os

import pytest
import torch

from seqpar import lightning_attn
from seqpar.kernels.lightning_attn import varlen

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["torch"] + (["triton"] if TRITON_OK else [])


@pytest.mark.parametrize("dtype,state", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                         (torch.float64, torch.float64)])
def test_torch_backend_state_dtype(dtype, state):
    """The state is fp32 for 16/32-bit inputs and fp64 for fp64 inputs (fp64 stays a reference end to end)."""
    q, k = torch.randn(2, 1, 5, 2, 8, dtype=dtype)
    v = torch.randn(1, 5, 2, 4, dtype=dtype)
    _, ht = lightning_attn(q, k, v, torch.rand(2), output_final_state=True, backend="torch")
    assert ht.dtype == state


def test_zero_length_gradients_agree_between_backends():
    """T = 0: ht = h0, and every gradient is a tensor (zeros for q, k, v, slopes; dht for h0) on both backends."""
    H, D, E = 2, 16, 16
    grads = {}
    h0_ = torch.randn(1, H, D, E, device=DEV)
    dht = torch.randn(1, H, D, E, device=DEV)
    for backend in BACKENDS:
        q, k = (torch.zeros(1, 0, H, D, device=DEV, requires_grad=True) for _ in range(2))
        v = torch.zeros(1, 0, H, E, device=DEV, requires_grad=True)
        s = torch.rand(H, device=DEV).requires_grad_(True)
        h0 = h0_.clone().requires_grad_(True)
        o, ht = lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True, backend=backend)
        assert o.shape == (1, 0, H, E) and torch.equal(ht.detach(), h0.detach())
        g = torch.autograd.grad((ht * dht).sum() + o.sum(), (q, k, v, s, h0))
        assert all(x is not None for x in g), backend
        assert torch.equal(g[3], torch.zeros_like(s)) and torch.allclose(g[4], dht)
        grads[backend] = g
    if "triton" in grads:
        for a, b in zip(grads["torch"], grads["triton"]):
            assert a.shape == b.shape and torch.allclose(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_read_once_per_tensor(backend):
    """Layers sharing one cu_seqlens tensor read it from the device once (forward and backward), and an
    in-place change of the tensor is seen (the cache is keyed by the object and its version)."""
    H, D = 2, 16
    cu = torch.tensor([0, 5, 5, 70, 100], dtype=torch.int32, device=DEV)
    x = torch.randn(1, 100, H, D, device=DEV, requires_grad=True)
    s = torch.tensor([0.1, 0.5], device=DEV)
    before = varlen.STATS["reads"]
    h = x
    n_layers = 3
    for _ in range(n_layers):
        h = h + lightning_attn(h, h, h, s, cu_seqlens=cu, backend=backend)[0]
    h.sum().backward()
    assert varlen.STATS["reads"] - before == 1
    cu[1] = 3  # in place: a new version is read again, and gives the new documents
    o_new = lightning_attn(x.detach(), x.detach(), x.detach(), s, cu_seqlens=cu, backend=backend)[0]
    assert varlen.STATS["reads"] - before == 2
    cu2 = torch.tensor([0, 3, 5, 70, 100], dtype=torch.int32, device=DEV)
    o_ref = lightning_attn(x.detach(), x.detach(), x.detach(), s, cu_seqlens=cu2, backend=backend)[0]
    assert torch.allclose(o_new, o_ref)


@pytest.mark.parametrize("learnable", [False, True])
def test_model_reads_cu_seqlens_once_per_step(learnable):
    """A whole TransNormerLLM forward + backward over packed documents plans cu_seqlens once for all layers."""
    import dataclasses

    from seqpar.models import TNLConfig, TransNormerLLM

    cfg = dataclasses.replace(TNLConfig.preset("tiny"), n_layers=3, learnable_slopes=learnable)
    model = TransNormerLLM(cfg).to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device=DEV)
    cu = torch.tensor([0, 20, 21, 64], dtype=torch.int32, device=DEV)
    before = varlen.STATS["reads"]
    model(ids, labels=ids, cu_seqlens=cu).loss.backward()
    assert varlen.STATS["reads"] - before == 1


@pytest.mark.gpu
@pytest.mark.parametrize("learnable", [False, True])
def test_gpu_model_step_has_no_host_sync(learnable):
    """After the first (planning) step, a model forward + backward with packed documents and learnable
    slopes runs under torch.cuda.set_sync_debug_mode("error") without a host synchronisation."""
    import dataclasses

    from seqpar.models import TNLConfig, TransNormerLLM

    cfg = dataclasses.replace(TNLConfig.preset("tiny"), n_layers=2, learnable_slopes=learnable)
    model = TransNormerLLM(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (1, 256), device="cuda")
    cu = torch.tensor([0, 100, 101, 256], dtype=torch.int32, device="cuda")
    model(ids, labels=ids, cu_seqlens=cu).loss.backward()  # plans, compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            out = model(ids, labels=ids, cu_seqlens=cu)
            out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(out.loss.detach()).all()
