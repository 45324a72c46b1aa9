"""Forward + backward time of one attention layer's operator through each entry path, per state mode.

Paths: ``function`` (the autograd.Function, eager; the backward reuses the forward's saved states) and
``custom op`` (``seqpar::lightning_attn_fwd`` / ``_bwd``, what torch.compile traces). State modes of bf16
inputs: ``split`` (fp32-exact state products), ``tf32``, ``bf16``. CUDA-event timing, median of ``--iters``.

    python benchmarks/op_paths.py --shape 1,32768,8,128
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import report  # benchmarks/report.py, beside this script
from seqpar.kernels.lightning_attn import chunk
from seqpar.kernels.lightning_attn.ops import lightning_attn_fwd_op
from seqpar.kernels.lightning_attn.tuning import from_env


def fwd_bwd(path, q, k, v, s, do, cfg):
    if path == "function":
        o, _ = chunk.chunk_lightning_attn(q, k, v, s, q.shape[-1] ** -0.5, config=cfg)
    else:  # the custom op reads the process's config: SEQPAR_LA_CONFIG (set per mode below)
        o, _, _ = lightning_attn_fwd_op(q, k, v, s, q.shape[-1] ** -0.5, None, None, "triton")
    o.backward(do)


def timed(fn, iters):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,32768,8,128", help="B,T,H,D (E = D)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--modes", default="split,tf32,bf16")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    B, T, H, D = (int(x) for x in args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda: (torch.randn(B, T, H, D, device="cuda", generator=g) * 0.3).bfloat16().requires_grad_(True)
    q, k, v = mk(), mk(), mk()
    do = torch.randn(B, T, H, D, device="cuda", generator=g).bfloat16()
    s = torch.linspace(0.01, 0.5, H, device="cuda")
    rows = []
    import seqpar.kernels.lightning_attn.tuning as tuning

    for mode in args.modes.split(","):
        cfg = from_env().replace(state_bf16=mode)
        tuning._env_config = lambda _c=cfg: _c  # the process config, which the custom op uses
        fwd_ms = timed(lambda: chunk.chunk_lightning_attn(q.detach(), k.detach(), v.detach(), s, D ** -0.5,
                                                          config=cfg), args.iters)
        for path in ("function", "custom op"):
            ms = timed(lambda: fwd_bwd(path, q, k, v, s, do, cfg), args.iters)
            rows.append((mode, path, fwd_ms, ms))
            print(f"{mode:5s} {path:9s} fwd {fwd_ms:.3f} ms  fwd+bwd {ms:.3f} ms", flush=True)
    lines = report.header(f"Operator entry paths and state modes, B{B} T{T} H{H} D{D} bf16", "op_paths.py")
    lines += ["| state products | path | forward ms | forward + backward ms |", "|---|---|---|---|"]
    lines += [f"| {m} | {p} | {f:.3f} | {t:.3f} |" for m, p, f, t in rows]
    report.write(args.out, f"op_paths_B{B}_T{T}_H{H}_D{D}.md", lines)


if __name__ == "__main__":
    main()
