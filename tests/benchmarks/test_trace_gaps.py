"""benchmarks/trace_gaps.py on a hand-built trace whose gaps, launches and host ops are known."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from trace_gaps import attribute_gaps, gap_table, gpu_times  # noqa: E402


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def _trace():
    return {"traceEvents": [
        # host thread 1: a forward region launching k1, k2; then a sync; then an optimizer step launching k3
        _x("cpu_op", "Torch-Compiled Region", 0, 100),
        _x("cpu_op", "aten::mm", 5, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 6, 2, correlation=1),
        _x("cpu_op", "aten::mul", 20, 10),
        _x("cuda_runtime", "cudaLaunchKernel", 21, 2, correlation=2),
        _x("cuda_runtime", "cudaStreamSynchronize", 110, 80),
        _x("user_annotation", "Optimizer.step#AdamW.step", 195, 50),
        _x("cpu_op", "aten::_fused_adamw_", 200, 40),
        _x("cuda_driver", "cuLaunchKernel", 230, 3, correlation=3),
        # thread 2 (autograd engine): a backward node launching k4 long after k3 ended
        _x("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 300, 60, tid=2),
        _x("cpu_op", "aten::mm", 340, 10, tid=2),
        _x("cuda_runtime", "cudaLaunchKernel", 345, 2, tid=2, correlation=4),
        # GPU: k1 [10, 60), k2 [60, 180) (no gap), k3 [235, 250), k4 [350, 360); a memset overlapping k4
        _x("kernel", "k1", 10, 50, tid=7, correlation=1),
        _x("kernel", "k2", 60, 120, tid=7, correlation=2),
        _x("kernel", "k3", 235, 15, tid=7, correlation=3),
        _x("kernel", "k4", 350, 10, tid=7, correlation=4),
        _x("gpu_memset", "Memset", 355, 10, tid=8, correlation=99),
        _x("gpu_user_annotation", "forward", 10, 240, tid=7),  # a host range mirrored on the GPU: not an activity
        {"ph": "s", "name": "flow", "ts": 6, "id": 1},  # not a complete event: ignored
    ]}


def test_gaps_busy_and_attribution():
    res = attribute_gaps(_trace(), min_us=1.0)
    assert res["busy_us"] == pytest.approx(50 + 120 + 15 + 15)  # k4 and the memset overlap: union [350, 365)
    assert res["span_us"] == pytest.approx(365 - 10)
    assert res["n_gaps"] == 2 and res["gap_us"] == pytest.approx((235 - 180) + (350 - 250))
    by_op = {r["op"]: r for r in res["rows"]}
    assert set(by_op) == {"aten::_fused_adamw_", "aten::mm"}
    opt = by_op["aten::_fused_adamw_"]
    assert opt["phase"] == "Optimizer.step#AdamW.step > aten::_fused_adamw_" and opt["n"] == 1
    assert opt["gap_us"] == pytest.approx(55) and opt["host_bound_us"] == pytest.approx(230 - 180)
    assert opt["sync_us"] == pytest.approx(190 - 180)  # the sync ran 10 us into the gap
    assert opt["next_kernel"] == "k3" and opt["max_us"] == pytest.approx(55)
    bwd = by_op["aten::mm"]  # charged on the engine thread, not on thread 1's ops
    assert bwd["phase"].startswith("autograd::engine::evaluate_function: MmBackward0 > aten::mm")
    assert bwd["gap_us"] == pytest.approx(100) and bwd["host_bound_us"] == pytest.approx(345 - 250)
    assert bwd["sync_us"] == 0.0
    assert [r["op"] for r in res["rows"]] == ["aten::mm", "aten::_fused_adamw_"]  # largest first


def test_min_us_and_table():
    res = attribute_gaps(_trace(), min_us=60.0)
    assert [r["op"] for r in res["rows"]] == ["aten::mm"]  # the 55 us gap is counted but not attributed
    assert res["gap_us"] == pytest.approx(155)
    lines = gap_table(res, per=1)
    assert lines[0].startswith("GPU idle 0.15 ms per step in 2 gaps") and "`aten::mm`" in lines[-1]


def test_gpu_times_sum_activities_only():
    assert gpu_times(_trace()) == {"k1": 50.0, "k2": 120.0, "k3": 15.0, "k4": 10.0, "Memset": 10.0}
