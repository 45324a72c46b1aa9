#!/usr/bin/env python
"""Train a TransNormerLLM (Lightning Attention-2) language model with data x sequence parallelism.

    python train.py                                     # tiny model, embedded corpus, CPU or all GPUs
    python train.py --config configs/debug.yaml trainer.max_steps=20
    torchrun --nproc_per_node 8 train.py --config configs/tnl-1b.yaml trainer.max_steps=100 parallel.sp=8
    python train.py --config configs/tnl-0.4b.yaml trainer.devices=8 parallel.sp=4   # Lightning launches

Configuration = the dataclass schema below  <  ``--config`` YAML  <  ``key=value`` overrides (OmegaConf
dotlist). Unknown keys, wrong types, ``parallel.sp`` not dividing the world size or ``data.seq_len`` not
divisible by ``parallel.sp`` stop with a one-line error. ``--print-config`` shows the merged config.

Fault tolerance: checkpoints are written atomically; ``trainer.resume=auto`` continues from the newest complete
one (skipping truncated files), so the same command can be restarted, e.g. by
``torchrun --max-restarts 3 ... train.py ... trainer.resume=auto``, and repeats the uninterrupted run's losses.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


# ------------------------------------------------------------------------------------------------ schema
@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | tnl-0.4b | tnl-1b | tnl-3b | tnl-15b
    overrides: Dict[str, Any] = field(default_factory=dict)  # any TNLConfig field, e.g. {n_layers: 4}
    compile: bool = False  # torch.compile each block (GPU: +47% tokens/s for tnl-0.4b on an H100)


@dataclass
class DataConfig:
    kind: str = "corpus"  # corpus (embedded stdlib bytes, vocab 256) | memmap (.bin token files) | recall
    seq_len: int = 256
    batch_size: int = 8  # per data-parallel rank; the ranks of one SP group share their samples
    path: Optional[str] = None  # memmap: directory with train.bin / val.bin, or one .bin file
    dtype: str = "uint16"  # memmap token dtype: uint16 | uint32
    packed: bool = False  # emit cu_seqlens at document boundaries (needs batch_size=1)
    eos_id: Optional[int] = None  # document separator for packed memmap data (corpus: 0)
    val_fraction: float = 0.05
    max_bytes: int = 8 * 1024 * 1024  # size cap of the embedded corpus
    train_samples: Optional[int] = None  # samples per epoch (default: non-overlapping windows)
    val_samples: Optional[int] = None
    num_workers: int = 0
    recall_pairs: int = 16
    recall_queries: int = 4


@dataclass
class ParallelConfig:
    sp: Optional[int] = None  # sequence-parallel group size; null = all devices of a node
    sp_mode: str = "allgather"  # allgather | ring


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables


@dataclass
class TrainerConfig:
    max_steps: int = 500
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # auto (all GPUs, or 1 CPU process) | int; under torchrun: LOCAL_WORLD_SIZE
    num_nodes: int = 1  # under torchrun: WORLD_SIZE // LOCAL_WORLD_SIZE
    precision: Optional[str] = None  # null: bf16-mixed on GPU, 32-true on CPU
    accumulate_grad_batches: int = 1
    log_every: int = 10
    val_check_interval: Optional[int] = 100  # training batches between validations; null: never
    limit_val_batches: int = 8
    out_dir: str = "runs/default"  # CSV logs under <out_dir>/logs
    ckpt_dir: Optional[str] = None  # null: <out_dir>/checkpoints (last.ckpt + the newest keep_ckpts)
    ckpt_every: int = 250  # training steps between checkpoints; 0: only last.ckpt at the end
    keep_ckpts: int = 2
    resume: Optional[str] = None  # path to a .ckpt | auto (newest complete .ckpt in ckpt_dir, if any) | null
    progress_bar: bool = True
    logger: str = "csv"  # csv (<out_dir>/logs/version_N/metrics.csv) | tensorboard (needs the tensorboard package)
    deterministic: bool = False  # torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG (GPU bitwise reruns)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 1234


class ConfigError(ValueError):
    pass


# Test-only fault injection (tests/test_reliability.py): SEQPAR_FAULT_AT_STEP=N makes global rank
# SEQPAR_FAULT_RANK (default 0) exit with status 1 right before optimizer step N, on the first attempt only
# (TORCHELASTIC_RESTART_COUNT unset or 0), so that torchrun --max-restarts restarts the job.
FAULT_STEP_ENV, FAULT_RANK_ENV = "SEQPAR_FAULT_AT_STEP", "SEQPAR_FAULT_RANK"


# ------------------------------------------------------------------------------------------------ config
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", action="append", default=[], help="YAML file(s), merged in order")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("overrides", nargs="*", help="key=value dotlist overrides, e.g. trainer.max_steps=100")
    return p.parse_args(argv)


def load_config(config_files: List[str], overrides: List[str]):
    """Schema < YAML files < dotlist overrides; raises ConfigError with a one-line message."""
    cfg = OmegaConf.structured(TrainConfig)
    try:
        for path in config_files:
            if not os.path.isfile(path):
                raise ConfigError(f"config file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must be key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        msg = str(e).strip().splitlines()[0]
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{msg}" + (f" (key: {key})" if key and key not in msg else "")) from None
    except yaml.YAMLError as e:  # malformed YAML file
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"invalid YAML in {path}{at}: {getattr(e, 'problem', None) or e}") from None
    except (TypeError, ValueError) as e:  # e.g. a YAML file that is a list, not a mapping
        raise ConfigError(f"{str(e).strip().splitlines()[0]}" + (f" ({path})" if config_files else "")) from None
    return cfg


def _torchelastic() -> bool:
    return all(k in os.environ for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"))


def _check_numbers(cfg) -> None:
    """Range checks the schema's types cannot express (one-line ConfigError)."""
    t, d, o = cfg.trainer, cfg.data, cfg.optim
    rules = [
        ("data.seq_len", d.seq_len, d.seq_len >= 1, ">= 1"),
        ("data.batch_size", d.batch_size, d.batch_size >= 1, ">= 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.val_fraction", d.val_fraction, 0.0 <= d.val_fraction < 1.0, "in [0, 1)"),
        ("parallel.sp", cfg.parallel.sp, cfg.parallel.sp is None or cfg.parallel.sp >= 1, ">= 1 or null"),
        ("optim.lr", o.lr, o.lr > 0, "> 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip >= 0, ">= 0 (0 disables)"),
        ("optim.betas", list(o.betas), len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two values in [0, 1)"),
        ("trainer.max_steps", t.max_steps, t.max_steps >= 1, ">= 1"),
        ("trainer.accumulate_grad_batches", t.accumulate_grad_batches, t.accumulate_grad_batches >= 1, ">= 1"),
        ("trainer.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("trainer.val_check_interval", t.val_check_interval, t.val_check_interval is None or t.val_check_interval >= 1,
         ">= 1 or null"),
        ("trainer.ckpt_every", t.ckpt_every, t.ckpt_every >= 0, ">= 0 (0: only last.ckpt at the end)"),
        ("trainer.keep_ckpts", t.keep_ckpts, t.keep_ckpts >= 1 or t.keep_ckpts == -1, ">= 1 (or -1: keep all)"),
    ]
    for key, value, ok, want in rules:
        if not ok:
            raise ConfigError(f"{key} must be {want}, got {value!r}")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def resolve_layout(cfg) -> Dict[str, Any]:
    """accelerator, devices, num_nodes, world size and sp; validates sp and seq_len."""
    import torch

    t = cfg.trainer
    accelerator = t.accelerator
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ConfigError(f"trainer.accelerator must be auto, cpu or gpu, got {accelerator!r}")
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu but no CUDA GPU is available (use trainer.accelerator=cpu)")
    if _torchelastic():
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        world = int(os.environ.get("WORLD_SIZE", devices))
        num_nodes = max(1, world // devices)
    else:
        d = t.devices
        if d in ("auto", -1, "-1", None):
            devices = torch.cuda.device_count() if accelerator != "cpu" else 1
        elif isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
            devices = int(d)
        else:
            raise ConfigError(f"trainer.devices must be auto or a positive int, got {d!r}")
        if devices < 1:
            raise ConfigError(f"trainer.devices must be >= 1, got {devices}")
        if not isinstance(t.num_nodes, int) or t.num_nodes < 1:
            raise ConfigError(f"trainer.num_nodes must be a positive int, got {t.num_nodes!r}")
        num_nodes = t.num_nodes
        world = devices * num_nodes
    _check_numbers(cfg)
    sp = cfg.parallel.sp if cfg.parallel.sp is not None else devices
    if sp < 1 or world % sp:
        divisors = [k for k in range(1, world + 1) if world % k == 0]
        raise ConfigError(f"parallel.sp={sp} must divide the world size {world} (choose among {divisors})")
    if cfg.parallel.sp_mode not in ("allgather", "ring"):
        raise ConfigError(f"parallel.sp_mode must be allgather or ring, got {cfg.parallel.sp_mode!r}")
    if t.logger not in ("csv", "tensorboard"):
        raise ConfigError(f"trainer.logger must be csv or tensorboard, got {t.logger!r}")
    if t.logger == "tensorboard" and not (_importable("tensorboard") or _importable("tensorboardX")):
        raise ConfigError("trainer.logger=tensorboard needs the tensorboard package (pip install tensorboard), "
                          "or use trainer.logger=csv")
    if cfg.data.seq_len % sp:
        up = -(-cfg.data.seq_len // sp) * sp
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is not divisible by parallel.sp={sp} (use e.g. data.seq_len={up})")
    return {"accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "world": world, "sp": sp}


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

    if not _torchelastic() or not dist.is_available() or dist.is_initialized():
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


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0" and os.environ.get("NODE_RANK", "0") == "0"


# ------------------------------------------------------------------------------------------------ callbacks
def _callbacks():
    """(StepSeeder, FaultInjector) classes; built on first use so that config errors need no Lightning import."""
    global _CALLBACKS
    if _CALLBACKS is not None:
        return _CALLBACKS
    import random

    import numpy as np
    import pytorch_lightning as pl
    import torch

    class StepSeeder(pl.Callback):
        """Reseeds python / numpy / torch (CPU and CUDA) before every training micro-batch from (seed, optimizer
        step, micro-batch, global rank).

        Lightning checkpoints no RNG state, and a resumed run draws random numbers in another order (new
        DataLoader iterators, no validation before the first step, ...): seeding each step from its index makes
        dropout & co. a function of the step, so a resumed run repeats the uninterrupted one exactly.
        """

        def __init__(self, seed: int):
            self.seed = int(seed)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            micro = batch_idx % max(1, trainer.accumulate_grad_batches)
            s = (self.seed * 1_000_003 + trainer.global_step * 7919 + micro * 104_729 + trainer.global_rank) % 2**32
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)  # also seeds every CUDA device

    class FaultInjector(pl.Callback):
        """Test hook (env SEQPAR_FAULT_AT_STEP / SEQPAR_FAULT_RANK): kill one rank once, before step ``step``."""

        def __init__(self, step: int, rank: int = 0):
            self.step, self.rank = int(step), int(rank)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
            if first_attempt and trainer.global_step == self.step and trainer.global_rank == self.rank:
                print(f"[train.py] {FAULT_STEP_ENV}: rank {self.rank} exits before step {self.step}", flush=True)
                sys.stderr.flush()
                os._exit(1)

    _CALLBACKS = (StepSeeder, FaultInjector)
    return _CALLBACKS


_CALLBACKS = None


# ------------------------------------------------------------------------------------------------ build
def build(cfg, layout):
    """(trainer, model, datamodule, ckpt_path); construction errors become ConfigError."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    import seqpar.strategies  # noqa: F401  registers "lightning_sp"
    from seqpar.data import SeqDataModule
    from seqpar.models import TNLConfig
    from seqpar.models.lit import LitLM
    from seqpar.strategies import LightningSPStrategy
    from seqpar.strategies.checkpointing import AtomicCheckpointIO, find_resume_checkpoint, verify_checkpoint

    t, d, o = cfg.trainer, cfg.data, cfg.optim
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same initial weights on every layout
    try:
        overrides = dict(OmegaConf.to_container(cfg.model.overrides, resolve=True))
        overrides["sp_mode"] = cfg.parallel.sp_mode
        model_cfg = TNLConfig.preset(cfg.model.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
    if d.kind == "corpus" and model_cfg.vocab_size < 256:
        raise ConfigError(f"data.kind=corpus is byte-level (256 tokens) but the model's vocab_size is {model_cfg.vocab_size}")
    try:
        dm = SeqDataModule(
            kind=d.kind, seq_len=d.seq_len, batch_size=d.batch_size, path=d.path, dtype=d.dtype, packed=d.packed,
            eos_id=d.eos_id, val_fraction=d.val_fraction, max_bytes=d.max_bytes, train_samples=d.train_samples,
            val_samples=d.val_samples, num_workers=d.num_workers, seed=cfg.seed, recall_pairs=d.recall_pairs,
            recall_queries=d.recall_queries, vocab_size=min(256, model_cfg.vocab_size),
        )
        if d.kind == "memmap" and not os.path.exists(d.path):
            raise ValueError(f"data.path not found: {d.path}")
        dm.setup("fit")  # open / build the datasets now: bad dtypes, sizes, task settings fail before training
        model = LitLM(
            model_cfg, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
            warmup_steps=o.warmup_steps, max_steps=t.max_steps, min_lr_ratio=o.min_lr_ratio,
        )
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"data: {e}" if "data" not in str(e).split(":")[0] else str(e)) from None
    if cfg.model.compile:
        model.model.compile_blocks()

    ckpt_dir = t.ckpt_dir or os.path.join(t.out_dir, "checkpoints")
    ckpt_path = None
    if t.resume == "auto":  # the newest complete checkpoint; truncated / corrupt files are skipped with a warning
        ckpt_path = find_resume_checkpoint(ckpt_dir)
    elif t.resume:
        if not os.path.isfile(t.resume):
            raise ConfigError(f"trainer.resume: checkpoint not found: {t.resume}")
        ok, why = verify_checkpoint(t.resume)  # complete, and matching its .sha256 when there is one
        if not ok:
            raise ConfigError(f"trainer.resume: {t.resume} is not a complete checkpoint ({why})")
        ckpt_path = t.resume

    if layout["world"] > 1 or layout["sp"] > 1:
        strategy = LightningSPStrategy(sp_size=layout["sp"], sp_mode=cfg.parallel.sp_mode)
    else:
        strategy = "auto"
    precision = t.precision or ("bf16-mixed" if layout["accelerator"] == "gpu" else "32-true")
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
            every_n_train_steps=t.ckpt_every or None, save_top_k=t.keep_ckpts if t.ckpt_every else 0,
            monitor="step", mode="max", save_last=True,
        )
    ]
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, min(t.log_every, 10))))
    StepSeeder, FaultInjector = _callbacks()
    callbacks.append(StepSeeder(cfg.seed))
    if os.environ.get(FAULT_STEP_ENV):
        callbacks.append(FaultInjector(int(os.environ[FAULT_STEP_ENV]), int(os.environ.get(FAULT_RANK_ENV, "0"))))
    try:
        trainer = _make_trainer(pl, t, o, layout, strategy, precision, callbacks, AtomicCheckpointIO)
    except (ValueError, TypeError, MisconfigurationException) as e:
        raise ConfigError(f"trainer: {str(e).strip().splitlines()[0]}") from None
    return trainer, model, dm, ckpt_path, ckpt_dir


def _make_logger(t):
    """Logs under <out_dir>/logs/version_N: CSV (metrics.csv) or TensorBoard event files."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    if t.logger == "tensorboard":
        return TensorBoardLogger(t.out_dir, name="logs")
    return CSVLogger(t.out_dir, name="logs", flush_logs_every_n_steps=t.log_every)


def _make_trainer(pl, t, o, layout, strategy, precision, callbacks, AtomicCheckpointIO):
    return pl.Trainer(
        accelerator=layout["accelerator"], devices=layout["devices"], num_nodes=layout["num_nodes"],
        strategy=strategy, precision=precision, max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=o.grad_clip or None,
        log_every_n_steps=t.log_every, val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if t.val_check_interval else 0, num_sanity_val_steps=0,
        logger=_make_logger(t), callbacks=callbacks,
        enable_progress_bar=t.progress_bar, default_root_dir=t.out_dir, benchmark=False,
        deterministic=bool(t.deterministic),
        plugins=[AtomicCheckpointIO()],
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg))
            return 0
        layout = resolve_layout(cfg)
        trainer, model, dm, ckpt_path, ckpt_dir = build(cfg, layout)
    except ConfigError as e:
        raise SystemExit(f"train.py: config error: {e}") from None
    if _is_rank_zero():
        print(OmegaConf.to_yaml(cfg), end="")
        print(f"[train.py] world={layout['world']} sp={layout['sp']} dp={layout['world'] // layout['sp']} "
              f"accelerator={layout['accelerator']} devices={layout['devices']} nodes={layout['num_nodes']} "
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M resume={ckpt_path}")

    import pytorch_lightning as pl
    import torch

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`num_workers`.*")
    if layout["accelerator"] == "gpu":
        torch.set_float32_matmul_precision("high")
    init_torchelastic_process_group(layout["accelerator"])
    if cfg.trainer.resume == "auto" and torch.distributed.is_available() and torch.distributed.is_initialized():
        choice = [ckpt_path]  # every rank resumes from rank 0's choice (files may change while ranks start)
        torch.distributed.broadcast_object_list(choice, src=0)
        ckpt_path = choice[0]
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    trainer.save_checkpoint(os.path.join(ckpt_dir, "last.ckpt"))  # the final state, whatever ckpt_every was
    if trainer.is_global_zero:
        print(f"[train.py] done: step {trainer.global_step}, checkpoint {os.path.join(ckpt_dir, 'last.ckpt')}, "
              f"logs {trainer.logger.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
