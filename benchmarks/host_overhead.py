"""Host-side cost of one seqpar fwd+bwd step (small shapes are launch-bound): wall time per step with the
GPU kept busy vs. the GPU time of the step's kernels; the floors (torch SDPA's step, a Python
autograd.Function that launches nothing, one Triton launch); the top Python functions by own time (cProfile)
of the whole step and of its forward and backward launchers.

    python benchmarks/host_overhead.py [--shape 4,16,2048,128] [--steps 200] [--rounds 7] [--per-launch]
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


def host_rounds(fns, steps, rounds=7):
    """Host ms per call of each named fn, interleaved over `rounds` rounds: {name: (min, median)}.

    Host timings of one process drift by tens of percent (clocks, other tenants); interleaving the
    candidates and taking the minimum of several rounds compares them under the same conditions."""
    got = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            got[name].append(host_time(fn, steps)[0] * 1e3)
    return {name: (min(ts), sorted(ts)[len(ts) // 2]) for name, ts in got.items()}


def floors(q, k, v, do, steps):
    """Host cost of the parts of a step that do not depend on seqpar's kernels: torch SDPA's fwd+bwd step,
    a Python autograd.Function that launches nothing (allocations only), and one Triton launch of a
    seqpar kernel through JITFunction.__getitem__ vs the compiled kernel's own launcher."""
    import torch.nn.functional as F

    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()

    def sdpa():
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).backward(dot)

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            ctx.save_for_backward(a, b, c)
            return torch.empty_like(c)

        @staticmethod
        def backward(ctx, g):
            a, b, c = ctx.saved_tensors
            return torch.empty_like(a), torch.empty_like(b), torch.empty_like(c)

    def noop():
        Noop.apply(q, k, v).backward(do)

    from seqpar.kernels.lightning_attn import kernels, launch, plan as plan_mod
    from seqpar.kernels.lightning_attn.tuning import DEFAULT

    B, T, H, D = q.shape
    plan = plan_mod._Plan(B, T, H, D, D, None, q.device, DEFAULT)
    buf = torch.zeros(plan.NSEG, H, D, D, device=q.device)
    slopes = torch.full((H,), 0.1, device=q.device)
    BD, BE = launch._blocks_state(DEFAULT, D, D, "scan")
    d = launch._dummy(q.device)
    grid = (plan.N * H * plan_mod._cdiv(D, BD) * plan_mod._cdiv(D, BE), 1, 1)
    pos = (buf, d, d, slopes, d, d, plan.T, H, D, D, plan.NS, plan.SEG_T)
    kw = dict(BD=BD, BE=BE, REVERSE=False, HAS_INIT=False, STORE_FIN=False, IS_VARLEN=False, num_warps=4)

    def jit_launch():
        kernels._scan_kernel[grid](*pos, **kw)

    compiled = kernels._scan_kernel[grid](*pos, **kw)
    names = kernels._scan_kernel.arg_names
    full = list(pos) + [kw[n] for n in names[len(pos):]]
    runner = compiled[grid]

    def compiled_launch():
        runner(*full)

    return {"torch SDPA fwd+bwd step": sdpa, "no-op autograd.Function fwd+bwd step": noop,
            "one Triton launch (_scan_kernel) via JITFunction": jit_launch,
            "the same launch via the CompiledKernel launcher": compiled_launch}


