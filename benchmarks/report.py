"""The markdown result files of the benchmarks: a header (device, versions, date, command) and the write."""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch


def header(title: str, script: str, device: Optional[str] = None) -> List[str]:
    """Lines opening a result file: the title, then device, torch and triton versions, date and the command
    (``python benchmarks/<script>`` with this process's arguments). device: None for the current GPU (or CPU)."""
    import triton

    if device is None:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return [f"# {title}", "",
            f"device: {device}; torch {torch.__version__}, triton {triton.__version__}; date {datetime.date.today()}; "
            f"command: `python benchmarks/{script} {' '.join(sys.argv[1:])}`", ""]


def write(out_dir: str, filename: str, lines: List[str]) -> str:
    """Write lines to out_dir/filename (creating out_dir), print them, return the path."""
    text = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    return path


def parse_overrides(text: str, flag: str = "--set") -> dict:
    """'key=value,key2=value2' -> {key: value} with ints, floats, true/false and none parsed (TNLConfig overrides).
    Raises SystemExit naming ``flag`` on an item without '='."""
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag}: {item!r} is not key=value")
        low = raw.lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low in ("none", "null"):
            value = None
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    value = raw
        out[key.strip()] = value
    return out


def smi_id(index: int = 0) -> str:
    """nvidia-smi's id of CUDA device ``index`` of this process: its UUID ("GPU-..."), else its PCI bus id. nvidia-smi
    numbers every GPU of the host, while CUDA numbers only the visible ones (CUDA_VISIBLE_DEVICES), so the
    CUDA index names another GPU where the two differ. Falls back to the index without CUDA."""
    try:
        import torch

        props = torch.cuda.get_device_properties(index)
    except Exception:  # noqa: BLE001 - no CUDA: nothing to sample, the command then finds no GPU
        return str(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return text if text.startswith("GPU-") else f"GPU-{text}"
    if hasattr(props, "pci_bus_id"):
        return f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
    return str(index)


class GPUClock:
    """Samples the GPU's SM clock (MHz) and power draw (W) with ``nvidia-smi`` every ``period_ms`` while the
    block runs: an H200 under training load sits at its power cap with the SM clock below the 1830 MHz that the
    989 TFLOP/s peak assumes, so a throughput figure is read with the clock it ran at.

        with report.GPUClock() as clk:
            ... timed steps ...
        clk.summary()  # "SM 1650 MHz (1395-1980), 688 W" or "" without nvidia-smi

    ``cmd``: the sampling command (tests pass a stand-in); without nvidia-smi nothing is sampled."""

    def __init__(self, period_ms: int = 200, index: int = 0, cmd: Optional[List[str]] = None):
        self.cmd = cmd or ["nvidia-smi", f"--id={smi_id(index)}", "--query-gpu=clocks.sm,power.draw",
                           "--format=csv,noheader,nounits", f"-lms={period_ms}"]
        self.samples: List[tuple] = []
        self._proc = None

    def __enter__(self):
        import subprocess
        import threading

        self._lines: List[str] = []
        self._first = threading.Event()
        try:
            self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except (FileNotFoundError, PermissionError):
            self._proc = None
            return self

        def read(stream):
            for line in stream:
                self._lines.append(line)
                self._first.set()
            self._first.set()

        self._reader = threading.Thread(target=read, args=(self._proc.stdout,), daemon=True)
        self._reader.start()
        # nvidia-smi takes a while to start: the block is timed only once it samples, so that its samples
        # cover the block (a sampler still starting when a short block ends samples the idle GPU after it)
        self._first.wait(timeout=10)
        return self

    def __exit__(self, *exc):
        if self._proc is None:
            return False
        exited = self._proc.poll() is not None
        n = len(self._lines)  # what was sampled while the block ran; a line printed on termination is not
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a sampler that does not stop is killed
            self._proc.kill()
        self._reader.join(timeout=5)
        self.samples = parse_clock_samples("".join(self._lines if exited else self._lines[:n]))
        return False

    def median_mhz(self) -> Optional[float]:
        return _median([s[0] for s in self.samples])

    def summary(self) -> str:
        """'SM <median> MHz (<min>-<max>), <median power> W' over the samples, '' when there are none."""
        if not self.samples:
            return ""
        mhz = [s[0] for s in self.samples]
        watts = [s[1] for s in self.samples if s[1] is not None]
        power = f", {_median(watts):.0f} W" if watts else ""
        return f"SM {_median(mhz):.0f} MHz ({min(mhz):.0f}-{max(mhz):.0f}){power}"


def parse_clock_samples(text: str) -> List[tuple]:
    """Lines 'clock_mhz, power_w' (nvidia-smi csv, noheader, nounits) -> [(mhz, watts or None)]; malformed
    lines (e.g. '[N/A]') are skipped."""
    out = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            mhz = float(parts[0])
        except (ValueError, IndexError):
            continue
        try:
            watts = float(parts[1]) if len(parts) > 1 else None
        except ValueError:
            watts = None
        out.append((mhz, watts))
    return out


def _median(xs: List[float]) -> Optional[float]:
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def time_steps(step: Callable[[], torch.Tensor], warmup: int, steps: int,
               sync: Callable[[], None] = torch.cuda.synchronize, clock: Optional[Callable[[], "GPUClock"]] = None) -> dict:
    """Time ``step`` (one training step, returning its loss): ``warmup`` synced steps (compilation, autotuning),
    then under :class:`GPUClock` ``steps`` synced steps (each starts on an idle device) and ``steps`` issued back
    to back with one sync at the end (a loop that logs rarely). The clock samples only the timed steps, not the
    warmup's compilation, when the GPU idles at its top clock. Returns {"step_s": median synced step, "issue_s":
    median host time to issue one, "b2b_s": mean back-to-back step, "losses": [float] of every synced step,
    "clock": the clock summary or "-"}. ``clock``: the sampler's factory (tests pass a stand-in)."""
    times, issue, losses = [], [], []

    def synced():
        sync()
        t0 = time.perf_counter()
        loss = step()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        losses.append(loss.item())
        return t2 - t0, t1 - t0

    for _ in range(warmup):
        synced()
    with (clock or GPUClock)() as clk:
        for _ in range(steps):
            t, i = synced()
            times.append(t)
            issue.append(i)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        b2b = (time.perf_counter() - t0) / steps
    return dict(step_s=statistics.median(times), issue_s=statistics.median(issue), b2b_s=b2b, losses=losses,
                clock=clk.summary() or "-")
