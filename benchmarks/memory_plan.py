#!/usr/bin/env python
"""Memory plan: bytes per GPU for parameters, gradients and AdamW state, with and without FSDP, plus activations.

    python benchmarks/memory_plan.py                       # tnl-0.4b/1b/3b/15b at world 1, 8, 64, fsdp off/on
    python benchmarks/memory_plan.py --tokens 32768        # + activations of 32K tokens per GPU
    python benchmarks/memory_plan.py --measure --models tnl-0.4b   # GPU: measure activation bytes per token

Model state (mixed precision as train.py runs it: fp32 master parameters, fp32 gradients, AdamW exp_avg and
exp_avg_sq in fp32 = 16 bytes per parameter):
  fsdp off (DDP): every rank holds all of it (plus DDP's gradient buckets, ~25 MB, ignored).
  fsdp on (FSDP2 over the dp x sp world W): 16 / W bytes per parameter, plus the transient unsharded copies of
  the blocks in flight: the current and the prefetched block in bf16 (2 x 2 bytes x block params) and one
  block's unsharded fp32 gradient before its reduce-scatter (4 bytes x block params), plus the root
  (embedding, lm head), which FSDP2 keeps gathered from the forward to the backward (2 bytes x root params).

Activations (activation checkpointing on): bytes per token per GPU. Anchor: tnl-0.4b on one H100, bf16,
batch 1 (benchmarks/results/train_longest_h100.md): peak 24.4 GiB at T = 131072 and 44.0 GiB at T = 262144,
i.e. (44.0 - 24.4) GiB / 131072 tokens = ~153 KiB (~160 KB) per token. The other models are scaled by
n_layers x d_model (the checkpointed block inputs dominate); ``--measure`` measures each on the GPU instead.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from seqpar.models import TNLConfig, TransNormerLLM  # noqa: E402

MODELS = ("tnl-0.4b", "tnl-1b", "tnl-3b", "tnl-15b")
WORLDS = (1, 8, 64)
ANCHOR_MODEL = "tnl-0.4b"
ANCHOR_BYTES_PER_TOKEN = (44.0 - 24.4) * 2**30 / 131072  # train_longest_h100.md, activation checkpointing on
GIB = 2**30


def counts(name: str):
    """(total params, params of one block, root params = embedding + final norm + lm head)."""
    cfg = TNLConfig.preset(name)
    with torch.device("meta"):
        m = TransNormerLLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    block = sum(p.numel() for p in m.layers[0].parameters())
    return total, block, total - block * cfg.n_layers


def state_bytes(name: str, world: int, fsdp: bool) -> dict:
    total, block, root = counts(name)
    if not fsdp:
        return {"params": 4 * total, "grads": 4 * total, "optim": 8 * total, "transient": 0}
    return {"params": 4 * total / world, "grads": 4 * total / world, "optim": 8 * total / world,
            "transient": 2 * 2 * block + 4 * block + 2 * root}


def act_bytes_per_token(name: str) -> float:
    a, c = TNLConfig.preset(ANCHOR_MODEL), TNLConfig.preset(name)
    return ANCHOR_BYTES_PER_TOKEN * (c.n_layers * c.d_model) / (a.n_layers * a.d_model)


def measure(name: str, tokens=(8192, 16384)) -> float:
    """Activation bytes per token on this GPU: peak-memory slope between two sequence lengths (bf16 autocast,
    activation checkpointing, one forward + backward of batch 1)."""
    cfg = TNLConfig.from_dict({**TNLConfig.preset(name).to_dict(), "activation_checkpointing": True})
    model = TransNormerLLM(cfg).cuda().train()
    peaks = []
    for T in tokens:
        ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
        for _ in range(2):  # the second run is the measured one (allocator warm, gradients allocated)
            model.zero_grad(set_to_none=False)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, labels=ids, return_logits=False)
            out.loss.backward()
            torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    del model
    torch.cuda.empty_cache()
    return (peaks[1] - peaks[0]) / (tokens[1] - tokens[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS))
    ap.add_argument("--tokens", type=int, default=0, help="tokens per GPU for the activation column (0: omit)")
    ap.add_argument("--measure", action="store_true", help="measure activation bytes per token on the GPU")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = ap.parse_args(argv)
    if any(w < 1 for w in a.worlds) or a.tokens < 0:
        ap.error("--worlds must be >= 1 and --tokens >= 0")
    if a.measure and not torch.cuda.is_available():
        ap.error("--measure needs a CUDA GPU")
    per_token = {m: (measure(m) if a.measure else act_bytes_per_token(m)) for m in a.models}
    src = "measured on " + torch.cuda.get_device_name() if a.measure else "tnl-0.4b H100 anchor, scaled"
    lines = [f"activation bytes per token (checkpointing on; {src}): "
             + ", ".join(f"{m} {per_token[m] / 1024:.0f} KiB" for m in a.models), "",
             "| model | params | world | fsdp | params GiB | grads GiB | AdamW GiB | transient GiB | total GiB"
             + (f" | + act {a.tokens} tok GiB" if a.tokens else "") + " |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if a.tokens else "")]
    for m in a.models:
        n = counts(m)[0]
        for w in a.worlds:
            for fsdp in (False, True):
                b = state_bytes(m, w, fsdp)
                tot = sum(b.values())
                row = (f"| {m} | {n / 1e9:.2f}B | {w} | {'on' if fsdp else 'off'} | {b['params'] / GIB:.2f} | "
                       f"{b['grads'] / GIB:.2f} | {b['optim'] / GIB:.2f} | {b['transient'] / GIB:.2f} | {tot / GIB:.2f}")
                if a.tokens:
                    row += f" | {(tot + per_token[m] * a.tokens) / GIB:.2f}"
                lines.append(row + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
