#!/usr/bin/env python
"""Train a TransNormerLLM (Lightning Attention-2) language model with data x sequence parallelism.

    python train.py                                     # tiny model, embedded corpus, CPU or all GPUs
    python train.py --config configs/debug.yaml trainer.max_steps=20
    torchrun --nproc_per_node 8 train.py --config configs/tnl-1b.yaml trainer.max_steps=100 parallel.sp=8
    torchrun --nproc_per_node 8 train.py --config configs/tnl-15b.yaml parallel.sp=8 parallel.fsdp=true
    python train.py --config configs/tnl-0.4b.yaml trainer.devices=8 parallel.sp=4   # Lightning launches
    python train.py --help                              # every config key with its default and meaning

Configuration = the schema (``seqpar.recipe.config``)  <  ``--config`` YAML  <  ``key=value`` overrides
(OmegaConf dotlist). Unknown keys, wrong types, out-of-range values, ``parallel.sp`` not dividing the world
size or ``data.seq_len`` not divisible by ``parallel.sp`` stop with a one-line error. ``--print-config``
checks and shows the merged config.

Fault tolerance: checkpoints are written atomically; ``trainer.resume=auto`` continues from the newest complete
one (skipping truncated files), so the same command can be restarted, e.g. by
``torchrun --max-restarts 3 ... train.py ... trainer.resume=auto``, and repeats the uninterrupted run's losses.
Extra callbacks: ``SEQPAR_EXTRA_CALLBACKS=module:factory`` (or ``file.py:factory``), comma separated.

The recipe lives in :mod:`seqpar.recipe` (config, layout, elastic, build, callbacks, run).
"""
from __future__ import annotations

import sys

from seqpar.recipe import ConfigError, build, load_config, main, resolve_layout  # noqa: F401  (re-exported)

if __name__ == "__main__":
    sys.exit(main())
