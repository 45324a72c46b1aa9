"""Training throughput vs sequence length on one GPU: TransNormerLLM (Lightning Attention-2) vs LLaMA-SDPA.

Tokens per optimizer step are held fixed (``--tokens``, batch = tokens / T; a comma list gives a row per value;
``--micro-batch`` accumulates the batch in forwards of that many sequences); each row is one model at
one length: median step time (forward + backward + AdamW; each step synced), tokens/GPU/s, MFU and peak memory,
and tokens/GPU/s of the same number of steps issued back to back with one sync at the end. The
LLaMA-style baseline has the same width, depth and head dim, softmax attention through torch SDPA
(flash), rotary embeddings and a SwiGLU sized to the TNL block's parameter count.

MFU is PaLM's: model FLOPs per token = 6 x the parameters used in matrix products (LM head included,
embedding lookup not) plus the attention's own FLOPs (TNL: ``seqpar.models.flops``; LLaMA: causal QK^T and PV),
recompute NOT counted; HFU adds the recomputed block forwards (with ``--ac full``; ``--ac`` takes the recompute
policy of ``TNLConfig.activation_checkpointing``: 0 / none, sel / selective, 1 / full, auto). Both against ``--peak-tflops``
(989 dense bf16 for H100/H200 SXM). ``--compile`` compiles the LLaMA baseline's blocks the same way as TNL's.

``--longest`` instead doubles T at batch 1 (activation checkpointing on) until the GPU runs out of
memory, to find the longest sequence one GPU trains.

Run on a GPU (the numbers in benchmarks/results/train_*.md come from this command):
    python benchmarks/bench_train.py --models tnl-0.4b,tnl-1b --lengths 2048,4096,8192,16384,32768,65536,131072
    python benchmarks/bench_train.py --longest --models tnl-0.4b
    python benchmarks/bench_train.py --longest --offload --models tnl-0.4b --max-tokens 1048576
    python benchmarks/bench_train.py --longest --seq-chunk 65536 --models tnl-0.4b,tnl-1b --start-tokens 1048576

``--longest --seq-chunk C`` trains with ``TNLConfig.seq_chunk = C`` (exact chunked forward/backward, activation
memory of C tokens; ``--ac`` then checkpoints the blocks inside each chunk's recompute): first a reference row at
32K tokens without chunking, then T doubles from ``--start-tokens``; the table has tokens, peak memory, tokens/s.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_baseline import LlamaLM, attention_flops_per_token  # noqa: E402
import report  # noqa: E402

from seqpar.models import TNLConfig, TransNormerLLM  # noqa: E402
from seqpar.models.flops import attention_flops_per_token as tnl_attention_flops  # noqa: E402


def tnl_attention_flops_per_token(cfg: TNLConfig, chunk: int = 64) -> float:
    return tnl_attention_flops(cfg, chunk)


AC_CHOICES = {"0": "none", "none": "none", "1": "full", "full": "full", "sel": "selective",
              "selective": "selective", "auto": "auto"}


def token_counts(text: str) -> list:
    """--tokens: "131072" or "32768,65536" -> [int, ...], each > 0."""
    try:
        counts = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens expects positive integers separated by commas, got {text!r}")
    if not counts or min(counts) <= 0:
        raise argparse.ArgumentTypeError(f"--tokens expects positive integers separated by commas, got {text!r}")
    return counts


def accumulation(B: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step: B sequences in forwards of ``micro_batch`` each (0: all B in one)."""
    if micro_batch < 0:
        raise ValueError(f"--micro-batch must be >= 0 (0: the whole batch in one forward), got {micro_batch}")
    if micro_batch == 0 or micro_batch >= B:
        return 1
    if B % micro_batch:
        raise ValueError(f"--micro-batch {micro_batch} must divide the batch of {B} sequences (--tokens / T)")
    return B // micro_batch


def ac_policy(value) -> str:
    """--ac: 0 / none, sel / selective, 1 / full, auto -> the TNLConfig.activation_checkpointing policy."""
    v = str(value).lower()
    if v not in AC_CHOICES:
        raise argparse.ArgumentTypeError(f"--ac must be one of {sorted(AC_CHOICES)}, got {value!r}")
    return AC_CHOICES[v]


