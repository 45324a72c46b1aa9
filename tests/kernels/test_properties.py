"""Property-based tests: random shapes, decays, documents and dtypes against the float64 reference."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqpar import lightning_attn
from seqpar.kernels.lightning_attn import naive_recurrent_lightning_attn

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA else "cpu"


@st.composite
def problems(draw, max_T):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, max_T))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from([1, 3, 8, 16, 24]))
    E = draw(st.sampled_from([1, 5, 8, 16, 32]))
    slopes = draw(st.lists(st.sampled_from([0.0, 1e-4, 0.05, 0.7, 5.0, 40.0]), min_size=H, max_size=H))
    with_h0 = draw(st.booleans())
    cu = None
    if B == 1 and draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, T), max_size=4)))
        cu = [0] + cuts + [T]
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, H, D, E, slopes, with_h0, cu, seed


def run_case(case, backend, dtype, tol, device="cpu"):
    B, T, H, D, E, slopes, with_h0, cu, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, H, E, generator=g, dtype=torch.float64)
    s = torch.tensor(slopes, dtype=torch.float64)
    cu_t = torch.tensor(cu, dtype=torch.int32) if cu is not None else None
    N = B if cu is None else len(cu) - 1
    h0 = torch.randn(N, H, D, E, generator=g, dtype=torch.float64) if with_h0 else None
    o_ref, ht_ref = naive_recurrent_lightning_attn(q, k, v, s, initial_state=h0, output_final_state=True,
                                                   cu_seqlens=cu_t)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32  # slopes and state precision
    o, ht = lightning_attn(
        q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), s.to(device, sdt),
        initial_state=None if h0 is None else h0.to(device, sdt), output_final_state=True,
        cu_seqlens=None if cu_t is None else cu_t.to(device), backend=backend)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    for x, ref in ((o, o_ref), (ht, ht_ref)):
        err = (x.double().cpu() - ref).norm()
        assert err <= tol * ref.norm() + 1e-6, (err / ref.norm()).item()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_T=150))
def test_torch_backend_random_problems(case):
    run_case(case, "torch", torch.float64, 1e-10)
    run_case(case, "torch", torch.float32, 1e-5)


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_T=80))
def test_triton_backend_random_problems(case):
    # fp32 through tl.dot: tf32 on a GPU gives ~1e-3, ieee under the interpreter ~1e-6
    run_case(case, "triton", torch.float32, 5e-3 if HAS_CUDA else 1e-4, device=DEVICE)
