"""Small communication helpers shared by the sequence-parallel ops.

All helpers take the process group explicitly (``None`` = the default group) and map group ranks to
global ranks with ``dist.get_global_rank`` for point-to-point ops, so they work on any subgroup,
contiguous or not.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

__all__ = [
    "group_size",
    "group_rank",
    "global_rank",
    "comm_device",
    "all_gather_flat",
    "isend",
    "irecv",
    "make_header",
    "start_header_exchange",
    "check_headers",
    "slopes_checksum",
    "set_consistency_checks",
    "consistency_checks_enabled",
]


def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) "
            "(torchrun sets the environment for it) before using seqpar.distributed"
        )
    return group if group is not None else dist.group.WORLD


def group_size(group=None) -> int:
    return dist.get_world_size(_group(group))


def group_rank(group=None) -> int:
    r = dist.get_rank(_group(group))
    if r < 0:
        raise ValueError("this process is not a member of the given process group")
    return r


def global_rank(group, group_rank_: int) -> int:
    """Global rank of ``group_rank_`` inside ``group`` (identity for the default group)."""
    g = _group(group)
    if g is dist.group.WORLD or g is None:
        return group_rank_
    return dist.get_global_rank(g, group_rank_)


def backend_name(group=None) -> str:
    return str(dist.get_backend(_group(group))).lower()


def comm_device(group, device: torch.device) -> torch.device:
    """Device on which tensors for ``group`` must live: CPU for a pure gloo group, else ``device``."""
    b = backend_name(group)
    if device.type != "cpu" and "gloo" in b and "nccl" not in b and device.type not in b:
        return torch.device("cpu")
    return device


# all_gather_single (torch >= 2.13) replaces the deprecated all_gather_into_tensor; older torch
# (the GPU machines run 2.11) only has the latter. Gloo implements both in current releases; if a
# backend rejects the single-tensor form we fall back to the list form (decided once per backend).
_SINGLE_OK: dict = {}


class _ListGatherWork:
    """Wraps an ``all_gather`` (list form) so that ``wait()`` also packs the result into one tensor."""

    def __init__(self, work, out: torch.Tensor, parts: List[torch.Tensor]):
        self.work, self.out, self.parts = work, out, parts

    def wait(self):
        self.work.wait()
        torch.stack(self.parts, 0, out=self.out.view(len(self.parts), -1))
        self.parts = []
        return True


def all_gather_flat(x: torch.Tensor, group=None, async_op: bool = True):
    """All-gather a 1-D tensor: returns ``(out [P, n], work)``; read ``out`` only after ``work.wait()``.

    With ``async_op=False`` the gather has completed on return (``work`` is None).
    """
    g = _group(group)
    P = dist.get_world_size(g)
    x = x.contiguous().view(-1)
    out = x.new_empty(P, x.numel())
    b = backend_name(g)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if _SINGLE_OK.get(b, True):
        try:
            work = fn(out.view(-1), x, group=g, async_op=async_op)
            _SINGLE_OK[b] = True
            return out, work
        except (RuntimeError, NotImplementedError) as e:  # backend without the single-tensor form
            if "not supported" not in str(e).lower() and "not implemented" not in str(e).lower():
                raise
            _SINGLE_OK[b] = False
    parts = [torch.empty_like(x) for _ in range(P)]
    work = dist.all_gather(parts, x, group=g, async_op=async_op)
    if async_op:
        return out, _ListGatherWork(work, out, parts)
    torch.stack(parts, 0, out=out)
    return out, None


def isend(t: torch.Tensor, group, dst_group_rank: int):
    return dist.isend(t.contiguous(), dst=global_rank(group, dst_group_rank), group=_group(group))


def irecv(t: torch.Tensor, group, src_group_rank: int):
    return dist.irecv(t, src=global_rank(group, src_group_rank), group=_group(group))


def as_group(group: Optional[object]):
    """The group itself, or the default group for ``None`` (after checking dist is initialised)."""
    return _group(group)


# --------------------------------------------------------------------------------------------
# Consistency header: what every rank of an SP group must agree on, exchanged before the state
# --------------------------------------------------------------------------------------------
# One int64 [HEADER_LEN] per rank, all-gathered (fixed size, the same collective in every mode) before the
# state exchange, whose message sizes depend on B, H, D, E: ranks that disagree get a ValueError naming the
# argument on every rank instead of a gloo abort (size mismatch), a hang (allgather vs ring) or silently
# wrong outputs (slopes, cu_seqlens, scale). The slopes checksum is computed on the slopes' device and the
# header travels on the communication device, so the only host synchronisation is reading the gathered
# header (none on a gloo group with CPU tensors; for device tensors it is the copy the exchange needs).
HEADER_MAGIC = 0x53504844_0001  # "SPHD", version 1
HEADER_FIELDS = ("magic", "status", "mode", "B", "H", "D", "E", "dtype", "scale", "cu_seqlens", "slopes")
HEADER_LEN = len(HEADER_FIELDS)
_MODE_CODES = {"allgather": 1, "ring": 2}
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_CHECKS = {"enabled": True}


def set_consistency_checks(enabled: bool) -> None:
    """Turn the SP header exchange on (default) or off. Must be the same on every rank (benchmarks only)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _CHECKS["enabled"] = enabled


def consistency_checks_enabled() -> bool:
    return _CHECKS["enabled"]


