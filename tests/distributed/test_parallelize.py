"""parallelize(model, dims, fsdp=True) on real gloo processes (4 ranks, one spawn for every case).

Each rank also runs the single-process reference on the whole global batch (same init), so every case is
checked against it: the global-batch loss, every gradient (``full_tensor()``), the clipped-gradient norm and
every parameter after 3 AdamW steps, within fp32 rounding. Cases: dp 2 x sp 2 and dp 1 x sp 4, both SP
modes, packed documents straddling SP ranks, parameter dims not divisible by the world (uneven shards),
activation checkpointing, and SP-only (fsdp=False) through the same function.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from seqpar.distributed import ParallelDims, parallelize, shard_sequence
from seqpar.models import TNLConfig, TransNormerLLM

from sp_dist_utils import run_workers

T, STEPS, LR = 16, 3, 3e-3
# vocab 50, d_model 36, glu 30, 4 heads of 9, 4 log-slopes: dims not divisible by 4 -> uneven FSDP shards
CFG = dict(vocab_size=50, d_model=36, n_layers=2, n_heads=4, glu_dim=30, learnable_slopes=True)
CASES = [  # (dp, sp, sp_mode, packed, fsdp, activation_checkpointing)
    (2, 2, "allgather", False, True, False),
    (2, 2, "ring", False, True, True),
    (1, 4, "allgather", True, True, False),
    (1, 4, "ring", True, True, False),
    (2, 2, "ring", False, False, False),
]


def _batch(dp: int, packed: bool):
    g = torch.Generator().manual_seed(11)
    B = 1 if packed else dp
    ids = torch.randint(0, CFG["vocab_size"], (B * (dp if packed else 1), T), generator=g)
    labels = torch.roll(ids, -1, 1)
    cu = None
    if packed:  # one packed row per dp rank; documents [0,3) [3,13) [13,16): 13 straddles shards of 4
        cu = torch.tensor([0, 3, 13, 16], dtype=torch.int32)
        labels[:, [2, 12]] = -100  # no target across a document boundary
    return ids, labels, cu


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _case(rank, dp, sp, mode, packed, fsdp, ckpt):
    tag = f"dp{dp}xsp{sp} {mode} packed={packed} fsdp={fsdp} ckpt={ckpt}"
    dims = ParallelDims(dp=dp, sp=sp)
    dims.build_mesh("cpu")
    assert dims.fsdp_mesh.size() == 4 and dims.fsdp_mesh.mesh_dim_names == ("dp_sp",)
    dp_rank, sp_rank = dims.coords(rank)
    assert (dims.dp_rank, dims.sp_rank) == (dp_rank, sp_rank)
    torch.manual_seed(0)
    cfg = TNLConfig(**CFG, activation_checkpointing=ckpt)
    ref = TransNormerLLM(cfg)
    model = copy.deepcopy(ref)
    assert parallelize(model, dims, sp_mode=mode, fsdp=fsdp) is model
    # the model and every attention layer get the SP group from the layout only
    assert model.sp_group is dims.sp_group and model.sp_mode == mode
    assert all(b.token_mixer.sp_group is dims.sp_group and b.token_mixer.sp_mode == mode for b in model.layers)
    if fsdp:
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        local = [p.to_local().shape[0] for p in model.embed.parameters()]
        counts = [0] * 4
        dist.all_gather_object(counts, local[0])
        assert sum(counts) == CFG["vocab_size"] and len(set(counts)) > 1, counts  # uneven shards: 13,13,12,12
    ids, labels, cu = _batch(dp, packed)
    ref.train(), model.train()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    mine = slice(dp_rank, dp_rank + 1)
    for step in range(STEPS):
        if packed:  # reference: each dp rank's packed row on its own, the dp mean of their losses
            ref_loss = sum(ref(ids[i:i + 1], labels=labels[i:i + 1], cu_seqlens=cu).loss for i in range(dp)) / dp
        else:
            ref_loss = ref(ids, labels=labels).loss
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)

        x = shard_sequence(ids[mine], dims.sp_group)
        y = shard_sequence(labels[mine], dims.sp_group)
        out = model(x, labels=y, cu_seqlens=cu)
        out.loss.backward()
        if not fsdp:  # SP only: the data-parallel all-reduce DDP would do, averaged over the world
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= 4
        norm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        loss /= 4  # ranks of an SP group hold the group's loss: the world mean is the dp mean
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=2e-6, atol=2e-6, msg=lambda m, _t=f"{tag} step {step} loss": f"{_t}: {m}")
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-7, msg=lambda m, _t=f"{tag} step {step} grad norm": f"{_t}: {m}")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(_full(p.grad), q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, _t=f"{tag} step {step} grad {name}": f"{_t}: {m}")
        opt.step(), opt_ref.step()
        opt.zero_grad(), opt_ref.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        # AdamW divides by sqrt(v): a near-zero gradient's rounding moves its update by a fraction of lr
        torch.testing.assert_close(_full(p.detach()), q.detach(), rtol=1e-4, atol=LR * 2e-3, msg=lambda m, _t=f"{tag} param {name}": f"{_t}: {m}")


def _worker(rank, world):
    torch.use_deterministic_algorithms(False)
    for case in CASES:
        _case(rank, *case)
    # bad input names the argument
    with pytest.raises(TypeError, match="dims must be a seqpar.distributed.ParallelDims"):
        parallelize(TransNormerLLM(TNLConfig(**CFG)), "dp2xsp2")
    with pytest.raises(RuntimeError, match="build_mesh"):
        parallelize(TransNormerLLM(TNLConfig(**CFG)), ParallelDims(dp=2, sp=2))
    with pytest.raises(ValueError, match="sp_mode"):
        parallelize(TransNormerLLM(TNLConfig(**CFG)), ParallelDims(dp=2, sp=2), sp_mode="tree")


def test_parallelize_fsdp_matches_single_process():
    run_workers(_worker, 4)


def test_parallelize_rejects_without_a_layout():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        parallelize(object(), ParallelDims(dp=1, sp=1))
