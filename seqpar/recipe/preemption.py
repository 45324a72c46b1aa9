"""``LastCheckpoint``: the recipe's ``last.ckpt``, written at step boundaries only, and saved on SIGTERM / SIGINT.

Every ``last.ckpt`` is taken in ``on_train_batch_end`` right after an optimizer step, like the periodic
``step*.ckpt`` files: at every ``every`` steps, at the final step (``max_steps``) and when a stop signal
arrived. Lightning's own end-of-fit checkpoint (``ModelCheckpoint(save_last=True)``'s ``on_train_end`` or a
``trainer.save_checkpoint`` after ``fit``) records the epoch as completed, so resuming it starts a new epoch with
a new shuffle: a finished run extended with a larger ``max_steps`` would then not repeat the longer
uninterrupted run. Here any two checkpoints of the same step hold the same loop state and resume identically.

Signals: SIGTERM (what schedulers send before preemption) and SIGINT only set a flag. After each optimizer
step the ranks agree on it (one all-reduce of one integer over the default group), so every rank finishes the
same step, writes ``last.ckpt`` together and stops; ``fit`` returns and the process exits with status 0.
``trainer.resume=auto`` then continues from that step. A second SIGINT interrupts at once (KeyboardInterrupt).
The handlers are installed at ``on_train_start`` (after Lightning's) and the previous ones restored at the end.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Dict, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist

__all__ = ["LastCheckpoint", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class LastCheckpoint(pl.Callback):
    """Writes ``<ckpt_dir>/last.ckpt`` after optimizer steps: every ``every`` steps (0: never periodically), at
    ``max_steps``, and when SIGTERM / SIGINT was received on any rank (then training stops cleanly).

    Args:
        ckpt_dir: directory of ``last.ckpt``.
        every: steps between periodic saves (the recipe's ``trainer.ckpt_every``).
        handle_signals: install the SIGTERM / SIGINT handlers (main thread only).
    """

    def __init__(self, ckpt_dir: str, every: int = 0, handle_signals: bool = True):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0, got {every!r}")
        self.ckpt_dir, self.every, self.handle_signals = str(ckpt_dir), every, bool(handle_signals)
        self.received: Optional[int] = None  # the first stop signal of this process
        self.stopped_at: Optional[int] = None  # global step of the checkpoint written because of a signal
        self._previous: Dict[int, Any] = {}
        self._last_step = -1
        self._pending = None  # CUDA: (event, pinned flag) of the previous step's reduction

    @property
    def path(self) -> str:
        return os.path.join(self.ckpt_dir, "last.ckpt")

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.received is None:
            self.received = int(signum)
            print(f"[train.py] received {signal.Signals(signum).name}: finishing the current step, then writing "
                  f"{self.path} and exiting", flush=True)

    def _install(self) -> None:
        if not self.handle_signals or self._previous:
            return
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._on_signal)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def _any_rank_signalled(self, trainer) -> bool:
        """Whether any rank has received a stop signal; every rank gets the same answer at the same step.
        On CUDA the max over ranks is read one step later (a copy to pinned memory behind an event), so the
        step loop never waits for the GPU; CPU tensors (gloo) are reduced and read at once."""
        flag = 1 if self.received is not None else 0
        if not (trainer.world_size > 1 and dist.is_available() and dist.is_initialized()):
            return flag > 0
        device = trainer.strategy.root_device
        t = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if device.type != "cuda":
            return int(t.item()) > 0
        host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        previous, self._pending = self._pending, (event, host)
        if previous is None:
            return False
        previous[0].synchronize()  # recorded a step ago: long complete
        return int(previous[1][0]) > 0

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        self._pending = None
        self._install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch inside gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        stop = self._any_rank_signalled(trainer)  # every rank, every step: they must agree on the same step
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        periodic = self.every > 0 and step % self.every == 0
        if stop or final or periodic:
            trainer.save_checkpoint(self.path, weights_only=False)  # a full checkpoint; says so (no warning)
        if stop and not final:
            self.stopped_at = step
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"[train.py] stopped by a signal after step {step}: wrote {self.path}; "
                      f"resume with trainer.resume=auto", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore()
