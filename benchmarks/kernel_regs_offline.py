"""Registers, stack (spills) and shared memory of the chunk-walk kernels for sm_90, compiled without a GPU.

    python benchmarks/kernel_regs_offline.py [--kernels lb dq dv] [--tma] [--stages 2] [--warps 8] [--maxnreg 128]
                                             [--bt 128]

Other block sizes from Python: ``resources(load_kernels(KERNELS), "lb", True, warps=8, BC=128)``.

Compiles each walk with ``triton.compile`` for an sm_90 target, with the argument attributes a launch at
B4 H16 D=E=128 bf16 gets (16-byte aligned pointers, H and the head dims multiples of 16), and reads the
cubin's resource usage with the ``cuobjdump`` that Triton's wheel carries. The kernel file is loaded by path
(``--kernels-file``), so a modified copy can be compared with the package's; run it under the Triton version
of the GPU machine (a venv with that triton wheel: the kernels module imports only triton) to see what that
compiler does. Registers and spills decide the walks' occupancy (benchmarks/NOTES_kernel.md); the GPU's own
figures come from ``benchmarks/kernel_resources.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "seqpar", "kernels", "lightning_attn", "kernels.py")
BF = "*bf16"

# per walk: kernel name, pointer types, float args, constexprs (the default launch at D = E = 128), warps,
# stages, int args that are multiples of 16
WALKS = {
    "lb": ("_lb_walk_kernel",
           dict(a_ptr=BF, b_ptr=BF, c_ptr=BF, out_ptr=BF, x_ptr="*i32", g_ptr="*i32", init_ptr="*i32",
                fin_ptr="*i32", chain_ptr="*fp32", sync_ptr="*i32", slopes_ptr="*fp32", cu_ptr="*i32",
                tab_ptr="*i32", sbuf_ptr="*fp32", segoff_ptr="*i32"),
           ("alpha", "gamma", "beta"),
           dict(BT=64, BK=128, BC=64, REVERSE=False, TRANS_INIT=False, HAS_INIT=False, STORE_FIN=False,
                STORE_SBUF=True, COMPUTE_DG=False, IS_VARLEN=False, STATE=0, PREC="tf32", UP=False),
           4, 2, ("H", "DA", "DC")),
    "dq": ("_bwd_dqdk_kernel",
           dict(q_ptr=BF, k_ptr=BF, v_ptr=BF, do_ptr=BF, dq_ptr=BF, dk_ptr=BF, hbuf_ptr="*fp32", gbuf_ptr="*fp32",
                dgq_ptr="*i32", dgk_ptr="*i32", slopes_ptr="*fp32", cu_ptr="*i32", segseq_ptr="*i32",
                segstart_ptr="*i32"),
           ("scale",),
           dict(BT=64, BD=64, BE=128, IS_VARLEN=False, STATE=0, PREC="tf32", UP=False, COMPUTE_DG=False,
                DO_DK=False, STORE_G=True),
           4, 2, ("H", "D", "E")),
    "dv": ("_bwd_dv_kernel",
           dict(q_ptr=BF, k_ptr=BF, v_ptr=BF, do_ptr=BF, dv_ptr=BF, dk_ptr=BF, dgk_ptr="*i32", gbuf_ptr="*fp32",
                slopes_ptr="*fp32", cu_ptr="*i32", segseq_ptr="*i32", segstart_ptr="*i32"),
           ("scale",),
           dict(BT=64, BD=128, BE=128, IS_VARLEN=False, STATE=0, PREC="tf32", UP=False, DO_DK=True,
                COMPUTE_DG=False),
           8, 2, ("H", "D", "E")),
}


def load_kernels(path: str):
    spec = importlib.util.spec_from_file_location("la_kernels_offline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def signature(fn, ptrs: dict, floats, consts: dict) -> dict:
    """Triton signature of fn: constexprs, the given pointer types, fp32 floats, i32 for every other argument."""
    return {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32") for n in fn.arg_names}


def resources(mod, walk: str, tma: bool, stages=None, warps=None, maxnreg=None, **constexprs) -> dict:
    """{"REG", "STACK", "SHARED_KB"} of one walk compiled for sm_90 (tma: the TMA constexpr, where it has one;
    stages, warps: WALKS' values when None; maxnreg: a register cap; constexprs: e.g. BC=128 over WALKS')."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, ptrs, floats, consts, w, st, div16 = WALKS[walk]
    fn = getattr(mod, name)
    unknown = sorted(set(constexprs) - set(consts))
    if unknown:
        raise ValueError(f"constexprs: {unknown} are not constexprs of {name} ({sorted(consts)})")
    consts = dict(consts, **constexprs)
    if "TMA" in fn.arg_names:
        consts["TMA"] = tma
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ptrs or n in div16}
    src = ASTSource(fn=fn, signature=signature(fn, ptrs, floats, consts), constexprs=consts, attrs=attrs)
    options = {"num_warps": warps or w, "num_stages": stages or st}
    if maxnreg:
        options["maxnreg"] = maxnreg
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    try:
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump gave no resource usage for {name}: {text[:200]!r}")
    return {"REG": int(m.group(1)), "STACK": int(m.group(2)), "SHARED_KB": ck.metadata.shared // 1024}


def main(argv=None):
    import triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", nargs="*", default=list(WALKS), help=f"walks: {', '.join(WALKS)}")
    ap.add_argument("--kernels-file", default=KERNELS, help="the kernels module to compile (a path)")
    ap.add_argument("--tma", action="store_true", help="compile the TMA variant of each walk")
    ap.add_argument("--stages", type=int, default=None,
                    help="num_stages (default: WALKS', the default launch's without TMA; with TMA the dk+dv walk "
                         "launches at KernelLaunch.tma_stages = 3)")
    ap.add_argument("--warps", type=int, default=None, help="num_warps (default: WALKS', the default launch's)")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap (ptxas -maxnreg)")
    ap.add_argument("--bt", type=int, default=None, help="tokens per walk step, BT (default: WALKS', CHUNK)")
    args = ap.parse_args(argv)
    bad = [w for w in args.kernels if w not in WALKS]
    if bad:
        ap.error(f"--kernels: {bad} not among {list(WALKS)}")
    if args.bt is not None and (args.bt < 16 or args.bt & (args.bt - 1)):
        ap.error(f"--bt: a power of two >= 16, got {args.bt}")
    mod = load_kernels(args.kernels_file)
    print(f"triton {triton.__version__}, sm_90, {args.kernels_file}")
    extra = {} if args.bt is None else {"BT": args.bt}
    print("| walk | TMA | BT | warps | registers | stack bytes | shared KB |\n|---|---|---|---|---|---|---|")
    for walk in args.kernels:
        r = resources(mod, walk, args.tma, args.stages, args.warps, args.maxnreg, **extra)
        bt = extra.get("BT", WALKS[walk][3]["BT"])
        warps = args.warps or WALKS[walk][4]
        print(f"| {WALKS[walk][0]} | {args.tma} | {bt} | {warps} | {r['REG']} | {r['STACK']} | {r['SHARED_KB']} |",
              flush=True)


if __name__ == "__main__":
    main()
