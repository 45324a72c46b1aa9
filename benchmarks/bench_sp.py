"""Benchmark of the sequence-parallel Lightning Attention op (seqpar.distributed.sp_lightning_attn).

Run under torchrun, one process per GPU:

    torchrun --nproc_per_node 2 benchmarks/bench_sp.py                       # B4 H16 D128 bf16, 8K and 32K tokens/rank
    torchrun --nproc_per_node 2 benchmarks/bench_sp.py --device cpu --tokens 256 --batch 1 --heads 2 --dim 16 \
        --dtype fp32 --iters 2 --warmup 1                                     # CPU / gloo smoke test

For each tokens-per-rank T it measures, forward + backward:
  * sp/<mode>:  the SP op over all P ranks (global sequence P*T), for mode in allgather, ring;
  * local:      the single-device operator seqpar.lightning_attn on T tokens (what each rank would
                cost without any communication: the ideal SP time);
  * lasp:       lasp.lasp_fuse_parallel (LASP's fused kernel + ring), when the lasp package imports (CUDA only);
  * comm/<mode>: the state exchange alone (forward exchange + backward exchange of one call), same sizes;
  * sp/<mode> without header: the SP op with the consistency header off (comm.set_consistency_checks(False)),
    and the header exchange alone (make_header + all-gather + check_headers): the cost of the check.
Every rank runs the same fixed number of iterations (no adaptive timers: they deadlock collectives);
the reported time is the max over ranks of the per-iteration mean. Rank 0 writes a markdown table to
benchmarks/results/sp_<device>.md.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import sys
import time

import torch
import torch.distributed as dist

from seqpar.distributed import comm
from seqpar.distributed import sp_lightning_attn
from seqpar.kernels.lightning_attn import lightning_attn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="tokens per rank")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--modes", nargs="+", default=["allgather", "ring"], choices=["allgather", "ring"])
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5 on cuda, 1 on cpu)")
    p.add_argument("--backend", default=None, help="kernel backend for seqpar.lightning_attn (default: auto)")
    p.add_argument("--no-lasp", action="store_true")
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/results/sp_<device>.md)")
    args = p.parse_args()
    if args.iters is None:
        args.iters = 20 if args.device == "cuda" else 3
    if args.warmup is None:
        args.warmup = 5 if args.device == "cuda" else 1
    return args


def init(args):
    if "RANK" not in os.environ:  # plain `python bench_sp.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    kw = dict(device_id=dev) if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300), **kw)
    return dev


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def align(dev):
    """Line the ranks up before a timed loop (outside any timed region)."""
    t = torch.zeros(1, device=dev)
    dist.all_reduce(t)
    sync(dev)


def timeit(fn, iters, warmup, dev):
    """Mean seconds per call on this rank; the same number of calls on every rank, then max over ranks."""
    for _ in range(warmup):
        fn()
    align(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    dt = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=dev)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def slopes_for(H):
    # ALiBi-style per-head decay rates, as in TransNormerLLM / Lightning Attention
    start = 2 ** (-(2 ** -(math.log2(H) - 3)))
    return torch.tensor([start ** (i + 1) for i in range(H)], dtype=torch.float32)


def make_step(fn, q, k, v, s, do):
    def step():
        for x in (q, k, v, s):
            x.grad = None
        o = fn(q, k, v, s)
        o.backward(do)

    return step


def comm_exchange(mode, shape, dev, group=None):
    """One call's state traffic alone: forward exchange of (M, a) and backward exchange of dH."""
    B, H, D, E = shape
    P, r = comm.group_size(group), comm.group_rank(group)
    M = torch.randn(B * H * D * E + H, device=dev)
    dH = torch.randn(B * H * D * E, device=dev)
    cdev = comm.comm_device(group, dev)

    def allgather():
        for x in (M, dH):
            _, w = comm.all_gather_flat(x.to(cdev), group, async_op=True)
            w.wait()

    def ring():
        # forward: recv from r-1, then send to r+1; backward: the reverse chain
        for x, src, dst in ((M, r - 1, r + 1), (dH, r + 1, r - 1)):
            buf = torch.empty_like(x, device=cdev)
            if 0 <= src < P:
                comm.irecv(buf, group, src).wait()
            if 0 <= dst < P:
                comm.isend(x.to(cdev), group, dst).wait()

    return allgather if mode == "allgather" else ring


def header_exchange(q, s, dev, group=None):
    """The consistency header of one call alone: build (slopes checksum on the device), all-gather, check."""
    r = comm.group_rank(group)

    def run():
        h = comm.make_header(mode="allgather", q=q, v=q, slopes=s, scale=q.shape[-1] ** -0.5, cu_seqlens=None)
        out, w = comm.start_header_exchange(h, group)
        w.wait()
        comm.check_headers(out, r)

    return run


def try_lasp(P):
    try:
        from lasp import lasp_fuse_parallel
        from lasp.utils import initialize_lasp
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"lasp not importable ({type(e).__name__})"
    try:
        initialize_lasp(1, P)
    except Exception as e:  # noqa: BLE001
        return None, f"initialize_lasp failed: {e}"
    return lasp_fuse_parallel, None


