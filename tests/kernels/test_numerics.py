"""Numerical safety: million-token sequences with strong decay stay finite (decay powers underflow to 0)."""
import pytest
import torch

from seqpar import lightning_attn


def _long_case(device, dtype, T):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, 2, 8, generator=g).to(device, dtype).requires_grad_(True) for _ in range(3))
    s = torch.tensor([30.0, 1e-6], device=device)  # one head forgets at once, one almost never
    o, ht = lightning_attn(q, k, v, s, output_final_state=True)
    (o.float().sum() + ht.sum()).backward()
    for name, t in (("o", o), ("ht", ht), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), name
    # with slope 30 each output is (almost) only its own token's term: o_t = scale q_t.k_t v_t
    o0 = (q[0, :, 0].float() * k[0, :, 0].float()).sum(-1, keepdim=True) * v[0, :, 0].float() * 8 ** -0.5
    assert torch.allclose(o[0, :, 0].float(), o0, rtol=2e-2, atol=2e-2)


def test_million_tokens_strong_decay_torch_cpu():
    _long_case("cpu", torch.float32, 1 << 20)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_million_tokens_strong_decay_triton_gpu(dtype):
    _long_case("cuda", dtype, 1 << 20)
