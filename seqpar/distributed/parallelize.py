"""Parallelisms as functions of the layout (torchtitan's shape): ``parallelize(model, dims, ...)``.

* SP: every :class:`~seqpar.models.GatedLinearAttention` holds its SP context (``sp_group``, ``sp_mode``);
  :func:`set_sp_context` is the one place that sets it (``TransNormerLLM(config, sp_group=...)`` and
  ``model.sp_group = ...`` go through it too).
* FSDP2: ``fully_shard`` per ``TNLBlock`` and at the root (the ``TransNormerLLM``) over the flattened
  dp x sp mesh (``ParallelDims.fsdp_mesh``): parameters replicated over SP ranks are sharded like DP replicas.
  The reduce-scatter averages gradients over the dp x sp world, which with the model's loss convention
  (rank loss = P * local_sum / global_count) is exactly the single-process gradient of the global-batch mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .mesh import ParallelDims

__all__ = ["parallelize", "set_sp_context", "SP_MODES"]

SP_MODES = ("allgather", "ring")


def _models(module: nn.Module):
    from seqpar.models.transnormer import TransNormerLLM

    return [m for m in module.modules() if isinstance(m, TransNormerLLM)]


def set_sp_context(module: nn.Module, group, mode: str) -> nn.Module:
    """Give every attention layer under ``module`` the SP process group ``group`` (None: no SP) and the state
    exchange ``mode`` ("allgather" | "ring"). Returns ``module``."""
    from seqpar.models.transnormer import GatedLinearAttention, TransNormerLLM

    if mode not in SP_MODES:
        raise ValueError(f"sp_mode must be 'allgather' or 'ring', got {mode!r}")
    if group is not None and not isinstance(group, torch.distributed.ProcessGroup):
        raise TypeError(f"sp_group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    for m in module.modules():
        if isinstance(m, (GatedLinearAttention, TransNormerLLM)):
            m.__dict__["_sp_group"] = group  # plain attributes: not parameters, buffers or submodules
            m.__dict__["_sp_mode"] = mode
    return module


def _mp_policy(param_dtype, reduce_dtype, mp_policy):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mp_policy is not None:
        if param_dtype is not None or reduce_dtype is not None:
            raise ValueError("give either mp_policy or param_dtype / reduce_dtype, not both")
        if not isinstance(mp_policy, MixedPrecisionPolicy):
            raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, got {type(mp_policy).__name__}")
        return mp_policy
    for name, dt in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dt is not None and not isinstance(dt, torch.dtype):
            raise TypeError(f"{name} must be a torch.dtype or None, got {dt!r}")
    if param_dtype is not None and reduce_dtype is None:
        reduce_dtype = torch.float32  # low-precision parameters, fp32 gradient reduction
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    sp_mode: str = "allgather",
    fsdp: bool = False,
    reshard_after_forward: bool = True,
    mp_policy=None,
    param_dtype: Optional[torch.dtype] = None,
    reduce_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Apply sequence parallelism (and FSDP2) to ``model`` in place; returns ``model``.

    Args:
        model: a ``TransNormerLLM`` or a module holding exactly one (e.g. ``LitLM``).
        dims: the layout; its mesh must be built (``dims.build_mesh("cuda" | "cpu")``, collective).
        sp_mode: "allgather" (LASP-2 prefix scan) or "ring".
        fsdp: shard parameters / gradients / optimizer state over ``dims.fsdp_mesh`` (FSDP2 ``fully_shard``
            per TNLBlock and at the TransNormerLLM root). Build the optimizer after this call.
        reshard_after_forward: FSDP2: free the gathered parameters after each block's forward (re-gather in
            the backward); False keeps them (more memory, less communication).
        mp_policy / param_dtype / reduce_dtype: FSDP2 mixed precision (``param_dtype=torch.bfloat16`` gives
            bf16 parameters in compute with fp32 gradient reduction).
    Inputs of the parallelized model: the rank's contiguous shard of T (``shard_sequence`` over
    ``dims.sp_group``), ``cu_seqlens`` global. ``loss`` is the global-batch mean.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(dims, ParallelDims):
        raise TypeError(f"dims must be a seqpar.distributed.ParallelDims, got {type(dims).__name__}")
    if not isinstance(fsdp, bool) or not isinstance(reshard_after_forward, bool):
        raise TypeError("fsdp and reshard_after_forward must be bools")
    if sp_mode not in SP_MODES:
        raise ValueError(f"sp_mode must be 'allgather' or 'ring', got {sp_mode!r}")
    tnl = _models(model)
    if len(tnl) != 1:
        raise ValueError(f"model must be or hold exactly one TransNormerLLM, found {len(tnl)}")
    if not dims.mesh_built:
        raise RuntimeError("parallelize needs the mesh: call dims.build_mesh(device_type) on every rank first")
    set_sp_context(model, dims.sp_group if dims.sp_enabled else None, sp_mode)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from seqpar.models.transnormer import TNLBlock

        root = tnl[0]
        mesh = dims.fsdp_mesh
        policy = _mp_policy(param_dtype, reduce_dtype, mp_policy)
        for block in root.layers:
            if not isinstance(block, TNLBlock):
                raise TypeError(f"expected TNLBlock layers, got {type(block).__name__}")
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        # the root keeps embedding, final norm and lm head; its parameters are used last in the backward,
        # so they stay gathered after the forward (FSDP2's default for the root)
        fully_shard(root, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    elif any(v is not None for v in (mp_policy, param_dtype, reduce_dtype)):
        raise ValueError("mp_policy / param_dtype / reduce_dtype apply to fsdp=True only")
    return model
