"""Builders of a train.py run: model, data, strategy, callbacks and the Lightning Trainer."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Sequence

from omegaconf import OmegaConf

from .config import ConfigError, activation_policy, check_model_overrides

__all__ = ["build", "build_model_config", "check_vocab_covers_data"]


def build_model_config(cfg):
    """TNLConfig from ``model.preset`` + ``model.overrides`` (type-checked) + ``parallel.sp_mode`` +
    ``model.activation_checkpointing`` (unless the overrides set it)."""
    from seqpar.models import TNLConfig

    check_model_overrides(cfg.model.overrides)
    try:
        overrides = dict(OmegaConf.to_container(cfg.model.overrides, resolve=True))
        overrides["sp_mode"] = cfg.parallel.sp_mode
        if "activation_checkpointing" not in overrides:  # an explicit overrides value wins
            policy = activation_policy(cfg.model.get("activation_checkpointing", "auto"))
            if policy == "auto" and overrides.get("activation_offload"):
                policy = "full"  # offload moves the inputs of fully checkpointed blocks
            overrides["activation_checkpointing"] = policy
        return TNLConfig.preset(cfg.model.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None


def check_vocab_covers_data(dm, vocab_size: int) -> None:
    """Every token id of the (memmap / token) datasets must be < vocab_size; one-line ConfigError otherwise."""
    import numpy as np

    for split, ds in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        tokens = getattr(ds, "tokens", None)
        if tokens is None or len(tokens) == 0:
            continue
        step = 1 << 24  # scan in slices: a memmap is paged in piecewise
        top = max(int(np.max(tokens[i:i + step])) for i in range(0, len(tokens), step))
        if top >= vocab_size:
            raise ConfigError(f"data: the {split} tokens reach id {top} but the model's vocab_size is {vocab_size} "
                              f"(set model.overrides.vocab_size >= {top + 1})")


def build(cfg, layout: Dict[str, Any], callbacks: Optional[Sequence[Any]] = None):
    """(trainer, model, datamodule, ckpt_path, ckpt_dir); construction errors become ConfigError.

    ``callbacks``: extra Lightning callbacks, appended after the recipe's own.
    """
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

    import seqpar.strategies  # noqa: F401  registers "lightning_sp"
    from seqpar.data import SeqDataModule
    from seqpar.models.lit import LitLM
    from seqpar.strategies import LightningSPStrategy
    from seqpar.strategies.checkpointing import (AtomicCheckpointIO, check_writable_dir, find_resume_checkpoint,
                                                 verify_checkpoint)

    from .callbacks import StepSeeder, extra_callbacks_from_env
    from .preemption import LastCheckpoint

    from .progress import RunInfo, StepLogger

    t, d, o = cfg.trainer, cfg.data, cfg.optim
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # same initial weights on every layout
    data_meta, data_dtype, data_eos = _data_meta(cfg)  # memmap: meta.json of `seqpar prepare` sets vocab / dtype / eos
    model_cfg = build_model_config(cfg)
    if model_cfg.seq_chunk is not None and (layout["sp"] > 1 or layout.get("fsdp")):  # now, not at the first step
        what = f"parallel.sp={layout['sp']}" if layout["sp"] > 1 else "parallel.fsdp=true"
        raise ConfigError(f"model.overrides.seq_chunk={model_cfg.seq_chunk} does not compose with {what} (each "
                          "layer's SP exchange needs the whole shard; FSDP's unsharded copies would get no "
                          "gradients): use seq_chunk=null, or parallel.sp=1 without fsdp")
    if d.kind == "corpus" and model_cfg.vocab_size < 256:
        raise ConfigError(f"data.kind=corpus is byte-level (256 tokens) but the model's vocab_size is {model_cfg.vocab_size}")
    try:
        dm = SeqDataModule(
            kind=d.kind, seq_len=d.seq_len, batch_size=d.batch_size, path=d.path, dtype=data_dtype, packed=d.packed,
            eos_id=data_eos, val_fraction=d.val_fraction, max_bytes=d.max_bytes, train_samples=d.train_samples,
            val_samples=d.val_samples, num_workers=d.num_workers, seed=cfg.seed, recall_pairs=d.recall_pairs,
            recall_queries=d.recall_queries, vocab_size=min(256, model_cfg.vocab_size),
        )
        if d.kind == "memmap" and not os.path.exists(d.path):
            raise ValueError(f"data.path not found: {d.path}")
        dm.setup("fit")  # open / build the datasets now: bad dtypes, sizes, task settings fail before training
        model = LitLM(
            model_cfg, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
            warmup_steps=o.warmup_steps, max_steps=t.max_steps, min_lr_ratio=o.min_lr_ratio,
            grad_clip=o.grad_clip or None,  # clipped by LitLM, so AdamW stays fused on the GPU
        )
    except (ValueError, TypeError, OSError) as e:
        raise ConfigError(f"data: {e}" if "data" not in str(e).split(":")[0] else str(e)) from None
    if d.kind == "memmap":
        check_vocab_covers_data(dm, model_cfg.vocab_size)
    if cfg.model.compile:
        compile_model(model.model, cfg.model.compile_scope, layout)

    ckpt_dir = t.ckpt_dir or os.path.join(t.out_dir, "checkpoints")
    why = check_writable_dir(ckpt_dir)  # now, not at the first save ckpt_every steps into training
    if why:
        raise ConfigError(f"trainer.ckpt_dir: {why}")
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

    if layout["world"] > 1 or layout["sp"] > 1 or layout.get("fsdp"):
        strategy = LightningSPStrategy(sp_size=layout["sp"], sp_mode=cfg.parallel.sp_mode,
                                       **({"fsdp": True} if layout.get("fsdp") else {}))
    else:
        strategy = "auto"
    precision = t.precision or ("bf16-mixed" if layout["accelerator"] == "gpu" else "32-true")
    cbs = [
        # first: its per-step line times the steps, not the checkpoint that LastCheckpoint writes at max_steps
        StepLogger(t.log_every, model_cfg, run_dir=t.out_dir, ckpt_path=os.path.join(ckpt_dir, "last.ckpt")),
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
            every_n_train_steps=t.ckpt_every or None, save_top_k=t.keep_ckpts if t.ckpt_every else 0,
            monitor="step", mode="max", save_last=False, enable_version_counter=False,
        ),
        # last.ckpt: after optimizer steps only (every ckpt_every steps, at max_steps, on SIGTERM / SIGINT), so
        # that it resumes exactly like the step file of the same step (see seqpar.recipe.preemption)
        LastCheckpoint(ckpt_dir, every=t.ckpt_every),
    ]
    show_bar = bool(t.progress_bar) and sys.stdout.isatty()  # a redirected log gets no \r-joined bar lines
    if show_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, min(t.log_every, 10))))
    cbs.append(StepSeeder(cfg.seed))
    cbs.append(RunInfo(_run_info(cfg, data_meta, data_dtype, data_eos)))
    try:
        cbs.extend(extra_callbacks_from_env())
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None
    cbs.extend(callbacks or ())
    try:
        trainer = _make_trainer(t, o, layout, strategy, precision, cbs, AtomicCheckpointIO(), show_bar)
    except (ValueError, TypeError, MisconfigurationException) as e:
        raise ConfigError(f"trainer: {str(e).strip().splitlines()[0]}") from None
    return trainer, model, dm, ckpt_path, ckpt_dir


def _data_meta(cfg):
    """(meta.json of a prepared memmap directory or None, data dtype, data eos_id); sets the model's vocab_size
    from it unless model.overrides.vocab_size is given; a contradiction is a one-line ConfigError."""
    from seqpar.data.prepare import apply_meta, read_meta

    d = cfg.data
    if d.kind != "memmap" or not d.path or not os.path.exists(d.path):
        return None, d.dtype, d.eos_id
    try:
        meta = read_meta(d.path)
        vocab = cfg.model.overrides.get("vocab_size") if "vocab_size" in cfg.model.overrides else None
        dtype, eos_id, vocab = apply_meta(meta, d.dtype, d.eos_id, vocab, where=f"{d.path}/meta.json")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if meta is not None:
        cfg.model.overrides["vocab_size"] = vocab
    return meta, dtype, eos_id


def _run_info(cfg, meta, dtype, eos_id):
    """What every checkpoint carries under "seqpar": data settings, meta.json, the tokenizer, the config."""
    d = cfg.data
    path = os.path.abspath(d.path) if d.path else None
    info = {
        "data": {"kind": d.kind, "path": path, "seq_len": int(d.seq_len), "dtype": dtype, "eos_id": eos_id,
                 "packed": bool(d.packed)},
        "meta": meta,
        "tokenizer": None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if meta is not None and path is not None:
        tok_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "tokenizer.json")
        if os.path.isfile(tok_file):
            with open(tok_file) as f:
                info["tokenizer"] = {"json": f.read(), "eos_id": int(meta["eos_id"]),
                                     **{k: v for k, v in (meta.get("tokenizer") or {}).items() if k in ("kind", "source")}}
    elif d.kind == "corpus":
        info["tokenizer"] = {"kind": "bytes", "eos_id": 0, "json": None}
    return info


def _make_logger(t):
    """Logs under <out_dir>/logs/version_N: CSV (metrics.csv), TensorBoard event files or Weights & Biases."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    if t.logger == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        return WandbLogger(save_dir=t.out_dir, project="seqpar", name=os.path.basename(os.path.normpath(t.out_dir)))
    if t.logger == "tensorboard":
        return TensorBoardLogger(t.out_dir, name="logs")
    return CSVLogger(t.out_dir, name="logs", flush_logs_every_n_steps=t.log_every)


