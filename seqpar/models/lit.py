"""LightningModule wrapping :class:`TransNormerLLM` for (sequence-parallel) pre-training."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TNLConfig
from .transnormer import TransNormerLLM


def _check_finite_enabled() -> bool:
    """The operator's NaN/inf switch (``set_check_finite`` / env ``SEQPAR_CHECK_FINITE``) also checks the loss."""
    from seqpar.kernels.lightning_attn import interface

    return bool(getattr(interface, "_check_finite", False))


def warmup_cosine(step: int, warmup_steps: int, max_steps: Optional[int], min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, cosine down to ``min_lr_ratio`` at ``max_steps``.

    ``max_steps=None`` (no known end): constant 1 after the warmup.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps is None:
        return 1.0
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_impl(on_cuda: bool, fp16_scaler: bool = False) -> dict:
    """AdamW implementation kwargs: fused on CUDA (gradient clipping is done by :class:`LitLM` itself, so
    Lightning's refusal to clip for an optimizer that unscales internally does not apply), foreach under a
    fp16 GradScaler (a fused step would see scaled gradients at clipping time)."""
    if not on_cuda:
        return {}
    return {"foreach": True} if fp16_scaler else {"fused": True}


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float, optimizer=None) -> torch.Tensor:
    """Clip the global L2 norm of the gradients of ``params`` to ``max_norm``; returns that norm before clipping
    (a 0-dim tensor on the gradients' device, no host sync).

    With a fused torch Adam/AdamW ``optimizer`` (``fused=True``) and plain-tensor gradients on one device, the
    scaling is left to the optimizer's next step: it gets ``grad_scale = max(1, (norm + 1e-6) / max_norm)``, which
    the fused step divides each gradient by as it reads it (storing the result), so the separate read-and-write
    pass over every gradient is saved; a step post-hook takes the scale off again, so it applies to that one step.
    Until that step the gradients are unscaled. Otherwise (no optimizer, not fused, DTensor gradients as under
    FSDP2) ``torch.nn.utils.clip_grad_norm_`` scales them in place. Either way the step and the gradients after it
    are those of clipping by ``min(1, max_norm / (norm + 1e-6))``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        DTensor = ()

    params = [p for p in params if p.grad is not None]
    opt = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    fused = (isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) and bool(params)
             and all(g.get("fused") for g in opt.param_groups)
             and not any(isinstance(p.grad, DTensor) for p in params) and len({p.grad.device for p in params}) == 1)
    if not fused:
        return torch.nn.utils.clip_grad_norm_(params, float(max_norm)).detach()
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        raise RuntimeError("clip_grad_norm_: the fused optimizer already has a grad_scale / found_inf (an AMP "
                           "GradScaler?); unscale first and clip with torch.nn.utils.clip_grad_norm_")
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]).detach()
    opt.grad_scale = torch.clamp((norm.float() + 1e-6) / float(max_norm), min=1.0)
    if not getattr(opt, "_seqpar_clip_hook", None):
        opt._seqpar_clip_hook = opt.register_step_post_hook(_drop_clip_scale)
    return norm


def _drop_clip_scale(opt, args, kwargs) -> None:
    opt.grad_scale = None


def _host(x: float) -> torch.Tensor:
    """A host number as a CPU scalar tensor for ``self.log`` (no device copy)."""
    return torch.tensor(float(x), dtype=torch.float32)


class LitLM(pl.LightningModule):
    """TransNormerLLM language model as a LightningModule.

    Args:
        config: a TNLConfig, a dict of its fields (e.g. from OmegaConf / a checkpoint), or a preset name.
        lr: peak learning rate of AdamW.
        weight_decay: applied to matrices of linear layers only (not norms, biases, embeddings, slopes).
        betas, eps: AdamW.
        warmup_steps: linear warmup steps.
        max_steps: end of the cosine schedule; None (or <= 0, Lightning's -1) takes ``trainer.max_steps``
            (or the estimated number of optimizer steps).
        min_lr_ratio: final LR / peak LR of the cosine schedule.
        grad_clip: clip the global gradient norm to this value before each optimizer step (``None`` or 0:
            no clipping); done here rather than by Lightning so the fused AdamW can be used. The norm before
            clipping is kept in ``last_grad_norm`` (a tensor, no host sync).

    SP / FSDP: the module holds no parallel plumbing. ``strategy="lightning_sp"`` runs the model through
    ``seqpar.distributed.parallelize`` (which gives every attention layer its SP context, and shards with
    FSDP2 when ``fsdp=True``); plain strategies leave the model single-process.

    Batch: dict with ``"input_ids"`` [B, T] and ``"labels"`` [B, T] (already shifted; -100 ignored),
    optional ``"cu_seqlens"`` (B == 1). Under SP the strategy has already sliced T to the rank's shard.

    Logged: ``train/loss`` (every step, the mean over the data-parallel ranks of their SP groups' losses, i.e.
    the loss of the global batch when every rank has as many valid tokens), ``train/lr``, ``train/tokens_per_s``
    (tokens of the global batch per second, each SP group's sequence counted once),
    ``train/tokens_per_gpu_per_s``, ``val/loss`` (epoch mean, synced over ranks).
    """

    def __init__(
        self,
        config: Union[TNLConfig, Dict[str, Any], str, None] = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: Sequence[float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        max_steps: Optional[int] = None,
        min_lr_ratio: float = 0.1,
        grad_clip: Optional[float] = None,
    ):
        super().__init__()
        if config is None:
            config = TNLConfig.preset("tiny")
        elif isinstance(config, str):
            config = TNLConfig.preset(config)
        elif isinstance(config, dict) or (hasattr(config, "keys") and not isinstance(config, TNLConfig)):
            config = TNLConfig.from_dict(dict(config))
        if not isinstance(config, TNLConfig):
            raise TypeError(f"config must be a TNLConfig, dict or preset name, got {type(config).__name__}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip >= 0):
            raise ValueError(f"grad_clip must be None or a number >= 0 (0 disables), got {grad_clip!r}")
        if max_steps is not None and max_steps <= 0:
            max_steps = None  # Lightning's -1 = "unbounded": the schedule then follows the trainer
        self.config = config
        self.save_hyperparameters(
            {"config": config.to_dict(), "lr": lr, "weight_decay": weight_decay, "betas": tuple(betas),
             "eps": eps, "warmup_steps": warmup_steps, "max_steps": max_steps, "min_lr_ratio": min_lr_ratio,
             "grad_clip": grad_clip}
        )
        self.model = TransNormerLLM(config)
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._last_step_time: Optional[float] = None

    def _sp_size(self) -> int:
        g = self.model.sp_group
        if g is None or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(g)

    # -- steps
    def forward(self, input_ids, labels=None, cu_seqlens=None):
        return self.model(input_ids, labels=labels, cu_seqlens=cu_seqlens)

    @staticmethod
    def _unpack(batch):
        if not isinstance(batch, dict) or "input_ids" not in batch or "labels" not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"batch must be a dict with 'input_ids' and 'labels' (optional 'cu_seqlens'), got {got}")
        ids = batch["input_ids"]
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and 0 in ids.shape:
            raise ValueError(f"empty batch: input_ids has shape {tuple(ids.shape)} (B and T must be >= 1)")
        return ids, batch["labels"], batch.get("cu_seqlens")

    def training_step(self, batch, batch_idx):
        input_ids, labels, cu = self._unpack(batch)
        out = self.model(input_ids, labels=labels, cu_seqlens=cu, return_logits=False)
        B = input_ids.shape[0]
        if _check_finite_enabled() and not bool(torch.isfinite(out.loss.detach())):
            raise FloatingPointError(
                f"non-finite training loss {out.loss.item()} at step {self.global_step} (batch {batch_idx}); "
                "SEQPAR_CHECK_FINITE is on"
            )
        # sync_dist: the mean over all ranks = over dp (the ranks of an SP group hold the same group loss)
        self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=B,
                 sync_dist=True)
        # Host numbers are logged as CPU tensors: Lightning turns a python float into a tensor on the module's
        # device, a host-to-device copy that waits for the queued GPU work, once per value and step.
        opt = self._trainer.optimizers[0] if self._trainer is not None and self._trainer.optimizers else None
        if opt is not None:
            self.log("train/lr", _host(opt.param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=B)
        # Throughput: the rank holds a distinct shard (or a distinct sample under pure DP), so the
        # global batch is local tokens x world size; each SP group's sequence counts once.
        now = time.perf_counter()
        if self._last_step_time is not None:
            dt = max(now - self._last_step_time, 1e-9)
            local_tokens = input_ids.numel()
            world = self._trainer.world_size if self._trainer is not None else 1
            self.log("train/tokens_per_s", _host(local_tokens * world / dt), on_step=True, on_epoch=False,
                     batch_size=B)
            self.log("train/tokens_per_gpu_per_s", _host(local_tokens / dt), on_step=True, on_epoch=False,
                     batch_size=B)
        self._last_step_time = now
        if input_ids.is_cuda and self._logs_this_step():
            # the most any rank has held so far (training, incl. activations), GiB: a device tensor for the
            # max over ranks, so only on the steps the loggers write
            self.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(input_ids.device) / 2**30, on_step=True,
                     on_epoch=False, batch_size=B, sync_dist=True, reduce_fx="max")
        return out.loss

    def _logs_this_step(self) -> bool:
        """Whether the Trainer's loggers write this step's metrics (every ``log_every_n_steps``)."""
        conn = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        return bool(getattr(conn, "should_update_logs", True))

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def validation_step(self, batch, batch_idx):
        input_ids, labels, cu = self._unpack(batch)
        out = self.model(input_ids, labels=labels, cu_seqlens=cu, return_logits=False)
        self.log("val/loss", out.loss.detach(), on_step=False, on_epoch=True, prog_bar=True,
                 sync_dist=True, batch_size=input_ids.shape[0])
        return out.loss

    # -- optimisation
    def param_groups(self):
        decay, no_decay, seen = [], [], set()
        for module in self.model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                if isinstance(module, nn.Linear) and name == "weight" and p.dim() >= 2 and p is not self.model.embed.weight:
                    decay.append(p)
                else:
                    no_decay.append(p)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def _total_steps(self) -> Optional[int]:
        if self.hparams.max_steps is not None:
            return int(self.hparams.max_steps)
        trainer = self._trainer
        if trainer is not None:
            if trainer.max_steps is not None and trainer.max_steps > 0:
                return int(trainer.max_steps)
            try:
                est = trainer.estimated_stepping_batches
                if est is not None and math.isfinite(est):
                    return int(est)
            except Exception:  # noqa: BLE001 - no dataloader yet / infinite
                pass
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        clip = self.hparams.get("grad_clip")
        if clip:
            self.last_grad_norm = clip_grad_norm_(self.parameters(), float(clip), optimizer)

    def configure_optimizers(self):
        h = self.hparams
        trainer = self._trainer
        trainer_clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
        fp16 = str(getattr(trainer, "precision", "")).startswith("16") if trainer is not None else False
        # Lightning's own clipping (Trainer(gradient_clip_val=...)) refuses a fused optimizer: foreach then
        kwargs = adamw_impl(next(self.model.parameters()).is_cuda, fp16_scaler=fp16 or bool(trainer_clip))
        opt = torch.optim.AdamW(self.param_groups(), lr=h.lr, betas=tuple(h.betas), eps=h.eps, **kwargs)
        total, warmup, min_ratio = self._total_steps(), int(h.warmup_steps), float(h.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, warmup, total, min_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
