"""train.py's configuration: the dataclass schema, loading (schema < YAML < dotlist) and value checks.

Every error is a :class:`ConfigError` with a one-line message naming the key. Nothing here imports
Lightning, so a bad config fails fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["ModelConfig", "DataConfig", "ParallelConfig", "OptimConfig", "TrainerConfig", "TrainConfig",
           "ConfigError", "parse_args", "load_config", "check_values", "check_model_overrides", "config_help",
           "activation_policy"]


class ConfigError(ValueError):
    """A configuration error; its message is one line naming the key."""


def _f(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING):
    """A schema field with its meaning (shown by ``--help``)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# ------------------------------------------------------------------------------------------------ schema
@dataclass
class ModelConfig:
    preset: str = _f("tiny", "tiny | tnl-0.4b | tnl-1b | tnl-3b | tnl-15b")
    overrides: Dict[str, Any] = _f(factory=dict, help="any TNLConfig field, type-checked, e.g. {n_layers: 4}")
    compile: bool = _f(False, "torch.compile the model (see compile_scope)")
    compile_scope: str = _f("auto", "model (one graph) | blocks (each block) | auto (model without SP/FSDP, else blocks)")
    activation_checkpointing: str = _f(
        "auto", "recompute policy: none | selective | full | auto (per length: the fastest that fits the GPU; "
        "full with activation_offload); model.overrides.activation_checkpointing wins")


@dataclass
class DataConfig:
    kind: str = _f("corpus", "corpus (embedded stdlib bytes, vocab 256) | memmap (.bin token files) | recall")
    seq_len: int = _f(256, "tokens per sample (divisible by parallel.sp)")
    batch_size: int = _f(8, "samples per data-parallel rank; the ranks of one SP group share their samples")
    path: Optional[str] = _f(None, "memmap: directory with train.bin / val.bin, or one .bin file")
    dtype: str = _f("uint16", "memmap token dtype: uint16 | uint32")
    packed: bool = _f(False, "emit cu_seqlens at document boundaries (needs batch_size=1)")
    eos_id: Optional[int] = _f(None, "document separator for packed memmap data (corpus: 0)")
    val_fraction: float = _f(0.05, "fraction held out for validation, in [0, 1)")
    max_bytes: int = _f(8 * 1024 * 1024, "size cap of the embedded corpus")
    train_samples: Optional[int] = _f(None, "samples per epoch (null: non-overlapping windows)")
    val_samples: Optional[int] = _f(None, "validation samples (null: non-overlapping windows)")
    num_workers: int = _f(0, "DataLoader worker processes")
    recall_pairs: int = _f(16, "recall task: key-value pairs per sample")
    recall_queries: int = _f(4, "recall task: queries per sample")


@dataclass
class ParallelConfig:
    sp: Optional[int] = _f(None, "sequence-parallel group size; null = all devices of a node")
    sp_mode: str = _f("allgather", "SP state exchange: allgather | ring")
    fsdp: bool = _f(False, "shard parameters, gradients and optimizer state over the dp x sp world (FSDP2)")


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "peak learning rate of AdamW")
    weight_decay: float = _f(0.1, "AdamW weight decay (linear weights only)")
    betas: List[float] = _f(factory=lambda: [0.9, 0.95], help="AdamW betas, two values in [0, 1), e.g. [0.9,0.95]")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup_steps: int = _f(30, "linear warm-up steps")
    min_lr_ratio: float = _f(0.1, "final / peak learning rate of the cosine schedule")
    grad_clip: float = _f(1.0, "gradient norm clipping; 0 disables")


@dataclass
class TrainerConfig:
    max_steps: int = _f(500, "optimizer steps")
    accelerator: str = _f("auto", "auto | cpu | gpu")
    devices: Any = _f("auto", "auto (all GPUs, or 1 CPU process) | int; under torchrun: LOCAL_WORLD_SIZE")
    num_nodes: int = _f(1, "nodes; under torchrun: WORLD_SIZE // LOCAL_WORLD_SIZE")
    precision: Optional[str] = _f(None, "null: bf16-mixed on GPU, 32-true on CPU")
    accumulate_grad_batches: int = _f(1, "micro-batches per optimizer step")
    log_every: int = _f(10, "steps between logged rows and printed 'step N | loss ...' lines")
    val_check_interval: Optional[int] = _f(100, "training batches between validations; null: never")
    limit_val_batches: int = _f(8, "validation batches per validation")
    out_dir: str = _f("runs/default", "run directory; logs under <out_dir>/logs")
    ckpt_dir: Optional[str] = _f(None, "null: <out_dir>/checkpoints (last.ckpt + the newest keep_ckpts)")
    ckpt_every: int = _f(250, "training steps between checkpoints; 0: only last.ckpt at the end")
    keep_ckpts: int = _f(2, "periodic checkpoints kept (-1: all)")
    resume: Optional[str] = _f(None, "path to a .ckpt | auto (newest complete .ckpt in ckpt_dir, if any) | null")
    progress_bar: bool = _f(True, "show a progress bar (on a terminal only: log files get whole lines)")
    logger: str = _f("csv", "csv (<out_dir>/logs/version_N/metrics.csv) | tensorboard | wandb")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG")


