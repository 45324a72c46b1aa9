"""Deterministic, resumable sampling keyed on the data-parallel coordinate.

``ResumableDistributedSampler`` is a ``DistributedSampler`` (so Lightning does not replace it) whose
``__iter__`` is lazy: the permutation is drawn at the first ``next()``, after Lightning's ``set_epoch``.
``ResumableDataLoader`` implements ``state_dict`` / ``load_state_dict`` (Lightning stores them in the
checkpoint's loop state), counting batches handed to the trainer. After a resume the shuffle follows the
checkpoint's pass, not Lightning's epoch number: the first ``set_epoch`` after ``load_state_dict`` fixes an
offset between the two, so the data order is a function of the samples consumed (the global step). A checkpoint
that Lightning saved after ``fit`` ended (epoch marked completed, the resumed loop starts "epoch 1") therefore
continues the same pass as a checkpoint of the same step saved mid-epoch. The state is kept in *global samples
consumed*, so a checkpoint resumes exactly under another dp layout with the same global batch
(dp x batch_size), e.g. SP=2 x DP=1 x B=2  ->  SP=1 x DP=2 x B=1.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator, Optional

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` over the dp coordinate with a one-shot ``start_index`` (indices of this rank to skip)."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start_index = 0
        self.epoch_offset = 0  # pass number = the epoch given to set_epoch + this (set on resume)
        self.external_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.external_epoch = int(epoch)
        super().set_epoch(int(epoch) + self.epoch_offset)

    def __iter__(self) -> Iterator[int]:  # a generator: evaluated at first next(), after set_epoch()
        indices = list(super().__iter__())
        skip, self.start_index = self.start_index, 0
        yield from indices[skip:]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableDistributedSampler` that can resume mid-epoch."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._batches_yielded = 0
        self._resume_batches = 0
        self._resume_epoch: Optional[int] = None

    def __iter__(self):  # a generator: runs at the first next(), after Lightning's set_epoch
        start, self._resume_batches = self._resume_batches, 0
        self._batches_yielded = start
        if self._resume_epoch is not None:  # continue the checkpoint's pass whatever epoch Lightning counts
            sampler = self.sampler
            sampler.epoch_offset = self._resume_epoch - sampler.external_epoch
            sampler.epoch, self._resume_epoch = self._resume_epoch, None
        for batch in super().__iter__():
            self._batches_yielded += 1
            yield batch

    def _replicas(self) -> int:
        return getattr(self.sampler, "num_replicas", 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": int(getattr(self.sampler, "epoch", 0)),
            "samples_consumed": int(self._batches_yielded * (self.batch_size or 1) * self._replicas()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        if not isinstance(sampler, ResumableDistributedSampler):
            warnings.warn("ResumableDataLoader without a ResumableDistributedSampler: data restarts at the epoch start")
            return
        consumed = int(state.get("samples_consumed", 0))
        bs = self.batch_size or 1
        per_rank, rem = divmod(consumed, sampler.num_replicas)
        if rem or per_rank % bs:
            warnings.warn(
                f"resuming after {consumed} samples with dp={sampler.num_replicas} x batch_size={bs}: "
                "not a whole number of steps, rounding down"
            )
            per_rank -= per_rank % bs
        epoch = int(state.get("epoch", 0))
        full = len(sampler) - (len(sampler) % bs if self.drop_last else 0)  # samples of this rank per pass
        if per_rank >= full:  # the pass had ended: the next one starts from scratch
            per_rank, epoch = 0, epoch + 1
        sampler.start_index = per_rank
        sampler.epoch = epoch  # also for callers that never call set_epoch
        self._resume_epoch = epoch
        self._resume_batches = per_rank // bs


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_replicas: int = 1,
    rank: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    num_workers: int = 0,
    collate_fn: Optional[Any] = None,
    pin_memory: bool = False,
) -> ResumableDataLoader:
    """A resumable loader reading the dp shard ``rank`` of ``num_replicas``."""
    sampler = ResumableDistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
