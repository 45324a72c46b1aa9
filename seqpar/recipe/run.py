"""``main(argv)``: the train.py recipe (parse, check, build, fit, final checkpoint, tear-down)."""
from __future__ import annotations

import os
import warnings
from typing import Any, List, Optional, Sequence

from omegaconf import OmegaConf

from .config import ConfigError, load_config, parse_args
from .elastic import destroy_process_group, init_torchelastic_process_group, is_rank_zero
from .layout import resolve_layout

__all__ = ["main"]


class _DropTips:
    """logging filter: Lightning's product adverts ("💡 Tip: ... litlogger / litmodels")."""

    def filter(self, record) -> bool:
        return "\U0001f4a1 Tip" not in str(record.getMessage())


def _quiet_lightning() -> None:
    import logging

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in lg.filters):
            lg.addFilter(_DropTips())
        for h in lg.handlers:
            if not any(isinstance(f, _DropTips) for f in h.filters):
                h.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # StepLogger prints every trainer.log_every steps whatever the epoch length
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")

DESCRIPTION = ("Train a TransNormerLLM (Lightning Attention-2) language model with data x sequence parallelism "
               "(+ FSDP2 with parallel.fsdp=true).")


def main(argv: Optional[List[str]] = None, callbacks: Optional[Sequence[Any]] = None) -> int:
    """Run train.py with ``argv`` (``--config`` files and ``key=value`` overrides); extra Lightning callbacks
    may be given. Config errors exit with one line ``train.py: config error: ...``."""
    args = parse_args(argv, DESCRIPTION)
    try:
        cfg = load_config(args.config, args.overrides)
        layout = resolve_layout(cfg)  # value checks too, so --print-config prints only a valid config
        if args.print_config:
            print(OmegaConf.to_yaml(cfg))
            return 0
        from .builders import build

        _quiet_lightning()
        trainer, model, dm, ckpt_path, ckpt_dir = build(cfg, layout, callbacks)
    except ConfigError as e:
        raise SystemExit(f"train.py: config error: {e}") from None
    if is_rank_zero():  # the merged config goes to <out_dir>/config.yaml (--print-config prints it)
        os.makedirs(cfg.trainer.out_dir, exist_ok=True)
        with open(os.path.join(cfg.trainer.out_dir, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg))
        print(f"[train.py] config {os.path.join(cfg.trainer.out_dir, 'config.yaml')} | data {cfg.data.kind}"
              f"{' ' + str(cfg.data.path) if cfg.data.path else ''} | vocab {model.config.vocab_size} | "
              f"seq_len {cfg.data.seq_len} | max_steps {cfg.trainer.max_steps}")
        print(f"[train.py] world={layout['world']} sp={layout['sp']} dp={layout['dp']} fsdp={layout['fsdp']} "
              f"accelerator={layout['accelerator']} devices={layout['devices']} nodes={layout['num_nodes']} "
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M resume={ckpt_path}")

    import torch

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`num_workers`.*")
    if layout["accelerator"] == "gpu":
        torch.set_float32_matmul_precision("high")
    init_torchelastic_process_group(layout["accelerator"])
    finished = False
    try:
        if cfg.trainer.resume == "auto" and torch.distributed.is_available() and torch.distributed.is_initialized():
            choice = [ckpt_path]  # every rank resumes from rank 0's choice (files may change while ranks start)
            torch.distributed.broadcast_object_list(choice, src=0)
            ckpt_path = choice[0]
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        # last.ckpt was written by LastCheckpoint after the final (or the signalled) step; a checkpoint saved
        # here would record the epoch as completed and resume with another data order
        last = os.path.join(ckpt_dir, "last.ckpt")
        for cb in trainer.callbacks:  # last.ckpt is written by LastCheckpoint at the final optimizer step
            if hasattr(cb, "finish") and hasattr(cb, "summary"):  # StepLogger: summary line + loss.png
                cb.finish(trainer)
        if trainer.is_global_zero:
            stopped = any(getattr(c, "stopped_at", None) is not None for c in trainer.callbacks)
            print(f"[train.py] {'stopped' if stopped else 'done'}: step {trainer.global_step}, checkpoint {last}, "
                  f"logs {trainer.logger.log_dir}")
        finished = True
    finally:
        destroy_process_group(barrier=finished)
    return 0