def build(kind: str, cfg: TNLConfig, ac, compile_blocks: bool = False, offload: bool = False,
          seq_chunk=None):
    """ac: the TNL recompute policy (or a bool); the LLaMA baseline checkpoints its blocks only for "full"."""
    ac = ac_policy(int(ac) if isinstance(ac, bool) else ac)
    if kind == "tnl":
        cfg = TNLConfig.from_dict({**cfg.to_dict(), "activation_checkpointing": ac, "activation_offload": offload,
                                   "seq_chunk": seq_chunk})
        model = TransNormerLLM(cfg)
        if compile_blocks == "model":  # the whole model in one graph
            model.compile_model()
        elif compile_blocks:  # torch.compile per block, one static graph per run (a fixed length, as in training)
            model.compile_blocks()
    else:
        d, glu = cfg.d_model, cfg.glu_dim
        model = LlamaLM(cfg.vocab_size, d, cfg.n_layers, cfg.n_heads, hidden=glu + d // 3,
                        activation_checkpointing=ac == "full", residual_dtype=cfg.residual_dtype)
        if compile_blocks == "model":  # the baseline compiled the same way
            model.compile()
        elif compile_blocks:
            for blk in model.blocks:
                blk.compile(dynamic=False)
    return model.cuda()


def loss_of(kind, model, x, y):
    if kind == "tnl":
        return model(x, labels=y, return_logits=False).loss
    return model(x, y)


