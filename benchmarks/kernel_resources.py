"""Registers, spills, shared memory and occupancy of each Triton kernel of one seqpar fwd+bwd step (GPU).

    python benchmarks/kernel_resources.py --shape 4,16,32768,128 [--variants base fwdreg168 ...]

For each launch-config variant (names from bench_kernel.TUNE_VARIANTS) it runs one forward+backward step,
records the compiled kernel of every launch, and prints a markdown table: registers per thread, spilled
bytes, static shared memory, warps, and the resident programs per SM that registers and shared memory allow
(Hopper: 64K registers, 227 KB shared memory per SM, 64 warps). Occupancy, not bandwidth, limits the chunk
walks (benchmarks/NOTES_kernel.md), so this is the table to read before and after a launch-config change.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

REGS_PER_SM = 65536
SMEM_PER_SM = 227 * 1024
WARPS_PER_SM = 64


def programs_per_sm(n_regs: int, shared: int, warps: int) -> tuple:
    """(by registers, by shared memory, resident) programs per SM on a Hopper SM."""
    regs = -(-max(n_regs, 1) // 8) * 8  # allocation unit: 8 registers per thread (256 per warp)
    by_regs = REGS_PER_SM // (regs * 32 * warps)
    by_smem = SMEM_PER_SM // (shared + 1024) if shared else 32  # 1 KB per block reserved by the driver
    return by_regs, by_smem, min(by_regs, by_smem, WARPS_PER_SM // warps, 32)


def record_step(shape, device, cfg):
    """Run one fwd+bwd step with the LaunchConfig cfg; return [(kernel name, launch options, compiled kernel)]
    in launch order."""
    from seqpar.kernels.lightning_attn import launch
    from seqpar.kernels.lightning_attn.chunk import chunk_lightning_attn

    B, H, T, D = shape
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    s = torch.linspace(0.01, 0.5, H, device=device)
    do = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    seen = []
    orig = launch._call

    def spy(kernel, grid, *args, **kwargs):
        ck = orig(kernel, grid, *args, **kwargs)
        opts = {key: val for key, val in kwargs.items() if key in ("num_warps", "num_stages", "maxnreg")}
        seen.append((getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", "?")), opts, ck))
        return ck

    launch._call = spy  # the launchers look _call up in their module at every launch
    try:
        chunk_lightning_attn(q, k, v, s, D ** -0.5, config=cfg)[0].backward(do)
        torch.cuda.synchronize()
    finally:
        launch._call = orig
    return seen


def table(shape, variants, device) -> str:
    from bench_kernel import variant_configs

    configs = variant_configs(variants)
    lines = [
        f"B,H,T,D = {','.join(map(str, shape))}, bf16, {torch.cuda.get_device_name()}",
        "",
        "| variant | kernel | warps | stages | maxnreg | registers | spilled bytes | shared KB | programs/SM by regs, smem | resident warps/SM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in configs.items():
        try:
            for kname, opts, ck in record_step(shape, device, cfg):
                n_regs = getattr(ck, "n_regs", None)
                if n_regs is None and hasattr(ck, "_init_handles"):
                    ck._init_handles()
                n_regs, n_spills = int(ck.n_regs), int(ck.n_spills)
                shared = int(getattr(ck.metadata, "shared", 0))
                warps = int(getattr(ck.metadata, "num_warps", opts.get("num_warps", 4)))
                r, sm, res = programs_per_sm(n_regs, shared, warps)
                lines.append(
                    f"| {name} | {kname} | {warps} | {opts.get('num_stages', '')} | {opts.get('maxnreg', '')} | "
                    f"{n_regs} | {n_spills} | {shared / 1024:.1f} | {r}, {sm} | {res * warps} |"
                )
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {name} | error {type(e).__name__}: {str(e)[:100]} | | | | | | | | |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4,16,32768,128", help="B,H,T,D")
    ap.add_argument("--variants", nargs="*", default=["base"], help="names from bench_kernel.TUNE_VARIANTS")
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_resources.py needs a CUDA GPU (it reads the compiled kernels' resource use)")
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 4:
        raise SystemExit(f"--shape must be B,H,T,D, got {args.shape!r}")
    text = table(shape, args.variants, "cuda")
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(f"Command: `python benchmarks/kernel_resources.py {' '.join(sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
