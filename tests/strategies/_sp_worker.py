"""Helper script for tests/strategies: trains a tiny LitLM with ``strategy="lightning_sp"``.

Run as a script (Lightning's launcher re-runs it for ranks 1..N-1, which is why this is not done inside
pytest), or call :func:`run` in-process for the single-process reference (``devices=1``, strategy "auto").
Rank 0 writes ``<out>/result.json`` (per-step world-mean losses, layout seen by every rank) and
``<out>/params.pt`` (final parameters).
"""
from __future__ import annotations

import argparse
import json
import os
import warnings

import pytorch_lightning as pl
import torch
import torch.distributed as dist

SEQ_LEN = 64
STEPS = 4




class Recorder(pl.Callback):
    """Records world-mean losses, the layout seen by every rank; rank 0 writes them in on_fit_end (in-process,
    so it works with the spawn launcher too)."""

    def __init__(self, out: str):
        self.out = out
        self.losses = []
        self.layouts = []
        self.shapes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(list(batch["input_ids"].shape))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().double().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)  # SP ranks hold the same group loss: world mean = mean over dp
            loss /= dist.get_world_size()
        self.losses.append(loss.item())

    def on_fit_start(self, trainer, pl_module):
        s = trainer.strategy
        info = {"global_rank": trainer.global_rank, "world_size": trainer.world_size}
        for k in ("sp_size", "dp_size", "sp_rank", "dp_rank"):
            info[k] = getattr(s, k, None)
        info["sampler"] = getattr(s, "distributed_sampler_kwargs", None)
        group = pl_module.model.sp_group
        info["model_sp_group_size"] = dist.get_world_size(group) if group is not None else 1
        # the model's (and every attention layer's) SP group is the layout's: ParallelDims owns it
        layers = [m for m in pl_module.modules() if hasattr(m, "sp_group")]
        layout_group = s.parallel_dims.sp_group if hasattr(s, "parallel_dims") else None
        info["group_from_layout"] = all(m.sp_group is layout_group for m in layers) and len(layers) > 1
        gathered = [None] * trainer.world_size
        if trainer.world_size > 1:
            dist.all_gather_object(gathered, info)
        else:
            gathered = [info]
        self.layouts = gathered

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "result.json"), "w") as f:
            json.dump({"losses": self.losses, "layouts": self.layouts, "shapes": self.shapes}, f)
        params = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(params, os.path.join(self.out, "params.pt"))


def run(devices: int, sp: int, batch_size: int, out: str, strategy: str = "lightning_sp", steps: int = STEPS,
        use_datamodule: bool = True) -> dict:
    import seqpar.strategies  # noqa: F401  (registers "lightning_sp")
    from seqpar.data import SeqDataModule
    from seqpar.models import TNLConfig
    from seqpar.models.lit import LitLM

    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    config = TNLConfig.preset("tiny", max_seq_len=SEQ_LEN)
    model = LitLM(config, lr=3e-3, warmup_steps=0, max_steps=1000, weight_decay=0.0)
    dm = SeqDataModule("corpus", seq_len=SEQ_LEN, batch_size=batch_size, max_bytes=1 << 18, seed=0)
    if strategy == "auto":
        strat = "auto"
    else:
        from seqpar.strategies import LightningSPStrategy

        strat = LightningSPStrategy(sp_size=sp, start_method="spawn" if strategy.endswith("spawn") else "popen")
    rec = Recorder(out)
    trainer = pl.Trainer(
        strategy=strat,
        accelerator="cpu",
        devices=devices,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
    )
    if use_datamodule:
        trainer.fit(model, datamodule=dm)
    else:  # a plain DataLoader: Lightning injects a DistributedSampler with the strategy's dp kwargs
        dm.setup()
        loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=batch_size, shuffle=True)
        trainer.fit(model, train_dataloaders=loader)
    return {"losses": rec.losses, "layouts": rec.layouts, "shapes": rec.shapes}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--strategy", default="lightning_sp")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--plain-loader", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    run(a.devices, a.sp, a.batch_size, a.out, a.strategy, a.steps, use_datamodule=not a.plain_loader)
