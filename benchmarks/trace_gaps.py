"""Where the GPU waits for the host: idle gaps on the GPU timeline of a torch-profiler chrome trace, each charged
to the host op that launched the kernel ending the gap.

For every pair of consecutive GPU activities (kernels, memcpys, memsets; the union of all streams) with idle time
between them, the launch of the second one (its ``cuda_runtime`` / ``cuda_driver`` event, matched by correlation
id) is looked up on its host thread, and the gap is charged to the chain of host ops enclosing that launch (the
outermost ones, which name the phase: a compiled region, an autograd backward node, ``Optimizer.step``, ...) and to
the innermost op. The part of the gap before the launch call began is host-bound (the host had not asked yet);
the rest is launch latency. Host syncs (``cudaStreamSynchronize``, ``cudaMemcpy*`` to host, ...) that the launching
thread ran between the start of the gap and the launch are counted too: a sync that returns when the GPU drains is
what usually leaves the GPU idle.

    python benchmarks/trace_gaps.py trace.json [--min-us 5] [--top 15]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, List

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
HOST_OP_CATS = ("cpu_op", "user_annotation", "python_function")
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "cuStreamSynchronize", "cuCtxSynchronize")


def _events(trace) -> List[dict]:
    evs = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in evs if e.get("ph") == "X" and "ts" in e and "dur" in e]


def gpu_times(trace) -> Dict[str, float]:
    """Total duration (us) per name of the GPU activities (kernels, memcpys, memsets) of a chrome trace; host
    annotations mirrored on the GPU timeline (``gpu_user_annotation``) are not activities and are left out."""
    out: Dict[str, float] = defaultdict(float)
    for e in _events(trace):
        if e.get("cat") in GPU_CATS:
            out[e.get("name", "")] += float(e["dur"])
    return dict(out)


def attribute_gaps(trace, min_us: float = 5.0, depth: int = 2) -> Dict[str, object]:
    """trace: a chrome-trace dict (``prof.export_chrome_trace``) or its event list. Returns
    {"busy_us", "span_us", "gap_us", "n_gaps", "rows"}: rows (largest total first) of
    {"phase": outermost ``depth`` host ops joined by " > ", "op": innermost host op, "n", "gap_us",
    "host_bound_us", "sync_us", "max_us", "next_kernel"}; gaps shorter than ``min_us`` are ignored (counted in
    ``gap_us`` but not in rows)."""
    evs = _events(trace)
    gpu = sorted((e for e in evs if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    launches = {}
    for e in evs:
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    ops_by_tid = defaultdict(list)
    syncs_by_tid = defaultdict(list)
    for e in evs:
        tid = (e.get("pid"), e.get("tid"))
        if e.get("cat") in HOST_OP_CATS:
            ops_by_tid[tid].append(e)
        if e.get("cat") in LAUNCH_CATS and e.get("name", "").split("_v")[0] in SYNC_NAMES:
            syncs_by_tid[tid].append(e)

    # pass 1: the gaps, the launch of the activity after each, and the GPU busy time (union of activities)
    gaps = []  # (gap_us, start of the gap, activity after it, its launch or None)
    busy = gap_total = 0.0
    n_gaps = 0
    end = None
    for e in gpu:
        s, d = float(e["ts"]), float(e["dur"])
        if end is not None and s > end:
            gap_total += s - end
            n_gaps += 1
            if s - end >= min_us:
                gaps.append((s - end, end, e, launches.get(e.get("args", {}).get("correlation"))))
        busy += d if end is None else max(0.0, s + d - max(end, s))
        end = s + d if end is None else max(end, s + d)

    # pass 2: the chain of host ops enclosing each launch, by one sweep per thread (host ops nest properly)
    chains = {}
    queries = defaultdict(list)
    for i, (_, _, _, launch) in enumerate(gaps):
        if launch is not None:
            queries[(launch.get("pid"), launch.get("tid"))].append((float(launch["ts"]), i))
    for tid, qs in queries.items():
        ops = sorted(ops_by_tid.get(tid, []), key=lambda o: (float(o["ts"]), -float(o["dur"])))
        stack, j = [], 0
        for t, i in sorted(qs):
            while j < len(ops) and float(ops[j]["ts"]) <= t:
                o = ops[j]
                while stack and float(stack[-1]["ts"]) + float(stack[-1]["dur"]) < float(o["ts"]):
                    stack.pop()
                stack.append(o)
                j += 1
            while stack and float(stack[-1]["ts"]) + float(stack[-1]["dur"]) < t:
                stack.pop()
            chains[i] = [o["name"] for o in stack if float(o["ts"]) + float(o["dur"]) >= t]

    rows: Dict[tuple, dict] = {}
    for i, (gap, g0, e, launch) in enumerate(gaps):
        if launch is None:
            key, host_bound, sync = ("(launch not in trace)", "(unknown)"), 0.0, 0.0
        else:
            tid, lt = (launch.get("pid"), launch.get("tid")), float(launch["ts"])
            chain = chains.get(i, [])
            phase = " > ".join(n[:60] for n in chain[:depth]) or "(no host op)"
            key = (phase, chain[-1][:60] if chain else "(no host op)")
            host_bound = min(gap, max(0.0, lt - g0))
            sync = sum(min(float(c["ts"]) + float(c["dur"]), lt) - max(float(c["ts"]), g0)
                       for c in syncs_by_tid.get(tid, [])
                       if float(c["ts"]) < lt and float(c["ts"]) + float(c["dur"]) > g0)
        r = rows.setdefault(key, dict(phase=key[0], op=key[1], n=0, gap_us=0.0, host_bound_us=0.0,
                                      sync_us=0.0, max_us=0.0, next_kernel=""))
        r["n"] += 1
        r["gap_us"] += gap
        r["host_bound_us"] += host_bound
        r["sync_us"] += sync
        if gap > r["max_us"]:
            r["max_us"], r["next_kernel"] = gap, e.get("name", "")[:60]
    span = (end - float(gpu[0]["ts"])) if gpu else 0.0
    return dict(busy_us=busy, span_us=span, gap_us=gap_total, n_gaps=n_gaps,
                rows=sorted(rows.values(), key=lambda r: -r["gap_us"]))


def gap_table(res: Dict[str, object], per: int = 1, top: int = 15) -> List[str]:
    """Markdown lines for ``attribute_gaps``' result; ``per``: divide the times by this (e.g. steps profiled)."""
    lines = [f"GPU idle {res['gap_us'] / per / 1e3:.2f} ms per step in {res['n_gaps'] / per:.0f} gaps per step "
             f"(busy {res['busy_us'] / per / 1e3:.2f} ms, span {res['span_us'] / per / 1e3:.2f} ms); "
             "gaps charged to the host ops around the launch of the kernel after the gap:", "",
             f"| gap ms | gaps (in {per} steps) | host-bound ms | in host syncs ms | largest us "
             "| phase (outer host ops) | innermost op | kernel after the largest |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"][:top]:
        lines.append(f"| {r['gap_us'] / per / 1e3:.2f} | {r['n']} | {r['host_bound_us'] / per / 1e3:.2f} "
                     f"| {r['sync_us'] / per / 1e3:.2f} | {r['max_us']:.0f} | `{r['phase']}` | `{r['op']}` "
                     f"| `{r['next_kernel']}` |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--per", type=int, default=1, help="steps in the trace (times are divided by it)")
    args = ap.parse_args()
    with open(args.trace) as f:
        res = attribute_gaps(json.load(f), args.min_us)
    print("\n".join(gap_table(res, args.per, args.top)))


if __name__ == "__main__":
    main()
