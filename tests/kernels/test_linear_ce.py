"""Fused linear + cross entropy vs the float64 reference (torch path and the Triton row kernel)."""
import os

import pytest
import torch

from seqpar.kernels.linear_ce import linear_cross_entropy, naive_linear_cross_entropy

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _dev(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _inputs(N, d, V, dtype, ignore_every=5, device="cpu"):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, d, generator=g) * 0.2).to(device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::ignore_every] = -100
    return h.requires_grad_(), w.requires_grad_(), y.to(device)


def _ref(h, w, y):
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = naive_linear_cross_entropy(h64, w64, y)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def _relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton"))])
@pytest.mark.parametrize("N,chunk", [(37, 8), (64, 64), (5, 100)])
def test_fp32_matches_float64(backend, N, chunk):
    h, w, y = _inputs(N, 24, 300, torch.float32, device=_dev(backend))  # V=300: not a power of two, several row blocks under triton
    loss = linear_cross_entropy(h, w, y, chunk_tokens=chunk, backend=backend)
    (2.5 * loss).backward()
    rl, rh, rw = _ref(h, w, y)
    assert loss.dtype == torch.float32
    assert _relerr(loss.cpu(), rl.cpu()) < 1e-6
    assert _relerr(h.grad, 2.5 * rh) < 1e-5
    assert _relerr(w.grad, 2.5 * rw) < 1e-5


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton"))])
def test_bf16_within_twice_the_naive_bf16_error(backend):
    h, w, y = _inputs(96, 32, 500, torch.bfloat16, device=_dev(backend))
    loss = linear_cross_entropy(h, w, y, chunk_tokens=40, backend=backend)
    loss.backward()
    rl, rh, rw = _ref(h, w, y)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    nl = naive_linear_cross_entropy(h2, w2, y)
    nl.backward()
    for ours, naive, ref in ((loss, nl, rl), (h.grad, h2.grad, rh), (w.grad, w2.grad, rw)):
        assert _relerr(ours, ref) <= max(2 * _relerr(naive, ref), 1e-2)


def test_autocast_uses_the_autocast_dtype_and_matches_plain_bf16():
    h, w, y = _inputs(33, 16, 70, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, chunk_tokens=10, backend="torch")
    loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    lb = linear_cross_entropy(hb, wb, y, chunk_tokens=10, backend="torch")
    lb.backward()
    assert torch.equal(loss, lb)
    assert torch.allclose(h.grad, hb.grad.float(), rtol=0, atol=0)


def test_all_rows_ignored_and_no_grad_needed():
    h, w, y = _inputs(8, 8, 16, torch.float32)
    y[:] = -100
    loss = linear_cross_entropy(h, w, y, backend="torch")
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
    h2, w2, y2 = _inputs(8, 8, 16, torch.float32)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h2, w2, y2), naive_linear_cross_entropy(h2, w2, y2), rtol=1e-6)


def test_bad_input_names_the_argument():
    h, w, y = _inputs(8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="h must be"):
        linear_cross_entropy(h[0], w, y)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :4], y)
    with pytest.raises(ValueError, match="labels must be"):
        linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="labels must be an integer"):
        linear_cross_entropy(h, w, y.float())
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, y, chunk_tokens=0)
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(h, w, y, backend="cuda")


@pytest.mark.gpu
def test_gpu_triton_matches_torch_path_bf16():
    h, w, y = _inputs(4096, 256, 64000, torch.bfloat16, device="cuda")
    l1 = linear_cross_entropy(h, w, y, chunk_tokens=1024, backend="triton")
    l1.backward()
    g1 = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    l2 = linear_cross_entropy(h, w, y, chunk_tokens=1024, backend="torch")
    l2.backward()
    assert _relerr(l1, l2) < 1e-5
    assert _relerr(g1[0], h.grad) < 1e-2 and _relerr(g1[1], w.grad) < 1e-2


def test_fp32_accumulating_gemm_only_on_cuda_half_compute():
    from seqpar.kernels.linear_ce import interface
    assert not interface._fp32_accumulating_mm(torch.device("cpu"), torch.bfloat16)
    assert not interface._fp32_accumulating_mm(torch.device("cuda"), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float32])
def test_gpu_fp32_accumulating_head_gemms_at_least_as_accurate(monkeypatch, h_dtype):
    """The weight gradient accumulated by the GEMM into fp32 (and dh written in place) against the unfused
    path (bf16 partial products added into fp32), both against float64; 5 chunks, the last one partial."""
    from seqpar.kernels.linear_ce import interface
    assert interface._fp32_accumulating_mm(torch.device("cuda"), torch.bfloat16)
    h, w, y = _inputs(4096, 256, 8000, torch.float32, device="cuda")
    h = h.detach().to(h_dtype).requires_grad_()
    ref = _ref(h, w, y)

    def run():
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(hh, ww, y, chunk_tokens=1000)
        loss.backward()
        return loss, hh.grad, ww.grad

    fused = run()
    monkeypatch.setattr(interface, "_fp32_accumulating_mm", lambda device, cdtype: False)
    plain = run()
    for a, b, r in zip(fused, plain, ref):
        assert a.dtype == b.dtype
        assert _relerr(a, r) <= 1.05 * _relerr(b, r) + 1e-6
    assert _relerr(fused[2], plain[2]) < 1e-2 and _relerr(fused[1], plain[1]) < 1e-2


@pytest.mark.gpu
def test_gpu_no_rows_gives_zero_gradients():
    h = torch.zeros(0, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(300, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long, device="cuda"))
    loss.backward()
    assert loss.item() == 0 and w.grad.abs().max().item() == 0 and h.grad.shape == (0, 64)
