"""torch.compile(fullgraph=True) of a TransNormerLLM training step under sequence parallelism (real gloo ranks).

Each rank holds its shard of the sequence and the model's attention runs ``sp_lightning_attn`` over the group;
traced, the state exchange is the custom op ``seqpar::sp_state_exchange`` (seqpar/distributed/sp_ops.py).
Checked on every rank: ``torch._dynamo.explain`` finds no graph break, and the compiled loss and every
parameter gradient (learnable slopes included) equal eager, in both modes, with and without packed documents;
a second batch with other document offsets reuses the graph; the header check and the cu_seqlens validation
still raise a ValueError on every rank inside the compiled graph. One spawn of 2 ranks for the whole module.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.distributed import shard_sequence, sp_lightning_attn
from seqpar.models import TNLConfig, TransNormerLLM

from sp_dist_utils import run_workers

T = 32  # global tokens: 16 per rank
# documents [0,5) [5,21) [21,32): one straddles the shard boundary 16; the second batch starts one exactly at it
CUS = ([0, 5, 21, T], [0, 16, 27, T])
SETTINGS = {  # device: (compile backend, attention backend, loss rtol, grad rtol)
    "cpu": ("aot_eager", "torch", 1e-5, 1e-4),
    "cuda": ("inductor", None, 1e-4, 1e-3),  # inductor's fusions round differently; tf32 dots in the kernels
}


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _batch(cu, dev):
    g = torch.Generator().manual_seed(len(cu) + cu[1])
    ids = torch.randint(0, 256, (1, T), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, [b - 1 for b in cu[1:-1]]] = -100  # no target across a document boundary
    return ids.to(dev), labels.to(dev), torch.tensor(cu, dtype=torch.int32, device=dev)


def _grads(model, fn, x, y, cu):
    model.zero_grad(set_to_none=True)
    loss = fn(x, y, cu)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _model_case(rank, mode, packed, group, dev):
    compile_backend, attn_backend, loss_tol, grad_tol = SETTINGS[dev]
    tag = f"[rank {rank} mode={mode} packed={packed}]"
    torch.manual_seed(0)
    cfg = TNLConfig.preset("tiny", learnable_slopes=True, attn_backend=attn_backend, sp_mode=mode)
    model = TransNormerLLM(cfg).to(dev)
    ref = TransNormerLLM(cfg).to(dev)
    ref.load_state_dict(model.state_dict())
    model.sp_group = group

    def step(x, y, cu):
        return model(x, labels=y, cu_seqlens=cu, return_logits=False).loss

    torch._dynamo.reset()
    batches = [_batch(cu, dev) for cu in CUS] if packed else [_batch(CUS[0], dev)[:2] + (None,)]
    sharded = [(shard_sequence(x, group), shard_sequence(y, group), cu) for x, y, cu in batches]
    explain = torch._dynamo.explain(step)(*sharded[0])
    assert explain.graph_break_count == 0, f"{tag} {explain.break_reasons}"
    torch._dynamo.reset()
    comp = torch.compile(step, backend=compile_backend, fullgraph=True)
    for i, ((x, y, cu), full) in enumerate(zip(sharded, batches)):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # new offsets, same graph
            l1, g1 = _grads(model, comp, x, y, cu)
        l0, g0 = _grads(model, step, x, y, cu)
        assert _rel(l1, l0) < loss_tol, f"{tag} batch {i} loss {l1} vs eager {l0}"
        lr = ref(full[0], labels=full[1], cu_seqlens=full[2], return_logits=False).loss  # the whole sequence
        assert _rel(l0, lr) < loss_tol, f"{tag} batch {i} SP loss {l0} vs single-process {lr}"
        assert any("log_slopes" in n for n in g0)
        for n in g0:
            assert _rel(g1[n], g0[n]) < grad_tol, f"{tag} batch {i} grad {n}: {_rel(g1[n], g0[n]):.2e}"


def _errors_inside_the_graph(rank, dev):
    """The consistency header and the cu_seqlens validation run inside the exchange op: a ValueError on every
    rank from the compiled graph, and the group still works after it."""
    compile_backend, attn_backend = SETTINGS[dev][:2]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g).to(dev) for _ in range(3))
    s = torch.tensor([0.1, 0.5], device=dev)

    def f(q, k, v, s, cu):
        return sp_lightning_attn(q, k, v, s, cu_seqlens=cu, backend=attn_backend)

    torch._dynamo.reset()
    comp = torch.compile(f, backend=compile_backend, fullgraph=True)
    cu = torch.tensor([0, 3, 16], dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match="disagree on slopes"):
        comp(q, k, v, s + (1e-3 if rank == 1 else 0.0), cu)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = 15 .* != group size 2 x local length 8"):
        comp(q, k, v, s, torch.tensor([0, 3, 15], dtype=torch.int32, device=dev))
    torch.testing.assert_close(comp(q, k, v, s, cu), f(q, k, v, s, cu), rtol=1e-5, atol=1e-6)


def _worker(rank, world, dev="cpu"):
    if dev == "cuda":
        torch.cuda.set_device(0)  # the ranks share one GPU over gloo
    sub = dist.new_group([0, 1])  # a group other than the default one: resolved by name inside the op
    for mode, group in (("allgather", dist.group.WORLD), ("ring", sub)):
        for packed in (False, True):
            _model_case(rank, mode, packed, group, dev)
    _errors_inside_the_graph(rank, dev)
    dist.barrier()


def test_sp_model_compiles_fullgraph_and_equals_eager():
    run_workers(_worker, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sp_model_compiles_fullgraph_and_equals_eager_gpu():
    """The same on the GPU: Triton kernels inside the custom ops, inductor; 2 processes share one GPU (gloo)."""
    run_workers(_worker, 2, "cuda")
