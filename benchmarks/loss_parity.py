"""Loss parity of sequence parallelism: the same training run at SP=1 (one process) and SP=P (P processes).

Both runs read the same samples (dp = 1 in both) from the same seed, so every step's loss must agree up to
floating-point reassociation; the script trains both with ``train.py``, compares the logged losses step by
step, and writes a table (and a PNG when matplotlib is installed) to ``benchmarks/results/``.

    # GPU (issue 6: 50 steps of tnl-0.4b, SP=1 on one GPU vs SP=2 on two; target: within 1e-3 relative)
    python benchmarks/loss_parity.py --sp 2 --steps 50 --tag gpu_tnl04b -- \
        --config configs/tnl-0.4b.yaml data.seq_len=16384
    # CPU (gloo, tiny model): the same check on any machine
    python benchmarks/loss_parity.py --sp 2 --steps 50 --tag cpu_tiny -- --config configs/debug.yaml

Arguments after ``--`` go to train.py for both runs (``parallel.sp``, ``trainer.max_steps``, ``trainer.devices``,
``trainer.log_every`` and ``trainer.out_dir`` are set by this script).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_RESTART_COUNT", "GROUP_RANK", "ROLE_RANK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(sp: int, steps: int, out_dir: Path, extra: list[str]) -> dict[int, float]:
    """Run train.py at SP=sp (sp processes when sp > 1) and return {step: train loss}."""
    common = [*extra, f"parallel.sp={sp}", f"trainer.max_steps={steps}", "trainer.log_every=1",
              "trainer.val_check_interval=null", "trainer.ckpt_every=0", "trainer.progress_bar=false",
              f"trainer.out_dir={out_dir}"]
    if sp == 1:
        cmd = [sys.executable, str(ROOT / "train.py"), *common, "trainer.devices=1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sp),
               "--master_port", str(_free_port()), str(ROOT / "train.py"), *common]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    logs = sorted(out_dir.glob("logs/version_*/metrics.csv"))
    if not logs:
        raise SystemExit(f"no metrics.csv under {out_dir}/logs (trainer.logger must be csv)")
    with open(logs[-1]) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sp", type=int, default=2, help="SP size of the second run (processes)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tag", default="run", help="names the result files: loss_parity_<tag>.md/.png")
    ap.add_argument("--work", default=str(ROOT / "runs" / "loss_parity"), help="directory for the two runs")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tol", type=float, default=1e-3, help="max relative difference to call it parity")
    ap.add_argument("train_args", nargs="*", help="after --: arguments for train.py")
    args = ap.parse_args(argv)
    if args.sp < 2:
        raise SystemExit(f"--sp must be >= 2, got {args.sp}")
    work = Path(args.work) / args.tag
    a = train(1, args.steps, work / "sp1", args.train_args)
    b = train(args.sp, args.steps, work / f"sp{args.sp}", args.train_args)
    steps = sorted(set(a) & set(b))
    if len(steps) < args.steps:
        raise SystemExit(f"expected {args.steps} logged steps in both runs, got {len(a)} and {len(b)}")
    rel = {s: abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps}
    worst = max(rel.values())

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
    os.makedirs(args.out, exist_ok=True)
    md = Path(args.out) / f"loss_parity_{args.tag}.md"
    lines = [f"# Loss parity: SP=1 vs SP={args.sp}, {args.steps} steps", "",
             f"device: {device}; torch {torch.__version__}; date {datetime.date.today()}; command: "
             f"`python benchmarks/loss_parity.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"max relative difference over {len(steps)} steps: **{worst:.2e}** "
             f"({'within' if worst <= args.tol else 'NOT within'} {args.tol:g})", "",
             f"| step | SP=1 loss | SP={args.sp} loss | rel. diff |", "|---|---|---|---|"]
    lines += [f"| {s} | {a[s]:.6f} | {b[s]:.6f} | {rel[s]:.1e} |" for s in steps]
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
        ax.plot(steps, [a[s] for s in steps], "-", label="SP=1 (1 process)")
        ax.plot(steps, [b[s] for s in steps], "--", label=f"SP={args.sp} ({args.sp} processes)")
        ax.set_ylabel("training loss")
        ax.set_title(f"Loss parity, {device}")
        ax.legend()
        ax.grid(alpha=0.3)
        bx.semilogy(steps, [max(rel[s], 1e-12) for s in steps], ".-")
        bx.axhline(args.tol, color="r", lw=0.8, ls=":")
        bx.set_ylabel("rel. diff")
        bx.set_xlabel("step")
        bx.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(md.with_suffix(".png"), dpi=110)
        print("wrote", md.with_suffix(".png"))
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
    print("wrote", md)
    return worst


if __name__ == "__main__":
    main()
