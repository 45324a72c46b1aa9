"""Callbacks of the train.py recipe, and loading of extra (user / test) callbacks named in the environment."""
from __future__ import annotations

import importlib
import importlib.util
import os
import random
from typing import List

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["StepSeeder", "EXTRA_CALLBACKS_ENV", "extra_callbacks_from_env"]

# "module:factory" or "path/to/file.py:factory", comma separated; each factory() returns a Callback or a list
EXTRA_CALLBACKS_ENV = "SEQPAR_EXTRA_CALLBACKS"


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


def _load_factory(spec: str):
    target, sep, name = spec.strip().rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"{EXTRA_CALLBACKS_ENV} entries must be 'module:factory' or 'file.py:factory', got {spec!r}")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ValueError(f"{EXTRA_CALLBACKS_ENV}: file not found: {target}")
        mod_name = "seqpar_extra_callbacks_" + os.path.splitext(os.path.basename(target))[0]
        s = importlib.util.spec_from_file_location(mod_name, target)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(target)
    factory = getattr(mod, name, None)
    if not callable(factory):
        raise ValueError(f"{EXTRA_CALLBACKS_ENV}: {target} has no callable {name!r}")
    return factory


def extra_callbacks_from_env() -> List[pl.Callback]:
    """Callbacks built by the factories named in ``$SEQPAR_EXTRA_CALLBACKS`` (empty when unset)."""
    out: List[pl.Callback] = []
    for spec in filter(None, os.environ.get(EXTRA_CALLBACKS_ENV, "").split(",")):
        made = _load_factory(spec)()
        out.extend(made if isinstance(made, (list, tuple)) else [made])
    return out
