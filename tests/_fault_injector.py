"""Test-only fault injection for train.py, loaded through ``SEQPAR_EXTRA_CALLBACKS=tests/_fault_injector.py:callbacks``.

``SEQPAR_FAULT_AT_STEP=N`` makes global rank ``SEQPAR_FAULT_RANK`` (default 0) exit with status 1 right before
optimizer step N, on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that
``torchrun --max-restarts`` restarts the job.
"""
from __future__ import annotations

import os
import sys

import pytorch_lightning as pl

FAULT_STEP_ENV, FAULT_RANK_ENV = "SEQPAR_FAULT_AT_STEP", "SEQPAR_FAULT_RANK"
SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fault_injector.py") + ":callbacks"


class FaultInjector(pl.Callback):
    """Kill one rank once, before step ``step``."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = int(step), int(rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        if first_attempt and trainer.global_step == self.step and trainer.global_rank == self.rank:
            print(f"[train.py] {FAULT_STEP_ENV}: rank {self.rank} exits before step {self.step}", flush=True)
            sys.stderr.flush()
            os._exit(1)


def callbacks():
    if not os.environ.get(FAULT_STEP_ENV):
        return []
    return [FaultInjector(int(os.environ[FAULT_STEP_ENV]), int(os.environ.get(FAULT_RANK_ENV, "0")))]
