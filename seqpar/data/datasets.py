"""Map-style token datasets (so Lightning's / our DistributedSampler shards them by the dp coordinate).

Every sample is a dict ``{"input_ids": int64[T], "labels": int64[T]}`` with ``labels[t]`` the token
that follows position ``t`` (already shifted) and ``-100`` where nothing is to be predicted. Packed samples
add ``"cu_seqlens": int32[N+1]`` (document boundaries inside the T positions, FlashAttention varlen
style) and are batched with batch size 1 (see :func:`collate_tokens`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100


def cyclic_window(tokens: np.ndarray, start: int, length: int) -> np.ndarray:
    """``length`` tokens of ``tokens`` from ``start``, wrapping around (repeating) as often as needed.

    Works on ``np.memmap`` without reading more than the window (plain slices, no fancy indexing).
    """
    n = len(tokens)
    start %= n
    if start + length <= n:
        return np.asarray(tokens[start : start + length])
    parts = [np.asarray(tokens[start:])]
    got = n - start
    while got < length:
        take = min(n, length - got)
        parts.append(np.asarray(tokens[:take]))
        got += take
    return np.concatenate(parts)


def pack_window(window: np.ndarray, eos_id: Optional[int], packed: bool) -> dict[str, torch.Tensor]:
    """Turn ``T+1`` tokens into a shifted sample; with ``packed``, reset at documents (after ``eos_id``)."""
    x = torch.from_numpy(window.astype(np.int64, copy=True))
    inp, labels = x[:-1], x[1:].clone()
    out = {"input_ids": inp, "labels": labels}
    if packed:
        if eos_id is None:
            raise ValueError("packed samples need eos_id (the token that ends a document)")
        is_eos = inp == eos_id
        # the token after an EOS starts another document: nothing to predict across the boundary
        labels[is_eos] = IGNORE_INDEX
        T = inp.shape[0]
        starts = torch.nonzero(is_eos[:-1]).flatten() + 1  # positions 1..T-1 that start a document
        cu = torch.cat([torch.zeros(1, dtype=torch.long), starts, torch.full((1,), T, dtype=torch.long)])
        out["cu_seqlens"] = cu.to(torch.int32)
    return out


class TokenWindowDataset(Dataset):
    """Fixed-length windows of a token stream: sample ``i`` starts at ``i * stride`` (mod stream length).

    Any ``seq_len`` works, including sequences longer than the stream (it is repeated). ``num_samples``
    defaults to the number of non-overlapping windows (at least 1).
    """

    def __init__(
        self,
        tokens: Union[np.ndarray, Sequence[int]],
        seq_len: int,
        num_samples: Optional[int] = None,
        stride: Optional[int] = None,
        packed: bool = False,
        eos_id: Optional[int] = None,
        offset: int = 0,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if len(self.tokens) < 2:
            raise ValueError("the token stream needs at least 2 tokens")
        self.seq_len = int(seq_len)
        self.stride = int(stride or seq_len)
        self.packed = packed
        self.eos_id = eos_id
        self.offset = int(offset)
        if packed and eos_id is None:
            raise ValueError("packed=True needs eos_id")
        n_windows = max(1, (len(self.tokens) - 1) // self.stride)
        self.num_samples = int(num_samples) if num_samples else n_windows

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        window = cyclic_window(self.tokens, self.offset + i * self.stride, self.seq_len + 1)
        return pack_window(window, self.eos_id, self.packed)


_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32, "uint8": np.uint8}


def open_token_file(path: str, dtype: str = "uint16") -> np.memmap:
    """Open a nanoGPT-style flat binary token file (``train.bin``) read-only as ``np.memmap``."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token file not found: {path}")
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    size = os.path.getsize(path)
    if size % itemsize:
        raise ValueError(f"{path}: size {size} is not a multiple of {dtype} ({itemsize} bytes); wrong dtype?")
    return np.memmap(path, dtype=_DTYPES[dtype], mode="r")


