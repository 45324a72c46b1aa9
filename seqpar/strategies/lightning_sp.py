"""``strategy="lightning_sp"``: data x sequence parallelism for PyTorch Lightning.

The world of ``W`` ranks is laid out as a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh`
``("dp", "sp")`` of shape ``(W // sp, sp)``; SP groups are contiguous ranks (``rank = dp_rank * sp + sp_rank``).

* Data: the sampler is keyed on the dp coordinate only (``distributed_sampler_kwargs``), so the ``sp``
  ranks of one group read the same samples; :meth:`batch_to_device` then keeps this rank's contiguous
  shard of every ``[B, T, ...]`` tensor (``T`` sliced *before* the host-to-device copy), leaving
  ``cu_seqlens`` global.
* Layout: :class:`seqpar.distributed.ParallelDims` owns sizes, checks, meshes, groups and coordinates; the
  model goes through :func:`seqpar.distributed.parallelize` (SP context on every attention layer, and FSDP2
  ``fully_shard`` over the flattened dp x sp mesh with ``fsdp=True``) once it is on its device, before the
  optimizer is built.
* Gradients: the model's per-rank backward loss is ``P * local_sum / global_count`` (see
  ``TransNormerLLM.forward``), so an average over the whole dp x sp world gives exactly the gradient of the
  global-batch mean loss. ``fsdp=False``: parameters replicated, DDP averages; ``fsdp=True``: no DDP wrapper,
  FSDP2's reduce-scatter averages (gradient clipping works on the DTensor gradients). The strategy stays a
  ``DDPStrategy`` (Lightning keys sampler injection and ``sync_dist`` on that class).
* Checkpoints: one replicated Lightning ``.ckpt`` written by rank 0, restorable under any layout (dp x sp,
  fsdp on or off, world 1), written atomically (``AtomicCheckpointIO``). With ``fsdp=True`` the model and
  optimizer states are gathered to full CPU tensors (``torch.distributed.checkpoint.state_dict`` with
  ``full_state_dict=True, cpu_offload=True``) and the optimizer state is stored in torch's parameter-index
  format, as a replicated run writes it; loading shards them again.
* Launch: Lightning's own launcher (``devices=N``; default ``start_method="popen"`` re-runs the script,
  ``"spawn"`` for notebooks / tests), or processes started by ``torchrun`` / SLURM, in which case no second
  set of processes is launched.

``sp_size=None`` means "all devices of one node" (``devices`` per node), i.e. SP inside a node and DP
across nodes.

Both Lightning class trees are served: ``pytorch_lightning`` (this project's dependency) and
``lightning.pytorch`` each get their own subclass of their own ``DDPStrategy`` registered as ``"lightning_sp"``
(and ``"lightning_sp_spawn"``) in their own ``StrategyRegistry``.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from seqpar.distributed import ParallelDims, parallelize
from seqpar.distributed.sharding import shard_bounds

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
    lo, hi = shard_bounds(T, sp_rank, sp_size)  # the slicing rule of shard_sequence

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


# --------------------------------------------------------------------------------------------- helpers
def _check_kwargs(DDPStrategy, kwargs: Dict[str, Any], fsdp: bool) -> None:
    """TypeError for keyword arguments neither DDPStrategy nor (without fsdp) DistributedDataParallel takes."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    strategy_args = set(inspect.signature(DDPStrategy.__init__).parameters) - {"self", "kwargs"}
    ddp_args = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}
    bad = sorted(set(kwargs) - strategy_args - ddp_args)
    if bad:
        raise TypeError(f"lightning_sp: unexpected keyword argument(s) {bad}; LightningSPStrategy takes sp_size, "
                        f"sp_mode, fsdp, DDPStrategy's arguments {sorted(strategy_args)} and "
                        f"DistributedDataParallel's {sorted(ddp_args - {'device_ids', 'output_device'})}")
    wrapper = sorted(set(kwargs) & (ddp_args - strategy_args))
    if fsdp and wrapper:
        raise TypeError(f"lightning_sp: {wrapper} configure the DDP wrapper, which fsdp=True does not use")


