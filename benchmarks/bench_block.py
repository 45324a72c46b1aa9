"""One TransNormerLLM block's pieces on the GPU, fwd+bwd, bf16 autocast: what the step's non-attention time costs.

Rows (each timed with triton.testing.do_bench, median ms, T tokens, B = 1):
    block, residual fp32 / bf16   one compiled TNLBlock fed an fp32 / bf16 residual stream (x + a keeps x's dtype)
    projections q,k,v,u           four [d -> inner] linears vs one [d -> 4 inner] linear of the concatenated weights
    SGLU w1,w2                    two [d -> g] linears vs one [d -> 2 g] linear of the concatenated weights
GEMM rows report TFLOP/s (6 x tokens x weights for fwd+bwd).

    python benchmarks/bench_block.py --model tnl-0.4b --T 32768
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

from seqpar.models import TNLConfig  # noqa: E402
from seqpar.models.transnormer import TNLBlock  # noqa: E402


def bench(fn, warmup=10, rep=50) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep)


def fwd_bwd(f, *inputs):
    """A closure running f(*inputs) under bf16 autocast and its backward (grad of ones-like dot)."""
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = f(*inputs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tnl-0.4b")
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    cfg = TNLConfig.preset(args.model)
    d, inner, g, T = cfg.d_model, cfg.inner_dim, cfg.glu_dim, args.T
    dev = "cuda"
    rows = []

    block = TNLBlock(cfg, 0).to(dev)
    block.compile(dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, T, d, device=dev, dtype=dtype, requires_grad=True)
        ms = bench(fwd_bwd(lambda x: block(x)[0], x))
        rows.append(f"| block (compiled), residual {str(dtype).split('.')[-1]} | {ms:.3f} | |")
        print(rows[-1], flush=True)
        del x

    x = torch.randn(T, d, device=dev, requires_grad=True)

    def gemm_rows(name, n_out, parts):
        ws = [torch.nn.Parameter(torch.randn(n_out, d, device=dev) * 0.02) for _ in range(parts)]
        flops = 6 * T * d * n_out * parts
        sep = bench(fwd_bwd(lambda x: [F.linear(x, w) for w in ws], x))
        cat = bench(fwd_bwd(lambda x: F.linear(x, torch.cat(ws)).split(n_out, -1), x))
        labels = (f"{parts} x [{d} -> {n_out}]", f"1 x [{d} -> {parts * n_out}] (weights cat per call)")
        for label, ms in zip(labels, (sep, cat)):
            rows.append(f"| {name}: {label} | {ms:.3f} | {flops / ms / 1e9:.0f} |")
            print(rows[-1], flush=True)

    gemm_rows("projections q,k,v,u", inner, 4)
    gemm_rows("SGLU w1,w2", g, 2)
    wo = torch.nn.Parameter(torch.randn(d, g, device=dev) * 0.02)
    xg = torch.randn(T, g, device=dev, requires_grad=True)
    ms = bench(fwd_bwd(lambda xg: F.linear(xg, wo), xg))
    rows.append(f"| SGLU w3: 1 x [{g} -> {d}] | {ms:.3f} | {6 * T * d * g / ms / 1e9:.0f} |")
    print(rows[-1], flush=True)

    lines = report.header(f"Block pieces, {args.model}, T={T}, fwd+bwd, bf16 autocast", "bench_block.py")
    lines += ["| piece | ms | TFLOP/s |", "|---|---|---|"] + rows
    report.write(args.out, f"block_pieces_{args.model}_T{T}.md", lines)


if __name__ == "__main__":
    main()
