"""Activation memory policies (TNLConfig.activation_checkpointing): none / selective / full / auto.

selective and full must not change the math (loss and every parameter gradient equal "none", eager and with
compiled blocks); they must keep what they claim (saved bytes counted with saved_tensors_hooks, selective's
cache included, against the formulas of seqpar.models.memory); "auto" picks by the memory budget.
"""
import pytest
import torch

from seqpar.models import TNLConfig, TransNormerLLM
from seqpar.models import memory
from seqpar.models.memory import (activation_bytes_per_token, choose_activation_policy, saved_activation_bytes,
                                  step_memory_bytes)
from seqpar.models.transnormer import TNLBlock, run_block

# the partitioner inductor uses (min-cut, which applies the selective policy's tags), without a C++ build
COMPILE_BACKEND = "aot_eager_decomp_partition"


def _loss_and_grads(policy, compiled=False, **overrides):
    torch.manual_seed(0)
    cfg = TNLConfig.preset("tiny", activation_checkpointing=policy, learnable_slopes=True, **overrides)
    model = TransNormerLLM(cfg).train()
    if compiled:
        torch._dynamo.reset()
        model.compile_blocks(backend=COMPILE_BACKEND)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 97), generator=g)
    torch.manual_seed(2)  # same dropout masks in every run
    out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_same(got, ref, what):
    loss, grads = got
    ref_loss, ref_grads = ref
    assert abs(float(loss - ref_loss)) <= 1e-6 * abs(float(ref_loss)), f"{what}: loss {loss} vs {ref_loss}"
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        err = float((grads[n] - g).norm() / g.norm().clamp_min(1e-30))
        assert err <= 1e-6, f"{what}: grad {n} rel err {err:.3g}"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_selective_and_full_equal_none(compiled):
    ref = _loss_and_grads("none", compiled)
    for policy in ("selective", "full"):
        _assert_same(_loss_and_grads(policy, compiled), ref, f"{policy} ({'compiled' if compiled else 'eager'})")


def test_selective_with_dropout_and_seq_chunk():
    """Dropout masks are replayed in the recompute; the chunked path recomputes each chunk under the policy."""
    ref = _loss_and_grads("none", dropout=0.1)
    _assert_same(_loss_and_grads("selective", dropout=0.1), ref, "selective, dropout")
    ref = _loss_and_grads("none", seq_chunk=40)
    _assert_same(_loss_and_grads("selective", seq_chunk=40), ref, "selective, seq_chunk")


def _saved_per_token(block, policy, d, lengths=(32, 64), residual=torch.float32):
    """Bytes per token the block keeps for its backward under ``policy`` (bf16 autocast over fp32 parameters, the
    residual stream in ``residual``): the slope between two lengths (the cast weights and the per-sequence state
    drop out)."""
    counts = []
    params = list(block.parameters())
    for T in lengths:
        x = torch.randn(1, T, d, dtype=residual, requires_grad=True)

        def fwd():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return run_block(block, policy, x)[0]

        y, nbytes = saved_activation_bytes(fwd, exclude=params)
        y.float().sum().backward()  # the graph is complete (a backward runs through it)
        counts.append(nbytes)
    return (counts[1] - counts[0]) / (lengths[1] - lengths[0])