def main():
    args = parse()
    dev = init(args)
    P, rank = dist.get_world_size(), dist.get_rank()
    dtype = DTYPES[args.dtype]
    B, H, D = args.batch, args.heads, args.dim
    if dev.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", P)))))
    lasp_fn, lasp_note = (None, "CPU run") if dev.type != "cuda" or args.no_lasp else try_lasp(P)
    rows = []
    notes = []
    if lasp_note and rank == 0:
        notes.append(f"lasp: {lasp_note}")
    for T in args.tokens:
        g = torch.Generator(device="cpu").manual_seed(1234 + rank)
        mk = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
        q, k, v, do = mk(B, T, H, D), mk(B, T, H, D), mk(B, T, H, D), mk(B, T, H, D)
        q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        s = slopes_for(H).to(dev).requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        results = {}
        local = make_step(lambda q, k, v, s: lightning_attn(q, k, v, s, backend=args.backend)[0], q, k, v, s, do)
        results["local (1 device, T tokens)"] = (timeit(local, args.iters, args.warmup, dev), B * T)
        for mode in args.modes:
            fn = lambda q, k, v, s, m=mode: sp_lightning_attn(q, k, v, s, mode=m, backend=args.backend)  # noqa: E731
            results[f"sp/{mode}"] = (timeit(make_step(fn, q, k, v, s, do), args.iters, args.warmup, dev), B * T * P)
            comm.set_consistency_checks(False)  # the same op without the consistency header (every rank)
            try:
                results[f"sp/{mode} without header"] = (
                    timeit(make_step(fn, q, k, v, s, do), args.iters, args.warmup, dev), B * T * P)
            finally:
                comm.set_consistency_checks(True)
            ex = comm_exchange(mode, (B, H, D, D), dev)
            results[f"comm/{mode} (exchange only)"] = (timeit(ex, args.iters, args.warmup, dev), None)
        results["header exchange only (int64 x %d)" % comm.HEADER_LEN] = (
            timeit(header_exchange(q, s, dev), args.iters, args.warmup, dev), None)
        if lasp_fn is not None:
            qt, kt, vt, dot = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v, do))
            qt, kt, vt = (x.requires_grad_(True) for x in (qt, kt, vt))
            st = s.detach().float().view(H, 1, 1)
            KV = torch.empty(B, H, D, D, dtype=torch.float32, device=dev)
            DKV = torch.empty(B, H, D, D, dtype=torch.float32, device=dev)
            lf = lambda q, k, v, s: lasp_fn(q, k, v, s, KV, DKV)  # noqa: E731
            try:
                results["lasp_fuse_parallel"] = (
                    timeit(make_step(lf, qt, kt, vt, st, dot), args.iters, args.warmup, dev), B * T * P)
            except Exception as e:  # noqa: BLE001 - identical failure on all ranks (same code path)
                notes.append(f"lasp_fuse_parallel failed at T={T}: {type(e).__name__}: {e}")
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        for name, (sec, tokens) in results.items():
            tps = f"{tokens / sec / 1e6:.3f}" if tokens else "-"
            tpd = f"{tokens / P / sec / 1e6:.3f}" if tokens and name != "local (1 device, T tokens)" else (
                f"{tokens / sec / 1e6:.3f}" if tokens else "-")
            rows.append((T, name, sec * 1e3, tps, tpd, peak))
        del q, k, v, do
    if rank == 0:
        if dev.type == "cuda":
            devname = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(dev)).strip("_").lower()
        else:
            devname = "cpu"
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"sp_{devname}.md")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        head = (
            f"# sp_lightning_attn benchmark ({devname}, P={P}, {dist.get_backend()})\n\n"
            f"B={B} H={H} D=E={D} {args.dtype}, forward+backward, mean of {args.iters} iterations after "
            f"{args.warmup} warm-up (max over ranks). T = tokens per rank; throughput of sp/lasp counts the "
            f"global sequence P*T (M tok/s for the group, and per device); `local` is one device on T tokens "
            f"with no communication (the ideal per-device SP cost). `comm` times the state exchange alone "
            f"(forward + backward); `without header` turns the ranks' consistency header off, `header exchange only` "
            f"times it alone. Peak memory: max allocated on rank 0 over the T block.\n\n"
            f"Command: `{' '.join(sys.argv)}` (torch {torch.__version__})\n\n"
        )
        table = ["| T/rank | op | ms | M tok/s (group) | M tok/s / device | peak GiB |", "|---|---|---|---|---|---|"]
        for T, name, ms, tps, tpd, peak in rows:
            table.append(f"| {T} | {name} | {ms:.3f} | {tps} | {tpd} | {peak:.2f} |")
        text = head + "\n".join(table) + "\n" + ("".join(f"\n- {n}" for n in notes) + "\n" if notes else "")
        with open(out, "w") as f:
            f.write(text)
        print(text)
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
