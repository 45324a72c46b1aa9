"""ParallelDims / DeviceMesh layout and DP x SP independence of the SP op."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.distributed import ParallelDims

from sp_dist_utils import run_workers
from test_sp_attn import check_case


def test_parallel_dims_sizes():
    pd = ParallelDims(dp=2, sp=4, world_size=8)
    assert (pd.dp, pd.sp, pd.world_size) == (2, 4, 8)
    assert ParallelDims(sp=2, world_size=8).dp == 4
    assert ParallelDims(dp=-1, sp=8, world_size=8).dp == 1
    assert ParallelDims(dp=3, sp=1).world_size == 3
    assert pd.coords(5) == (1, 1) and pd.coords(3) == (0, 3)
    assert pd.sp_enabled and pd.dp_enabled and not ParallelDims(1, 1, 1).sp_enabled


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dp=2, sp=3, world_size=8), r"sp=3 must divide the world size 8 \(choose among \[1, 2, 4, 8\]\)"),
        (dict(dp=3, sp=2, world_size=8), r"dp \* sp must equal the world size: 3 \* 2 = 6 != 8"),
        (dict(dp=2, sp=0, world_size=8), "sp must be a positive int"),
        (dict(dp=1.5, sp=2, world_size=8), "dp must be a positive int"),
        (dict(dp=2, sp=2, world_size=-4), "world_size must be a positive int"),
        (dict(dp=2, sp=True, world_size=2), "sp must be a positive int"),
        (dict(sp=2), "cannot infer dp"),
    ],
)
def test_parallel_dims_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_mesh_needs_build():
    with pytest.raises(RuntimeError, match="build_mesh"):
        ParallelDims(1, 2, 2).sp_group


def _worker_dp_sp(rank, world):
    pd = ParallelDims(dp=2, sp=2)
    assert pd.world_size == 4
    mesh = pd.build_mesh("cpu")
    assert pd.build_mesh("cpu") is mesh
    assert mesh.mesh_dim_names == ("dp", "sp")
    assert (pd.dp_rank, pd.sp_rank) == pd.coords(rank) == divmod(rank, 2)
    sp_ranks = dist.get_process_group_ranks(pd.sp_group)
    dp_ranks = dist.get_process_group_ranks(pd.dp_group)
    assert sp_ranks == [2 * pd.dp_rank, 2 * pd.dp_rank + 1], sp_ranks  # contiguous SP groups
    assert dp_ranks == [pd.sp_rank, pd.sp_rank + 2], dp_ranks
    with pytest.raises(ValueError, match="world size 4"):
        ParallelDims(dp=4, sp=2, world_size=8).build_mesh("cpu")
    # each SP group works on its own data (seed depends on the dp coordinate), independently
    for mode in ("allgather", "ring"):
        check_case(pd.sp_group, [9, 9], mode=mode, seed=100 + pd.dp_rank, tag="dpxsp")
        check_case(pd.sp_group, [10, 10], mode=mode, cu=[0, 3, 10, 14, 20], seed=200 + pd.dp_rank,
                   tag="dpxsp-varlen")


def test_dp_x_sp_mesh():
    run_workers(_worker_dp_sp, 4)
