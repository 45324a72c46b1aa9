"""Short sequences are launch-bound: fwd+bwd of the operator and of causal SDPA (flash), eager and replayed from
a CUDA graph, side by side.

Per shape (default B4 H16 T2048 D128, bf16) and implementation: the median of ``--iters`` CUDA-event timings
of one forward + backward (``torch.autograd.grad`` of o against do), eager, then the same call captured once
in a ``torch.cuda.CUDAGraph`` and replayed. The graph's gradients are checked against the eager ones first.

    python benchmarks/op_graph.py --shapes 4,16,2048,128 4,16,8192,128
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from op_paths import timed  # noqa: E402  (median of CUDA-event timings after 3 warm-up calls)

from seqpar import lightning_attn  # noqa: E402


def make_fn(impl, q, k, v, s, do):
    if impl == "seqpar":
        def fn():
            o, _ = lightning_attn(q, k, v, s)
            return torch.autograd.grad(o, (q, k, v), do)
    else:  # causal softmax attention through SDPA ([B, H, T, D] views)
        qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))

        def fn():
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            return torch.autograd.grad(o, (q, k, v), dot)
    return fn


def graphed(fn):
    """(replay, outputs): fn captured in a CUDA graph after warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["4,16,2048,128"], help="B,H,T,D ...")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("op_graph.py needs a CUDA GPU")
    rows = []
    for shape in args.shapes:
        B, H, T, D = (int(x) for x in shape.split(","))
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = ((torch.randn(B, T, H, D, device="cuda", generator=g) * 0.3).bfloat16().requires_grad_(True)
                   for _ in range(3))
        do = torch.randn(B, T, H, D, device="cuda", generator=g).bfloat16()
        s = torch.linspace(0.01, 0.5, H, device="cuda")
        for impl in ("seqpar", "sdpa"):
            fn = make_fn(impl, q, k, v, s, do)
            ref = [x.clone() for x in fn()]
            eager = timed(fn, args.iters)
            try:
                replay, out = graphed(fn)
                replay()
                torch.cuda.synchronize()
                err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(out, ref))
                graph_ms = timed(replay, args.iters) if err < 1e-2 else float("nan")
                note = f"graph grads vs eager: {err:.1e}"
            except Exception as e:  # a capture failure is a result, not a crash of the table
                graph_ms, note = float("nan"), f"capture failed: {type(e).__name__}: {str(e)[:80]}"
            rows.append((shape, impl, eager, graph_ms, note))
            print(f"{shape} {impl}: eager {eager:.3f} ms, graph {graph_ms:.3f} ms ({note})", flush=True)
    lines = report.header("fwd+bwd, eager vs CUDA graph: seqpar vs causal SDPA (bf16)", "op_graph.py")
    lines += ["| B,H,T,D | implementation | eager ms | CUDA graph ms | check |", "|---|---|---|---|---|"]
    lines += [f"| {sh} | {im} | {e:.3f} | {gm:.3f} | {n} |" for sh, im, e, gm, n in rows]
    report.write(args.out, f"op_graph_{torch.cuda.get_device_name().replace(' ', '_')}.md", lines)


if __name__ == "__main__":
    main()
