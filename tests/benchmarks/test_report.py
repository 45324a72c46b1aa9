"""benchmarks/report.py: the GPU clock sampler's parsing, its summary, a sampler command that is missing, and the
nvidia-smi id of the process's GPU."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import torch  # noqa: E402
from report import GPUClock, parse_clock_samples, smi_id  # noqa: E402


def test_parse_clock_samples_skips_malformed_lines():
    text = "1980, 124.5\n1650, 688.2\n[N/A], [N/A]\n1395, [N/A]\n\n"
    assert parse_clock_samples(text) == [(1980.0, 124.5), (1650.0, 688.2), (1395.0, None)]


def test_sampler_summary_from_a_stand_in_command():
    cmd = [sys.executable, "-c", "print('1700, 690.0'); print('1500, 700.0'); print('1900, 650.0')"]
    with GPUClock(cmd=cmd) as clk:
        clk._proc.wait(timeout=30)  # the stand-in prints and exits; nvidia-smi would run until terminated
    assert clk.median_mhz() == 1700.0
    assert clk.summary() == "SM 1700 MHz (1500-1900), 690 W"


def test_sampler_without_the_command_samples_nothing():
    with GPUClock(cmd=["/nonexistent/nvidia-smi"]) as clk:
        pass
    assert clk.samples == [] and clk.summary() == "" and clk.median_mhz() is None


def test_smi_id_names_the_visible_gpu_by_uuid_or_bus_id(monkeypatch):
    """CUDA index 0 of a process with CUDA_VISIBLE_DEVICES=3 is nvidia-smi's GPU 3: the id is the UUID, else the
    PCI bus id, never the CUDA index (which would sample another, idle GPU)."""
    class Props:
        uuid = "1b2c-77"

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    assert smi_id(0) == "GPU-1b2c-77"

    class Bus:
        pci_domain_id, pci_bus_id, pci_device_id = 0, 0x1A, 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Bus())
    assert smi_id(0) == "00000000:1a:00.0"

    def no_cuda(i):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_cuda)
    assert smi_id(2) == "2"


def test_time_steps_counts_synced_and_back_to_back_steps():
    """warmup + steps synced steps (losses of all, times of the last ``steps``), then ``steps`` back to back with one
    sync at the end."""
    from report import time_steps

    calls, syncs = [], []

    def step():
        calls.append(len(syncs))
        return torch.tensor(float(len(calls)))

    r = time_steps(step, warmup=2, steps=3, sync=lambda: syncs.append(1))
    assert len(calls) == 2 + 3 + 3
    assert r["losses"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert len(syncs) == 2 * 5 + 2  # before and after each synced step, around the back-to-back run
    assert calls[5:] == [11, 11, 11]  # the back-to-back steps run with no sync between them
    assert r["step_s"] >= 0 and r["issue_s"] <= r["step_s"] + 1e-3 and r["b2b_s"] >= 0
    assert r["clock"] in ("-",) or r["clock"].startswith("SM ")


def test_time_steps_samples_the_clock_over_the_timed_steps_only():
    """The warmup (compilation: the GPU idles at its top clock) runs before the clock starts sampling."""
    from report import time_steps

    events = []

    class Clock:
        def __enter__(self):
            events.append("enter")
            return self

        def __exit__(self, *exc):
            events.append("exit")
            return False

        def summary(self):
            return "SM 1600 MHz (1500-1700), 690 W"

    def step():
        events.append("step")
        return torch.tensor(0.0)

    r = time_steps(step, warmup=2, steps=3, sync=lambda: None, clock=Clock)
    assert events == ["step"] * 2 + ["enter"] + ["step"] * 6 + ["exit"]
    assert r["clock"] == "SM 1600 MHz (1500-1700), 690 W" and len(r["losses"]) == 5
