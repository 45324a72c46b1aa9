"""Where a training step's time goes: per-category GPU time of one TransNormerLLM step (torch profiler).

A bare loop (bf16 autocast, gradient-norm clipping as train.py, fused AdamW, the model's chunked loss) at batch B
and length T. For every variant it measures the median step time, then profiles two steps and sums the GPU kernel
time per category
(GEMMs, lightning-attention kernels, loss + head row pass, copies, memsets/fills, compiled elementwise,
other elementwise, optimizer, communication); host gaps = step time - GPU busy time, and the profiled steps' idle
gaps charged to the host ops that launched the kernel after each gap (benchmarks/trace_gaps.py). Variants:

    ac      the blocks' recompute policy (``TNLConfig.activation_checkpointing``): ac0 / acnone = none, acsel /
            selective = selective (GEMM and attention outputs kept, elementwise recomputed), ac1 / acfull = full
            (every block recomputed from its input), acauto = auto (the fastest that fits the GPU)
    ce      ``fused`` (seqpar.kernels.linear_ce) or ``ckpt`` (the previous head: lm head + fp32 cross entropy per
            chunk under torch.utils.checkpoint, recomputed in the backward)

MFU counts PaLM's model FLOPs (seqpar.models.flops); HFU adds the recomputed block forwards.

    python benchmarks/profile_train.py --models tnl-0.4b,tnl-1b --T 32768
    python benchmarks/profile_train.py --models tnl-0.4b --variants ac0-fused,acsel-fused,ac1-fused
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import json
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
import trace_gaps  # noqa: E402

from seqpar.models import TNLConfig, TransNormerLLM  # noqa: E402
from seqpar.models.lit import clip_grad_norm_  # noqa: E402
from seqpar.models.flops import hardware_flops_per_token, model_flops_per_token  # noqa: E402
from seqpar.models.memory import step_memory_bytes  # noqa: E402

CATEGORIES = [
    ("lightning-attn", re.compile(r"^_(lb_walk|seg_state|scan|fwd_out|bwd_|la_|lightning)")),
    ("loss + head row pass", re.compile(r"_ce_fwd_bwd|log_softmax|nll_loss|cross_entropy|softmax_backward")),
    ("GEMM", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|wgmma|splitK", re.I)),
    ("optimizer", re.compile(r"multi_tensor|fused_adam|FusedAdam|adam", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("elementwise (compiled)", re.compile(r"^triton_")),  # inductor's fused kernels (names may hold "_to_copy")
    ("copies", re.compile(r"Memcpy|copy|CatArray|cat_", re.I)),
    ("memsets / fills", re.compile(r"Memset|fill|zero", re.I)),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if pat.search(name):
            return cat
    return "other elementwise / reductions"


def old_ce_sum(self, h, labels):
    """The head before seqpar.kernels.linear_ce: lm head + fp32 CE per chunk, recomputed in the backward."""
    hf, lf = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    n = self.config.loss_chunk_tokens

    def piece(hc, lc):
        logits = self.lm_head(hc).float()
        return F.cross_entropy(logits, lc.long(), ignore_index=-100, reduction="sum")

    total = None
    for s in range(0, hf.shape[0], n):
        part = torch.utils.checkpoint.checkpoint(piece, hf[s:s + n], lf[s:s + n], use_reentrant=False)
        total = part if total is None else total + part
    return total


AC_TAGS = {"ac0": "none", "acnone": "none", "none": "none", "ac1": "full", "acfull": "full", "full": "full",
           "acsel": "selective", "acselective": "selective", "selective": "selective", "acauto": "auto",
           "auto": "auto"}


def parse_variant(v: str):
    """'ac0-fused' -> ("none", "fused"): the recompute policy (AC_TAGS) and the head ("fused" | "ckpt")."""
    ac, sep, ce = v.rpartition("-")
    if not sep or ac not in AC_TAGS or ce not in ("fused", "ckpt"):
        raise SystemExit(f"--variants: {v!r} is not <ac>-<head> with <ac> in {sorted(AC_TAGS)} and <head> in "
                         f"fused, ckpt")
    return AC_TAGS[ac], ce


def step_fn(model, opt, x, y, grad_clip=0.0, clip_mode="fused"):
    rf = torch.profiler.record_function  # phases named on the host timeline (trace_gaps charges gaps to them)
    with rf("forward"), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, labels=y, return_logits=False).loss
    with rf("backward"):
        loss.backward()
    with rf("clip"):
        if grad_clip and clip_mode == "fused":  # as train.py (LitLM): the clip factor goes into the fused AdamW step
            clip_grad_norm_(model.parameters(), grad_clip, opt)
        elif grad_clip:  # torch's clipping: the gradients scaled in place, then the step
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    with rf("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def run_variant(name, T, B, ac, ce, compile_scope, steps, warmup, grad_clip=0.0, overrides=None, compile_mode=None,
                clip_mode="fused"):
    """ac: the recompute policy ("none" | "selective" | "full" | "auto"); compile_scope: None | "blocks" | "model";
    grad_clip: clip the gradient norm before the optimizer step (0: no clipping); overrides: TNLConfig fields;
    compile_mode: torch.compile's ``mode`` (None: the default); clip_mode: "fused" (the clip factor handed to the
    fused AdamW step, as train.py) | "inplace" (torch.nn.utils.clip_grad_norm_)."""
    cfg = TNLConfig.preset(name, **{**(overrides or {}), "activation_checkpointing": ac})
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = TransNormerLLM(cfg).cuda()
    if ce == "ckpt":
        model._chunked_ce_sum = old_ce_sum.__get__(model)
    kw = {"mode": compile_mode} if compile_mode else {}
    if compile_scope == "blocks":
        model.compile_blocks(**kw)
    elif compile_scope == "model":
        model.compile_model(**kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)
    torch.cuda.reset_peak_memory_stats()
    timed = report.time_steps(lambda: step_fn(model, opt, x, y, grad_clip, clip_mode), warmup, steps)
    step, step_b2b, losses = timed["step_s"], timed["b2b_s"], timed["losses"]
    cats = {}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):  # synced as the timed steps: the second step's start is a gap in the trace
            with torch.profiler.record_function("step"):
                step_fn(model, opt, x, y, grad_clip, clip_mode)
            with torch.profiler.record_function("sync"):
                torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:  # the GPU's idle gaps, charged to the host ops that ended them
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            trace = json.load(f)
    gaps = trace_gaps.attribute_gaps(trace, min_us=5.0, depth=3)
    busy = gaps["busy_us"] / 2e3  # union of the GPU activities, ms per step
    kernels = {k: us / 2e3 for k, us in trace_gaps.gpu_times(trace).items()}  # host annotations excluded
    for k, ms in kernels.items():
        cats[category(k)] = cats.get(category(k), 0.0) + ms
    del trace
    # optimizer alone (fused AdamW over the model's parameters), for the table
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        opt.step()
    torch.cuda.synchronize()
    opt_ms = (time.perf_counter() - t0) / 5 * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30
    tps = B * T / step
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ac = model.activation_policy(B, T, x)  # "auto" resolved for this shape
    est = step_memory_bytes(cfg, ac, B, T, compiled=compile_scope is not None) / 2**30
    # hardware FLOPs of the resolved policy ("selective" recomputes no GEMM: those of "none")
    r = dict(model=name, T=T, B=B, ac=ac, ce=ce, step_ms=step * 1e3, tps=tps, b2b_ms=step_b2b * 1e3,
             issue_ms=timed["issue_s"] * 1e3, busy_ms=busy, cats=cats, clock=timed["clock"],
             mfu=model_flops_per_token(cfg) * tps / 989e12, est_gib=est,
             mfu_b2b=model_flops_per_token(cfg) * B * T / step_b2b / 989e12,
             hfu=hardware_flops_per_token(cfg, ac) * tps / 989e12,
             peak_gib=peak, opt_ms=opt_ms, loss_last=losses[-1], gaps=gaps,
             top=sorted(((ms, k) for k, ms in kernels.items()
                         if category(k) not in ("GEMM", "lightning-attn")), reverse=True)[:12])
    del model, opt, x, y
    gc.collect()
    torch.cuda.empty_cache()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tnl-0.4b,tnl-1b")
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--variants", default="ac1-ckpt,ac1-fused,ac0-ckpt,ac0-fused",
                    help="comma list of <ac>-<head>: ac0 (none) | acsel (selective) | ac1 (full) | acauto, "
                         "and ckpt | fused")
    ap.add_argument("--compile", default="blocks", choices=["0", "1", "blocks", "model"],
                    help="0: eager; 1 or blocks: compile each block; model: compile the whole model")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-clip", type=float, default=1.0,
                    help="gradient-norm clipping before the optimizer step, as train.py (optim.grad_clip); 0: none")
    ap.add_argument("--clip-mode", default="fused", choices=["fused", "inplace"],
                    help="fused: the clip factor goes into the fused AdamW step (train.py); inplace: torch's clipping")
    ap.add_argument("--set", default="", help="TNLConfig overrides for every run, e.g. residual_dtype=autocast")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--head-gemms", default="auto", choices=["auto", "unfused"],
                    help="fused head's weight-gradient GEMMs: auto (accumulate into fp32 where aten can) or unfused "
                         "(bf16 products added into fp32: the path before, for A/B runs)")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if args.grad_clip < 0:
        ap.error(f"--grad-clip must be >= 0, got {args.grad_clip}")
    overrides = report.parse_overrides(args.set)
    TNLConfig.preset("tiny", **overrides)  # a bad override fails here, before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("profile_train.py needs a CUDA GPU")
    if args.head_gemms == "unfused":
        from seqpar.kernels.linear_ce import interface as linear_ce_interface

        linear_ce_interface._fp32_accumulating_mm = lambda device, cdtype: False
    import triton

    dev = torch.cuda.get_device_name()
    scope = {"0": None, "1": "blocks"}.get(args.compile, args.compile)
    results = []
    for name in args.models.split(","):
        for v in args.variants.split(","):
            ac, ce = parse_variant(v)
            try:
                r = run_variant(name, args.T, args.B, ac, ce, scope, args.steps, args.warmup, args.grad_clip,
                                overrides, args.compile_mode, args.clip_mode)
            except torch.cuda.OutOfMemoryError:
                print(f"{name} {v}: OOM", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            results.append(r)
            print(f"{name} {v}: step {r['step_ms']:.1f} ms, {r['tps']:.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
                  f"HFU {100 * r['hfu']:.1f}%, busy {r['busy_ms']:.1f} ms, host issue {r['issue_ms']:.1f} ms; "
                  f"back-to-back {r['b2b_ms']:.1f} ms, MFU {100 * r['mfu_b2b']:.1f}%; peak {r['peak_gib']:.1f} GiB "
                  f"(estimated {r['est_gib']:.1f}, policy {r['ac']}), "
                  f"loss {r['loss_last']:.4f}", flush=True)
    cats = [c for c, _ in CATEGORIES] + ["other elementwise / reductions"]
    lines = [
        f"# Where a training step's time goes (B{args.B} T{args.T}, compiled: {scope or 'no'})", "",
        f"device: {dev}; torch {torch.__version__}, triton {triton.__version__}; date {datetime.date.today()}; "
        f"bf16 autocast, fused AdamW, gradient clipping {args.grad_clip or 'off'} ({args.clip_mode}); "
        f"command: `python benchmarks/profile_train.py {' '.join(sys.argv[1:])}`", "",
        "GPU ms per step by kernel category (torch profiler, mean of 2 steps); step = median of synced steps (each "
        "starts on an idle GPU); host gaps = step - GPU busy; host issue = host time to issue one synced step; "
        "back-to-back = mean step of steps issued with one sync at the end; GPU clock = nvidia-smi's SM clock "
        "(median, range) and power while the steps were timed; "
        "optimizer (alone) = fused AdamW step timed separately; MFU = PaLM model FLOPs, HFU = + recompute, "
        "against 989 TFLOP/s; estimated GiB = seqpar.models.memory.step_memory_bytes.", "",
        "| model | recompute | head | step ms | tokens/s | MFU | HFU | peak GiB | estimated GiB | " + " | ".join(cats)
        + " | GPU busy | host gaps | host issue | step, back-to-back | MFU, back-to-back | optimizer (alone) "
        "| loss, last step | GPU clock, timed steps |",
        "|" + "---|" * (17 + len(cats)),
    ]
    for r in results:
        cells = [f"{r['cats'].get(c, 0.0):.1f}" for c in cats]
        lines.append(
            f"| {r['model']} | {r['ac']} | {r['ce']} | {r['step_ms']:.1f} | {r['tps']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | {r['peak_gib']:.1f} | {r['est_gib']:.1f} | "
            + " | ".join(cells)
            + f" | {r['busy_ms']:.1f} | {r['step_ms'] - r['busy_ms']:.1f} | {r['issue_ms']:.1f} | {r['b2b_ms']:.1f} "
            f"| {100 * r['mfu_b2b']:.1f}% | {r['opt_ms']:.1f} | {r['loss_last']:.4f} | {r['clock']} |")
    for r in results:  # where the non-GEMM, non-attention time goes, by kernel
        lines += ["", f"Top kernels outside GEMM and lightning-attn, {r['model']}, recompute "
                  f"{r['ac']}, head {r['ce']} (ms per step):", "",
                  "| ms | category | kernel |", "|---|---|---|"]
        lines += [f"| {ms:.2f} | {category(k)} | `{k[:110]}` |" for ms, k in r["top"]]
        lines += ["", f"Host gaps in the profiled steps, {r['model']} (2 synced steps under the profiler; the "
                  "table's host gaps are step - GPU busy of the untraced timing):", ""]
        lines += trace_gaps.gap_table(r["gaps"], per=2, top=12)
    table = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    models = "_".join(m.replace("-", "").replace(".", "") for m in args.models.split(","))
    path = os.path.join(args.out, f"profile_train_{dev.replace(' ', '_')}_{models}_T{args.T}{args.tag}.md")
    with open(path, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