@dataclass
class TrainConfig:
    model: ModelConfig = _f(factory=ModelConfig, help="model")
    data: DataConfig = _f(factory=DataConfig, help="data")
    parallel: ParallelConfig = _f(factory=ParallelConfig, help="parallelism")
    optim: OptimConfig = _f(factory=OptimConfig, help="optimizer")
    trainer: TrainerConfig = _f(factory=TrainerConfig, help="trainer")
    seed: int = _f(1234, "seed of init, data order and per-step RNG")


# ------------------------------------------------------------------------------------------------ help
def config_help() -> str:
    """One line per config key: ``key = default  meaning``."""
    lines = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            sub = typing.get_type_hints(cls).get(f.name)
            if dataclasses.is_dataclass(sub):
                walk(sub, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
            lines.append(f"  {prefix + f.name:<34} = {str(shown):<14} {f.metadata.get('help', '')}")

    walk(TrainConfig, "")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py", description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=value overrides; defaults shown):\n" + config_help(),
    )
    p.add_argument("--config", "-c", action="append", default=[], help="YAML file(s), merged in order")
    p.add_argument("--print-config", action="store_true", help="check and print the merged config, then exit")
    p.add_argument("overrides", nargs="*", help="key=value dotlist overrides, e.g. trainer.max_steps=100")
    return p.parse_intermixed_args(argv)  # options may come between the key=value overrides


# ------------------------------------------------------------------------------------------------ load
def _schema_type(key: str):
    """The resolved schema type of a dotted key (None when unknown)."""
    tp = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


def load_config(config_files: List[str], overrides: List[str]):
    """Schema < YAML files < dotlist overrides; raises ConfigError with a one-line message."""
    cfg = OmegaConf.structured(TrainConfig)
    path = None
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
        if key and typing.get_origin(_schema_type(key)) is list:
            value = getattr(e, "value", None)
            raise ConfigError(f"{key} must be a list, e.g. {key}=[0.9,0.95], got {value!r}") from None
        raise ConfigError(f"{msg}" + (f" (key: {key})" if key and key not in msg else "")) from None
    except yaml.YAMLError as e:  # malformed YAML file
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"invalid YAML in {path}{at}: {getattr(e, 'problem', None) or e}") from None
    except (TypeError, ValueError) as e:  # e.g. a YAML file that is a list, not a mapping
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{str(e).strip().splitlines()[0]}" + (f" ({path})" if config_files else "")) from None
    return cfg


# ------------------------------------------------------------------------------------------------ checks
def check_values(cfg) -> None:
    """Range and choice checks the schema's types cannot express (one-line ConfigError); no world needed."""
    t, d, o, p = cfg.trainer, cfg.data, cfg.optim, cfg.parallel
    rules = [
        ("data.seq_len", d.seq_len, d.seq_len >= 1, ">= 1"),
        ("data.batch_size", d.batch_size, d.batch_size >= 1, ">= 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.val_fraction", d.val_fraction, 0.0 <= d.val_fraction < 1.0, "in [0, 1)"),
        ("parallel.sp", p.sp, p.sp is None or p.sp >= 1, ">= 1 or null"),
        ("model.compile_scope", cfg.model.compile_scope, cfg.model.compile_scope in ("auto", "model", "blocks"),
         "auto, model or blocks"),
        ("parallel.sp_mode", p.sp_mode, p.sp_mode in ("allgather", "ring"), "allgather or ring"),
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
        ("trainer.logger", t.logger, t.logger in ("csv", "tensorboard", "wandb"), "csv, tensorboard or wandb"),
    ]
    for key, value, ok, want in rules:
        if not ok:
            raise ConfigError(f"{key} must be {want}, got {value!r}")
    activation_policy(cfg.model.activation_checkpointing)
    check_model_overrides(cfg.model.overrides)


def activation_policy(value: Any, key: str = "model.activation_checkpointing") -> str:
    """The recompute policy of ``key``: none | selective | full | auto (true / false: full / none)."""
    from seqpar.models.config import normalize_activation_checkpointing

    if isinstance(value, str) and value.lower() in ("true", "false"):  # a str key turns `true` into "True"
        value = value.lower() == "true"
    try:
        return normalize_activation_checkpointing(value, name=key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _type_ok(value: Any, tp: Any) -> bool:
    """Strict type check of one override value against a TNLConfig annotation (bool is not an int)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def check_model_overrides(overrides) -> None:
    """``model.overrides`` keys must be TNLConfig fields and values of the field's type (strict booleans)."""
    from seqpar.models.config import TNLConfig

    hints = typing.get_type_hints(TNLConfig)
    items = OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides) else dict(overrides)
    bad = sorted(set(items) - set(hints))
    if bad:
        raise ConfigError(f"model: unknown TNLConfig fields {bad}")
    for name, value in items.items():
        tp = hints[name]
        if not _type_ok(value, tp):
            want = " or ".join("null" if a is type(None) else a.__name__ for a in (typing.get_args(tp) or (tp,)))
            raise ConfigError(f"model.overrides.{name} must be {want}, got {value!r} ({type(value).__name__})")
        if name == "activation_checkpointing":
            activation_policy(value, "model.overrides.activation_checkpointing")
