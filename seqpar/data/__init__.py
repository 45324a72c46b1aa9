"""Datasets for seqpar: the embedded stdlib byte corpus, memmap token files, a long-range recall task."""
from .corpus import EOS_ID, VOCAB_SIZE, corpus_fingerprint, load_corpus, split_corpus
from .datamodule import KINDS, SeqDataModule
from .datasets import (
    IGNORE_INDEX,
    MemmapTokenDataset,
    RecallDataset,
    TokenWindowDataset,
    collate_tokens,
    cyclic_window,
    open_token_file,
)
from .sampling import ResumableDataLoader, ResumableDistributedSampler, make_loader

__all__ = [
    "EOS_ID", "VOCAB_SIZE", "IGNORE_INDEX", "KINDS",
    "load_corpus", "split_corpus", "corpus_fingerprint",
    "TokenWindowDataset", "MemmapTokenDataset", "RecallDataset", "collate_tokens", "cyclic_window",
    "open_token_file", "ResumableDataLoader", "ResumableDistributedSampler", "make_loader", "SeqDataModule",
]
