"""``strategy="lightning_sp"``: data x sequence parallelism for PyTorch Lightning.

The world of ``W`` ranks is laid out as a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh`
``("dp", "sp")`` of shape ``(W // sp, sp)``; SP groups are contiguous ranks (``rank = dp_rank * sp + sp_rank``).

* Data: the sampler is keyed on the dp coordinate only (``distributed_sampler_kwargs``), so the ``sp``
  ranks of one group read the same samples; :meth:`batch_to_device` then keeps this rank's contiguous
  shard of every ``[B, T, ...]`` tensor (``T`` sliced *before* the host-to-device copy), leaving
  ``cu_seqlens`` global.
* Gradients: parameters are replicated, and the model's per-rank backward loss is the token mean of its
  shard scaled to the SP group's token count (see ``TransNormerLLM._loss``), so DDP's average over the whole
  world gives exactly the gradient of the global-batch mean loss. This is why the strategy is a
  ``DDPStrategy`` (Lightning also keys sampler injection and ``sync_dist`` on that class).
* Checkpoints: plain (replicated) state dicts written by rank 0, restorable under any dp x sp layout, written
  atomically (``AtomicCheckpointIO``: temporary file in the same directory, fsync, ``os.replace``).
* Launch: Lightning's own launcher (``devices=N``; default ``start_method="popen"`` re-runs the script,
  ``"spawn"`` for notebooks / tests), or processes started by ``torchrun`` / SLURM, in which case no second
  set of processes is launched.

``sp_size=None`` means "all devices of one node" (``devices`` per node), i.e. SP inside a node and DP
across nodes. The model reads :attr:`sp_group` (and :attr:`device_mesh`) from ``trainer.strategy``.

Both Lightning class trees are served: ``pytorch_lightning`` (this project's dependency) and
``lightning.pytorch`` each get their own subclass of their own ``DDPStrategy`` registered as ``"lightning_sp"``
(and ``"lightning_sp_spawn"``) in their own ``StrategyRegistry``.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

SP_MODES = ("allgather", "ring")
GLOBAL_KEYS = ("cu_seqlens",)
STRATEGY_NAME = "lightning_sp"

__all__ = ["LightningSPStrategy", "shard_batch", "get_strategy_class", "register_strategies", "STRATEGY_CLASSES"]


# --------------------------------------------------------------------------------------------- batch slicing
def _seq_len_of(batch: Any) -> Optional[int]:
    if isinstance(batch, torch.Tensor):
        return batch.shape[1] if batch.dim() >= 2 else None
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            return ids.shape[1]
        items = [v for k, v in batch.items() if k not in GLOBAL_KEYS]
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        return None
    for v in items:
        t = _seq_len_of(v)
        if t is not None:
            return t
    return None


def shard_batch(batch: Any, sp_rank: int, sp_size: int, global_keys=GLOBAL_KEYS) -> Any:
    """Keep shard ``sp_rank`` of ``sp_size`` (contiguous) of every ``[B, T, ...]`` tensor along dim 1.

    ``T`` is the length of ``batch["input_ids"]`` (else of the first tensor with >= 2 dims); tensors whose
    dim 1 differs, 0-/1-D tensors and keys in ``global_keys`` (``cu_seqlens``) are left unchanged. Works on
    dicts, lists, tuples (nested) and bare tensors. Raises ``ValueError`` if ``T % sp_size != 0``.
    """
    if sp_size == 1:
        return batch
    T = _seq_len_of(batch)
    if T is None:
        return batch
    if T % sp_size != 0:
        raise ValueError(
            f"lightning_sp: sequence length T={T} is not divisible by sp_size={sp_size}; pad the sequences to a "
            f"multiple of {sp_size} (e.g. T={-(-T // sp_size) * sp_size}, padding labels with -100) or choose a "
            f"seq_len divisible by {sp_size}"
        )
    L = T // sp_size
    lo, hi = sp_rank * L, (sp_rank + 1) * L

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.dim() >= 2 and x.shape[1] == T:
                return x[:, lo:hi].contiguous()
            return x
        if isinstance(x, Mapping):
            out = {k: (v if k in global_keys else cut(v)) for k, v in x.items()}
            return out if type(x) is dict else type(x)(out)
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
            return type(x)(*(cut(v) for v in x))
        if isinstance(x, (list, tuple)):
            return type(x)(cut(v) for v in x)
        return x

    return cut(batch)


# --------------------------------------------------------------------------------------------- strategy
def _make_strategy_class(pl_module_name: str):
    """Build the strategy on ``<pl_module_name>.strategies.DDPStrategy`` (one class per Lightning tree)."""
    strategies = importlib.import_module(f"{pl_module_name}.strategies")
    DDPStrategy = strategies.DDPStrategy

    class _LightningSPStrategy(DDPStrategy):
        __doc__ = f"""Data x sequence parallel strategy ({pl_module_name} tree), registered as ``"lightning_sp"``.

        Args:
            sp_size: ranks per sequence-parallel group (a divisor of the world size). ``None``: all devices of
                one node (the ``devices`` per node), i.e. SP within a node, DP across nodes.
            sp_mode: how SP attention exchanges the KV state: ``"allgather"`` (LASP-2 style prefix scan) or
                ``"ring"``. Exposed as ``strategy.sp_mode`` for the model.
            **ddp_kwargs: everything ``DDPStrategy`` accepts (``start_method``, ``process_group_backend``,
                ``timeout``, ``find_unused_parameters``, ``static_graph``, ...).
        """

        strategy_name = STRATEGY_NAME

        def __init__(self, sp_size: Optional[int] = None, sp_mode: str = "allgather", **ddp_kwargs: Any) -> None:
            if sp_size is not None and (isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1):
                raise ValueError(f"lightning_sp: sp_size must be a positive int or None, got {sp_size!r}")
            if sp_mode not in SP_MODES:
                raise ValueError(f"lightning_sp: sp_mode must be one of {SP_MODES}, got {sp_mode!r}")
            super().__init__(**ddp_kwargs)
            self._sp_size_arg = sp_size
            self.sp_mode = sp_mode
            self._device_mesh = None
            self._mesh_key = None

        # -------------------------------------------------------------- checkpoints
        @property
        def checkpoint_io(self):
            """Default: :class:`~seqpar.strategies.checkpointing.AtomicCheckpointIO` (temporary file + atomic
            rename, never a half-written ``.ckpt``); ``Trainer(plugins=[...])`` can set another one."""
            if self._checkpoint_io is None and pl_module_name == "pytorch_lightning":
                from .checkpointing import AtomicCheckpointIO

                self._checkpoint_io = AtomicCheckpointIO()
            return DDPStrategy.checkpoint_io.fget(self)

        @checkpoint_io.setter
        def checkpoint_io(self, io) -> None:
            DDPStrategy.checkpoint_io.fset(self, io)

        # -------------------------------------------------------------- layout
        @property
        def _planned_world_size(self) -> int:
            if dist.is_available() and dist.is_initialized():
                return dist.get_world_size()
            return max(1, self.num_nodes * self.num_processes)

        @property
        def sp_size(self) -> int:
            if self._device_mesh is not None:
                return self._device_mesh["sp"].size()
            if self._sp_size_arg is not None:
                return self._sp_size_arg
            return max(1, self.num_processes)

        @property
        def dp_size(self) -> int:
            return max(1, self._planned_world_size // self.sp_size)

        @property
        def sp_rank(self) -> int:
            if self._device_mesh is not None:
                return self._device_mesh.get_local_rank("sp")
            return self.global_rank % self.sp_size

        @property
        def dp_rank(self) -> int:
            if self._device_mesh is not None:
                return self._device_mesh.get_local_rank("dp")
            return self.global_rank // self.sp_size

        @property
        def device_mesh(self):
            """The ``("dp", "sp")`` DeviceMesh (``None`` before ``setup_environment``)."""
            return self._device_mesh

        @property
        def sp_group(self):
            return self._device_mesh.get_group("sp") if self._device_mesh is not None else None

        @property
        def dp_group(self):
            return self._device_mesh.get_group("dp") if self._device_mesh is not None else None

        def _validate_layout(self, world_size: int) -> None:
            sp = self.sp_size
            if world_size % sp != 0:
                raise ValueError(
                    f"lightning_sp: sp_size={sp} must divide the world size {world_size} "
                    f"(num_nodes={self.num_nodes} x devices={self.num_processes}); choose sp among the divisors of "
                    f"{world_size}: {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
                )

        # -------------------------------------------------------------- lifecycle
        def _configure_launcher(self) -> None:
            if self.num_processes:  # fail at Trainer(...) time, before any process is launched
                self._validate_layout(max(1, self.num_nodes * self.num_processes))
            super()._configure_launcher()

        def setup_environment(self) -> None:
            super().setup_environment()  # device + process group (a no-op if already initialised)
            self._setup_device_mesh()

        def _setup_device_mesh(self) -> None:
            from torch.distributed.device_mesh import init_device_mesh

            world_size = dist.get_world_size()
            key = (id(dist.distributed_c10d._get_default_group()), world_size, self.sp_size)
            if self._device_mesh is not None and self._mesh_key == key:
                return  # setup_environment runs on every fit / validate / test: build the mesh once
            self._device_mesh = None
            self._validate_layout(world_size)
            sp = self.sp_size
            self._device_mesh = init_device_mesh(
                self.root_device.type, (world_size // sp, sp), mesh_dim_names=("dp", "sp")
            )
            self._mesh_key = key

        @property
        def distributed_sampler_kwargs(self) -> Dict[str, Any]:
            # ranks of one SP group read the same samples: shard the data over the dp coordinate only
            return {"num_replicas": self.dp_size, "rank": self.dp_rank}

        def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
            # slice T on the host first so only this rank's shard is copied to the device
            batch = shard_batch(batch, self.sp_rank, self.sp_size)
            return super().batch_to_device(batch, device=device, dataloader_idx=dataloader_idx)

        def __repr__(self) -> str:
            return f"{type(self).__name__}(sp_size={self._sp_size_arg}, sp_mode={self.sp_mode!r})"

    name = "LightningSPStrategy" if pl_module_name == "pytorch_lightning" else "LightningSPStrategyLightning"
    _LightningSPStrategy.__name__ = _LightningSPStrategy.__qualname__ = name
    _LightningSPStrategy.__module__ = __name__
    return _LightningSPStrategy


STRATEGY_CLASSES: Dict[str, type] = {}
for _tree in ("pytorch_lightning", "lightning.pytorch"):
    try:
        _cls = _make_strategy_class(_tree)
    except ImportError:
        continue
    STRATEGY_CLASSES[_tree] = _cls
    globals()[_cls.__name__] = _cls

if not STRATEGY_CLASSES:  # pragma: no cover
    raise ImportError("seqpar.strategies needs pytorch_lightning or lightning (pip install pytorch-lightning)")

if "LightningSPStrategy" not in globals():  # only lightning.pytorch is installed
    LightningSPStrategy = STRATEGY_CLASSES["lightning.pytorch"]  # noqa: F811


def get_strategy_class(tree: Any = "pytorch_lightning") -> type:
    """The strategy class of a Lightning tree, given by name, by its module or by a Trainer / module of it."""
    if not isinstance(tree, str):
        mod = tree if hasattr(tree, "__path__") else type(tree)
        tree = mod.__name__ if hasattr(mod, "__path__") else mod.__module__
    tree = "lightning.pytorch" if tree.startswith("lightning.pytorch") or tree == "lightning" else "pytorch_lightning"
    if tree not in STRATEGY_CLASSES:
        raise ImportError(f"{tree} is not installed")
    return STRATEGY_CLASSES[tree]


def register_strategies() -> None:
    """Register ``"lightning_sp"`` / ``"lightning_sp_spawn"`` in every installed tree's registry (idempotent)."""
    for tree, cls in STRATEGY_CLASSES.items():
        registry = importlib.import_module(f"{tree}.strategies").StrategyRegistry
        for name, extra in ((STRATEGY_NAME, {}), (STRATEGY_NAME + "_spawn", {"start_method": "spawn"})):
            entry = registry[name] if name in registry else None
            if entry is not None and entry["strategy"] is cls:
                continue  # already registered (e.g. imported twice)
            if entry is not None and getattr(entry["strategy"], "__module__", "") != __name__:
                continue  # someone else's strategy of that name: leave it alone
            registry.register(
                name,
                cls,
                description="Data x sequence parallel (DeviceMesh dp x sp) DDP strategy of seqpar"
                + (" with start_method='spawn'" if extra else ""),
                override=entry is not None,
                **extra,
            )


register_strategies()