def compile_model(model, scope: str, layout: Dict[str, Any]) -> str:
    """``model.compile``: the whole model in one graph ("model"), or each block ("blocks"); "auto" takes
    "model" without SP and FSDP (whose exchanges and hooks sit between the blocks) and "blocks" otherwise.
    Returns the scope used."""
    if scope == "auto":
        scope = "model" if layout["sp"] == 1 and not layout.get("fsdp") else "blocks"
    if scope == "model":
        model.compile_model()
    else:
        model.compile_blocks()
    return scope


def _make_trainer(t, o, layout, strategy, precision, callbacks, checkpoint_io, show_bar=None):
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator=layout["accelerator"], devices=layout["devices"], num_nodes=layout["num_nodes"],
        strategy=strategy, precision=precision, max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=None,
        log_every_n_steps=t.log_every, val_check_interval=t.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if t.val_check_interval else 0, num_sanity_val_steps=0,
        logger=_make_logger(t), callbacks=callbacks,
        enable_progress_bar=t.progress_bar if show_bar is None else show_bar,
        enable_model_summary=False,  # its FLOPs column reads 0 for this model; train.py prints the parameter count
        default_root_dir=t.out_dir, benchmark=False,
        deterministic=bool(t.deterministic),
        plugins=[checkpoint_io],
    )
