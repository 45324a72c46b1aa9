"""Host-side views of ``cu_seqlens``, read once per tensor and reused by every layer of a step.

Reading the offsets of a device tensor is a host sync. A model passes the same ``cu_seqlens`` tensor
to each of its layers (and its backward), so the offsets, their validation and anything derived from
them (kernel plans, the SP layer's local offsets) are kept on the tensor object itself and rebuilt only
when the tensor is modified in place (``_version``). The cache lives and dies with the tensor: a new
batch's tensor is read once, the next layers hit the cache. Keyed by the object, never by data_ptr
(a freshly allocated tensor may reuse the address of a freed one).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Tuple

import torch

# Number of host reads of a cu_seqlens tensor (one per new tensor or in-place change); tests read it.
STATS = {"reads": 0}

_ATTR = "_seqpar_varlen"


def _entry(cu_seqlens: torch.Tensor) -> Dict[Hashable, Any]:
    """The per-tensor cache dict, reset when the tensor was modified in place."""
    ent = getattr(cu_seqlens, _ATTR, None)
    if ent is None or ent["version"] != cu_seqlens._version:
        STATS["reads"] += 1
        ent = {"version": cu_seqlens._version, "offsets": tuple(int(x) for x in cu_seqlens.tolist())}
        setattr(cu_seqlens, _ATTR, ent)
    return ent


def offsets(cu_seqlens: torch.Tensor) -> Tuple[int, ...]:
    """cu_seqlens as a tuple of python ints (one host read per tensor and in-place version)."""
    return _entry(cu_seqlens)["offsets"]


def cached(cu_seqlens: torch.Tensor, key: Hashable, build: Callable[[Tuple[int, ...]], Any]) -> Any:
    """build(offsets), computed once per (tensor version, key) and kept on the tensor."""
    ent = _entry(cu_seqlens)
    if key not in ent:
        ent[key] = build(ent["offsets"])
    return ent[key]
