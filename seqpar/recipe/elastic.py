"""Process-group set-up and tear-down for processes started by torchrun."""
from __future__ import annotations

import os

from .layout import is_torchelastic

__all__ = ["init_torchelastic_process_group", "destroy_process_group", "is_rank_zero"]


def is_rank_zero() -> bool:
    """Global rank 0 from the launcher's environment (before any process group exists)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0" and os.environ.get("NODE_RANK", "0") == "0"


def init_torchelastic_process_group(accelerator: str) -> None:
    """Under torchrun: initialise the default process group on a store namespaced by the restart attempt.

    With ``torchrun --max-restarts`` the agent's TCPStore outlives a failed attempt, and the keys that gloo /
    NCCL publish at rendezvous (e.g. each rank's listening address) are not namespaced per attempt: a
    restarted rank can read its peer's address from the *previous* attempt and fail with "connectFullMesh
    failed ... Connection refused". Prefixing the store with ``TORCHELASTIC_RESTART_COUNT`` makes every
    attempt rendezvous on fresh keys. Lightning then finds the group initialised and keeps it.
    """
    import datetime

    import torch
    import torch.distributed as dist

    if not is_torchelastic() or not dist.is_available() or dist.is_initialized():
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    timeout = datetime.timedelta(minutes=30)  # Lightning's default
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=not agent_store and rank == 0,
        timeout=timeout, multi_tenant=not agent_store,
    )
    store = dist.PrefixStore(f"seqpar/attempt_{attempt}", store)
    backend = "gloo"
    if accelerator in ("gpu", "cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def destroy_process_group(barrier: bool = False) -> None:
    """Destroy the default process group if one exists (end of a run).

    barrier: first wait until every rank has arrived (a run that ended normally on this rank), so that no rank
    tears its gloo / NCCL connections down while a peer still has collectives in flight, which can abort the
    peer at exit (gloo: "terminate called without an active exception") after a finished run. Leave it off on
    an error path: the peers may never arrive."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