def run_one(kind, cfg, T, tokens, steps, warmup, ac, peak_tflops, compile_blocks=False, offload=False,
            seq_chunk=None, micro_batch=0):
    B = max(1, tokens // T)
    accum = accumulation(B, micro_batch)
    mb = B // accum
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # each row compiles afresh (no dynamic-shape graphs from earlier rows)
    torch.manual_seed(0)  # same initial weights for every row of one model (compare first losses)
    model = build(kind, cfg, ac, compile_blocks, offload, seq_chunk)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = cfg.vocab_size * cfg.d_model  # the lookup; the (untied) LM head stays in the matmul count
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)

    def train_step():  # one optimizer step over accum micro-batches of mb sequences (gradients summed in .grad)
        total = 0.0
        for i in range(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_of(kind, model, x[i * mb:(i + 1) * mb], y[i * mb:(i + 1) * mb]) / accum
            loss.backward()
            total = total + loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    timed = report.time_steps(train_step, warmup, steps)
    bad = [v for v in timed["losses"] if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite loss {bad[0]}")
    first_loss = timed["losses"][0]
    step = timed["step_s"]
    tps = B * T / step
    tps_b2b = B * T / timed["b2b_s"]
    policy = ac_policy(int(ac) if isinstance(ac, bool) else ac)
    if kind == "tnl":  # "auto" resolved for this shape
        with torch.autocast("cuda", dtype=torch.bfloat16):
            policy = model.activation_policy(mb, min(T, seq_chunk or T), x[:mb])
    elif policy != "full":
        policy = "none"
    attn = tnl_attention_flops_per_token(cfg) if kind == "tnl" else attention_flops_per_token(cfg.n_layers, cfg.d_model, T)
    n_matmul = n_params - n_embed
    flops_tok = 6 * n_matmul + attn  # PaLM model FLOPs: no recompute
    n_head = cfg.vocab_size * cfg.d_model
    # + recomputed block forwards ("selective" recomputes no GEMM: its hardware FLOPs are those of "none")
    hfu_tok = flops_tok + ((2 * (n_matmul - n_head) + attn / 3) if policy == "full" else 0)
    mfu = flops_tok * tps / (peak_tflops * 1e12)
    hfu = hfu_tok * tps / (peak_tflops * 1e12)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, x, y
    gc.collect()
    return dict(B=B if accum == 1 else f"{B} ({accum} x {mb})", step_ms=step * 1e3, tps=tps, tps_b2b=tps_b2b,
                clock=timed["clock"], mfu=mfu, hfu=hfu, peak_gib=peak, params=n_params, loss0=first_loss,
                policy=policy)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tnl-0.4b,tnl-1b")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536,131072")
    ap.add_argument("--tokens", type=token_counts, default=[131072],
                    help="tokens per optimizer step, or a comma list (one row per value and length)")
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="sequences per forward/backward; the --tokens / T sequences of a step are accumulated in "
                         "micro-batches of this many (0: all in one)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ac", type=ac_policy, default="full",
                    help="recompute policy of the blocks: 0 / none, sel / selective, 1 / full, auto")
    ap.add_argument("--baseline", default="llama", help="'llama' or 'none'")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--longest", action="store_true")
    ap.add_argument("--compile", default="0", choices=["0", "1", "both", "model"],
                    help="torch.compile: 0, 1 (each block), 'both' (eager and block-compiled rows), 'model' (whole models)")
    ap.add_argument("--max-tokens", type=int, default=1 << 23)
    ap.add_argument("--offload", action="store_true", help="--longest with activation_offload (block inputs in host memory)")
    ap.add_argument("--seq-chunk", type=int, default=None, help="--longest with TNLConfig.seq_chunk = C tokens")
    ap.add_argument("--start-tokens", type=int, default=1 << 17, help="--longest: first T (doubled until OOM)")
    ap.add_argument("--set", default="", help="TNLConfig overrides, e.g. residual_dtype=autocast (the LLaMA "
                    "baseline follows residual_dtype)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    overrides = report.parse_overrides(args.set)
    lengths = [int(t) for t in args.lengths.split(",")]
    for T, tokens in itertools.product(lengths, args.tokens):
        try:  # a --micro-batch that does not divide a row's batch fails here, before any GPU work
            accumulation(max(1, tokens // T), args.micro_batch)
        except ValueError as e:
            ap.error(str(e))
    TNLConfig.preset("tiny", **overrides)  # a bad override fails here, before any GPU work
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    dev = torch.cuda.get_device_name()
    head = (f"# Training throughput, one GPU\n\ndevice: {dev}; torch {torch.__version__}; "
            f"date {datetime.date.today()}; bf16 autocast, fused AdamW; command: `python benchmarks/bench_train.py "
            f"{' '.join(sys.argv[1:])}`\n\n")
    rows = []
    tag = ("longest_offload" if args.offload else "longest") if args.longest else "throughput"
    if args.longest and args.seq_chunk:
        tag = f"longest_chunk{args.seq_chunk}_ac{ {'none': '0', 'full': '1'}.get(args.ac, args.ac)}"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_{tag}_{dev.replace(' ', '_')}.md")

    def flush_table(row=None) -> str:
        """Print row (if any) and rewrite the table file with every row so far: a run cut short keeps its rows."""
        if row is not None:
            print(row, flush=True)
        table = head + "\n".join(rows) + "\n"
        with open(path, "w") as f:
            f.write(table)
        return table

    if args.longest and args.seq_chunk:
        head += ("| model | T (B=1) | seq_chunk | block ckpt | step ms | tokens/s | vs 32K unchunked | peak GiB |\n"
                 "|---|---|---|---|---|---|---|---|\n")
        for name in args.models.split(","):
            cfg = TNLConfig.preset(name, **overrides)
            ref = run_one("tnl", cfg, 32768, 32768, steps=3, warmup=1, ac=True, peak_tflops=args.peak_tflops)
            rows.append(f"| {name} | 32768 | none | yes | {ref['step_ms']:.0f} | {ref['tps']:.0f} | 1.00 | "
                        f"{ref['peak_gib']:.1f} |")
            flush_table(rows[-1])
            T = args.start_tokens
            while T <= args.max_tokens:
                try:
                    r = run_one("tnl", cfg, T, T, steps=1, warmup=1, ac=args.ac, peak_tflops=args.peak_tflops,
                                seq_chunk=args.seq_chunk)
                    rows.append(f"| {name} | {T} | {args.seq_chunk} | {r['policy']} | {r['step_ms']:.0f} | "
                                f"{r['tps']:.0f} | {r['tps'] / ref['tps']:.2f} | {r['peak_gib']:.1f} |")
                except torch.cuda.OutOfMemoryError as e:
                    rows.append(f"| {name} | {T} | {args.seq_chunk} | {args.ac} | OOM ({type(e).__name__}) | | | |")
                    flush_table(rows[-1])
                    break
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
                flush_table(rows[-1])
                T *= 2
    elif args.longest:
        head += "| model | T (B=1) | step ms | tokens/s | peak GiB |\n|---|---|---|---|---|\n"
        for name in args.models.split(","):
            cfg = TNLConfig.preset(name, **overrides)
            T = args.start_tokens
            while T <= args.max_tokens:
                try:
                    r = run_one("tnl", cfg, T, T, steps=1, warmup=1, ac=True, peak_tflops=args.peak_tflops,
                                offload=args.offload)
                    rows.append(f"| {name} | {T} | {r['step_ms']:.0f} | {r['tps']:.0f} | {r['peak_gib']:.1f} |")
                except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # RuntimeError: pinned host memory
                    if not isinstance(e, torch.cuda.OutOfMemoryError) and "memory" not in str(e):
                        raise
                    rows.append(f"| {name} | {T} | OOM ({type(e).__name__}) | | |")
                    break
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
                flush_table(rows[-1])
                T *= 2
    else:
        head += ("| model | attention | T | B | step ms | tokens/GPU/s | MFU | HFU | peak GiB | loss, step 1 "
                 "| tokens/GPU/s, back-to-back | GPU clock, timed steps |\n"
                 "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        kinds = {"0": ["tnl"], "1": ["tnl+compile"], "both": ["tnl", "tnl+compile"],
                 "model": ["tnl+model"]}[args.compile]
        if args.baseline == "llama":
            kinds += {"0": ["llama"], "1": ["llama+compile"], "both": ["llama", "llama+compile"],
                      "model": ["llama+model"]}[args.compile]
        for name in args.models.split(","):
            cfg = TNLConfig.preset(name, **overrides)
            for T, tokens, kind in itertools.product(lengths, args.tokens, kinds):
                label = {"tnl": "Lightning Attention-2 (seqpar)", "llama": "softmax, torch SDPA",
                         "tnl+compile": "Lightning Attention-2 (seqpar), blocks compiled",
                         "llama+compile": "softmax, torch SDPA, blocks compiled",
                         "tnl+model": "Lightning Attention-2 (seqpar), model compiled",
                         "llama+model": "softmax, torch SDPA, model compiled"}[kind]
                scope = "model" if kind.endswith("model") else kind.endswith("compile")
                model_name = name if kind.startswith("tnl") else f"LLaMA, {name}'s size"
                try:
                    try:
                        r = run_one(kind.split("+")[0], cfg, T, tokens, args.steps, args.warmup, args.ac,
                                    args.peak_tflops, compile_blocks=scope, micro_batch=args.micro_batch)
                    except torch.cuda.OutOfMemoryError:
                        # --ac auto: the baseline has no memory estimate; it gets full recompute when none fits
                        if args.ac != "auto" or kind.startswith("tnl"):
                            raise
                        r = None
                    if r is None:  # retried outside the except block: its traceback held the failed run's tensors
                        gc.collect()
                        torch.cuda.empty_cache()
                        r = run_one(kind.split("+")[0], cfg, T, tokens, args.steps, args.warmup, "full",
                                    args.peak_tflops, compile_blocks=scope, micro_batch=args.micro_batch)
                    label = f"{label}, recompute {r['policy']}"
                    rows.append(f"| {model_name} | {label} | {T} | {r['B']} | {r['step_ms']:.0f} | {r['tps']:.0f} | "
                                f"{100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | {r['peak_gib']:.1f} | {r['loss0']:.4f} | "
                                f"{r['tps_b2b']:.0f} | {r['clock']} |")
                except torch.cuda.OutOfMemoryError:
                    label = f"{label}, recompute {args.ac}"
                    rows.append(f"| {model_name} | {label} | {T} | {max(1, tokens // T)} | OOM | | | | | | | |")
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
                flush_table(rows[-1])
    print(flush_table())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
