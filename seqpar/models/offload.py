"""Host memory of ``TNLConfig.activation_offload``: formula, measurement, and an up-front check.

With activation checkpointing every block keeps only its input (the residual stream x [B, T, d_model]);
``activation_offload`` moves those inputs to (pinned) host memory while the forward runs and copies each
back when its block is recomputed. Host bytes of one training forward:

    n_layers * B * T * d_model * itemsize(x)        (+ the small cu_seqlens tensor per layer when packed)

``x`` keeps its dtype (the copy is exact): fp32 under bf16 autocast with fp32 weights (the residual
stream accumulates in fp32; rounding it to bf16 would change the recomputed block and its gradient),
bf16 when the model itself is bf16. tnl-0.4b, 1M tokens, fp32: 24 * 2^20 * 1024 * 4 B = 96 GiB.
For longer sequences use ``TNLConfig.seq_chunk`` (then the formula holds with T = seq_chunk).
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Optional

import torch

__all__ = ["HostMemoryError", "offload_host_bytes", "available_host_bytes", "check_offload_fits",
           "save_on_host", "host_offload_stats", "reset_host_offload_stats"]

# fraction of the available host memory the pinned copies may take (the rest: the process, data loaders)
HOST_FRACTION = 0.9


class HostMemoryError(RuntimeError):
    """The pinned host copies of ``activation_offload`` would not fit in the available host memory."""


def offload_host_bytes(config, batch_size: int, seq_len: int, dtype: torch.dtype) -> int:
    """Host bytes ``activation_offload`` pins for one forward: n_layers * B * T * d_model * itemsize(dtype)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.n_layers * batch_size * seq_len * config.d_model * itemsize


def available_host_bytes() -> Optional[int]:
    """Host memory available to this process (psutil, else /proc/meminfo MemAvailable, else sysconf), plus the
    pinned blocks torch's host allocator holds free in its cache; None when unknown."""
    avail = None
    try:
        import psutil  # optional

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        avail = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        if avail is None:
            try:
                avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return None
    if torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats"):
        try:  # pinned memory freed by the previous step stays in torch's cache: it is reusable
            st = torch.cuda.host_memory_stats()
            avail += max(0, int(st.get("reserved_bytes.current", 0)) - int(st.get("allocated_bytes.current", 0)))
        except (RuntimeError, AttributeError, TypeError):
            pass
    return avail


def check_offload_fits(config, batch_size: int, seq_len: int, dtype: torch.dtype,
                       available: Optional[int] = None) -> int:
    """Raise :class:`HostMemoryError` when the offloaded block inputs exceed ``HOST_FRACTION`` of the available
    host memory (instead of the process being killed mid-forward); returns the bytes needed."""
    need = offload_host_bytes(config, batch_size, seq_len, dtype)
    avail = available_host_bytes() if available is None else available
    if avail is not None and need > HOST_FRACTION * avail:
        gib = 2.0 ** 30
        raise HostMemoryError(
            f"activation_offload needs {need / gib:.1f} GiB of pinned host memory (n_layers {config.n_layers} x "
            f"B {batch_size} x T {seq_len} x d_model {config.d_model} x {torch.empty((), dtype=dtype).element_size()} "
            f"bytes) but only {avail / gib:.1f} GiB of host memory is available (limit {HOST_FRACTION:.0%}); "
            f"use TNLConfig.seq_chunk (memory of one chunk for any T), a shorter sequence, or no offload"
        )
    return need


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.total = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.current += n
            self.total += n
            self.peak = max(self.peak, self.current)

    def sub(self, n: int) -> None:
        with self.lock:
            self.current -= n


_STATS = _Stats()


def host_offload_stats() -> dict:
    """Bytes held in host memory by :func:`save_on_host` in this process: current, peak, total (since reset)."""
    return {"current": _STATS.current, "peak": _STATS.peak, "total": _STATS.total}


def reset_host_offload_stats() -> None:
    """Reset the peak and total of :func:`host_offload_stats` (as ``torch.cuda.reset_peak_memory_stats``)."""
    with _STATS.lock:
        _STATS.peak = _STATS.current
        _STATS.total = 0


class save_on_host(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu`` that also counts the host bytes (:func:`host_offload_stats`).

    Saved tensors are copied, dtype unchanged, to (pinned when ``pin_memory``) host memory and back to their
    device when unpacked (CPU tensors are copied too, as ``save_on_cpu`` does).
    """

    def __init__(self, pin_memory: bool = False):
        def pack(t: torch.Tensor):
            packed = torch.empty(t.size(), dtype=t.dtype, layout=t.layout,
                                 pin_memory=pin_memory and t.device.type != "cpu")
            packed.copy_(t)
            n = packed.numel() * packed.element_size()
            _STATS.add(n)
            weakref.finalize(packed, _STATS.sub, n)
            return (t.device, packed)

        def unpack(p):
            device, t = p
            return t.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)
