import pytest
import torch.nn as nn

from seqpar.models import TNLConfig, TransNormerLLM
from seqpar.models.flops import (attention_flops_per_token, hardware_flops_per_token, hfu as hfu_fn, matmul_params, mfu,
                                 model_flops_per_token, recompute_of)
from seqpar.recipe.progress import format_step_line


def hfu_of(cfg, tps, recompute):
    return hardware_flops_per_token(cfg, recompute) * tps / 989e12


def test_recompute_of_resolves_the_policy_per_chunk():
    model = TransNormerLLM(TNLConfig.preset("tiny", activation_checkpointing="full"))
    assert recompute_of(model, 2, 64) == "full"
    auto = TransNormerLLM(TNLConfig.preset("tiny", activation_checkpointing="auto", seq_chunk=16))
    assert recompute_of(auto, 1, 64) == "none"  # CPU: nothing to fit; the chunk's shape [1, 16] is asked
    assert auto._policy_cache and all(key[1] == 16 for key in auto._policy_cache)


def test_step_line_writes_hfu_only_when_it_differs():
    line = format_step_line(5, 2.5, 1e-3, 1.0, 2e5, 2e5, mfu=0.451, mem_gib=38.0, hfu=0.601)
    assert line.endswith("| MFU 45.1% | HFU 60.1% | mem 38.0 GiB")
    assert "HFU" not in format_step_line(5, 2.5, 1e-3, 1.0, 2e5, 2e5, mfu=0.451, hfu=0.451)


@pytest.mark.parametrize("bias", [False, True])
def test_matmul_params_counts_every_linear_layer(bias):
    cfg = TNLConfig.preset("tiny", bias=bias, n_layers=3)
    model = TransNormerLLM(cfg)
    n = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    assert matmul_params(cfg) == n  # LM head included, embedding not


def test_model_and_hardware_flops():
    cfg = TNLConfig.preset("tnl-0.4b")
    n = matmul_params(cfg)
    assert model_flops_per_token(cfg) == 6 * n + attention_flops_per_token(cfg)
    block = n - cfg.vocab_size * cfg.d_model
    hfu = hardware_flops_per_token(cfg, "full")
    assert hfu == model_flops_per_token(cfg) + 2 * block + attention_flops_per_token(cfg, backward=False)
    assert hardware_flops_per_token(cfg, "none") == model_flops_per_token(cfg)
    assert hardware_flops_per_token(cfg, "selective") == model_flops_per_token(cfg)  # no GEMM recomputed
    head = 2 * cfg.vocab_size * cfg.d_model
    blocks_fwd = 2 * block + attention_flops_per_token(cfg, backward=False)
    # the chunked path recomputes each chunk's forward (blocks and head); "full" inside it the blocks again
    assert hardware_flops_per_token(cfg, "none", seq_chunked=True) == model_flops_per_token(cfg) + blocks_fwd + head
    assert hardware_flops_per_token(cfg, "full", seq_chunked=True) == model_flops_per_token(cfg) + 2 * blocks_fwd + head
    assert hfu_fn(cfg, 1e5, 989.0, "full") == pytest.approx(hfu_of(cfg, 1e5, "full"))
    assert hfu_of(cfg, 1e5, "full") > mfu(cfg, 1e5, 989.0) and hfu_fn(cfg, 1.0, None) is None
    with pytest.raises(ValueError, match="recompute"):
        hardware_flops_per_token(cfg, "some")
    # ~6 * 0.41B: the 137K tokens/s at 29% MFU on a 989 TFLOP/s peak
    assert 0.28 < mfu(cfg, 137e3, 989.0) < 0.30
    assert mfu(cfg, 1.0, None) is None
