"""Helpers for multi-process tests: spawn real ranks (gloo on CPU, nccl on GPU) on a free port.

A worker signals failure by raising: ``torch.multiprocessing.spawn`` then terminates the other
ranks and re-raises in the parent (the process group has a short timeout, so a rank stuck in a
collective also fails instead of hanging the suite).
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world, port, backend, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, world: int, *args, backend: str = "gloo") -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; re-raise any worker's exception."""
    mp.spawn(_entry, args=(fn, world, free_port(), backend, args), nprocs=world, join=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    e = rel_err(got, ref)
    assert e <= tol, f"{name}: relative error {e:.3g} > {tol:.1g}"