def per_launch(step_with, steps=300, repeats=3):
    """Median host us of each launcher call (launch._call, by kernel) inside the step, fast launch on / off,
    autograd on its worker thread / on the calling thread; one line per (mode, kernel) with `repeats` medians.
    step_with(cfg): the step with the LaunchConfig cfg."""
    import collections
    import statistics

    from seqpar.kernels.lightning_attn import launch
    from seqpar.kernels.lightning_attn.tuning import from_env

    base = from_env()
    fast, slow = base.replace(fast_launch=True), base.replace(fast_launch=False)
    acc = collections.defaultdict(list)
    orig = launch._call

    def timed(kernel, grid, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(kernel, grid, *args, **kwargs)
        finally:
            acc[kernel.fn.__name__].append(time.perf_counter() - t0)

    modes = {"fast, worker thread": step_with(fast),
             "off, worker thread": step_with(slow),
             "fast, calling thread": on_main_thread(step_with(fast)),
             "off, calling thread": on_main_thread(step_with(slow))}
    out = collections.defaultdict(list)
    launch._call = timed
    try:
        for _ in range(repeats):
            for mode, fn in modes.items():
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                acc.clear()
                for _ in range(steps):
                    fn()
                torch.cuda.synchronize()
                for name, ts in acc.items():
                    out[(mode, name)].append(statistics.median(ts) * 1e6)
    finally:
        launch._call = orig
    print(f"host us per launcher call inside the step (medians of {steps} steps, {repeats} repeats):")
    for (mode, name), vals in sorted(out.items()):
        print(f"| {mode} | {name} | " + " / ".join(f"{v:.0f}" for v in vals) + " |")


def on_main_thread(fn):
    """fn with autograd's device threads off: the backward runs on the calling thread."""
    def run():
        with torch.autograd.set_multithreading_enabled(False):
            fn()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4,16,2048,128")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the host-time comparison")
    ap.add_argument("--per-launch", action="store_true", help="also time each launcher call inside the step")
    args = ap.parse_args()
    from seqpar import lightning_attn

    B, H, T, D = (int(x) for x in args.shape.split(","))
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    s = torch.linspace(0.01, 0.5, H, device="cuda")
    do = torch.randn_like(v)

    def step():
        o, _ = lightning_attn(q, k, v, s, backend="triton")
        o.backward(do)

    from seqpar.kernels.lightning_attn import launch, plan as plan_mod
    from seqpar.kernels.lightning_attn.chunk import chunk_lightning_attn
    from seqpar.kernels.lightning_attn.interface import validate_inputs
    from seqpar.kernels.lightning_attn.tuning import from_env

    scale = D ** -0.5

    def step_with(cfg):
        """The step of lightning_attn (the same checks, then the Triton entry) with the LaunchConfig cfg."""
        def run():
            validate_inputs(q, k, v, s, None, None, None, "triton")
            o, _ = chunk_lightning_attn(q, k, v, s, scale, config=cfg)
            o.backward(do)
        return run

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
    fl = floors(q, k, v, do, args.steps)
    fns = {"seqpar fwd+bwd step": step, "seqpar fwd+bwd step, autograd on the calling thread": on_main_thread(step)}
    # the same step through Triton's own launch path
    slow = from_env().replace(fast_launch=False)
    fns["seqpar fwd+bwd step, fast_launch off"] = step_with(slow)
    fns["seqpar fwd+bwd step, fast_launch off, autograd on the calling thread"] = on_main_thread(step_with(slow))
    for name in ("torch SDPA fwd+bwd step", "no-op autograd.Function fwd+bwd step"):
        fns[name] = fl[name]
        fns[name + ", autograd on the calling thread"] = on_main_thread(fl[name])
    fns.update({name: fn for name, fn in fl.items() if name not in fns})
    print(f"host ms per call, {args.rounds} interleaved rounds of {args.steps} calls: min / median")
    for name, (lo, med) in host_rounds(fns, args.steps, args.rounds).items():
        print(f"| {name} | {lo:.3f} / {med:.3f} |")
    if args.per_launch:
        per_launch(step_with)
    # the whole step on this thread (autograd's device threads off), so cProfile sees the backward too
    profile_calls("whole step, autograd on the main thread", on_main_thread(step), args.steps, 25)
    # and its two launchers: the forward through the public API, the backward launcher called directly
    cfg = from_env()
    plan = plan_mod._Plan(B, T, H, D, D, None, q.device, cfg)  # default "fwd" mode: look-back segments = scan's
    _, _, hbuf = launch.lightning_attn_fwd_lb(q.detach(), k.detach(), v.detach(), s, scale, None, plan, cfg, True)

    def fwd():
        with torch.no_grad():
            lightning_attn(q, k, v, s, backend="triton")

    def bwd():
        launch.lightning_attn_bwd(q.detach(), k.detach(), v.detach(), do, None, s, scale, False, hbuf, plan, cfg,
                                  False)

    profile_calls("forward (lightning_attn, no grad)", fwd, args.steps, 18)
    profile_calls("backward launcher", bwd, args.steps, 18)


def profile_calls(name, fn, steps, top):
    """Print the host time per call of fn and the top functions by own time (cProfile over 50 calls)."""
    t_host, _ = host_time(fn, steps)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"== {name}: host {t_host * 1e3:.3f} ms/call")
    print("\n".join(buf.getvalue().splitlines()[: top + 20]))


if __name__ == "__main__":
    main()
