"""Kernel benchmark: seqpar's Triton Lightning Attention-2 against torch SDPA (causal, flash), fla's
chunk_simple_gla and OpenNLPLab's lightning_attn (official LA2), bf16, forward and forward+backward.

    python benchmarks/bench_kernel.py                      # default shapes, writes results/kernel_<device>.md
    python benchmarks/bench_kernel.py --shapes 4,16,8192,128 --impls seqpar,fla

Conventions of the peers (checked numerically against ours before timing, see `check_peers`):
* fla:            chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=scale), layout [B, T, H, D] like ours.
* lightning_attn: lightning_attn_func(q * scale, k, v, slopes), layout [B, H, T, D]; slopes [H] is the
                  decay rate (lambda = exp(-s)), no scale argument (q is pre-scaled outside the timing).
* SDPA:           F.scaled_dot_product_attention(..., is_causal=True), layout [B, H, T, D].
Times are medians of triton.testing.do_bench (L2 flushed between runs); tokens/s = B*T / time.
Peak extra memory: max_memory_allocated during one forward+backward minus the memory held before
it (inputs, do); it includes the outputs and the gradients (o, dq, dk, dv).
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

DEFAULT_SHAPES = [
    (4, 16, 2048, 128),
    (4, 16, 4096, 128),
    (4, 16, 8192, 128),
    (4, 16, 16384, 128),
    (4, 16, 32768, 128),
    (1, 16, 131072, 128),
    (2, 32, 32768, 64),
]


def alibi_slopes(H: int) -> torch.Tensor:
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(H).is_integer():
        s = pow2(H)
    else:
        c = 2 ** math.floor(math.log2(H))
        s = pow2(c) + pow2(2 * c)[0::2][: H - c]
    return torch.tensor(s, dtype=torch.float32)


def make_impls(which):
    impls = {}
    if "seqpar" in which:
        from seqpar import lightning_attn

        def seqpar_fn(q, k, v, s, scale):
            return lambda: lightning_attn(q, k, v, s, scale=scale, backend="triton")[0]

        impls["seqpar"] = (seqpar_fn, "bthd")
    if "fla" in which:
        try:
            from fla.ops.simple_gla import chunk_simple_gla

            def fla_fn(q, k, v, s, scale):
                g = -s
                return lambda: chunk_simple_gla(q, k, v, g_gamma=g, scale=scale)[0]

            impls["fla"] = (fla_fn, "bthd")
        except Exception as e:  # noqa: BLE001
            print(f"fla not importable: {e!r}")
    if "lightning_attn" in which:
        try:
            from lightning_attn.ops import lightning_attn_func

            def la_fn(q, k, v, s, scale):
                return lambda: lightning_attn_func(q, k, v, s)

            impls["lightning_attn"] = (la_fn, "bhtd_prescaled")
        except Exception as e:  # noqa: BLE001
            print(f"lightning_attn not importable: {e!r}")
    if "sdpa" in which:

        def sdpa_fn(q, k, v, s, scale):
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

        impls["sdpa"] = (sdpa_fn, "bhtd")
    return impls


def prepare(layout, q, k, v, scale, requires_grad):
    if layout == "bthd":
        xs = [q, k, v]
    elif layout == "bhtd":
        xs = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
    else:  # bhtd_prescaled
        xs = [(q * scale).transpose(1, 2).contiguous()] + [x.transpose(1, 2).contiguous() for x in (k, v)]
    return [x.detach().clone().requires_grad_(requires_grad) for x in xs]


def check_peers(impls, device):
    """One shape, all implementations against ours (and ours against the fp32 torch backend)."""
    from seqpar import lightning_attn

    B, H, T, D = 2, 4, 2048 + 37, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    s = alibi_slopes(H).to(device)
    scale = D**-0.5
    do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    leaves = [x.float().requires_grad_(True) for x in (q, k, v)]
    ref, _ = lightning_attn(*leaves, s, scale=scale, backend="torch")
    ref_grads = torch.autograd.grad(ref, leaves, do.float())
    lines = []
    for name, (fn, layout) in impls.items():
        if name == "sdpa":
            continue
        xs = prepare(layout, q, k, v, scale, True)
        o = fn(*xs, s, scale)()
        dd = do if layout == "bthd" else do.transpose(1, 2).contiguous()
        grads = torch.autograd.grad(o, xs, dd)
        if layout != "bthd":
            o = o.transpose(1, 2)
            grads = [g.transpose(1, 2) for g in grads]
            if layout == "bhtd_prescaled":
                grads[0] = grads[0] * scale
        errs = [rel(o, ref)] + [rel(g, r) for g, r in zip(grads, ref_grads)]
        lines.append(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    out = ["Agreement with the fp32 torch backend (B2 H4 T2085 D128, bf16 inputs, ALiBi slopes), rel. L2 error:",
           "", "| impl | o | dq | dk | dv |", "|---|---|---|---|---|"] + lines
    return "\n".join(out)


def bench_one(fn, layout, B, H, T, D, device, warmup, rep):
    from triton.testing import do_bench

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    s = alibi_slopes(H).to(device)
    scale = D**-0.5
    res = {}
    # forward only
    xs = prepare(layout, q, k, v, scale, False)
    f = fn(*xs, s, scale)
    with torch.no_grad():
        f()
        torch.cuda.synchronize()
        res["fwd"] = do_bench(f, warmup=warmup, rep=rep, quantiles=[0.5])
        if isinstance(res["fwd"], (list, tuple)):
            res["fwd"] = res["fwd"][0]
    del xs, f
    # forward + backward
    xs = prepare(layout, q, k, v, scale, True)
    del q, k, v
    f = fn(*xs, s, scale)
    do = torch.randn_like(f())

    def step():
        f().backward(do)

    step()
    torch.cuda.synchronize()
    for x in xs:
        x.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    res["mem"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    for x in xs:
        x.grad = None
    t = do_bench(step, warmup=warmup, rep=rep, grad_to_none=xs, quantiles=[0.5])
    res["fwdbwd"] = t[0] if isinstance(t, (list, tuple)) else t
    return res


def profile_breakdown(B, H, T, D, device):
    """Per-kernel CUDA times of seqpar's forward+backward (torch.profiler), as markdown lines."""
    from seqpar import lightning_attn

    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    s = alibi_slopes(H).to(device).requires_grad_(True)
    do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        lightning_attn(q, k, v, s, backend="triton")[0].backward(do)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    n = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            lightning_attn(q, k, v, s, backend="triton")[0].backward(do)
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0:
            rows.append((t / n / 1000.0, ev.key))
    rows.sort(reverse=True)
    lines = [f"Per-kernel time of seqpar fwd+bwd (slopes.requires_grad), B{B} H{H} T{T} D{D}, ms per step:", "",
             "| kernel | ms |", "|---|---|"]
    lines += [f"| {k[:60]} | {t:.3f} |" for t, k in rows[:14]]
    return "\n".join(lines)


