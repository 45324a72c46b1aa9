"""One TransNormerLLM block on the GPU, fwd+bwd, bf16 autocast: what the step's non-attention time costs, and the
GEMMs it runs, alone.

Block rows (one compiled TNLBlock, B = 1, T tokens, median ms of triton.testing.do_bench):
    residual fp32 / bf16   the block fed an fp32 (today's default under autocast) or a bf16 residual stream
    gemms                  how the block's projections reach the GEMMs (weights concatenated per call, which
                           under autocast fuses into the weights' bf16 cast; parameters unchanged):
                             separate   seven GEMMs per block forward (q, k, v, u, o, w1, w2, w3: eight)
                             qku        q, k, u as one [d -> 3 inner] GEMM, v alone (v stays contiguous)
                             qkvu       q, k, v, u as one [d -> 4 inner] GEMM
                             glu        w1, w2 as one [d -> 2 g] GEMM
                             qku+glu, qkvu+glu  both
Compile modes (``--modes``): "default" (cuBLAS GEMMs, inductor's fused elementwise kernels), "max-autotune" (inductor
also benchmarks its Triton GEMM templates against cuBLAS per shape and may fuse elementwise epilogues and prologues
into them; no CUDA graphs), "max-autotune-tma" (the same with Hopper's persistent TMA GEMM templates).
GEMM rows: each GEMM of a block step alone (bf16 in, bf16 out, no autocast), forward Y = X W^T, input gradient
dX = dY W and weight gradient dW = dY^T X, at M = B*T rows, with TFLOP/s (2 M N K per GEMM).

    python benchmarks/bench_block.py --model tnl-0.4b --T 32768
    python benchmarks/bench_block.py --model tnl-0.4b --T 32768 --variants separate,qku+glu --gemm-rows 131072
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

from seqpar.models import TNLConfig  # noqa: E402
from seqpar.models.transnormer import TNLBlock  # noqa: E402

VARIANTS = ("separate", "qku", "qkvu", "glu", "qku+glu", "qkvu+glu")
MODES = ("default", "max-autotune", "max-autotune-tma")


def compile_block(block, mode: str):
    """block.compile under one of MODES (module docstring); inductor's TMA switch is set for this process."""
    import torch._inductor.config as inductor_config

    inductor_config.triton.enable_persistent_tma_matmul = mode == "max-autotune-tma"
    if mode == "default":
        block.compile(dynamic=False)
    else:
        block.compile(dynamic=False, mode="max-autotune-no-cudagraphs")


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


def _linear_cat(x, mods):
    """One GEMM of x [.., d] with the row-concatenated weights of ``mods`` -> the outputs split per module."""
    w = torch.cat([m.weight for m in mods])
    b = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
    return F.linear(x, w, b).split([m.out_features for m in mods], -1)


def merged_block(cfg, variant: str) -> TNLBlock:
    """A TNLBlock whose projections run as ``variant`` says (see the module docstring); same parameters."""
    block = TNLBlock(cfg, 0)
    att, glu = block.token_mixer, block.channel_mixer
    if "qk" in variant:
        def qkvu(x, att=att, with_v="qkvu" in variant):
            shape = x.shape[:-1] + (att.n_heads, att.head_dim)
            if with_v:
                q, k, v, u = _linear_cat(x, [att.q_proj, att.k_proj, att.v_proj, att.u_proj])
                v = v.contiguous()
            else:
                q, k, u = _linear_cat(x, [att.q_proj, att.k_proj, att.u_proj])
                v = att.v_proj(x)
            return att.qk_act(q).view(shape), att.qk_act(k).view(shape), v.view(shape), att.gate_act(u)
        att._qkvu = qkvu
    if "glu" in variant:
        def sglu(x, glu=glu):
            a, b = _linear_cat(x, [glu.w1, glu.w2])
            return glu.w3(a * b)
        glu.forward = sglu
    return block


def gemm_rows(cfg, M, dev):
    """(label, ms, TFLOP/s) of each GEMM of a block step alone, at M rows."""
    d, inner, g = cfg.d_model, cfg.inner_dim, cfg.glu_dim
    shapes = [(d, inner, "q|k|v|u|o-in"), (d, 3 * inner, "qku merged"), (d, 4 * inner, "qkvu merged"),
              (d, g, "w1|w2"), (d, 2 * g, "w1w2 merged"), (inner, d, "o"), (g, d, "w3")]
    out = []
    for K, N, name in shapes:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
        flops = 2 * M * N * K
        for kind, fn in (("fwd X W^T", lambda: x @ w.t()), ("dgrad dY W", lambda: dy @ w),
                         ("wgrad dY^T X", lambda: dy.t() @ x)):
            ms = bench(fn)
            out.append((f"{name} [{K} -> {N}], {kind}", ms, flops / ms / 1e9))
        del x, w, dy
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tnl-0.4b")
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--modes", default="default", help=f"comma list of compile modes: {', '.join(MODES)}")
    ap.add_argument("--no-gemm-rows", action="store_true", help="skip the GEMM-alone rows")
    ap.add_argument("--residuals", default="float32,bfloat16", help="comma list of float32, bfloat16")
    ap.add_argument("--gemm-rows", default="", help="comma list of M for the GEMM rows (default: T)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {', '.join(MODES)}")
    residuals = []
    for r in args.residuals.split(","):
        if r not in ("float32", "bfloat16"):
            ap.error(f"--residuals: {r!r} is not float32 or bfloat16")
        residuals.append(getattr(torch, r))
    try:
        ms_rows = [int(m) for m in args.gemm_rows.split(",")] if args.gemm_rows else [args.T]
    except ValueError:
        ap.error(f"--gemm-rows must be a comma list of ints, got {args.gemm_rows!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_block.py needs a CUDA GPU")
    cfg = TNLConfig.preset(args.model)
    dev, T = "cuda", args.T
    lines = report.header(f"One block, {args.model}, T={T}, fwd+bwd, bf16 autocast", "bench_block.py")
    lines += ["| block (compiled) | compile mode | residual | ms | compile s | vs first row, same residual |",
              "|---|---|---|---|---|---|"]
    base = {}
    for mode in modes:
        for variant in variants:
            torch._dynamo.reset()
            block = merged_block(cfg, variant).to(dev)
            compile_block(block, mode)
            for dtype in residuals:
                x = torch.randn(1, T, cfg.d_model, device=dev, dtype=dtype, requires_grad=True)
                t0 = time.perf_counter()
                fwd_bwd(lambda x: block(x)[0], x)()
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                ms = bench(fwd_bwd(lambda x: block(x)[0], x))
                name = str(dtype).split(".")[-1]
                base.setdefault(name, ms)
                lines.append(f"| {variant} | {mode} | {name} | {ms:.3f} | {compile_s:.0f} | {ms / base[name]:.3f} |")
                print(lines[-1], flush=True)
                del x
            del block
    if not args.no_gemm_rows:
        lines += ["", "| GEMM alone (bf16) | M | ms | TFLOP/s |", "|---|---|---|---|"]
    for M in [] if args.no_gemm_rows else ms_rows:
        for label, ms, tf in gemm_rows(cfg, M, dev):
            lines.append(f"| {label} | {M} | {ms:.3f} | {tf:.0f} |")
            print(lines[-1], flush=True)
    tag = "" if modes == ["default"] else "_" + "_".join(m.replace("-", "") for m in modes)
    report.write(args.out, f"block_variants_{args.model}_T{T}{tag}.md", lines)


if __name__ == "__main__":
    main()
