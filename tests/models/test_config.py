import pytest
import torch

from seqpar.models import TNLConfig, TransNormerLLM, alibi_slopes, layer_slopes


@pytest.mark.parametrize(
    "name, nominal",
    [("tnl-0.4b", 0.4e9), ("tnl-1b", 1.0e9), ("tnl-3b", 3.0e9), ("tnl-15b", 15.0e9)],
)
def test_preset_param_counts_on_meta(name, nominal):
    cfg = TNLConfig.preset(name)
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = model.num_parameters()
    assert abs(n - nominal) / nominal < 0.03, (name, n)
    # closed form: per layer 5 d*inner (q, k, v, u, o) + 3 d*glu, plus embedding and untied lm head
    d, L, g, V = cfg.d_model, cfg.n_layers, cfg.glu_dim, cfg.vocab_size
    assert n == L * (5 * d * cfg.inner_dim + 3 * d * g) + 2 * V * d
    assert model.num_parameters(exclude_embeddings=True) == n - 2 * V * d


def test_paper_shapes():
    c = TNLConfig.preset("tnl-15b")
    assert (c.n_layers, c.n_heads, c.d_model, c.head_dim, c.vocab_size) == (42, 40, 5120, 128, 64000)
    assert (TNLConfig.preset("tnl-0.4b").n_layers, TNLConfig.preset("tnl-0.4b").d_model) == (24, 1024)
    assert (TNLConfig.preset("tnl-1b").n_layers, TNLConfig.preset("tnl-1b").d_model) == (16, 2048)
    assert (TNLConfig.preset("tnl-3b").n_layers, TNLConfig.preset("tnl-3b").d_model) == (32, 2560)


def test_preset_overrides_and_tied_count():
    c = TNLConfig.preset("tiny", n_layers=3, tie_embeddings=True)
    assert c.n_layers == 3 and c.vocab_size == 256 and c.head_dim == 16
    m = TransNormerLLM(c)
    assert m.lm_head.weight is m.embed.weight
    d, g = c.d_model, c.glu_dim
    assert m.num_parameters() == 3 * (5 * d * d + 3 * d * g) + 256 * d
    with pytest.raises(ValueError, match="unknown TNLConfig preset"):
        TNLConfig.preset("gpt-9")
    with pytest.raises(ValueError, match="unknown TNLConfig fields"):
        TNLConfig.preset("tiny", n_layer=3)


def test_config_dict_roundtrip():
    c = TNLConfig.preset("tiny", dropout=0.1)
    assert TNLConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=65, n_heads=4), "divisible"),
        (dict(d_model=0), "d_model"),
        (dict(n_layers=-1), "n_layers"),
        (dict(vocab_size=2.5), "vocab_size"),
        (dict(head_dim=0), "head_dim"),
        (dict(glu_dim=-3), "glu_dim"),
        (dict(loss_chunk_tokens=0), "loss_chunk_tokens"),
        (dict(dropout=1.0), "dropout"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(init_std=-1.0), "init_std"),
        (dict(decay="exp"), "decay"),
        (dict(gate_act="tanh"), "gate_act"),
        (dict(qk_act="gelu"), "qk_act"),
        (dict(sp_mode="tree"), "sp_mode"),
        (dict(attn_backend="cuda"), "attn_backend"),
        (dict(attn_scale=0.0), "attn_scale"),
        (dict(decay="none", learnable_slopes=True), "learnable_slopes"),
    ],
)
def test_bad_config(kwargs, match):
    base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4)
    with pytest.raises(ValueError, match=match):
        TNLConfig(**{**base, **kwargs})


def test_explicit_head_dim_and_default_glu():
    c = TNLConfig(vocab_size=10, d_model=48, n_layers=1, n_heads=4, head_dim=8)
    assert c.inner_dim == 32 and c.glu_dim == 128  # 8/3 * 48 = 128
    m = TransNormerLLM(c)
    out = m(torch.randint(0, 10, (2, 5)))
    assert out.logits.shape == (2, 5, 10)


def test_slopes():
    # ALiBi: powers of two are 2^(-8 i / n); other counts interleave the next power's slopes
    assert alibi_slopes(8) == pytest.approx([2.0 ** (-(i + 1)) for i in range(8)])
    s6 = alibi_slopes(6)
    assert s6[:4] == pytest.approx(alibi_slopes(4)) and s6[4:] == pytest.approx(alibi_slopes(8)[0:4:2])
    c = TNLConfig.preset("tiny", n_layers=3)
    base = alibi_slopes(4)
    assert layer_slopes(c, 0) == pytest.approx([b * (1 + 1e-5) for b in base])
    assert layer_slopes(c, 1) == pytest.approx([b * (0.5 + 1e-5) for b in base])
    assert layer_slopes(c, 2) == pytest.approx([b * 1e-5 for b in base])
    assert layer_slopes(TNLConfig.preset("tiny", n_layers=1), 0) == pytest.approx(base)  # no 0/0
    assert layer_slopes(TNLConfig.preset("tiny", decay="alibi"), 1) == pytest.approx(base)
    assert layer_slopes(TNLConfig.preset("tiny", decay="none"), 0) == [0.0] * 4
    m = TransNormerLLM(c)
    buf = m.layers[1].token_mixer.slopes
    assert buf.dtype == torch.float32 and "slopes_buf" not in str(list(m.state_dict()))
    m.to(torch.bfloat16)
    assert m.layers[1].token_mixer.slopes.dtype == torch.float32
    assert torch.equal(m.layers[1].token_mixer.slopes, buf)


def test_learnable_slopes_get_gradients():
    c = TNLConfig.preset("tiny", learnable_slopes=True)
    m = TransNormerLLM(c)
    ids = torch.randint(0, 256, (2, 20))
    m(ids, labels=ids).loss.backward()
    att = m.layers[0].token_mixer
    assert att.log_slopes.grad is not None and torch.isfinite(att.log_slopes.grad).all()
    assert torch.allclose(att.slopes, torch.tensor(layer_slopes(c, 0)))


def test_meta_init_then_materialise():
    cfg = TNLConfig.preset("tiny")
    with torch.device("meta"):
        m = TransNormerLLM(cfg)
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert torch.equal(m.layers[1].token_mixer.slopes, torch.tensor(layer_slopes(cfg, 1)))
    out = m(torch.randint(0, 256, (2, 9)), labels=torch.randint(0, 256, (2, 9)))
    assert torch.isfinite(out.loss) and abs(out.loss.item() - 5.545) < 0.5