TUNE_VARIANTS = {
    "base": {},
    "st3": {k: {"num_stages": 3} for k in ("seg", "fwd", "dqdk", "dv")},
    "st1": {k: {"num_stages": 1} for k in ("seg", "fwd", "dqdk", "dv")},
    "w4": {k: {"num_warps": 4} for k in ("fwd", "dqdk", "dv")},
    "blk128": {k: {"BLK": 128} for k in ("fwd", "dqdk", "dv")},
    "blk128w16": {k: {"BLK": 128, "num_warps": 16} for k in ("fwd", "dqdk", "dv")},
    "blk128st1": {k: {"BLK": 128, "num_stages": 1} for k in ("fwd", "dqdk", "dv")},
    "seg16": {"seg_max": 16},
    "seg8": {"seg_max": 8},
    "waves2": {"waves": 2},
    "waves3": {"waves": 3},
    "waves8": {"waves": 8},
    "waves8seg64": {"waves": 8, "seg_max": 64},
    # a fixed number of chunks per segment (the automatic rule off)
    **{f"sc{n}": {"seg_chunks": n} for n in (4, 8, 12, 15, 16, 20, 24, 31, 32, 48, 64)},
    "seg64": {"seg_max": 64, "waves": 2},
    "w4st3": {k: {"num_warps": 4, "num_stages": 3} for k in ("fwd", "dqdk", "dv")},
    "w4st4": {k: {"num_warps": 4, "num_stages": 4} for k in ("fwd", "dqdk", "dv")},
    "w4st3s32": {**{k: {"num_warps": 4, "num_stages": 3} for k in ("fwd", "dqdk", "dv")}, "scan": {"BLK": 32}},
    "w4st3s32seg3": {**{k: {"num_warps": 4, "num_stages": 3} for k in ("fwd", "dqdk", "dv", "seg")},
                     "scan": {"BLK": 32}},
    "w4s32": {**{k: {"num_warps": 4} for k in ("fwd", "dqdk", "dv")}, "scan": {"BLK": 32}},
    # the segment-state + scan path (three forward and four backward kernels) instead of the look-back one
    "scan": {"lookback": False},
    # bf16 state products: split hi + lo bf16 (default), fp32 operands (tf32 dots), rounded to bf16 (old)
    "state_split": {"state_bf16": "split"},
    "state_tf32": {"state_bf16": "tf32"},
    "state_bf16": {"state_bf16": "bf16"},
    # the slope gradient (with --learnable-slopes): derivative-state kernel (default) or rowwise sums, whose
    # accuracy needs the split state (the "auto" state of rowsum) or degrades with T (rounded state)
    "ds_rowsum": {"dslopes": "rowsum"},
    "ds_rowsum_bf16": {"dslopes": "rowsum", "state_bf16": "bf16"},
    "dsl_w8": {"dsl": {"num_warps": 8}},
    "dsl_w2": {"dsl": {"num_warps": 2}},
    "dsl_st1": {"dsl": {"num_stages": 1}},
    "dsl_st3": {"dsl": {"num_stages": 3}},
    "dsl_blk32": {"dsl": {"BLK": 32}},
    "dsl_blk32w2": {"dsl": {"BLK": 32, "num_warps": 2}},
    "dsl_blk128w8": {"dsl": {"BLK": 128, "num_warps": 8}},
    "nofuse": {"fuse_dkdv": False},
    # backward segment states of (q, do) by their own kernel instead of in the dq walk
    "nogstate": {"dq_gstate": False},
    "dqw8": {"dqdk": {"num_warps": 8}},
    "dqblk128w8": {"dqdk": {"BLK": 128, "num_warps": 8}},
    "scan32": {"scan": {"BLK": 32}},
    "scan16": {"scan": {"BLK": 16}},
    "fwdblk128w8": {"fwd": {"BLK": 128, "num_warps": 8}},
    "noseglong": {"seg_long": None},
    "seg64scan32": {"seg_max": 64, "waves": 2, "scan": {"BLK": 32}},
    "dqblk32": {"dqdk": {"BLK": 32}},
    "dqblk32st3": {"dqdk": {"BLK": 32, "num_stages": 3}},
    "dqst1": {"dqdk": {"num_stages": 1}},
    "dqst3": {"dqdk": {"num_stages": 3}},
    "dvfst3": {"dv_fused": {"num_stages": 3}},
    "dvfst1": {"dv_fused": {"num_stages": 1}},
    "fwdst3": {"fwd": {"num_stages": 3}},
    "segst3": {"seg": {"num_stages": 3}},
    "seg64st3": {"seg_max": 64, "waves": 2, "seg": {"num_stages": 3}},
    "segblk128": {"seg": {"BLK": 128, "num_warps": 8}},
    "scan_nofuse": {"lookback": False, "fuse_dkdv": False},
    "lb": {"lookback": True},
    "lb2": {"lookback": True, "lb_chunks": 2},
    "lb8": {"lookback": True, "lb_chunks": 8},
    "lb16": {"lookback": True, "lb_chunks": 16},
    "lb32": {"lookback": True, "lb_chunks": 32},
    "w8": {k: {"num_warps": 8} for k in ("fwd", "dqdk", "dv")},
    "w8st3": {k: {"num_warps": 8, "num_stages": 3} for k in ("fwd", "dqdk", "dv")},
    "blk128w8": {k: {"BLK": 128, "num_warps": 8} for k in ("fwd", "dqdk", "dv")},
    "fusedw8blk128": {"fuse_dkdv": True, "dv": {"BLK": 128, "num_warps": 8}},
    "fused": {"fuse_dkdv": True, "dv": {"BLK": 128}},
    "fused_w8": {"fuse_dkdv": True, "dv": {"BLK": 128, "num_warps": 8}},
    # register caps (ptxas -maxnreg): 168 registers fit 3 programs of 4 warps per SM, 128 fit 4 (or 2 of 8)
    "fwdreg168": {"fwd": {"maxnreg": 168}},
    "fwdreg128": {"fwd": {"maxnreg": 128}},
    "dqreg168": {"dqdk": {"maxnreg": 168}},
    "dqreg128": {"dqdk": {"maxnreg": 128}},
    "dvfreg128": {"dv_fused": {"maxnreg": 128}},
    "reg168": {"fwd": {"maxnreg": 168}, "dqdk": {"maxnreg": 168}, "dv_fused": {"maxnreg": 128}},
    "reg128": {"fwd": {"maxnreg": 128}, "dqdk": {"maxnreg": 128}, "dv_fused": {"maxnreg": 128}},
    "fwdreg128st1": {"fwd": {"maxnreg": 128, "num_stages": 1}},
    "dqreg128st1": {"dqdk": {"maxnreg": 128, "num_stages": 1}},
    # the chunk walks' tiles through masked pointer loads instead of TMA descriptors
    "notma": {"tma": False},
    "dvfw4": {"dv_fused": {"num_warps": 4}},
    # forward launches that TMA's lower register use opens (sm_90 compile: 8 warps 172 registers, no spills;
    # BLK 128 at 8 warps: no spills, q and k read once instead of once per E block)
    "fwdw8": {"fwd": {"num_warps": 8}},
    "fwdw8r128": {"fwd": {"num_warps": 8, "maxnreg": 128}},
    "fwdw16": {"fwd": {"num_warps": 16}},
    # tokens per walk step (KernelLaunch.BT; CHUNK = 64 by default): half the serial steps of a walk at 128
    "bt128": {k: {"BT": 128} for k in ("fwd", "dqdk", "dv", "dv_fused")},
    "fwdbt128": {"fwd": {"BT": 128}},
    "fwdbt128w8": {"fwd": {"BT": 128, "num_warps": 8}},
    "dqbt128": {"dqdk": {"BT": 128}},
    "dqbt128w8": {"dqdk": {"BT": 128, "num_warps": 8}},
    "dvfbt128": {"dv_fused": {"BT": 128}},
    "bt32": {k: {"BT": 32} for k in ("fwd", "dqdk", "dv", "dv_fused")},
}


