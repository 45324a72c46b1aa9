"""Sequence-parallel model tests with real gloo processes (SP = 2 and 4 on the CPU).

Every rank builds the same tiny float64 model, takes its contiguous shard of T of the same batch and
runs the model with ``model.sp_group`` set. Checked against the single-process model on the whole
sequence: the loss on every rank, the logits shards, and the parameter gradients averaged over the
ranks (what DDP does). Workers write their results to files; an exception in a worker fails the test.
"""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqpar.models import TNLConfig, TransNormerLLM

B, T = 2, 48
# (sp_mode, activation_checkpointing): selective recomputes the SP exchange of the elementwise-recomputed block
MODES = (("allgather", False), ("ring", True), ("allgather", "selective"))


def _cfg(mode="allgather", ckpt=False):
    return TNLConfig.preset("tiny", n_layers=3, sp_mode=mode, activation_checkpointing=ckpt)


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (B, T), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, 3:17] = -100  # unequal numbers of valid tokens per shard
    labels[1, 30:33] = -100
    return ids, labels


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, state_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        group = dist.new_group(list(range(world)))  # an explicit group, not read from globals
        ids, labels = _batch()
        L = T // world
        sl = slice(rank * L, (rank + 1) * L)
        results = {}
        for mode, ckpt in MODES:
            model = TransNormerLLM(_cfg("allgather", ckpt)).double()
            model.load_state_dict(torch.load(state_path))
            model.train()
            model.sp_group = group  # set after construction, as the Lightning strategy does
            model.sp_mode = mode
            out = model(ids[:, sl], labels=labels[:, sl])
            out.loss.backward()
            grads = {}
            for n, p in model.named_parameters():
                gsum = p.grad.clone()
                dist.all_reduce(gsum, group=group)
                grads[n] = gsum / world
            results[f"{mode}-{ckpt}"] = {"loss": out.loss.detach(), "logits": out.logits.detach(), "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sp_loss_and_grads_match_single_process(world, tmp_path):
    torch.manual_seed(0)
    ref_model = TransNormerLLM(_cfg()).double()
    state_path = str(tmp_path / "state.pt")
    torch.save(ref_model.state_dict(), state_path)
    ids, labels = _batch()
    ref = ref_model(ids, labels=labels)
    ref.loss.backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}

    mp.spawn(_worker, args=(world, _free_port(), state_path, str(tmp_path)), nprocs=world, join=True)

    L = T // world
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        for mode, ckpt in MODES:
            r = res[f"{mode}-{ckpt}"]
            torch.testing.assert_close(r["loss"], ref.loss.detach(), rtol=1e-10, atol=0, msg=f"{mode} loss rank {rank}")
            torch.testing.assert_close(
                r["logits"], ref.logits.detach()[:, rank * L : (rank + 1) * L], rtol=1e-9, atol=1e-10,
                msg=f"{mode} logits rank {rank}",
            )
            for n, g in ref_grads.items():
                err = float((r["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-300))
                assert err < 1e-8, f"{mode} grad {n} rank {rank}: rel err {err:.3g}"