def _param_names(optimizer, module) -> list:
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _names_to_ids(osd: Dict[str, Any], optimizer, module) -> Dict[str, Any]:
    """Parameter-name keyed optimizer state -> torch's index format (what a replicated run saves)."""
    index = {n: i for i, n in enumerate(_param_names(optimizer, module))}
    return {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def _ids_to_names(osd: Dict[str, Any], optimizer, module) -> Dict[str, Any]:
    """torch's index format -> parameter-name keyed optimizer state (for set_optimizer_state_dict)."""
    names = _param_names(optimizer, module)
    return {"state": {names[int(i)]: v for i, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]]}


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
                ``"ring"``.
            fsdp: shard parameters, gradients and optimizer state over the whole dp x sp world (FSDP2) instead
                of replicating them under DDP.
            **ddp_kwargs: ``DDPStrategy``'s arguments (``start_method``, ``process_group_backend``,
                ``timeout``, ...) and, without fsdp, ``DistributedDataParallel``'s (``find_unused_parameters``,
                ``static_graph``, ...). Anything else is a TypeError.
        """

        strategy_name = STRATEGY_NAME

        def __init__(self, sp_size: Optional[int] = None, sp_mode: str = "allgather", fsdp: bool = False,
                     **ddp_kwargs: Any) -> None:
            if sp_size is not None and (isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1):
                raise ValueError(f"lightning_sp: sp_size must be a positive int or None, got {sp_size!r}")
            if sp_mode not in SP_MODES:
                raise ValueError(f"lightning_sp: sp_mode must be one of {SP_MODES}, got {sp_mode!r}")
            if not isinstance(fsdp, bool):
                raise TypeError(f"lightning_sp: fsdp must be a bool, got {fsdp!r}")
            _check_kwargs(DDPStrategy, ddp_kwargs, fsdp)
            super().__init__(**ddp_kwargs)
            self._sp_size_arg = sp_size
            self.sp_mode = sp_mode
            self.fsdp = fsdp
            self._dims: Optional[ParallelDims] = None
            self._mesh_key = None
            self._parallelized = None  # (id of the module, mesh key) already parallelized

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

        def _sharded(self) -> bool:
            from torch.distributed.tensor import DTensor

            m = self.lightning_module
            return m is not None and any(isinstance(p, DTensor) for p in m.parameters())

        def lightning_module_state_dict(self) -> Dict[str, Any]:
            if not self._sharded():
                return super().lightning_module_state_dict()
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # collective: every rank gathers, rank 0 keeps full CPU tensors (the others get an empty dict)
            return get_model_state_dict(self.lightning_module,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
            if not self._sharded():  # restored before setup: the module is not sharded yet
                return super().load_model_state_dict(checkpoint, strict=strict)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.lightning_module, dict(checkpoint["state_dict"]),
                                 options=StateDictOptions(full_state_dict=True, strict=strict))

        def optimizer_state(self, optimizer) -> Dict[str, Any]:
            if not self._sharded():
                return super().optimizer_state(optimizer)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
            osd = get_optimizer_state_dict(self.lightning_module, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return _names_to_ids(osd, optimizer, self.lightning_module) if osd else osd

        def load_optimizer_state_dict(self, checkpoint) -> None:
            if not self._sharded():
                return super().load_optimizer_state_dict(checkpoint)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            for optimizer, osd in zip(self.optimizers, checkpoint["optimizer_states"]):
                optimizer = getattr(optimizer, "_optimizer", optimizer)
                set_optimizer_state_dict(self.lightning_module, optimizer,
                                         _ids_to_names(osd, optimizer, self.lightning_module),
                                         options=StateDictOptions(full_state_dict=True))

        # -------------------------------------------------------------- layout (owned by ParallelDims)
        @property
        def _planned_world_size(self) -> int:
            if dist.is_available() and dist.is_initialized():
                return dist.get_world_size()
            return max(1, self.num_nodes * self.num_processes)

        @property
        def parallel_dims(self) -> ParallelDims:
            """The layout (sizes and, after ``setup_environment``, meshes and groups)."""
            if self._dims is not None:
                return self._dims
            sp = self._sp_size_arg if self._sp_size_arg is not None else max(1, self.num_processes)
            try:
                return ParallelDims(sp=sp, world_size=self._planned_world_size)
            except ValueError as e:
                raise ValueError(f"lightning_sp: {e} (num_nodes={self.num_nodes} x devices={self.num_processes})") from None

        @property
        def sp_size(self) -> int:
            return self.parallel_dims.sp

        @property
        def dp_size(self) -> int:
            return self.parallel_dims.dp

        @property
        def sp_rank(self) -> int:
            return self.parallel_dims.coords(self.global_rank)[1]

        @property
        def dp_rank(self) -> int:
            return self.parallel_dims.coords(self.global_rank)[0]

        @property
        def device_mesh(self):
            """The ``("dp", "sp")`` DeviceMesh (``None`` before ``setup_environment``)."""
            return self._dims.mesh if self._dims is not None else None

        @property
        def sp_group(self):
            return self._dims.sp_group if self._dims is not None else None

        @property
        def dp_group(self):
            return self._dims.dp_group if self._dims is not None else None

        # -------------------------------------------------------------- lifecycle
        def _configure_launcher(self) -> None:
            if self.num_processes:  # fail at Trainer(...) time, before any process is launched
                self.parallel_dims
            super()._configure_launcher()

        def setup_environment(self) -> None:
            super().setup_environment()  # device + process group (a no-op if already initialised)
            self._setup_device_mesh()

        def _setup_device_mesh(self) -> None:
            key = (id(dist.distributed_c10d._get_default_group()), dist.get_world_size(), self.root_device.type)
            if self._dims is not None and self._mesh_key == key:
                return  # setup_environment runs on every fit / validate / test: build the mesh once
            self._dims = None
            dims = self.parallel_dims
            dims.build_mesh(self.root_device.type)
            self._dims, self._mesh_key = dims, key

        def _fsdp_dtypes(self) -> Dict[str, Any]:
            precision = str(getattr(self.precision_plugin, "precision", "32-true"))
            if precision in ("bf16-mixed",):
                return {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
            if precision in ("32-true", "32", "bf16-true", "64-true"):
                return {}
            raise ValueError(f"lightning_sp: fsdp=True supports precision 32-true, bf16-mixed or bf16-true, "
                             f"got {precision!r}")

        def model_to_device(self) -> None:
            super().model_to_device()
            module = self.lightning_module
            if module is None or self._parallelized == (id(module), self._mesh_key):
                return
            # SP context on every attention layer; with fsdp, fully_shard per block and at the root. Runs before
            # DDP wrapping and before setup_optimizers, so the optimizer sees the sharded parameters.
            parallelize(module, self._dims, sp_mode=self.sp_mode, fsdp=self.fsdp,
                        **(self._fsdp_dtypes() if self.fsdp else {}))
            if self.fsdp:  # sharded from identical initial values: DDP's start-up broadcast (validate / test) skips them
                module._ddp_params_and_buffers_to_ignore = [n for n, _ in module.named_parameters()]
            self._parallelized = (id(module), self._mesh_key)

        def configure_ddp(self) -> None:
            if self.fsdp:
                return  # FSDP2 reduce-scatters (and averages) the gradients itself: no DDP wrapper
            super().configure_ddp()

        @contextlib.contextmanager
        def block_backward_sync(self):
            """Micro-batches of gradient accumulation: DDP's no_sync, or with fsdp every FSDP2 module's
            gradients kept unsharded and local (no reduce-scatter) until the last micro-batch."""
            if not self.fsdp:
                with super().block_backward_sync():
                    yield None
                return
            from torch.distributed.fsdp import FSDPModule

            mods = [m for m in (self.lightning_module.modules() if self.lightning_module is not None else ())
                    if isinstance(m, FSDPModule)]
            for m in mods:
                m.set_requires_gradient_sync(False, recurse=False)
            try:
                yield None
            finally:
                for m in mods:
                    m.set_requires_gradient_sync(True, recurse=False)

        @property
        def distributed_sampler_kwargs(self) -> Dict[str, Any]:
            # ranks of one SP group read the same samples: shard the data over the dp coordinate only
            return {"num_replicas": self.dp_size, "rank": self.dp_rank}

        def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
            # slice T on the host first so only this rank's shard is copied to the device
            batch = shard_batch(batch, self.sp_rank, self.sp_size)
            return super().batch_to_device(batch, device=device, dataloader_idx=dataloader_idx)

        def __repr__(self) -> str:
            return f"{type(self).__name__}(sp_size={self._sp_size_arg}, sp_mode={self.sp_mode!r}, fsdp={self.fsdp})"

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