def use_variant(base, name):
    """The LaunchConfig `base` with TUNE_VARIANTS[name] applied (``base.replace(**overrides)``: dict entries
    update the nested values they name)."""
    if name not in TUNE_VARIANTS:
        raise ValueError(f"unknown tuning variant {name!r}; expected one of {sorted(TUNE_VARIANTS)}")
    return base.replace(**TUNE_VARIANTS[name])


def variant_configs(names, base=None):
    """{name: LaunchConfig} for the variant names, built before anything runs so that a bad name or value
    fails at once; base: the config the variants start from (None: DEFAULT with SEQPAR_LA_CONFIG)."""
    from seqpar.kernels.lightning_attn import tuning

    base = tuning.from_env() if base is None else base
    return {name: use_variant(base, name) for name in names}


def _lb_split(prof, n):
    """ms per call of the four _lb_walk_kernel launches of a step (o, dq, dk, dv), from the raw events."""
    evs = []
    for e in prof.events():
        if "_lb_walk_kernel" in e.name and str(getattr(e, "device_type", "")).endswith("CUDA"):
            evs.append(e.time_range.elapsed_us() / 1000.0)
    if len(evs) != 4 * n:
        return None
    return [sum(evs[i::4]) / n for i in range(4)]


def tune(shapes, variants, device, learnable_slopes=False):
    """Per-kernel times (torch.profiler) of seqpar fwd+bwd under launch-config variants (names of
    TUNE_VARIANTS, each a LaunchConfig passed to chunk_lightning_attn); learnable_slopes: the slopes
    need a gradient (the slope-gradient kernel runs)."""
    from seqpar.kernels.lightning_attn import plan as plan_mod
    from seqpar.kernels.lightning_attn.chunk import chunk_lightning_attn

    configs = variant_configs(variants)
    knames = ("_seg_state_kernel", "_scan_kernel", "_fwd_out_kernel", "_bwd_dqdk_kernel", "_bwd_dv_kernel",
              "_dslopes_kernel", "_lb_walk_kernel")
    lines = [f"slopes.requires_grad = {learnable_slopes}", "",
             "| shape | variant | seg_chunks (lb_chunks) | kernel ms: " + " / ".join(
        ["seg_state", "scan", "fwd_out", "dqdk", "dv", "dslopes", "lb_walk (x4)"]) + " | fwd ms | fwd+bwd ms (do_bench) |",
        "|---|---|---|---|---|---|"]
    from triton.testing import do_bench
    from torch.profiler import ProfilerActivity, profile

    results = []
    for B, H, T, D in shapes:
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        s = alibi_slopes(H).to(device).requires_grad_(learnable_slopes)
        do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
        scale = D ** -0.5
        for name, cfg in configs.items():
            try:
                fwd_fn = lambda cfg=cfg: chunk_lightning_attn(q, k, v, s, scale, config=cfg)[0]  # noqa: E731
                step = lambda fwd_fn=fwd_fn: fwd_fn().backward(do)  # noqa: E731
                step()
                torch.cuda.synchronize()
                plan = plan_mod._Plan(B, T, H, D, D, None, q.device, cfg)
                n = 3
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(n):
                        step()
                    torch.cuda.synchronize()
                times = {}
                for ev in prof.key_averages():
                    t = getattr(ev, "device_time_total", None)
                    t = ev.cuda_time_total if t is None else t
                    for kname in knames:
                        if kname in ev.key:
                            times[kname] = times.get(kname, 0.0) + t / n / 1000.0
                tot = do_bench(step, warmup=10, rep=50, grad_to_none=[q, k, v, s] if learnable_slopes else [q, k, v],
                               quantiles=[0.5])
                tot = tot[0] if isinstance(tot, (list, tuple)) else tot
                fwd = do_bench(fwd_fn, warmup=10, rep=50, quantiles=[0.5])
                fwd = fwd[0] if isinstance(fwd, (list, tuple)) else fwd
                ks = " / ".join(f"{times.get(x, float('nan')):.3f}" for x in knames)
                lb = _lb_split(prof, n)
                if lb:
                    ks += " (o / dq / dk / dv: " + " / ".join(f"{x:.3f}" for x in lb) + ")"
                segs = f"{plan.seg_chunks} ({plan.lb_chunks})" if cfg.lookback is True else str(plan.seg_chunks)
                line = f"| {B},{H},{T},{D} | {name} | {segs} | {ks} | {fwd:.3f} | {tot:.3f} |"
                if (B, H, T, D) == shapes[0]:
                    results.append((name, tot))
            except Exception as e:  # noqa: BLE001
                line = f"| {B},{H},{T},{D} | {name} | error {type(e).__name__}: {str(e)[:80]} | | |"
            print(line, flush=True)
            lines.append(line)
        del q, k, v, do
    best = min(results, key=lambda r: r[1]) if results else None
    if best is not None:
        import json

        print("BEST_CONFIG " + json.dumps(TUNE_VARIANTS[best[0]]), flush=True)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=None, help="B,H,T,D ...")
    ap.add_argument("--impls", default="seqpar,fla,lightning_attn,sdpa")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--breakdown", default="4,16,32768,128")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the rest after this many seconds")
    ap.add_argument("--tune", nargs="*", default=None,
                    help="launch-config variants to profile, names of TUNE_VARIANTS (none given: all of them); "
                         "each is LaunchConfig.replace(**TUNE_VARIANTS[name]) of the default config")
    ap.add_argument("--learnable-slopes", action="store_true", help="--tune with slopes.requires_grad")
    args = ap.parse_args()
    device = "cuda"
    if args.tune is not None:
        unknown = [n for n in args.tune if n not in TUNE_VARIANTS]
        if unknown:
            ap.error(f"unknown --tune variants {unknown}; known: {' '.join(TUNE_VARIANTS)}")
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else [(4, 16, 32768, 128)]
        text = tune(shapes, args.tune or list(TUNE_VARIANTS), device, args.learnable_slopes)
        text = "\n".join(report.header("Kernel times per launch-config variant", "bench_kernel.py")) + "\n" + text
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    impls = make_impls(args.impls.split(","))
    t0 = time.time()
    import triton

    name = torch.cuda.get_device_name()
    header = [
        f"# Kernel benchmark: {name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, bf16, "
        f"median of triton.testing.do_bench(warmup={args.warmup}, rep={args.rep}); "
        f"seqpar launch config overrides: {os.environ.get('SEQPAR_LA_CONFIG', 'none')}; "
        "ALiBi slopes; command: `python benchmarks/bench_kernel.py " + " ".join(sys.argv[1:]) + "`",
        "",
    ]
    sections = []
    out = args.out
    if out is None:
        tag = name.replace("NVIDIA ", "").split()[0].lower()
        out = os.path.join(os.path.dirname(__file__), "results", f"kernel_{tag}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def write(extra=()):  # after every row, so a run cut short keeps what it measured
        with open(out, "w") as fh:
            fh.write("\n".join(header) + "\n" + "\n\n".join(list(sections) + list(extra)) + "\n")

    if not args.no_check:
        sections.append(check_peers(impls, device))
        print(sections[-1], flush=True)
    table = ["| B,H,T,D | impl | fwd ms | fwd+bwd ms | fwd+bwd Mtok/s | peak extra GB |", "|---|---|---|---|---|---|"]
    for B, H, T, D in shapes:
        for iname, (fn, layout) in impls.items():
            if time.time() - t0 > args.budget_s:
                table.append(f"| {B},{H},{T},{D} | {iname} | skipped (time budget) | | | |")
                continue
            try:
                r = bench_one(fn, layout, B, H, T, D, device, args.warmup, args.rep)
                line = (f"| {B},{H},{T//1024}K,{D} | {iname} | {r['fwd']:.3f} | {r['fwdbwd']:.3f} | "
                        f"{B * T / r['fwdbwd'] / 1e3:.1f} | {r['mem']:.2f} |")
            except Exception as e:  # noqa: BLE001
                line = f"| {B},{H},{T//1024}K,{D} | {iname} | error: {type(e).__name__}: {str(e)[:60]} | | | |"
                torch.cuda.empty_cache()
            table.append(line)
            print(line, flush=True)
            write(["\n".join(table)])
    sections.append("\n".join(table))
    if args.breakdown and "seqpar" in impls and time.time() - t0 < args.budget_s:
        B, H, T, D = (int(x) for x in args.breakdown.split(","))
        sections.append(profile_breakdown(B, H, T, D, device))
    write()
    print("\n".join(header) + "\n" + "\n\n".join(sections))


if __name__ == "__main__":
    main()
