import pytest
import torch.nn as nn

from seqpar.models import TNLConfig, TransNormerLLM
from seqpar.models.flops import (attention_flops_per_token, hardware_flops_per_token, matmul_params, mfu,
                                 model_flops_per_token)


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
    with pytest.raises(ValueError, match="recompute"):
        hardware_flops_per_token(cfg, "some")
    # ~6 * 0.41B: the 137K tokens/s at 29% MFU on a 989 TFLOP/s peak
    assert 0.28 < mfu(cfg, 137e3, 989.0) < 0.30
    assert mfu(cfg, 1.0, None) is None
