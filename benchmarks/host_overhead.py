"""Host-side cost of one seqpar fwd+bwd step (small shapes are launch-bound): wall time per step with the
GPU kept busy vs. the GPU time of the step's kernels, and the top Python functions by own time (cProfile).

    python benchmarks/host_overhead.py [--shape 4,16,2048,128] [--steps 200]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def host_time(fn, steps):
    """(host seconds per call to enqueue, wall seconds per call incl. the final sync), after 5 warm-up calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    t_host = (time.perf_counter() - t0) / steps
    torch.cuda.synchronize()
    return t_host, (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4,16,2048,128")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    from seqpar import lightning_attn

    B, H, T, D = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    s = torch.linspace(0.01, 0.5, H, device="cuda")
    do = torch.randn_like(v)

    def step():
        o, _ = lightning_attn(q, k, v, s, backend="triton")
        o.backward(do)

    # host time per step: enqueue only (the GPU lags behind when the host is the bottleneck)
    t_host, t_wall = host_time(step, args.steps)
    # GPU time of one step, from a CUDA graph-free event pair around a synchronized step
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    e0.record()
    step()
    e1.record()
    torch.cuda.synchronize()
    print(f"shape {args.shape}: host enqueue {t_host * 1e3:.3f} ms/step, wall {t_wall * 1e3:.3f} ms/step, "
          f"one step between events {e0.elapsed_time(e1):.3f} ms")
    # the backward runs on an autograd worker thread, which cProfile does not see: profile the forward
    # through the public API and the backward launcher called directly, both on this thread
    import importlib

    chunk = importlib.import_module("seqpar.kernels.lightning_attn.chunk")
    scale = D ** -0.5
    plan = chunk._Plan(B, T, H, D, D, None, q.device)  # default "fwd" mode: look-back segments = scan's
    _, _, hbuf = chunk.lightning_attn_fwd_lb(q.detach(), k.detach(), v.detach(), s, scale, None, plan, True)

    def fwd():
        with torch.no_grad():
            lightning_attn(q, k, v, s, backend="triton")

    def bwd():
        chunk.lightning_attn_bwd(q.detach(), k.detach(), v.detach(), do, None, s, scale, False, hbuf, plan, False)

    for name, fn in (("forward (lightning_attn, no grad)", fwd), ("backward launcher", bwd)):
        t_host, _ = host_time(fn, args.steps)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(18)
        print(f"== {name}: host {t_host * 1e3:.3f} ms/call")
        print("\n".join(buf.getvalue().splitlines()[:40]))


if __name__ == "__main__":
    main()
