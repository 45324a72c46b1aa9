"""Training feedback of ``train.py``: per-step log lines, an end-of-run summary, a loss-curve PNG, and the
run's data / tokenizer settings stored in every checkpoint.

Every ``log_every`` optimizer steps global rank 0 prints one line (torchtitan style)::

    step 20 | loss 2.3412 | lr 1.00e-03 | grad-norm 0.812 | tokens/s 41.2K | tokens/GPU/s 20.6K | MFU 31.2% | mem 12.3 GiB

MFU and mem are left out where unknown (CPU, GPU without a known peak). Lines go through the progress
bar's ``write`` when a bar is shown, plain ``print`` otherwise: a log file gets whole lines.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch

__all__ = ["StepLogger", "RunInfo", "format_step_line", "plot_losses"]


def _si(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def format_step_line(step: int, loss: Optional[float], lr: Optional[float], grad_norm: Optional[float],
                     tokens_per_s: Optional[float], tokens_per_gpu_per_s: Optional[float],
                     mfu: Optional[float] = None, mem_gib: Optional[float] = None,
                     hfu: Optional[float] = None) -> str:
    """``step N | loss X | lr Y | grad-norm G | tokens/s T | tokens/GPU/s U [| MFU M%] [| HFU H%] [| mem P GiB]``
    (HFU: recompute included; written when it differs from MFU)."""
    parts = [f"step {step}"]
    parts.append(f"loss {loss:.4f}" if loss is not None else "loss -")
    parts.append(f"lr {lr:.2e}" if lr is not None else "lr -")
    parts.append(f"grad-norm {grad_norm:.3f}" if grad_norm is not None else "grad-norm -")
    parts.append(f"tokens/s {_si(tokens_per_s)}" if tokens_per_s is not None else "tokens/s -")
    parts.append(f"tokens/GPU/s {_si(tokens_per_gpu_per_s)}" if tokens_per_gpu_per_s is not None else "tokens/GPU/s -")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if hfu is not None and (mfu is None or abs(hfu - mfu) > 5e-4):
        parts.append(f"HFU {100 * hfu:.1f}%")
    if mem_gib is not None:
        parts.append(f"mem {mem_gib:.1f} GiB")
    return " | ".join(parts)


def plot_losses(path: str, train: List[Tuple[int, float]], val: List[Tuple[int, float]]) -> Optional[str]:
    """Write a loss-curve PNG; returns None on success, else the reason it was not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _scalar(metrics: Dict[str, Any], key: str) -> Optional[float]:
    v = metrics.get(key)
    if v is None:
        return None
    v = float(v.detach().float().cpu()) if isinstance(v, torch.Tensor) else float(v)
    return v if math.isfinite(v) else None


def _autocast_bf16(trainer) -> bool:
    """Whether the trainer runs bf16 autocast (the dtype the recompute policy was chosen for)."""
    return str(getattr(trainer, "precision", "")).startswith("bf16")


