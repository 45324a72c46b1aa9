"""The feature map phi of q and k (``qk_act``): o = LA(phi(q), phi(k), v).

The Triton kernels apply phi on load and return the gradients of the pre-activations (``FUSED``: one read of
q and k each way instead of an activation pass that writes phi(q), phi(k) and a backward pass that reads them
again); the other activations (and the torch backend) apply :func:`apply` before the operator.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

QK_ACTS = ("none", "silu", "relu", "elu1", "sigmoid")
# kernel codes of the activations the kernels apply (phi(0) = 0: masked tiles stay zero); see kernels._act
FUSED = {"none": 0, "silu": 1, "relu": 2}


def check(qk_act: Optional[str]) -> str:
    """``qk_act`` resolved ("none" for None); a ValueError naming the argument otherwise."""
    if qk_act is None:
        return "none"
    if not isinstance(qk_act, str) or qk_act not in QK_ACTS:
        raise ValueError(f"qk_act must be one of {QK_ACTS} or None, got {qk_act!r}")
    return qk_act


def apply(x: torch.Tensor, qk_act: str) -> torch.Tensor:
    """phi(x) in torch (the reference): x [..., D] -> [..., D], same dtype."""
    if qk_act == "silu":
        return F.silu(x)
    if qk_act == "relu":
        return F.relu(x)
    if qk_act == "elu1":
        return 1.0 + F.elu(x)
    if qk_act == "sigmoid":
        return torch.sigmoid(x)
    return x
