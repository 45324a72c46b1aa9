"""``SeqDataModule``: one LightningDataModule for the embedded corpus, memmap token files and the recall task."""
from __future__ import annotations

import os
from typing import Any, Optional

try:  # the project's Lightning tree (pyproject depends on pytorch-lightning)
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover
    import lightning.pytorch as pl

from .corpus import DEFAULT_MAX_BYTES, EOS_ID, VOCAB_SIZE, load_corpus, split_corpus
from .datasets import MemmapTokenDataset, RecallDataset, TokenWindowDataset, collate_tokens, open_token_file
from .sampling import ResumableDataLoader, make_loader

KINDS = ("corpus", "memmap", "recall")


def _dp_coordinate(trainer: Any) -> tuple[int, int]:
    """(num_replicas, rank) of the data-parallel coordinate: the strategy's sampler kwargs (dp under SP)."""
    if trainer is None:
        return 1, 0
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    if kwargs and kwargs.get("num_replicas"):
        return int(kwargs["num_replicas"]), int(kwargs.get("rank", 0))
    return 1, 0


def _pin(trainer) -> bool:
    """Pin the batches when the trainer computes on a GPU: a copy from pageable memory waits for the GPU's
    queued work before it starts (a host sync every step); from pinned memory it is queued like a kernel."""
    dev = getattr(getattr(trainer, "strategy", None), "root_device", None) if trainer is not None else None
    return bool(dev is not None and dev.type == "cuda")


class SeqDataModule(pl.LightningDataModule):
    """Fixed-length next-token samples ``{"input_ids", "labels"[, "cu_seqlens"]}`` of shape ``[B, T]``.

    Args:
        kind: ``"corpus"`` (embedded stdlib bytes, vocab 256, no download), ``"memmap"`` (``path`` is a
            directory with ``train.bin`` / ``val.bin`` or one ``.bin`` file split by ``val_fraction``),
            ``"recall"`` (synthetic long-range key-value recall).
        seq_len: tokens per sample (any length; short streams are repeated).
        batch_size: samples per step *per data-parallel rank* (ranks of one SP group share the samples).
        packed: emit ``cu_seqlens`` at document boundaries (after ``eos_id``); needs ``batch_size == 1``.
        train_samples / val_samples: samples per epoch (default: non-overlapping windows of the stream).
        seed: seeds the shuffling (epoch ``e`` uses ``seed + e``) and the recall task.
    """

    def __init__(
        self,
        kind: str = "corpus",
        seq_len: int = 256,
        batch_size: int = 8,
        path: Optional[str] = None,
        dtype: str = "uint16",
        packed: bool = False,
        eos_id: Optional[int] = None,
        val_fraction: float = 0.05,
        max_bytes: int = DEFAULT_MAX_BYTES,
        train_samples: Optional[int] = None,
        val_samples: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        recall_pairs: int = 16,
        recall_queries: int = 4,
        vocab_size: int = VOCAB_SIZE,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"data kind must be one of {KINDS}, got {kind!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if packed and batch_size != 1:
            raise ValueError(f"packed documents (cu_seqlens) need batch_size=1, got {batch_size}")
        if packed and kind == "recall":
            raise ValueError("the recall task has no documents to pack")
        if kind == "memmap" and not path:
            raise ValueError("data kind 'memmap' needs a path (a directory with train.bin/val.bin, or a .bin file)")
        self.kind, self.seq_len, self.batch_size = kind, int(seq_len), int(batch_size)
        self.path, self.dtype, self.packed = path, dtype, packed
        self.eos_id = EOS_ID if (eos_id is None and kind == "corpus") else eos_id
        if packed and self.eos_id is None:
            raise ValueError("packed=True with memmap data needs eos_id (the document separator token)")
        self.val_fraction, self.max_bytes = val_fraction, int(max_bytes)
        self.train_samples, self.val_samples = train_samples, val_samples
        self.num_workers, self.seed = int(num_workers), int(seed)
        self.recall_pairs, self.recall_queries, self.vocab_size = recall_pairs, recall_queries, vocab_size
        self.train_dataset = self.val_dataset = None

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        common = dict(packed=self.packed, eos_id=self.eos_id)
        if self.kind == "corpus":
            train, val = split_corpus(load_corpus(self.max_bytes), self.val_fraction)
            self.train_dataset = TokenWindowDataset(train, self.seq_len, self.train_samples, **common)
            self.val_dataset = TokenWindowDataset(val, self.seq_len, self.val_samples, **common)
        elif self.kind == "memmap":
            if os.path.isdir(self.path):
                tr, va = os.path.join(self.path, "train.bin"), os.path.join(self.path, "val.bin")
                self.train_dataset = MemmapTokenDataset(tr, self.seq_len, self.dtype, num_samples=self.train_samples, **common)
                if os.path.exists(va):
                    self.val_dataset = MemmapTokenDataset(va, self.seq_len, self.dtype, num_samples=self.val_samples, **common)
                else:
                    self.val_dataset = None
            else:
                tokens = open_token_file(self.path, self.dtype)
                cut = int(len(tokens) * (1 - self.val_fraction))
                self.train_dataset = TokenWindowDataset(tokens[:cut], self.seq_len, self.train_samples, **common)
                self.val_dataset = TokenWindowDataset(tokens[cut:], self.seq_len, self.val_samples, **common)
        else:
            rc = dict(num_pairs=self.recall_pairs, num_queries=self.recall_queries, vocab_size=self.vocab_size)
            self.train_dataset = RecallDataset(self.seq_len, self.train_samples or 4096, seed=self.seed, **rc)
            self.val_dataset = RecallDataset(self.seq_len, self.val_samples or 64, seed=self.seed + 1_000_003, **rc)

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset, train: bool) -> ResumableDataLoader:
        replicas, rank = _dp_coordinate(getattr(self, "trainer", None))
        return make_loader(
            dataset,
            self.batch_size,
            num_replicas=replicas,
            rank=rank,
            shuffle=train,
            seed=self.seed,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=collate_tokens,
            pin_memory=_pin(getattr(self, "trainer", None)),
        )

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup("fit")
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self):
        self.setup("fit")
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self):
        return self.val_dataloader()
