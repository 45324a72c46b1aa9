"""Segment layout of one call (:class:`_Plan`), its cache (:func:`get_plan`) and segment sizing.

Every sequence (a batch row, or a document of a packed batch) is cut into chunks of CHUNK tokens, and
runs of ``seg_chunks`` chunks form a segment; segments never cross a sequence boundary. A plan holds the
segment counts and the device tables the kernels read; it is built once per shape (dense) or per
cu_seqlens tensor (varlen) and launch config, and reused by every layer of a step and the backward.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

from . import varlen
from .tuning import LaunchConfig

CHUNK = 64  # tokens per chunk (BT)


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _p2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b) (triton.cdiv is a JIT function: slow to call from Python)."""
    return -(-a // b)


def _blk(cfg: LaunchConfig, kind: str, x: int, other: int) -> int:
    """Block of the split dim x for a kernel kind (the other dim `other` is held whole, or is split the
    same way): at most the kind's BLK, and at most 128 x 128 elements of an fp32 state block."""
    return max(16, min(getattr(cfg, kind).BLK, _p2(x), 16384 // _p2(other)))


def _seg_chunks_auto(cfg: LaunchConfig, n_chunks: int, H: int, D: int, E: int, device) -> int:
    """Chunks per segment chosen from the problem size: on a GPU enough programs for cfg.waves waves of
    the output kernel, at most cfg.seg_max chunks; problems that fill those waves with seg_max-chunk
    segments get longer segments and fewer waves (cfg.seg_long). The count is then rounded to the nearest
    power of two (at most the cap that applied), so that power-of-two lengths split into whole segments and
    the programs fill whole waves. On the CPU: 4."""
    if device.type != "cuda":
        return 4
    sms = _num_sms(device)
    neb = _cdiv(E, _blk(cfg, "fwd", E, D))
    work = n_chunks * H * neb
    cap = cfg.seg_max
    seg_chunks = min(cap, work // (cfg.waves * sms))
    long = cfg.seg_long
    if long is not None and seg_chunks == cfg.seg_max:
        cap = long.seg_max
        seg_chunks = min(cap, work // (long.waves * sms))
    return min(cap, _p2_nearest(max(1, seg_chunks)))


def _p2_nearest(n: int) -> int:
    """The power of two nearest to n >= 1 (in log scale: 3 -> 4, 5 -> 4, 6 -> 8, 11 -> 8, 12 -> 16)."""
    lo = 1 << (n.bit_length() - 1)
    return lo if n * n < 2 * lo * lo else 2 * lo


class _Plan:
    """Segment layout of one call: sequences, segments and the tables the kernels read.

    seg_chunks: chunks per segment (None: cfg.seg_chunks, else automatic, see _seg_chunks_auto).
    """

    def __init__(self, B: int, T: int, H: int, D: int, E: int, cu_seqlens, device, cfg: LaunchConfig,
                 seg_chunks: Optional[int] = None):
        if not isinstance(cfg, LaunchConfig):
            raise TypeError(f"cfg must be a LaunchConfig, got {type(cfg).__name__}")
        self.B, self.T, self.H, self.D, self.E = B, T, H, D, E
        self.is_varlen = cu_seqlens is not None
        self._lens_t = self._t_local = None
        if self.is_varlen:
            offs = varlen.offsets(cu_seqlens)
            self.N = len(offs) - 1
            lens = [b - a for a, b in zip(offs, offs[1:])]
        else:
            self.N = B
            lens = [T] * B
        self.lens = lens
        n_chunks = sum(_cdiv(L, CHUNK) for L in lens)
        if seg_chunks is None:
            seg_chunks = cfg.seg_chunks
        explicit_seg = seg_chunks
        if seg_chunks is None:
            seg_chunks = _seg_chunks_auto(cfg, n_chunks, H, D, E, device)
        self.seg_chunks = int(seg_chunks)
        self.SEG_T = self.seg_chunks * CHUNK
        # segments of the look-back walks: the scan's in the default "fwd" mode (its segment states are
        # stored for the backward), else the given segment length or cfg.lb_chunks chunks
        if cfg.lookback == "fwd":
            self.lb_chunks = self.seg_chunks
        else:
            self.lb_chunks = int(explicit_seg) if explicit_seg is not None else int(cfg.lb_chunks)
        self._lb = None
        if self.is_varlen:
            nseg = [_cdiv(L, self.SEG_T) for L in lens]
            segoff = [0]
            for x in nseg:
                segoff.append(segoff[-1] + x)
            self.NSEG = segoff[-1]
            self.NS = 0
            seq, st = [], []
            for n_, (a, m) in enumerate(zip(offs[:-1], nseg)):
                seq += [n_] * m
                st += [a + i * self.SEG_T for i in range(m)]
            self.cu = cu_seqlens.to(device=device, dtype=torch.int32)
            self.segoff = torch.tensor(segoff, dtype=torch.int32, device=device)
            self.segseq = torch.tensor(seq if seq else [0], dtype=torch.int32, device=device)
            self.segstart = torch.tensor(st if st else [0], dtype=torch.int32, device=device)
        else:
            self.NS = _cdiv(T, self.SEG_T)
            self.NSEG = B * self.NS
            self.cu = self.segoff = self.segseq = self.segstart = None

    def lb_layout(self, device):
        """Walk positions of the look-back kernels: (PF_T, NP, table, n_pos, empty).

        PF_T tokens per segment; non-varlen: NP segments per sequence, n_pos = N * NP, table None;
        varlen: table [n_pos, 2] int32 of (sequence, position), position-major, NP = 0.
        empty: indices of empty sequences (their final state is the initial one), or None.
        """
        if self._lb is None:
            pf_t = self.lb_chunks * CHUNK
            nps = [_cdiv(L, pf_t) for L in self.lens]
            empty = [n_ for n_, m in enumerate(nps) if m == 0]
            empty = torch.tensor(empty, dtype=torch.long, device=device) if empty else None
            if not self.is_varlen:
                self._lb = (pf_t, nps[0] if nps else 0, None, sum(nps), empty)
            else:
                rows = [(n_, p_) for p_ in range(max(nps, default=0)) for n_, m in enumerate(nps) if p_ < m]
                tab = torch.tensor(rows if rows else [(0, 0)], dtype=torch.int32, device=device)
                self._lb = (pf_t, 0, tab, len(rows), empty)
        return self._lb

    def t_local(self, device) -> torch.Tensor:
        """[B*T] position of each token inside its sequence (fp32), built once per plan."""
        if self._t_local is None:
            if not self.is_varlen:
                self._t_local = torch.arange(self.T, device=device, dtype=torch.float32).repeat(self.B)
            else:
                ids = torch.repeat_interleave(torch.arange(self.N, device=device), self.lens_t(device).long(),
                                              output_size=self.T)
                self._t_local = (torch.arange(self.T, device=device) - self.cu.long()[ids]).float()
        return self._t_local

    def lens_t(self, device) -> torch.Tensor:
        """[N] sequence lengths (fp32) on the device, built once per plan."""
        if self._lens_t is None:
            self._lens_t = torch.tensor(self.lens, dtype=torch.float32).to(device, non_blocking=True)
        return self._lens_t


# Plans of dense calls by shape and settings (varlen plans live on their cu_seqlens tensor).
_DENSE_PLANS: dict = {}


def _plan_key(B, T, H, D, E, device, seg_chunks, cfg: LaunchConfig) -> tuple:
    """Everything a plan depends on: the shape, the device and the segment settings of cfg."""
    return (B, T, H, D, E, str(device), seg_chunks) + cfg.plan_key


def get_plan(B, T, H, D, E, cu_seqlens, device, cfg: LaunchConfig, seg_chunks=None) -> _Plan:
    """The plan of one call, built once per shape (dense) or per cu_seqlens tensor (varlen) and config:
    every layer of a step, and the backward, reuse it without reading cu_seqlens again."""
    key = _plan_key(B, T, H, D, E, device, seg_chunks, cfg)
    if cu_seqlens is not None:
        return varlen.cached(cu_seqlens, ("plan",) + key,
                             lambda _: _Plan(B, T, H, D, E, cu_seqlens, device, cfg, seg_chunks))
    plan = _DENSE_PLANS.get(key)
    if plan is None:
        if len(_DENSE_PLANS) > 256:
            _DENSE_PLANS.clear()
        plan = _DENSE_PLANS[key] = _Plan(B, T, H, D, E, None, device, cfg, seg_chunks)
    return plan
