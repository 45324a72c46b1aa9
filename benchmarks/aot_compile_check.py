"""Compile seqpar's Triton kernels for a GPU with another Triton version, without a GPU.

Two steps:

    record   run the operator's forward and backward on the CPU under the Triton interpreter and write every
             kernel launch's signature (argument types, constexprs, launch options) to a JSON file;
    compile  in a Python whose ``triton`` is the version to check (e.g. the device image's 3.6, installed
             with ``pip install --no-deps --target DIR triton==3.6.0`` and put first on PYTHONPATH), load
             seqpar/kernels/lightning_attn/kernels.py by path (no torch needed) and compile each recorded
             signature for ``--arch`` (default sm_90), printing its shared memory.

    TRITON_INTERPRET=1 python benchmarks/aot_compile_check.py record --out /tmp/launches.json
    PYTHONPATH=/tmp/t36 python benchmarks/aot_compile_check.py compile /tmp/launches.json [--against old.py]

This catches frontend and backend errors of a kernel change (syntax the older Triton lacks, type errors,
shared memory over the limit) on a CPU-only machine; ``--against`` shows whether a refactor changed the
generated code. It does not run the kernels: correctness comes from the interpreter tests, speed from the GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "seqpar", "kernels", "lightning_attn", "kernels.py")
_DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "torch.float64": "fp64",
           "torch.int32": "i32", "torch.int64": "i64", "torch.bool": "i1"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _arg_type(a) -> str:
    import torch

    if isinstance(a, torch.Tensor):
        return "*" + _DTYPES[str(a.dtype)]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(a).__name__}")


def record(out: str, shapes, configs) -> int:
    """Run fwd+bwd of chunk_lightning_attn for each (B, T, H, D, E, dtype, varlen, learnable slopes) case under
    each LaunchConfig field override of ``configs``; write the distinct launch signatures to ``out``; return
    how many."""
    import torch

    sys.path.insert(0, os.path.join(HERE, ".."))
    from seqpar.kernels.lightning_attn import launch
    from seqpar.kernels.lightning_attn.chunk import chunk_lightning_attn
    from seqpar.kernels.lightning_attn.tuning import LaunchConfig

    seen = {}
    orig = launch._call

    def spy(kernel, grid, *args, fast_launch=False, **kwargs):
        fn = getattr(kernel, "fn", kernel)
        names = list(kernel.arg_names)
        sig = {names[i]: _arg_type(a) for i, a in enumerate(args)}
        const = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
        for k in const:
            sig[k] = "constexpr"
        opts = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        key = json.dumps([fn.__name__, sig, const, opts], sort_keys=True)
        seen[key] = dict(kernel=fn.__name__, signature=sig, constexprs=const, options=opts)
        return orig(kernel, grid, *args, fast_launch=fast_launch, **kwargs)

    launch._call = spy
    try:
        for (B, T, H, D, E, dtype, varlen, learn), over in ((c, o) for c in shapes for o in configs):
            g = torch.Generator().manual_seed(0)
            dt = getattr(torch, dtype)
            q, k = (torch.randn(B, T, H, D, generator=g).to(dt).requires_grad_() for _ in range(2))
            v = torch.randn(B, T, H, E, generator=g).to(dt).requires_grad_()
            s = (torch.rand(H, generator=g) * 0.5).requires_grad_(learn)
            cu = torch.tensor([0, T // 3, T], dtype=torch.int32) if varlen else None
            if varlen:
                q, k, v = (x.detach()[:1].requires_grad_() for x in (q, k, v))
            o, _ = chunk_lightning_attn(q, k, v, s, D ** -0.5, cu_seqlens=cu, config=LaunchConfig(**over))
            o.float().square().sum().backward()
    finally:
        launch._call = orig
    with open(out, "w") as f:
        json.dump(list(seen.values()), f, indent=1)
    return len(seen)


def _opcodes(ptx: str) -> Counter:
    """Instruction counts per PTX opcode (directives, labels and debug lines left out)."""
    c = Counter()
    for line in ptx.splitlines():
        t = line.strip().split()
        if t and not t[0].startswith((".", "$", "{", "}", ")", "//")):
            c[t[0].rstrip(";")] += 1
    return c


def compile_all(path: str, arch: int, against: str = None) -> int:
    """Compile every recorded launch with the imported triton for CUDA sm_<arch>, with the constexprs a GPU
    launch would take; return the number of failures. against: another kernels.py (e.g. before a refactor),
    compiled for the same launches; the table says whether the PTX opcode counts are the same."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def load(file, name):
        spec = importlib.util.spec_from_file_location(name, file)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return m

    mod = load(KERNELS, "seqpar_kernels_aot")
    ref = load(against, "seqpar_kernels_against") if against else None
    with open(path) as f:
        launches = json.load(f)
    target = GPUTarget("cuda", arch, 32)
    print(f"triton {triton.__version__}, target sm_{arch}, {len(launches)} launch signatures")
    print("| kernel | constexprs | warps | stages | shared KB | result |" + (" PTX vs --against |" if ref else ""))
    print("|---|---|---|---|---|---|" + ("---|" if ref else ""))
    bad = 0
    for r in launches:
        fn = getattr(mod, r["kernel"])
        names = list(fn.arg_names)
        sig = {n: r["signature"][n] for n in names if n in r["signature"]}
        missing = [n for n in names if n not in sig]
        if missing:  # parameters with defaults the launch left out
            bad += 1
            print(f"| {r['kernel']} | | | | | | | missing arguments {missing} |")
            continue
        opts = {k: v for k, v in r["options"].items() if v is not None}
        if "UP" in r["constexprs"]:  # the interpreter upcasts bf16 dots (UP); a GPU launch never does
            r["constexprs"]["UP"] = False
        short = ",".join(f"{k}={v}" for k, v in sorted(r["constexprs"].items()))
        try:
            ck = triton.compile(ASTSource(fn, sig, constexprs=r["constexprs"]), target=target, options=opts)
            same = ""
            if ref is not None:
                ck0 = triton.compile(ASTSource(getattr(ref, r["kernel"]), sig, constexprs=r["constexprs"]),
                                     target=target, options=opts)
                same = _opcodes(ck.asm["ptx"]) == _opcodes(ck0.asm["ptx"])
                same = " same opcode counts |" if same else " DIFFERENT |"
            print(f"| {r['kernel']} | {short} | {opts.get('num_warps', '')} | {opts.get('num_stages', '')} | "
                  f"{getattr(ck.metadata, 'shared', 0) / 1024:.1f} | ok |{same}")
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the others
            bad += 1
            msg = str(e).strip().splitlines()[-1][:100] if str(e).strip() else type(e).__name__
            print(f"| {r['kernel']} | {short} | {opts.get('num_warps', '')} | {opts.get('num_stages', '')} | | "
                  f"FAILED: {type(e).__name__}: {msg} |")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compile")
    c.add_argument("launches")
    c.add_argument("--arch", type=int, default=90)
    c.add_argument("--against", default=None, help="another kernels.py to compare PTX opcode counts with")
    args = ap.parse_args()
    if args.cmd == "record":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SystemExit("record runs the kernels under the interpreter: set TRITON_INTERPRET=1")
        cases = [(2, 130, 2, 128, 128, "bfloat16", False, False), (1, 200, 2, 64, 64, "bfloat16", True, True),
                 (1, 96, 2, 128, 128, "float32", False, True), (1, 64, 2, 96, 160, "float16", False, False)]
        configs = [{}, {"lookback": False}, {"lookback": True}, {"fuse_dkdv": False, "lookback": False},
                   {"dslopes": "rowsum"}]
        n = record(args.out, cases, configs)
        print(f"wrote {n} launch signatures to {args.out}")
    else:
        sys.exit(1 if compile_all(args.launches, args.arch, args.against) else 0)


if __name__ == "__main__":
    main()
