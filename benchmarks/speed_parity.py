"""Speed may not change the math: loss after N training steps of the fast path against the plain eager path.

Trains the same model from the same seed on the embedded corpus (byte tokens, the stdlib sources) for
``--steps`` steps per path and seed, bf16 autocast, AdamW (fused on the GPU, clipping 1.0), a cosine
schedule, and compares the mean loss of the last 10 steps. Paths:

    eager       no torch.compile; the head before seqpar.kernels.linear_ce (lm head + fp32 cross entropy per
                chunk under torch.utils.checkpoint, recomputed in the backward); an fp32 residual stream
                (``residual_dtype="param"``)
    fast        the whole model under torch.compile (``compile_model``) with the fused linear + CE head, the
                preset's residual stream (bf16 for the sized presets), gradient clipping through the fused
                AdamW step (``seqpar.models.lit.clip_grad_norm_``, as train.py) and the TNLConfig overrides of
                ``--fast-set``

The difference between paths is judged against the difference between seeds of one path (run-to-run
noise). Writes a table to ``--out``.

    python benchmarks/speed_parity.py --model tnl-0.4b --T 8192 --steps 200 --seeds 0,1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
from profile_train import old_ce_sum  # noqa: E402

from seqpar.data.corpus import load_corpus  # noqa: E402
from seqpar.models import TNLConfig, TransNormerLLM  # noqa: E402
from seqpar.models.lit import clip_grad_norm_  # noqa: E402


def batches(tokens: np.ndarray, B: int, T: int, steps: int, seed: int):
    """[B, T+1] windows at random offsets (one stream per seed)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - T - 1, size=B)
        yield torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]).astype(np.int64))


def train(path: str, model_name: str, B: int, T: int, steps: int, seed: int, lr: float, tokens: np.ndarray,
          dev: str, overrides=None):
    """overrides: TNLConfig fields of this path (the fast path's --fast-set)."""
    torch.manual_seed(seed)
    torch._dynamo.reset()
    cfg = TNLConfig.preset(model_name, **(overrides or {}))
    model = TransNormerLLM(cfg).to(dev)
    if path == "eager":
        model._chunked_ce_sum = old_ce_sum.__get__(model)
    elif dev == "cuda":
        model.compile_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=dev == "cuda")
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    losses, t0 = [], time.perf_counter()
    for batch in batches(tokens, B, T, steps, seed):
        batch = batch.to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(batch[:, :-1], labels=batch[:, 1:], return_logits=False).loss
        loss.backward()
        if path == "fast":  # as train.py: the clip factor goes into the fused AdamW step
            clip_grad_norm_(model.parameters(), 1.0, opt)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    losses = [x.item() for x in losses]
    return dict(path=path, seed=seed, final=float(np.mean(losses[-10:])), first=losses[0],
                seconds=time.perf_counter() - t0, losses=losses)


def plot(rows, path: str, title: str) -> bool:
    """Loss curves (10-step running mean, or over all steps when fewer) of every path and seed into a PNG; False
    without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        w = min(10, len(r["losses"]))
        y = np.convolve(r["losses"], np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(r["losses"]) + 1), y, ls="-" if r["path"] == "fast" else "--",
                label=f"{r['path']}, seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (10-step mean)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tnl-0.4b")
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--fast-set", default="", help="TNLConfig overrides of the fast path, e.g. residual_dtype=autocast")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    fast_set = report.parse_overrides(args.fast_set, "--fast-set")
    fast_cfg = TNLConfig.preset(args.model, **fast_set)  # a bad override fails here
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = load_corpus()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for path in ("eager", "fast"):
            r = train(path, args.model, args.B, args.T, args.steps, seed, args.lr, tokens, dev,
                      fast_set if path == "fast" else {"residual_dtype": "param"})
            rows.append(r)
            print(f"{path} seed {seed}: first {r['first']:.4f}, last-10 mean {r['final']:.4f}, {r['seconds']:.0f} s",
                  flush=True)
    by = {(r["path"], r["seed"]): r["final"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    path_diff = [abs(by[("fast", s)] - by[("eager", s)]) for s in seeds]
    # run-to-run noise of one path: the spread (max - min) of its final losses over the seeds
    seed_diff = ([max(by[(p, s)] for s in seeds) - min(by[(p, s)] for s in seeds) for p in ("eager", "fast")]
                 if len(seeds) > 1 else [])
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    lines = report.header(f"Loss parity: fast path vs eager path, {args.model} B{args.B} T{args.T}, {args.steps} steps",
                          "speed_parity.py", name)
    lines += [f"Residual stream: eager fp32 (residual_dtype=param), fast residual_dtype={fast_cfg.residual_dtype}"
              + (f"; the fast path's overrides: {', '.join(f'{k}={v}' for k, v in fast_set.items())}" if fast_set else "")
              + ".", ""]
    marks = sorted({m for m in (args.steps // 4, args.steps // 2, 3 * args.steps // 4) if m >= 10})
    lines += ["| path | seed | loss, step 1 | " + " | ".join(f"mean loss, steps {m - 9}-{m}" for m in marks)
              + " | mean loss, last 10 steps | seconds |", "|---|---|---|" + "---|" * len(marks) + "---|---|"]
    lines += [f"| {r['path']} | {r['seed']} | {r['first']:.4f} | "
              + "".join(f"{np.mean(r['losses'][m - 10:m]):.4f} | " for m in marks)
              + f"{r['final']:.4f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", f"|fast - eager| per seed: {', '.join(f'{d:.4f}' for d in path_diff)}; "
              f"spread over seeds (max - min) per path, eager / fast: {' / '.join(f'{d:.4f}' for d in seed_diff) or 'n/a'}; "
              f"mean of each path: {np.mean([by[('eager', s)] for s in seeds]):.4f} / "
              f"{np.mean([by[('fast', s)] for s in seeds]):.4f}"]
    stem = f"speed_parity_{args.model}_T{args.T}_{args.steps}steps_lr{args.lr:g}"
    stem += f"_fast-residual-{fast_cfg.residual_dtype}" + "".join(f"_{k}-{v}" for k, v in fast_set.items()
                                                                      if k != "residual_dtype")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:  # the curves, for re-plotting
        json.dump([{k: r[k] for k in ("path", "seed", "losses")} for r in rows], f)
    png = os.path.join(args.out, stem + ".png")
    if plot(rows, png, f"{args.model} B{args.B} T{args.T}, lr {args.lr:g}: fast vs eager ({name})"):
        lines += ["", f"Curves: {os.path.basename(png)}"]
    out = report.write(args.out, stem + ".md", lines)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
