import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

pl = pytest.importorskip("pytorch_lightning")

from seqpar.models import LitLM, TNLConfig  # noqa: E402
from seqpar.models.lit import warmup_cosine  # noqa: E402


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n, T=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        # a learnable stream: repeated short patterns
        base = torch.randint(0, 256, (8,), generator=g)
        self.items = []
        for i in range(n):
            x = base.roll(i).repeat(T // 8 + 1)[: T + 1]
            self.items.append({"input_ids": x[:-1].clone(), "labels": x[1:].clone()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_constructor_variants():
    a = LitLM()
    assert a.config == TNLConfig.preset("tiny")
    b = LitLM("tiny", lr=1e-3)
    c = LitLM(TNLConfig.preset("tiny").to_dict(), warmup_steps=3)
    assert b.hparams.lr == 1e-3 and c.hparams.warmup_steps == 3 and c.config == a.config
    assert isinstance(a.hparams.config, dict)
    with pytest.raises(ValueError, match="lr"):
        LitLM(lr=0.0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LitLM(min_lr_ratio=2.0)
    with pytest.raises(TypeError, match="config"):
        LitLM(config=3)


def test_param_groups_no_decay_on_embeddings():
    for tie in (False, True):
        lit = LitLM(TNLConfig.preset("tiny", tie_embeddings=tie, learnable_slopes=True, bias=True))
        decay, no_decay = lit.param_groups()
        dec = {id(p) for p in decay["params"]}
        names = {id(p): n for n, p in lit.model.named_parameters()}
        assert id(lit.model.embed.weight) not in dec
        assert all(".bias" not in names[i] and "slopes" not in names[i] for i in dec)
        assert id(lit.model.layers[0].token_mixer.q_proj.weight) in dec
        assert (id(lit.model.lm_head.weight) in dec) == (not tie)
        total = len(decay["params"]) + len(no_decay["params"])
        assert total == len(list(lit.model.parameters()))
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10**6, 10, None, 0.1) == 1.0  # no known end: constant after warmup
    assert LitLM(max_steps=-1).hparams.max_steps is None  # Lightning's "unbounded"


def test_lit_has_no_sp_plumbing():
    """LitLM does not fetch an SP group from the strategy: the strategy's parallelize sets the layers' context."""
    lit = LitLM()
    lit._trainer = SimpleNamespace(strategy=SimpleNamespace(sp_group="G", sp_mode="ring"))
    lit.setup("fit")
    assert lit.model.sp_group is None and lit.model.sp_mode == "allgather"
    assert not hasattr(lit, "_attach_sp_group")
    lit._trainer = None


def test_bad_batch():
    lit = LitLM()
    with pytest.raises(ValueError, match="input_ids"):
        lit.training_step({"tokens": torch.zeros(1, 4, dtype=torch.long)}, 0)


def test_trainer_fit_logs_and_learns(tmp_path):
    torch.manual_seed(0)
    lit = LitLM(TNLConfig.preset("tiny"), lr=3e-3, warmup_steps=2, max_steps=30, weight_decay=0.0)
    dl = torch.utils.data.DataLoader(_Batches(16), batch_size=4)
    val = torch.utils.data.DataLoader(_Batches(4, seed=0), batch_size=4)
    with torch.no_grad():
        before = lit.model(**{k: torch.stack([b[k] for b in val.dataset.items]) for k in ("input_ids", "labels")}).loss
    trainer = pl.Trainer(
        max_steps=30, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, val_check_interval=None,
        check_val_every_n_epoch=100, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
    )
    trainer.fit(lit, dl)
    m = trainer.callback_metrics
    for key in ("train/loss", "train/lr", "train/tokens_per_s", "train/tokens_per_gpu_per_s"):
        assert key in m, (key, sorted(m))
    assert float(m["train/tokens_per_s"]) == pytest.approx(float(m["train/tokens_per_gpu_per_s"]))
    assert float(m["train/lr"]) == pytest.approx(3e-3 * warmup_cosine(29, 2, 30, 0.1))
    trainer.validate(lit, val, verbose=False)
    after = trainer.callback_metrics["val/loss"]
    assert math.isfinite(float(after)) and float(after) < 0.5 * float(before)
    # checkpoint round trip rebuilds the config from the saved dict
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    re = LitLM.load_from_checkpoint(path)
    assert re.config == lit.config
    for (n, p), q in zip(lit.model.state_dict().items(), re.model.state_dict().values()):
        assert torch.equal(p, q), n


def test_adamw_is_fused_on_cuda_unless_a_fp16_scaler_or_lightning_clips():
    from seqpar.models.lit import adamw_impl

    assert adamw_impl(False) == {} and adamw_impl(False, True) == {}
    assert adamw_impl(True) == {"fused": True}
    # a fp16 GradScaler / Lightning's own clipping refuse a fused (self-unscaling) optimizer
    assert adamw_impl(True, fp16_scaler=True) == {"foreach": True}


@pytest.mark.parametrize("fused", [True, False])
def test_clip_grad_norm_into_the_fused_step_equals_clipping_in_place(fused):
    from seqpar.models.lit import clip_grad_norm_

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    b = copy.deepcopy(a)
    oa = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=fused)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=fused)
    for step, gain in enumerate([10.0, 1e-4, 30.0]):  # clipped, not clipped (scale 1), clipped
        x = torch.randn(8, 32)
        for m in (a, b):
            (m(x) ** 2).sum().mul(gain).backward()
        na = clip_grad_norm_(a.parameters(), 1.0, oa)
        nb = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 1.0)
        torch.testing.assert_close(na, nb)
        assert (getattr(oa, "grad_scale", None) is not None) == fused
        oa.step()
        ob.step()
        assert getattr(oa, "grad_scale", None) is None  # one step only
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)  # stored clipped either way
        oa.zero_grad()
        ob.zero_grad()
    if fused:  # a scale the optimizer already has (an AMP GradScaler's) is not overwritten
        oa.grad_scale = torch.tensor(2.0)
        (a(x) ** 2).sum().backward()
        with pytest.raises(RuntimeError, match="grad_scale"):
            clip_grad_norm_(a.parameters(), 1.0, oa)


def test_litlm_clips_the_global_gradient_norm_itself():
    lit = LitLM("tiny", grad_clip=0.05)
    x = torch.randint(0, 256, (2, 32))
    lit.model(x, labels=x).loss.backward()
    grads = [p.grad.clone() for p in lit.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 0.05
    lit.on_before_optimizer_step(None)
    torch.testing.assert_close(lit.last_grad_norm, norm)
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in lit.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(0.05), rtol=1e-4, atol=0)
    for g, p in zip(grads, lit.parameters()):  # one common factor
        torch.testing.assert_close(p.grad, g * (0.05 / norm), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="grad_clip"):
        LitLM("tiny", grad_clip=-1)
