"""sp_lightning_attn over real processes (gloo, CPU) against the single-process operator."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.distributed import gather_sequence, shard_sequence, sp_lightning_attn
from seqpar.kernels.lightning_attn import lightning_attn

from sp_dist_utils import assert_close, rel_err, run_workers

DECAYS = {
    "strong": lambda H: torch.linspace(0.5, 2.0, H),
    "weak": lambda H: torch.linspace(1e-3, 0.05, H),
    "zero": lambda H: torch.zeros(H),
}


def _data(seed, B, T, H, D, E, dtype, decay):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, H, E, generator=g, dtype=torch.float64)
    w = torch.randn(B, T, H, E, generator=g, dtype=torch.float64)  # loss weights
    s = DECAYS[decay](H).double()
    return [x.to(dtype) for x in (q, k, v, w, s)]


def _reference(q, k, v, w, s, cu):
    q, k, v, s = (x.detach().clone().requires_grad_(True) for x in (q, k, v, s))
    o, _ = lightning_attn(q, k, v, s, cu_seqlens=cu, backend="torch")
    (o * w).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad, s.grad


def check_case(group, lens, *, B=2, H=2, D=8, E=16, decay="strong", mode="allgather", cu=None,
               dtype=torch.float64, seed=0, offsets=False, tag=""):
    """Run the SP op on this rank's slice of a seeded global problem and compare with the reference.

    lens: per-group-rank shard lengths (may differ). Returns this rank's output (for cross-mode checks).
    """
    P, r = dist.get_world_size(group), dist.get_rank(group)
    T = sum(lens)
    off = sum(lens[:r])
    L = lens[r]
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v, w, s = _data(seed, B if cu is None else 1, T, H, D, E, dtype, decay)
    ref = _reference(q, k, v, w, s, cu_t)
    ql, kl, vl = (x[:, off:off + L].clone().requires_grad_(True) for x in (q, k, v))
    sl = s.clone().requires_grad_(True)
    o = sp_lightning_attn(ql, kl, vl, sl, group=group, mode=mode, cu_seqlens=cu_t, backend="torch",
                          shard_offset=off if offsets else None)
    (o * w[:, off:off + L]).sum().backward()
    ds = sl.grad.clone()
    dist.all_reduce(ds, group=group)  # slopes are replicated: their gradient is the sum over ranks
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    what = f"[{tag} P={P} rank={r} lens={lens} decay={decay} mode={mode} cu={cu} {dtype}]"
    sl_ = slice(off, off + L)
    assert_close(f"o {what}", o.detach(), ref[0][:, sl_], tol)
    assert_close(f"dq {what}", ql.grad, ref[1][:, sl_], tol)
    assert_close(f"dk {what}", kl.grad, ref[2][:, sl_], tol)
    assert_close(f"dv {what}", vl.grad, ref[3][:, sl_], tol)
    assert_close(f"dslopes {what}", ds, ref[4], tol)
    return o.detach(), ql.grad, kl.grad, vl.grad, ds


def _varlen_cases(P, L):
    T = P * L
    if P == 2:  # L = 13
        return [
            [0, 5, 13, 20, T],  # doc starts exactly at the shard boundary 13
            [0, 10, T],  # doc straddles; shard 1 lies fully inside it
            [0, 2, 3, 6, 11, 15, 16, T],  # many short docs, one straddling by 2 tokens
        ]
    if P == 8:  # L = 6 -> T = 48
        return [
            [0, 3, 30, 36, T],  # doc 1 spans ranks 0..4 (shards 1-4 inside it), doc 3 starts at shard start 36
            [0, 1, 47, T],  # one long doc over all eight ranks, one-token docs at both ends
        ]
    # P = 4, L = 9 -> T = 36
    return [
        [0, 4, 21, 27, T],  # doc 1 spans ranks 0..2 (shard 1 inside it), doc 3 starts at shard start 27
        [0, 9, 18, 27, T],  # every shard is its own document
        [0, 1, 35, T],  # one long doc over all ranks, one-token docs at both ends
    ]


def _worker_equal(rank, world, L_dense, L_var):
    g = None
    for mode in ("allgather", "ring"):
        for decay in DECAYS:
            outs = check_case(g, [L_dense] * world, decay=decay, mode=mode, seed=1)
        for i, cu in enumerate(_varlen_cases(world, L_var)):
            check_case(g, [L_var] * world, cu=cu, mode=mode, decay="weak" if i % 2 else "strong", seed=2 + i)
        check_case(g, [L_dense] * world, mode=mode, dtype=torch.float32, seed=7, D=16, E=8)
    # the two modes agree to rounding (same math, different association)
    a = check_case(g, [L_dense] * world, mode="allgather", decay="weak", seed=9)
    b = check_case(g, [L_dense] * world, mode="ring", decay="weak", seed=9)
    for x, y in zip(a, b):
        assert_close("allgather vs ring", x, y, 1e-12)


def _worker_unequal(rank, world, lens, cu):
    for mode in ("allgather", "ring"):
        check_case(None, lens, mode=mode, decay="weak", seed=3, tag="unequal")
        check_case(None, lens, mode=mode, cu=cu, offsets=True, decay="strong", seed=4, tag="unequal+cu")


@pytest.mark.parametrize("world,L_dense,L_var", [(2, 13, 13), (4, 7, 9), (8, 5, 6)])
def test_sp_matches_single_process(world, L_dense, L_var):
    run_workers(_worker_equal, world, L_dense, L_var)


def test_sp_unequal_shards():
    lens = [5, 12, 3, 9]
    run_workers(_worker_unequal, 4, lens, [0, 4, 6, 16, 17, 25, sum(lens)])


def _worker_groups(rank, world):
    # a non-contiguous group: {0, 2} and {1, 3}; every rank creates both groups in the same order
    ga = dist.new_group([0, 2])
    gb = dist.new_group([1, 3])
    g = ga if rank in (0, 2) else gb
    for mode in ("allgather", "ring"):
        check_case(g, [11, 11], mode=mode, seed=10 + rank % 2, tag="noncontig")
        check_case(g, [13, 13], mode=mode, cu=[0, 5, 13, 20, 26], seed=20 + rank % 2, tag="noncontig-varlen")


def test_sp_noncontiguous_group():
    run_workers(_worker_groups, 4)


def _worker_errors(rank, world):
    x = torch.zeros(1, 5, 2, 4)
    with pytest.raises(ValueError, match=r"not divisible by sp_size=2 \(dim 1\): pad it to a multiple of 2, e.g. T=6"):
        shard_sequence(x)
    full = torch.arange(2 * 6 * 3, dtype=torch.float64).view(2, 6, 3).requires_grad_(True)
    part = shard_sequence(full)
    assert torch.equal(part, full[:, 3 * rank:3 * rank + 3])
    back = gather_sequence(part)
    assert torch.equal(back, full)
    part2 = shard_sequence(full, dim=2 - 2)  # dim 0 has 2 rows: one per rank
    assert torch.equal(part2, full[rank:rank + 1])
    q = torch.randn(1, 5 + rank, 2, 4, dtype=torch.float64)
    s = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="shards must be equal"):
        sp_lightning_attn(q, q, q, s, cu_seqlens=torch.tensor([0, 11]), backend="torch")
    with pytest.raises(ValueError, match="mode"):
        sp_lightning_attn(q, q, q, s, mode="tree", backend="torch")
    with pytest.raises(ValueError, match="slopes"):
        sp_lightning_attn(q, q, q, -s, backend="torch")
    # the group still works after the rejected calls (nothing was left in flight)
    check_case(None, [6, 6], seed=5, tag="after-errors")
    # the list-form all-gather fallback (backends without all_gather_single / _into_tensor)
    from seqpar.distributed import comm

    backend = comm.backend_name(None)
    comm._SINGLE_OK[backend] = False
    try:
        check_case(None, [6, 6], seed=6, tag="list-allgather")
    finally:
        comm._SINGLE_OK[backend] = True


def test_sp_errors_and_sharding():
    run_workers(_worker_errors, 2)


class _Log(torch.autograd.Function):
    """Identity that records when its backward runs."""

    @staticmethod
    def forward(ctx, x, log, name):
        ctx.log, ctx.name = log, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        ctx.log.append(ctx.name)
        return dx, None, None


def _worker_overlap(rank, world):
    """The exchange is in flight while the local kernel runs, in forward and in backward."""
    from seqpar.distributed import sp_attn

    log = []
    S, F = sp_attn._Start.__dict__, sp_attn._Finish.__dict__  # staticmethod objects, restored as such
    orig = (sp_attn.lightning_attn, S["forward"], S["backward"], F["forward"], F["backward"])

    def kernel(q, *a, **kw):
        log.append("kernel.fwd")
        o, ht = orig[0](_Log.apply(q, log, "kernel.bwd"), *a, **kw)
        return o, ht

    def wrap(fn, name):
        def f(ctx, *a):
            log.append(name)
            return fn.__func__(ctx, *a)
        return staticmethod(f)

    sp_attn.lightning_attn = kernel
    sp_attn._Start.forward = wrap(orig[1], "start.fwd")
    sp_attn._Start.backward = wrap(orig[2], "start.bwd")
    sp_attn._Finish.forward = wrap(orig[3], "finish.fwd")
    sp_attn._Finish.backward = wrap(orig[4], "finish.bwd")
    try:
        for mode in ("allgather", "ring"):
            log.clear()
            check_case(None, [8, 8], mode=mode, seed=11, tag="overlap")
            expect = ["start.fwd", "kernel.fwd", "finish.fwd", "finish.bwd", "kernel.bwd", "start.bwd"]
            order = [e for e in log if e in expect]
            assert order == expect, (mode, log)
    finally:
        (sp_attn.lightning_attn, sp_attn._Start.forward, sp_attn._Start.backward,
         sp_attn._Finish.forward, sp_attn._Finish.backward) = orig


def test_sp_exchange_overlaps_local_kernel():
    run_workers(_worker_overlap, 2)


# ------------------------------------------------------------------------------------------
# GPU (NCCL): skipped without >= 2 GPUs
# ------------------------------------------------------------------------------------------


def _worker_gpu(rank, world, dtype, floor, device_type="cuda"):
    dev = torch.device("cuda", rank) if device_type == "cuda" else torch.device(device_type)
    P, r = world, rank
    B, L, H, D = 2, 300, 4, 64
    T = P * L
    for mode in ("allgather", "ring"):
        for cu in (None, [0, 100, L, L + 37, T]):
            b = B if cu is None else 1
            q, k, v, w, s = (x.to(dev) for x in _data(3, b, T, H, D, D, torch.float64, "weak"))
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=dev)
            ref = _reference(q, k, v, w, s, cu_t)
            # yardstick (FlashAttention's rule): the single-device kernel in the same dtype on the whole sequence
            qs, ks, vs = (x.to(dtype).requires_grad_(True) for x in (q, k, v))
            ss = s.float().requires_grad_(True)
            os_, _ = lightning_attn(qs, ks, vs, ss, cu_seqlens=cu_t)
            (os_.float() * w.float()).sum().backward()
            single = [os_.detach(), qs.grad, ks.grad, vs.grad, ss.grad]
            sl_ = slice(r * L, (r + 1) * L)
            ql, kl, vl = (x[:, sl_].to(dtype).requires_grad_(True) for x in (q, k, v))
            sp = s.float().requires_grad_(True)
            o = sp_lightning_attn(ql, kl, vl, sp, mode=mode, cu_seqlens=cu_t)
            (o.float() * w[:, sl_].float()).sum().backward()
            ds = sp.grad.clone()
            dist.all_reduce(ds)
            what = f"[gpu {dtype} mode={mode} cu={cu} rank={r}]"
            got = [o, ql.grad, kl.grad, vl.grad, ds]
            for i, name in enumerate(("o", "dq", "dk", "dv", "dslopes")):
                full = i == 4
                ref_i = ref[i] if full else ref[i][:, sl_]
                single_i = single[i] if full else single[i][:, sl_]
                tol = max(floor, 2 * rel_err(single_i.float(), ref_i))
                assert_close(f"{name} {what}", got[i].float(), ref_i, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")
@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_sp_nccl(dtype, floor):
    run_workers(_worker_gpu, 2, dtype, floor, backend="nccl")
