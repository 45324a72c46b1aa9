"""Plots (PNG) from the markdown tables in benchmarks/results/, for the README.

    pip install -e ".[bench]" && python benchmarks/plot_results.py

* train_throughput_<gpu>.png: tokens/GPU/s vs sequence length, TNL (Lightning Attention-2) vs LLaMA-SDPA,
  from results/train_throughput_<gpu>.md (benchmarks/bench_train.py);
* train_longest_chunked_<gpu>.png: peak GPU memory and tokens/s vs sequence length of sequence-chunked
  training (TNLConfig.seq_chunk), from results/train_longest_chunk*_<gpu>.md (bench_train.py --longest --seq-chunk);
* kernel_<gpu>.png: fwd+bwd time per token vs sequence length of the attention operators (B*T*H fixed
  at B4 H16 up to 32K, then B1 T128K), from results/kernel_<gpu>.md (benchmarks/bench_kernel.py).
Only what the tables hold is drawn; nothing is interpolated.
"""
from __future__ import annotations

import glob
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rows(path):
    """Table rows of a markdown file as lists of stripped cells (header and rule lines skipped)."""
    out = []
    for line in open(path):
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out.append(cells)
    return out


def device_of(path):
    m = re.search(r"device: ([^;]+);", open(path).read()) or re.search(r"# Kernel benchmark: (.+)", open(path).read())
    return m.group(1).strip() if m else os.path.basename(path)


def plot_train(path):
    series = {}
    for r in rows(path):
        if len(r) not in (8, 9, 10) or not r[2].isdigit() or not r[5].isdigit():
            continue
        model, attn, T, tps = r[0], r[1], int(r[2]), float(r[5])
        pts = series.setdefault((model, attn), [])
        if T not in [p[0] for p in pts]:  # a repeated measurement (a later run's reference row): keep the first
            pts.append((T, tps))
    fig, ax = plt.subplots(figsize=(7, 5.0))
    for (model, attn), pts in sorted(series.items()):
        pts.sort()
        style = "-o" if "Lightning" in attn else "--s"
        ax.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], style, label=f"{model}, {attn}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T (tokens per step fixed at 128K)")
    ax.set_ylabel("training throughput, K tokens/GPU/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Training speed vs length, one {device_of(path)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    out = path[:-3] + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_kernel(path):
    series = {}
    for r in rows(path):
        if len(r) != 6 or r[0].count(",") != 3:
            continue
        B, H, T, D = r[0].split(",")
        try:
            ms = float(r[3])
        except ValueError:
            continue
        if D != "128" or H != "16":
            continue
        T = int(T[:-1]) * 1024 if T.endswith("K") else int(T)
        series.setdefault(r[1], []).append((T, ms * 1e3 / (int(B) * T)))  # microseconds per token
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], "-o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (H16 D128, B4; B1 at 128K)")
    ax.set_ylabel("fwd+bwd time per token, ns (lower is better)")
    ax.set_title(f"Attention operator fwd+bwd, bf16, {device_of(path)}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    out = path[:-3] + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_longest_chunked(paths, gpu):
    """Two panels: peak GiB and tokens/s vs T, one line per (seq_chunk, block checkpointing) table."""
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for n, path in enumerate(paths):
        pts = []
        for r in rows(path)[1:]:
            if len(r) < 8 or not r[1].isdigit() or not r[5].replace(".", "").isdigit() or r[2] == "none":
                continue
            pts.append((int(r[1]), float(r[7]), float(r[5]), r[2], r[3]))
        if not pts:
            continue
        label = f"seq_chunk {pts[0][3]}, block ckpt {pts[0][4]}"
        T = [p[0] for p in pts]
        ax_m.plot(T, [p[1] for p in pts], "o-", label=label)
        ax_t.plot(T, [p[2] for p in pts], "o-", label=label)
        ref = [r for r in rows(path)[1:] if len(r) >= 8 and r[2] == "none"]
        if ref:
            ax_t.axhline(float(ref[0][5]), ls="--", lw=1, color="gray",
                         label="32K unchunked, checkpointed" if n == 0 else None)
    for ax, yl in ((ax_m, "peak GPU memory (GiB)"), (ax_t, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in one sequence (B = 1)")
        ax.set_ylabel(yl)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"tnl-0.4b, exact sequence-chunked training, {gpu}")
    fig.tight_layout()
    out = os.path.join(HERE, f"train_longest_chunked_{gpu}.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main():
    made = []
    chunked = {}
    for p in sorted(glob.glob(os.path.join(HERE, "train_longest_chunk*_*.md"))):
        chunked.setdefault(os.path.splitext(p)[0].rsplit("_", 1)[-1], []).append(p)
    for gpu, paths in chunked.items():
        made.append(plot_longest_chunked(paths, gpu))
    for p in sorted(glob.glob(os.path.join(HERE, "train_throughput_*.md"))):
        made.append(plot_train(p))
    for p in sorted(glob.glob(os.path.join(HERE, "kernel_h*.md"))):
        if p.endswith("_v1.md"):
            continue
        made.append(plot_kernel(p))
    for m in made:
        print("wrote", m)


if __name__ == "__main__":
    main()