class MemmapTokenDataset(TokenWindowDataset):
    """Windows of a memory-mapped token file (``uint16`` / ``uint32`` ``.bin``, as nanoGPT's prepare.py writes).

    Only the requested windows are read; the file is reopened lazily in each DataLoader worker.
    """

    def __init__(self, path: str, seq_len: int, dtype: str = "uint16", **kwargs):
        self.path = path
        self.dtype = dtype
        super().__init__(open_token_file(path, dtype), seq_len, **kwargs)

    def __getstate__(self):  # do not pickle the mapping into workers / spawned processes
        state = self.__dict__.copy()
        state["tokens"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.tokens = open_token_file(self.path, self.dtype)


class RecallDataset(Dataset):
    """Synthetic long-range associative recall.

    Sequence of ``seq_len + 1`` tokens: ``num_pairs`` (key, value) pairs at the very start, random filler
    tokens, then ``num_queries`` queries ``[QUERY, key, value]`` at the very end. Only the values of the
    queries are labelled, so the task is solvable only if information flows from the first tokens to the
    last ones -- under sequence parallelism, from the first SP shard to the last.

    Vocabulary layout (``vocab_size >= 2 + 2 * num_keys + 1``): 0 = pad (unused), 1 = QUERY,
    keys ``[2, 2+K)``, values ``[2+K, 2+2K)``, filler ``[2+2K, vocab_size)``. Sample ``i`` is a
    pure function of ``(seed, i)``.
    """

    QUERY = 1

    def __init__(
        self,
        seq_len: int,
        num_samples: int = 1024,
        num_pairs: int = 16,
        num_queries: int = 4,
        vocab_size: int = 256,
        num_keys: Optional[int] = None,
        seed: int = 0,
    ):
        self.seq_len = int(seq_len)
        self.num_samples = int(num_samples)
        self.num_pairs = int(num_pairs)
        self.num_queries = int(num_queries)
        self.vocab_size = int(vocab_size)
        self.num_keys = int(num_keys or min(64, (vocab_size - 3) // 2))
        self.seed = int(seed)
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={num_pairs} needs at least as many distinct keys (num_keys={self.num_keys})")
        if not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(f"num_queries must be in [1, num_pairs], got {num_queries}")
        if 2 + 2 * self.num_keys >= self.vocab_size:
            raise ValueError(f"vocab_size={vocab_size} too small for {self.num_keys} keys + values + filler")
        if 2 * self.num_pairs + 3 * self.num_queries > self.seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} too short for {num_pairs} pairs and {num_queries} queries "
                f"(needs >= {2 * self.num_pairs + 3 * self.num_queries - 1})"
            )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, int(i)])
        K, L = self.num_keys, self.seq_len + 1
        keys = rng.choice(K, size=self.num_pairs, replace=False) + 2
        values = rng.integers(0, K, size=self.num_pairs) + 2 + K
        x = rng.integers(2 + 2 * K, self.vocab_size, size=L)
        x[0 : 2 * self.num_pairs : 2] = keys
        x[1 : 2 * self.num_pairs : 2] = values
        q = rng.choice(self.num_pairs, size=self.num_queries, replace=False)
        qstart = L - 3 * self.num_queries
        x[qstart::3] = self.QUERY
        x[qstart + 1 :: 3] = keys[q]
        x[qstart + 2 :: 3] = values[q]
        x = torch.from_numpy(x.astype(np.int64))
        inp = x[:-1]
        labels = torch.full_like(inp, IGNORE_INDEX)
        pos = torch.arange(qstart + 1, L, 3)  # input positions holding the queried key
        labels[pos] = x[pos + 1]
        return {"input_ids": inp, "labels": labels}


def collate_tokens(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into ``[B, T]``; packed samples (with ``cu_seqlens``) need B == 1 and keep it 1-D."""
    if "cu_seqlens" in samples[0]:
        if len(samples) != 1:
            raise ValueError(
                f"packed documents (cu_seqlens) need batch_size=1, got {len(samples)}; "
                "use a longer seq_len instead of a larger batch"
            )
        s = samples[0]
        return {"input_ids": s["input_ids"][None], "labels": s["labels"][None], "cu_seqlens": s["cu_seqlens"]}
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