def slopes_checksum(slopes: torch.Tensor) -> torch.Tensor:
    """Exact, order-sensitive int64 checksum of ``slopes`` [H] computed on its device (no host sync) -> [1].

    The float64 bit pattern of every slope is split into two 32-bit halves, each weighted by a fixed odd
    weight < 2^16 and summed (no overflow for H < 2^14): any change of one slope changes the sum.
    """
    bits = slopes.detach().reshape(-1).to(torch.float64).view(torch.int64)
    n = bits.numel()
    i = torch.arange(n, device=bits.device, dtype=torch.int64)
    w_lo = (i * 40503 + 7919) % 65536 | 1
    w_hi = (i * 25033 + 104729) % 65536 | 1
    lo = torch.bitwise_and(bits, 0xFFFFFFFF)
    hi = torch.bitwise_and(torch.bitwise_right_shift(bits, 32), 0xFFFFFFFF)
    return ((lo * w_lo).sum() + (hi * w_hi).sum() + n).reshape(1)


def _int_checksum(values) -> int:
    import hashlib
    from array import array

    return int.from_bytes(hashlib.blake2b(array("q", [int(x) for x in values]).tobytes(), digest_size=7).digest(),
                          "little")


def _float_bits(x: float) -> int:
    import struct

    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def make_header(*, mode: str, q: Optional[torch.Tensor], v: Optional[torch.Tensor], slopes: Optional[torch.Tensor],
                scale: Optional[float], cu_seqlens: Optional[List[int]], status: int = 0) -> torch.Tensor:
    """This rank's header (int64 [HEADER_LEN]) on the slopes' device.

    ``status`` 1 marks a rank whose own inputs failed validation (the other fields may then be 0);
    ``cu_seqlens`` is the host list of global offsets (None: no packing).
    """
    B = H = D = E = dt = 0
    if status == 0:
        B, _, H, D = q.shape
        E, dt = v.shape[-1], _DTYPE_CODES.get(q.dtype, 99)
    host = [HEADER_MAGIC, int(status), _MODE_CODES.get(mode, 0), B, H, D, E, dt,
            _float_bits(scale) if status == 0 else 0,
            (_int_checksum(cu_seqlens) if cu_seqlens is not None else -1) if status == 0 else 0]
    head = torch.tensor(host, dtype=torch.int64)
    if status != 0 or slopes is None:
        return torch.cat([head, head.new_zeros(1)])
    dev = slopes.device
    return torch.cat([head.to(dev, non_blocking=True), slopes_checksum(slopes)])


def start_header_exchange(header: torch.Tensor, group=None):
    """All-gather ``header`` (int64 [HEADER_LEN]) asynchronously: ``(out [P, HEADER_LEN], work)``."""
    if header.dtype != torch.int64 or header.shape != (HEADER_LEN,):
        raise ValueError(f"header must be int64 [{HEADER_LEN}], got {header.dtype} {tuple(header.shape)}")
    cdev = comm_device(group, header.device)
    return all_gather_flat(header if header.device == cdev else header.to(cdev), group, async_op=True)


_WHAT = {
    "mode": "mode ('allgather' or 'ring')",
    "B": "B (batch size, dim 0 of q/k/v)",
    "H": "H (heads, dim 2 of q/k/v)",
    "D": "D (head dim of q/k, dim 3)",
    "E": "E (head dim of v, dim 3)",
    "dtype": "dtype of q/k/v",
    "scale": "scale",
    "cu_seqlens": "cu_seqlens (global document offsets, or None)",
    "slopes": "slopes (values differ)",
}


def check_headers(gathered: torch.Tensor, rank: int, op: str = "sp_lightning_attn") -> None:
    """Raise the same ValueError on every rank when the gathered headers [P, HEADER_LEN] disagree.

    A rank whose own inputs were invalid (status 1) raises its own error; the others name that rank.
    """
    rows = gathered.to("cpu").tolist()
    P = len(rows)
    f = {name: [row[i] for row in rows] for i, name in enumerate(HEADER_FIELDS)}
    if any(m != HEADER_MAGIC for m in f["magic"]):
        raise ValueError(f"{op}: the SP ranks run different seqpar versions or calls (header magic {f['magic']})")
    bad = [i for i, s in enumerate(f["status"]) if s != 0]
    if bad:
        if f["status"][rank] != 0:
            return  # the caller raises this rank's own validation error
        raise ValueError(f"{op}: SP rank(s) {bad} of the group rejected their own inputs (see their error); "
                         f"this rank's inputs were valid")
    for name in HEADER_FIELDS[2:]:
        vals = f[name]
        if len(set(vals)) == 1:
            continue
        if name == "mode":
            inv = {c: m for m, c in _MODE_CODES.items()}
            shown = [inv.get(x, "?") for x in vals]
        elif name == "dtype":
            inv = {c: str(d).replace("torch.", "") for d, c in _DTYPE_CODES.items()}
            shown = [inv.get(x, "?") for x in vals]
        elif name == "scale":
            import struct

            shown = [struct.unpack("<d", struct.pack("<q", x))[0] for x in vals]
        elif name == "cu_seqlens":
            shown = ["None" if x == -1 else f"#{x & 0xFFFF:04x}" for x in vals]
        elif name == "slopes":
            shown = [f"#{x & 0xFFFF:04x}" for x in vals]
        else:
            shown = vals
        per_rank = ", ".join(f"rank {i}: {s}" for i, s in enumerate(shown))
        raise ValueError(f"{op}: the {P} ranks of the SP group disagree on {_WHAT[name]} ({per_rank}); every "
                         f"rank must pass the same B, H, D, E, dtype, mode, scale, slopes and cu_seqlens")
