"""Data x sequence parallel layout: ``ParallelDims`` -> 2-D ``DeviceMesh(("dp", "sp"))`` and the flattened
``("dp_sp",)`` mesh that FSDP2 shards parameters over. The one owner of the layout: sizes, checks, meshes,
groups and rank coordinates.

Ranks are laid out row-major on a ``(dp, sp)`` grid, so every SP group is a block of contiguous
ranks ``[i*sp, (i+1)*sp)`` (on one host when sp divides the GPUs per node: the state exchange stays
on NVLink) and DP groups are strided (``{j, j+sp, j+2sp, ...}``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ParallelDims"]


def _check_pos_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return x


class ParallelDims:
    """Sizes of the data-parallel and sequence-parallel dimensions.

    Args:
        dp: data-parallel size; ``None`` or ``-1`` infers it as ``world_size // sp``.
        sp: sequence-parallel size (ranks sharing one sequence), default 1.
        world_size: total number of ranks; default: ``torch.distributed``'s world size when it is
            initialised, else ``dp * sp``.
    Raises:
        ValueError when a size is not a positive int, sp does not divide the world size, or
        dp * sp != world_size.
    """

    def __init__(self, dp: Optional[int] = None, sp: int = 1, world_size: Optional[int] = None):
        sp = _check_pos_int("sp", sp)
        if world_size is None:
            if dist.is_available() and dist.is_initialized():
                world_size = dist.get_world_size()
            elif dp is None or dp == -1:
                raise ValueError("cannot infer dp: give dp or world_size, or initialise torch.distributed first")
            else:
                world_size = _check_pos_int("dp", dp) * sp
        world_size = _check_pos_int("world_size", world_size)
        if world_size % sp:
            divisors = [k for k in range(1, world_size + 1) if world_size % k == 0]
            raise ValueError(f"sp={sp} must divide the world size {world_size} (choose among {divisors})")
        if dp is None or dp == -1:
            dp = world_size // sp
        dp = _check_pos_int("dp", dp)
        if dp * sp != world_size:
            raise ValueError(f"dp * sp must equal the world size: {dp} * {sp} = {dp * sp} != {world_size}")
        self.dp, self.sp, self.world_size = dp, sp, world_size
        self._mesh = None
        self._fsdp_mesh = None

    def __repr__(self) -> str:
        return f"ParallelDims(dp={self.dp}, sp={self.sp}, world_size={self.world_size})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ParallelDims) and (self.dp, self.sp, self.world_size) == (
            other.dp, other.sp, other.world_size)

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def build_mesh(self, device_type: str = "cuda"):
        """Build (once; later calls return the cached mesh) the ``(dp, sp)`` DeviceMesh.

        Collective: every rank must call it. torch.distributed must be initialised with
        ``world_size`` ranks.
        """
        if self._mesh is not None and self._mesh.device_type == device_type:
            return self._mesh
        from torch.distributed.device_mesh import DeviceMesh

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_mesh needs torch.distributed initialised (init_process_group)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims world_size {self.world_size} != torch.distributed world size {dist.get_world_size()}"
            )
        grid = torch.arange(self.world_size, dtype=torch.int).view(self.dp, self.sp)
        self._mesh = DeviceMesh(device_type, grid, mesh_dim_names=("dp", "sp"))
        self._fsdp_mesh = None
        return self._mesh

    @property
    def fsdp_mesh(self):
        """1-D mesh ``("dp_sp",)`` over the whole dp x sp world (row-major), built once from the 2-D mesh.

        FSDP2 shards parameters over it: SP ranks hold replicated parameters exactly as DP replicas do.
        """
        if self._fsdp_mesh is None:
            mesh = self.mesh
            if hasattr(mesh, "_flatten"):
                self._fsdp_mesh = mesh["dp", "sp"]._flatten("dp_sp")
            else:  # the same ranks in the same order
                from torch.distributed.device_mesh import DeviceMesh

                self._fsdp_mesh = DeviceMesh(mesh.device_type, torch.arange(self.world_size, dtype=torch.int),
                                             mesh_dim_names=("dp_sp",))
        return self._fsdp_mesh

    @property
    def mesh_built(self) -> bool:
        return self._mesh is not None

    @property
    def mesh(self):
        if self._mesh is None:
            raise RuntimeError("call build_mesh(device_type) first")
        return self._mesh

    @property
    def sp_group(self):
        """Process group of this rank's SP group (contiguous ranks)."""
        return self.mesh.get_group("sp")

    @property
    def dp_group(self):
        """Process group of the ranks holding the same sequence shard index in other DP replicas."""
        return self.mesh.get_group("dp")

    @property
    def sp_rank(self) -> int:
        return self.mesh.get_local_rank("sp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    def coords(self, rank: int):
        """(dp_rank, sp_rank) of a global rank, without a mesh."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range [0, {self.world_size})")
        return divmod(rank, self.sp)
