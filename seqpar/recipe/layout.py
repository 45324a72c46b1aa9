"""The world of a train.py run: accelerator, devices, nodes, world size and SP size (checked, no processes)."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict

from .config import ConfigError, check_values

__all__ = ["resolve_layout", "is_torchelastic"]


def is_torchelastic() -> bool:
    """True when the processes were started by torchrun (torchelastic's environment is set)."""
    return all(k in os.environ for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_layout(cfg) -> Dict[str, Any]:
    """{accelerator, devices, num_nodes, world, sp, dp, fsdp}; checks values, sp against the world, seq_len."""
    import torch

    from seqpar.distributed import ParallelDims

    t = cfg.trainer
    accelerator = t.accelerator
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator must be auto, cpu or gpu, got {accelerator!r}")
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda":
        accelerator = "gpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu but no CUDA GPU is available (use trainer.accelerator=cpu)")
    if is_torchelastic():
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        world = int(os.environ.get("WORLD_SIZE", devices))
        num_nodes = max(1, world // devices)
    else:
        d = t.devices
        if d in ("auto", -1, "-1", None):
            devices = torch.cuda.device_count() if accelerator != "cpu" else 1
        elif (isinstance(d, int) and not isinstance(d, bool)) or (isinstance(d, str) and d.isdigit()):
            devices = int(d)
        else:
            raise ConfigError(f"trainer.devices must be auto or a positive int, got {d!r}")
        if devices < 1:
            raise ConfigError(f"trainer.devices must be >= 1, got {devices}")
        if not isinstance(t.num_nodes, int) or t.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes must be a positive int, got {t.num_nodes!r}")
        num_nodes = t.num_nodes
        world = devices * num_nodes
    check_values(cfg)
    sp = cfg.parallel.sp if cfg.parallel.sp is not None else devices
    try:
        dims = ParallelDims(sp=sp, world_size=world)
    except ValueError as e:
        raise ConfigError(f"parallel.{e}") from None
    if t.logger == "tensorboard" and not (_importable("tensorboard") or _importable("tensorboardX")):
        raise ConfigError("trainer.logger=tensorboard needs the tensorboard package (pip install tensorboard), "
                          "or use trainer.logger=csv")
    if t.logger == "wandb" and not _importable("wandb"):
        raise ConfigError("trainer.logger=wandb needs the wandb package (pip install wandb), or use trainer.logger=csv")
    if cfg.data.seq_len % sp:
        up = -(-cfg.data.seq_len // sp) * sp
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.sp={sp} (use e.g. data.seq_len={up})")
    return {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "world": world, "sp": sp,
            "dp": dims.dp, "fsdp": bool(cfg.parallel.fsdp)}
