"""Test hook for train.py (``SEQPAR_EXTRA_CALLBACKS=tests/_signal_hook.py:callbacks``): park one rank so that the
test can send it a real signal from outside at a known step.

``SEQPAR_SIGNAL_AT_STEP=N``, ``SEQPAR_SIGNAL_RANK=r`` (default 0), ``SEQPAR_SIGNAL_READY=<file>``: before optimizer
step N, rank r writes its pid to ``<file>`` and waits until train.py's ``LastCheckpoint`` has received a stop
signal (the test sends SIGTERM / SIGINT to that pid), then lets the step run. Exits with status 3 if no signal
comes within 120 s.
"""
from __future__ import annotations

import os
import time

import pytorch_lightning as pl

STEP_ENV, RANK_ENV, READY_ENV = "SEQPAR_SIGNAL_AT_STEP", "SEQPAR_SIGNAL_RANK", "SEQPAR_SIGNAL_READY"


class WaitForSignal(pl.Callback):
    def __init__(self, step: int, rank: int, ready: str):
        self.step, self.rank, self.ready = step, rank, ready

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        tmp = self.ready + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, self.ready)
        deadline = time.monotonic() + 120
        while not any(getattr(c, "received", None) is not None for c in trainer.callbacks):
            if time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.02)


def callbacks():
    if not os.environ.get(STEP_ENV):
        return []
    return [WaitForSignal(int(os.environ[STEP_ENV]), int(os.environ.get(RANK_ENV, "0")), os.environ[READY_ENV])]
