"""SP ranks that disagree get a ValueError naming the argument on every rank (real gloo processes).

Before the header exchange a B/H mismatch aborted gloo in C++ (message sizes differ), allgather vs ring hung
until the process-group timeout, and different slopes / cu_seqlens / scale gave silently wrong outputs. One
spawn of 2 ranks runs every case in turn; after each error the group must still work (no message left over),
which the final agreeing call checks against the single-process operator.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.distributed import comm, sp_lightning_attn
from seqpar.kernels.lightning_attn import lightning_attn

from sp_dist_utils import assert_close, run_workers

B, L, H, D, E = 1, 6, 2, 4, 4


DEVICE = {"type": "cpu"}  # the worker sets "cuda" for the GPU variant (gloo moves CUDA tensors through the host)


def _inputs(rank, B=B, H=H, D=D, E=E, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(B, 2 * L, H, D, generator=g) for _ in range(2))
    v = torch.randn(B, 2 * L, H, E, generator=g)
    sl = slice(rank * L, (rank + 1) * L)
    dev = DEVICE["type"]
    return [x[:, sl].to(dev, dtype) for x in (q, k, v)] + [torch.linspace(0.1, 0.9, H, device=dev)]


# each case: (name expected in the message of the agreeing rank(s), what rank 1 changes)
CASES = {
    "B (batch": dict(B=2),
    "H (heads": dict(H=3),
    "D (head dim of q/k": dict(D=8),
    "E (head dim of v": dict(E=8),
    "dtype": dict(dtype=torch.float64),
    "mode": dict(mode="ring"),
    "slopes": dict(slopes_eps=1e-7),
    "cu_seqlens": dict(cu=[0, 5, 12]),
    "cu_seqlens ": dict(cu_only_rank1=True),  # None on rank 0, given on rank 1
    "scale": dict(scale=0.3),
}


def _call(rank, case):
    mode, cu, scale = "allgather", [0, 3, 12], None
    shape = {k: case[k] for k in ("B", "H", "D", "E", "dtype") if k in case and rank == 1}
    if "cu" in case or "cu_only_rank1" in case:
        shape["B"] = 1
    q, k, v, s = _inputs(rank, **shape)
    if rank == 1:
        mode = case.get("mode", mode)
        scale = case.get("scale", scale)
        if "slopes_eps" in case:
            s = s.clone()
            s[1] += case["slopes_eps"]  # one ulp-sized change of one slope is detected
        cu = case.get("cu", cu)
    use_cu = "cu" in case or ("cu_only_rank1" in case and rank == 1)
    cu_t = torch.tensor(cu, dtype=torch.int64, device=DEVICE["type"]) if use_cu else None
    return sp_lightning_attn(q, k, v, s, mode=mode, cu_seqlens=cu_t, scale=scale, backend="torch")


def _worker(rank, world, device="cpu"):
    DEVICE["type"] = device
    for name, case in CASES.items():
        with pytest.raises(ValueError, match=r"disagree on " + name.strip().replace("(", r"\(")) as ei:
            _call(rank, case)
        assert "rank 0" in str(ei.value) and "rank 1" in str(ei.value)
    # invalid inputs on rank 1 only: rank 1 raises its own error, rank 0 is told which rank failed
    q, k, v, s = _inputs(rank)
    if rank == 1:
        s = -s
    with pytest.raises(ValueError, match="slopes" if rank == 1 else r"SP rank\(s\) \[1\] of the group rejected"):
        sp_lightning_attn(q, k, v, s, backend="torch")
    with pytest.raises(ValueError, match="mode must be one of" if rank == 1 else r"rank\(s\) \[1\]"):
        sp_lightning_attn(q, k, v, _inputs(rank)[3], mode="rnig" if rank == 1 else "ring", backend="torch")
    # the group still works: agreeing calls in both modes equal the single-process operator
    q, k, v, s = _inputs(rank)
    full = _inputs(0)
    g = torch.Generator().manual_seed(7)
    qf, kf = (torch.randn(B, 2 * L, H, D, generator=g) for _ in range(2))
    vf = torch.randn(B, 2 * L, H, E, generator=g)
    qf, kf, vf = (x.to(DEVICE["type"]) for x in (qf, kf, vf))
    ref = lightning_attn(qf, kf, vf, full[3], backend="torch")[0][:, rank * L:(rank + 1) * L]
    for mode in ("allgather", "ring"):
        assert_close(f"o {mode}", sp_lightning_attn(q, k, v, s, mode=mode, backend="torch"), ref, 1e-5)
    # checks off on every rank (benchmarks): same result, no header exchanged
    comm.set_consistency_checks(False)
    try:
        assert_close("o unchecked", sp_lightning_attn(q, k, v, s, backend="torch"), ref, 1e-5)
    finally:
        comm.set_consistency_checks(True)
    dist.barrier()


def test_disagreeing_sp_ranks_raise_value_error_on_every_rank():
    run_workers(_worker, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_disagreeing_sp_ranks_raise_value_error_on_every_rank_cuda_tensors():
    """The same cases with CUDA tensors (slopes checksum on the GPU), 2 processes sharing one GPU over gloo."""
    run_workers(_worker, 2, "cuda")


def test_slopes_checksum_is_exact_and_order_sensitive():
    s = torch.linspace(0.01, 2.0, 16)
    c = comm.slopes_checksum(s)
    assert c.dtype == torch.int64 and c.shape == (1,)
    assert torch.equal(c, comm.slopes_checksum(s.clone()))
    assert torch.equal(c, comm.slopes_checksum(s.double()))  # fp32 -> fp64 is exact: same values, same sum
    for i in range(16):
        t = s.clone()
        t[i] = torch.nextafter(t[i], torch.tensor(9.0))  # one ulp
        assert not torch.equal(c, comm.slopes_checksum(t)), i
    assert not torch.equal(c, comm.slopes_checksum(s.flip(0)))
    assert not torch.equal(c, comm.slopes_checksum(s[:15]))


def test_header_fields_and_errors_single_process():
    q, k, v, s = _inputs(0)
    h = comm.make_header(mode="ring", q=q, v=v, slopes=s, scale=0.5, cu_seqlens=None)
    assert h.shape == (comm.HEADER_LEN,) and h.dtype == torch.int64
    rows = torch.stack([h, h])
    comm.check_headers(rows, 0)  # agreeing headers pass
    other = comm.make_header(mode="ring", q=q, v=v, slopes=s, scale=0.5, cu_seqlens=[0, 12])
    with pytest.raises(ValueError, match=r"cu_seqlens .*rank 0: None, rank 1: #"):
        comm.check_headers(torch.stack([h, other]), 0)
    with pytest.raises(ValueError, match="different seqpar versions"):
        comm.check_headers(torch.stack([h, torch.zeros_like(h)]), 0)
    with pytest.raises(ValueError, match=r"header must be int64"):
        comm.start_header_exchange(h[:3], None)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        comm.set_consistency_checks(1)
