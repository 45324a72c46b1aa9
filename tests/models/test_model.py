import pytest
import torch
import torch.nn.functional as F

from seqpar.models import LMOutput, TNLConfig, TransNormerLLM


def tiny(**kw):
    return TransNormerLLM(TNLConfig.preset("tiny", **kw))


def ids(B=2, T=70, V=256):
    return torch.randint(0, V, (B, T))


def test_shapes_and_output():
    m = tiny()
    x = ids(3, 70)  # one full 64-chunk + a tail
    out = m(x)
    assert isinstance(out, LMOutput)
    assert out.loss is None and out.logits.shape == (3, 70, 256) and out.logits.dtype == torch.float32
    out = m(x, labels=x)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and int(out.num_tokens) == 3 * 70
    # random init: loss close to log(V)
    assert abs(out.loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    assert m(x, labels=x, return_logits=False).logits is None
    assert m(x[:, :1]).logits.shape == (3, 1, 256)


def test_ignore_index():
    m = tiny()
    x = ids(2, 40)
    labels = torch.roll(x, -1, 1)
    labels[:, -1] = -100
    labels[0, :10] = -100
    out = m(x, labels=labels)
    logits = out.logits.detach()
    keep = labels != -100
    ref = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss.detach(), ref, rtol=1e-6, atol=1e-6)
    assert int(out.num_tokens) == int(keep.sum())
    # the targets at ignored positions do not matter
    other = labels.clone()
    other[~keep] = -100
    assert torch.equal(m(x, labels=other).loss, out.loss)
    # all ignored: a zero loss that still backpropagates (zero gradient)
    none = torch.full_like(x, -100)
    out0 = m(x, labels=none)
    assert out0.loss.item() == 0.0
    out0.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())


