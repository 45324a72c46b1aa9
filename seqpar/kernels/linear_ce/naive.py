"""Reference: full logits, then summed cross entropy (any dtype; float64 for tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int = -100) -> torch.Tensor:
    """sum over valid rows of CE(h @ weight^T, labels): h [N, d], weight [V, d], labels [N] -> scalar.

    Logits in the inputs' dtype, the log-softmax in fp32 at least (fp64 inputs stay fp64).
    """
    logits = h @ weight.t()
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