class StepLogger(pl.Callback):
    """Per-step log lines on global rank 0, a summary and ``loss.png`` at the end of the run.

    Args:
        log_every: optimizer steps between lines.
        model_config: the TNLConfig (for MFU); None leaves MFU out.
        run_dir: where ``loss.png`` goes (None: no plot).
        ckpt_path: reported in the summary.
        stream: where lines go without a progress bar (default: stdout).
    """

    def __init__(self, log_every: int, model_config=None, run_dir: Optional[str] = None,
                 ckpt_path: Optional[str] = None, stream=None):
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive int, got {log_every!r}")
        self.log_every, self.model_config, self.run_dir, self.ckpt_path = log_every, model_config, run_dir, ckpt_path
        self.stream = stream
        self.train_losses: List[Tuple[int, float]] = []
        self.val_losses: List[Tuple[int, float]] = []
        self.tokens = 0  # tokens of the global batches trained on in this run (each SP group's sequence once)
        self._acc_local = self._acc_global = 0  # this rank's / all ranks' tokens since the last line
        self._t_last: Optional[float] = None
        self._t_start: Optional[float] = None
        self._grad_norm: Optional[float] = None
        self._step_seen = None

    # -- output
    def _write(self, trainer, line: str) -> None:
        bar = getattr(trainer, "progress_bar_callback", None)
        if bar is not None and getattr(bar, "is_enabled", False) and hasattr(bar, "print"):
            bar.print(line)
        else:
            print(line, file=self.stream or sys.stdout, flush=True)

    # -- hooks
    def on_train_start(self, trainer, pl_module):
        self._t_start = self._t_last = time.perf_counter()
        self._step_seen = trainer.global_step
        self._start_step = trainer.global_step

    def _log_step(self, trainer, step: int) -> bool:
        return step % self.log_every == 0 or step == trainer.max_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # the norm of the (world-averaged, unclipped) gradients, on the steps that print a line; every rank
        # computes it (a DTensor norm under FSDP is a collective)
        if not self._log_step(trainer, trainer.global_step + 1):
            return
        norms = [p.grad.detach().float().norm(2) for p in pl_module.parameters() if p.grad is not None]
        if not norms:
            self._grad_norm = None
            return
        total = torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]).norm(2)
        self._grad_norm = float(total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(ids, torch.Tensor):  # this rank's shard; the ranks together hold world x as many
            self._acc_local += ids.numel()
            self._acc_global += ids.numel() * trainer.world_size
            self.tokens += ids.numel() * trainer.world_size
        step = trainer.global_step
        if step == self._step_seen:  # gradient accumulation: not an optimizer step yet
            return
        self._step_seen = step
        if not self._log_step(trainer, step):
            return
        now = time.perf_counter()
        dt = max(now - (self._t_last or now), 1e-9)
        tps, tpgs = self._acc_global / dt, self._acc_local / dt
        self._acc_global = self._acc_local = 0
        self._t_last = now
        loss = _scalar(trainer.callback_metrics, "train/loss")
        if loss is not None:
            self.train_losses.append((step, loss))
        if not trainer.is_global_zero:
            return
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None
        device = ids.device if isinstance(ids, torch.Tensor) else torch.device("cpu")
        mfu = hfu = mem = None
        if device.type == "cuda":
            from seqpar.models.flops import hfu as hfu_fn, mfu as mfu_fn, peak_tflops, recompute_of

            if self.model_config is not None:
                peak = peak_tflops(device)
                mfu = mfu_fn(self.model_config, tpgs, peak)
                model = getattr(pl_module, "model", None)
                if model is not None and hasattr(model, "activation_policy") and ids.dim() == 2:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=_autocast_bf16(trainer)):
                        policy = recompute_of(model, ids.shape[0], ids.shape[1], ids)
                    hfu = hfu_fn(self.model_config, tpgs, peak, policy, bool(self.model_config.seq_chunk))
            mem = torch.cuda.max_memory_allocated(device) / 2**30
        self._write(trainer, format_step_line(step, loss, lr, self._grad_norm, tps, tpgs, mfu, mem, hfu))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step_seen is None:
            self._step_seen = trainer.global_step

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        v = _scalar(trainer.callback_metrics, "val/loss")
        if v is not None and (not self.val_losses or self.val_losses[-1][0] != trainer.global_step):
            self.val_losses.append((trainer.global_step, v))
            if trainer.is_global_zero:
                self._write(trainer, f"step {trainer.global_step} | val loss {v:.4f} | val ppl {math.exp(min(v, 50)):.2f}")

    # -- end of run
    def summary(self, trainer) -> str:
        """The end-of-run summary (steps, tokens, time, best val loss, checkpoint)."""
        elapsed = time.perf_counter() - self._t_start if self._t_start else 0.0
        best = min((v for _, v in self.val_losses), default=None)
        last = self.train_losses[-1][1] if self.train_losses else None
        parts = [
            f"steps {trainer.global_step - getattr(self, '_start_step', 0)} (global step {trainer.global_step})",
            f"tokens {_si(self.tokens)}",
            f"time {elapsed:.1f} s",
            f"last train loss {last:.4f}" if last is not None else "last train loss -",
            f"best val loss {best:.4f}" if best is not None else "best val loss -",
        ]
        if self.ckpt_path:
            parts.append(f"checkpoint {self.ckpt_path}")
        return "done: " + " | ".join(parts)

    def finish(self, trainer) -> None:
        """Print the summary and write ``<run_dir>/loss.png`` (global rank 0)."""
        if not trainer.is_global_zero:
            return
        print(self.summary(trainer), flush=True)
        if self.run_dir and (self.train_losses or self.val_losses):
            path = os.path.join(self.run_dir, "loss.png")
            why = plot_losses(path, self.train_losses, self.val_losses)
            print(f"loss curve: {path}" if why is None else f"loss curve not written: {why}", flush=True)


class RunInfo(pl.Callback):
    """Stores ``info`` (data settings, data meta.json, tokenizer json, the run config) under the key
    ``"seqpar"`` of every checkpoint, so that ``seqpar generate / eval / export`` need nothing re-typed."""

    def __init__(self, info: Dict[str, Any]):
        self.info = dict(info)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["seqpar"] = self.info