def test_bad_inputs():
    m = tiny()
    x = ids(2, 8)
    with pytest.raises(ValueError, match="input_ids"):
        m(x[0])
    with pytest.raises(ValueError, match="input_ids"):
        m(x[None])
    with pytest.raises(ValueError, match="input_ids"):
        m(x.float())
    with pytest.raises(TypeError, match="input_ids"):
        m(x.tolist())
    bad = x.clone()
    bad[1, 3] = 256
    with pytest.raises(ValueError, match="input_ids"):
        m(bad)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match="input_ids"):
        m(bad)
    with pytest.raises(ValueError, match="labels"):
        m(x, labels=x[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        m(x, labels=x.float())
    with pytest.raises(ValueError, match="labels"):
        m(x, labels=torch.full_like(x, 256))
    with pytest.raises(ValueError, match="labels"):
        m(x, labels=torch.full_like(x, -2))
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(x, cu_seqlens=torch.tensor([0, 4, 8]))
    with pytest.raises(TypeError, match="config"):
        TransNormerLLM({"d_model": 64})


def test_activation_checkpointing_same_gradients():
    cfg = dict(dropout=0.1)  # dropout masks must be replayed identically by the recompute
    m1 = tiny(**cfg)
    m2 = tiny(**cfg, activation_checkpointing=True)
    m2.load_state_dict(m1.state_dict())
    m1.train()
    m2.train()
    x = ids(2, 70)
    grads, calls = [], []
    for m in (m1, m2):
        n_calls, orig = [0], m.layers[0].forward

        def counted(*a, _orig=orig, _n=n_calls, **k):
            _n[0] += 1
            return _orig(*a, **k)

        m.layers[0].forward = counted
        torch.manual_seed(123)
        loss = m(x, labels=torch.roll(x, -1, 1)).loss
        loss.backward()
        calls.append(n_calls[0])
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        grads.append(loss.detach())
    assert calls == [1, 2]  # the checkpointed block is recomputed in the backward
    torch.testing.assert_close(grads[1], grads[3], rtol=0, atol=0)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[2][n], rtol=1e-6, atol=1e-8, msg=n)


def test_recurrent_decode_equals_full_forward():
    m = tiny(n_layers=3).eval()
    x = ids(2, 70)
    full = m(x).logits
    rec, states = m.forward_recurrent(x)
    torch.testing.assert_close(rec, full, rtol=0, atol=1e-4)
    # prefill states == recurrent states
    out = m(x, output_final_states=True)
    for a, b in zip(out.final_states, states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # chunked forward continued from a state == full forward
    out1 = m(x[:, :30], output_final_states=True)
    out2 = m(x[:, 30:], initial_states=out1.final_states)
    torch.testing.assert_close(torch.cat([out1.logits, out2.logits], 1), full, rtol=0, atol=1e-4)


def test_greedy_generate_matches_full_forward():
    m = tiny(n_layers=3).eval()
    prompt = ids(2, 67)
    gen, step_logits = m.generate(prompt, max_new_tokens=12, temperature=0, return_logits=True)
    assert gen.shape == (2, 79) and torch.equal(gen[:, :67], prompt)
    full = m(gen).logits
    T0 = prompt.shape[1]
    torch.testing.assert_close(step_logits, full[:, T0 - 1 : -1], rtol=0, atol=1e-4)
    assert torch.equal(full[:, T0 - 1 : -1].argmax(-1), gen[:, T0:])
    # top_k=1 sampling is greedy; the model is left in its previous mode
    m.train()
    assert torch.equal(m.generate(prompt, 12, temperature=1.0, top_k=1), gen)
    assert m.training


def test_sampling_generate():
    m = tiny()
    prompt = ids(3, 5)
    g1 = m.generate(prompt, 8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(1))
    g2 = m.generate(prompt, 8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g1, g2) and g1.shape == (3, 13)
    assert int(g1.min()) >= 0 and int(g1.max()) < 256
    assert torch.equal(m.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(prompt, 3, top_k=0)
    with pytest.raises(ValueError, match="input_ids"):
        m.generate(prompt.float(), 3)


def test_packed_documents():
    m = tiny().eval()
    a, b = ids(1, 23), ids(1, 41)
    packed = m(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 23, 64])).logits
    torch.testing.assert_close(packed, torch.cat([m(a).logits, m(b).logits], 1), rtol=0, atol=1e-5)


def test_tied_embeddings_and_bf16_autocast():
    m = tiny(tie_embeddings=True)
    x = ids(2, 40)
    ref = m(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.item()) / ref.item() < 2e-2
    out.loss.backward()
    assert m.embed.weight.grad is not None and torch.isfinite(m.embed.weight.grad).all()


def test_init_scales():
    m = TransNormerLLM(TNLConfig.preset("tiny", d_model=128, glu_dim=512, n_layers=8))
    std = m.layers[0].token_mixer.q_proj.weight.std().item()
    out_std = m.layers[0].token_mixer.o_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002 and abs(out_std - 0.02 / 4) < 0.001


def test_tiny_overfit():
    torch.manual_seed(0)
    m = tiny()
    x = ids(4, 32)
    labels = torch.roll(x, -1, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = m(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_sp_attributes_without_group():
    m = TransNormerLLM(TNLConfig.preset("tiny", sp_mode="ring"))
    assert m.sp_group is None and m.sp_mode == "ring"
    m.sp_mode = "allgather"
    with pytest.raises(ValueError, match="sp_mode"):
        m.sp_mode = "tree"
    assert m(ids(1, 10)).logits.shape == (1, 10, 256)  # no process group: single-process path


def test_chunked_loss_without_logits_matches():
    m1 = tiny(loss_chunk_tokens=16)
    x = ids(2, 70)
    labels = torch.roll(x, -1, 1)
    labels[1, 5:40] = -100
    grads, losses = [], []
    for return_logits in (True, False):
        m1.zero_grad()
        out = m1(x, labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in m1.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for n in grads[0]:  # the fused head orders the fp32 products differently: equal to fp32 rounding
        err = ((grads[1][n] - grads[0][n]).norm() / grads[0][n].norm()).item()
        assert err < 2e-6, (n, err)
    with torch.no_grad():
        torch.testing.assert_close(m1(x, labels=labels, return_logits=False).loss, losses[0], rtol=1e-6, atol=0)


def _eager_and_compiled(cfg, compile_fn):
    """Two models with the same weights; compile_fn(model) compiles the second in place and returns it, and
    its parameter names stay those of the eager model."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = TransNormerLLM(cfg)
    compiled = TransNormerLLM(cfg)
    compiled.load_state_dict(eager.state_dict())
    assert compile_fn(compiled) is compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())
    return eager, compiled


@pytest.mark.parametrize("ac", [False, True])
def test_compile_blocks_matches_eager(ac):
    """compile_blocks(): same loss and gradients as eager, parameter names unchanged (aot_eager backend:
    dynamo traces the blocks and autograd is rebuilt, without inductor's code generation time)."""
    eager, compiled = _eager_and_compiled(TNLConfig.preset("tiny", activation_checkpointing=ac),
                                          lambda m: m.compile_blocks(backend="aot_eager"))
    cfg = eager.config
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, 96), generator=g)
    y = torch.randint(0, cfg.vocab_size, (2, 96), generator=g)
    for m in (eager, compiled):
        m.train()
        m(x, labels=y, return_logits=False).loss.backward()
    le = eager(x, labels=y).loss
    lc = compiled(x, labels=y).loss
    assert torch.allclose(le, lc, rtol=1e-5, atol=1e-6), (le, lc)
    for (n, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(pe.grad, pc.grad, rtol=1e-4, atol=1e-6), n


def test_compile_model_fullgraph_matches_eager():
    """compile_model(): the whole model (embedding, blocks, fused head, loss) traces as one graph with packed
    documents and learnable slopes, and loss and gradients equal eager (aot_eager backend)."""
    eager, compiled = _eager_and_compiled(TNLConfig.preset("tiny", learnable_slopes=True),
                                          lambda m: m.compile_model(backend="aot_eager", fullgraph=True))
    cfg = eager.config
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (1, 96), generator=g)
    y = torch.randint(0, cfg.vocab_size, (1, 96), generator=g)
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    losses = []
    for m in (eager, compiled):
        m.train()
        loss = m(x, labels=y, cu_seqlens=cu, return_logits=False).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for (n, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(pe.grad, pc.grad, rtol=1e-4, atol=1e-6), n


def test_activation_offload_moves_block_inputs_and_keeps_gradients(monkeypatch):
    """activation_offload: exactly the n_layers checkpointed block inputs [B, T, d] go through the offload
    hooks (nothing from inside the blocks), and loss and gradients equal plain checkpointing."""
    import seqpar.models.transnormer as tn

    with pytest.raises(ValueError, match="activation_offload needs activation_checkpointing=True"):
        TNLConfig.preset("tiny", activation_offload=True)
    cfg = TNLConfig.preset("tiny", activation_checkpointing=True, dropout=0.1)
    cfg_off = TNLConfig.preset("tiny", activation_checkpointing=True, activation_offload=True, dropout=0.1)
    torch.manual_seed(0)
    ref = TransNormerLLM(cfg)
    off = TransNormerLLM(cfg_off)
    off.load_state_dict(ref.state_dict())
    packed = []
    real = tn._offload_saved

    def spy():
        hooks = real()  # save_on_cpu; wrap its pack to record what it is given
        pack = hooks.pack_hook

        def counting_pack(t):
            packed.append(tuple(t.shape))
            return pack(t)

        hooks.pack_hook = counting_pack
        return hooks

    monkeypatch.setattr(tn, "_offload_saved", spy)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, cfg.vocab_size, (2, 80), generator=g)
    losses = []
    for m in (ref, off):
        m.train()
        torch.manual_seed(5)  # same dropout masks
        loss = m(x, labels=x, return_logits=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert packed == [(2, 80, cfg.d_model)] * cfg.n_layers, packed
    assert torch.equal(losses[0], losses[1])
    for (n, a), b in zip(ref.named_parameters(), off.parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_residual_dtype_autocast_keeps_the_stream_in_bf16():
    """residual_dtype="autocast": the blocks see (and return) a bf16 residual under bf16 autocast; outside autocast
    the model is unchanged; the loss stays near the fp32-residual one; a bad value names the field."""
    torch.manual_seed(0)
    ref, low = tiny(), tiny(residual_dtype="autocast")
    low.load_state_dict(ref.state_dict())
    x = ids(2, 70)
    seen = []
    low.layers[0].register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out[0].dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = ref(x, labels=x, return_logits=False).loss
        b = low(x, labels=x, return_logits=False).loss
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert torch.isfinite(b) and abs(a.item() - b.item()) < 2e-2 * a.item()
    b.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in low.parameters() if p.requires_grad)
    seen.clear()
    torch.testing.assert_close(low(x, labels=x).loss, ref(x, labels=x).loss, rtol=0, atol=0)  # fp32: no change
    assert seen == [(torch.float32, torch.float32)]
    with pytest.raises(ValueError, match="residual_dtype"):
        TNLConfig.preset("tiny", residual_dtype="bf16")