@pytest.mark.parametrize("residual", ["param", "autocast"], ids=["fp32-residual", "bf16-residual"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_saved_bytes_order_and_formulas(compiled, residual):
    """none > selective > full, each equal to seqpar.models.memory's formula (eager: the Triton path's)."""
    cfg = TNLConfig.preset("tiny", n_heads=2, head_dim=48, glu_dim=160, attn_backend="triton", residual_dtype=residual)
    block = TNLBlock(cfg, 0).train()
    if compiled:
        torch._dynamo.reset()
        block.compile(backend=COMPILE_BACKEND, dynamic=False)
    x_dtype = torch.bfloat16 if residual == "autocast" else torch.float32  # what the model's embedding feeds it
    got = {p: _saved_per_token(block, p, cfg.d_model, residual=x_dtype) for p in ("none", "selective", "full")}
    assert got["none"] > got["selective"] > got["full"] > 0, got
    for p, v in got.items():
        want = activation_bytes_per_token(cfg, p, torch.bfloat16, compiled=compiled)["saved"]  # r from the config
        assert v == pytest.approx(want, rel=1e-6), (p, got)


def test_auto_picks_by_budget():
    cfg = TNLConfig.preset("tnl-0.4b")
    B, T = 1, 32768
    est = {p: step_memory_bytes(cfg, p, B, T) for p in ("none", "selective", "full")}
    assert est["none"] > est["selective"] > est["full"]
    assert choose_activation_policy(cfg, B, T, est["none"]) == "none"
    assert choose_activation_policy(cfg, B, T, est["none"] - 1) == "selective"
    assert choose_activation_policy(cfg, B, T, est["selective"] - 1) == "full"
    assert choose_activation_policy(cfg, B, T, 0) == "full"  # nothing fits: the least memory there is
    # longer sequences need more: at a fixed budget the choice moves from none to full
    budget = step_memory_bytes(cfg, "selective", B, 2 * T)
    picks = [choose_activation_policy(cfg, B, t, budget) for t in (T, 2 * T, 8 * T)]
    assert picks == ["none", "selective", "full"], picks
    with pytest.raises(ValueError, match="budget_bytes must be a non-negative number of bytes"):
        choose_activation_policy(cfg, B, T, -1)
    with pytest.raises(ValueError, match="policy must be one of"):
        step_memory_bytes(cfg, "auto", B, T)


def test_auto_in_the_model(monkeypatch):
    """CPU: "auto" is "none"; with a device budget (patched) the model picks per shape, once, cached."""
    cfg = TNLConfig.preset("tiny", activation_checkpointing="auto")
    model = TransNormerLLM(cfg).train()
    assert model.activation_policy(2, 64) == "none"
    _assert_same(_loss_and_grads("auto"), _loss_and_grads("none"), "auto on the CPU")
    state = memory.model_state_bytes(model)
    need = {p: step_memory_bytes(cfg, p, 2, 64, torch.float32, torch.float32, state, compiled=False)
            for p in ("none", "selective", "full")}
    for policy, budget in (("none", need["none"]), ("selective", need["none"] - 1), ("full", need["selective"] - 1)):
        model = TransNormerLLM(cfg).train()
        monkeypatch.setattr(memory, "device_budget_bytes", lambda device, b=budget: b)
        assert model.activation_policy(2, 64) == policy
        monkeypatch.setattr(memory, "device_budget_bytes", lambda device: 0)
        assert model.activation_policy(2, 64) == policy  # cached per shape
        assert model.activation_policy(2, 65) == "full"


def test_bool_spellings_and_bad_values():
    assert TNLConfig.preset("tiny").activation_checkpointing == "none"
    assert TNLConfig.preset("tiny", activation_checkpointing=False).activation_checkpointing == "none"
    assert TNLConfig.preset("tiny", activation_checkpointing=True).activation_checkpointing == "full"
    old = {**TNLConfig.preset("tiny").to_dict(), "activation_checkpointing": True}  # a config saved before
    assert TNLConfig.from_dict(old).activation_checkpointing == "full"
    for p in ("none", "selective", "full", "auto"):
        assert TNLConfig.preset("tiny", activation_checkpointing=p).to_dict()["activation_checkpointing"] == p
    for bad in ("maybe", "Full", 1, None):
        with pytest.raises(ValueError, match=r"TNLConfig.activation_checkpointing must be one of \('none', "
                                             r"'selective', 'full', 'auto'\)"):
            TNLConfig.preset("tiny", activation_checkpointing=bad)
    for p in ("none", "selective", "auto"):
        with pytest.raises(ValueError, match="activation_offload needs activation_checkpointing=True"):
            TNLConfig.preset("tiny", activation_checkpointing=p, activation_offload=True)
    with pytest.raises(ValueError, match="policy must be 'none', 'selective' or 'full'"):
        run_block(TNLBlock(TNLConfig.preset("tiny"), 0), "auto", torch.zeros(1, 4, 64))


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_policies_bf16_gradients_peaks_and_estimate(compiled):
    """tnl-0.4b's block (4 layers), B1 T16K, bf16 autocast, fused AdamW, two steps: selective and full match
    none's loss and gradients (bf16 rounding), peaks order none > selective > full, and the second step's peak
    is within 25% of step_memory_bytes."""
    import gc

    B, T = 1, 16384
    res = {}
    for policy in ("none", "selective", "full"):
        torch.manual_seed(0)
        cfg = TNLConfig.preset("tnl-0.4b", n_layers=4, activation_checkpointing=policy)
        model = TransNormerLLM(cfg).cuda().train()
        if compiled:
            torch._dynamo.reset()
            model.compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)
        y = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)
        for step in range(2):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, labels=y, return_logits=False).loss
            loss.backward()
            if step == 0:
                first = (loss.item(), {n: p.grad.float().cpu() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        res[policy] = dict(first=first, peak=torch.cuda.max_memory_allocated(),
                           est=step_memory_bytes(cfg, policy, B, T, compiled=compiled))
        del model, opt, x, y, loss
        gc.collect()
        torch.cuda.empty_cache()
    ref_loss, ref_grads = res["none"]["first"]
    for policy in ("selective", "full"):
        loss, grads = res[policy]["first"]
        assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss), (policy, loss, ref_loss)
        for n, gr in ref_grads.items():
            err = float((grads[n] - gr).norm() / gr.norm().clamp_min(1e-30))
            assert err <= 2e-2, f"{policy}: grad {n} rel err {err:.3g}"
    peaks = {p: r["peak"] / 2**30 for p, r in res.items()}
    ests = {p: r["est"] / 2**30 for p, r in res.items()}
    print(f"compiled={compiled} peak GiB {peaks} estimated GiB {ests}")
    assert peaks["none"] > peaks["selective"] > peaks["full"], peaks
    for p in peaks:
        assert abs(ests[p] - peaks[p]) <= 0.25 * peaks[p], (p, peaks, ests)
