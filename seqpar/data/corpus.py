"""The embedded default corpus: byte-level tokens of the Python standard library's ``.py`` sources.

Nothing is downloaded: every machine that runs Python has its standard library. Files are read in a
deterministic order (directories and names sorted, tests / site-packages / caches skipped), each document
is the file's raw bytes followed by an end-of-document byte ``EOS_ID = 0`` (NUL never occurs in source
text), and the stream is capped at ``max_bytes``. Tokens are bytes, so the vocabulary is 256.

The exact bytes depend on the Python version installed (3.11 on one machine, 3.12 on another gives a
different but equally deterministic corpus); :func:`corpus_fingerprint` names it.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from typing import Optional

import numpy as np

VOCAB_SIZE = 256
EOS_ID = 0
DEFAULT_MAX_BYTES = 8 * 1024 * 1024

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"}


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


@functools.lru_cache(maxsize=4)
def _load(root: str, max_bytes: int) -> np.ndarray:
    chunks: list[bytes] = []
    total = 0
    for path in _stdlib_files(root):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        data = data.replace(b"\x00", b"")  # keep EOS unambiguous
        if not data:
            continue
        doc = data + bytes([EOS_ID])
        if total + len(doc) > max_bytes:
            doc = doc[: max_bytes - total]
        chunks.append(doc)
        total += len(doc)
        if total >= max_bytes:
            break
    if total == 0:
        raise RuntimeError(f"no Python sources found under {root!r} for the embedded corpus")
    arr = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES, root: Optional[str] = None) -> np.ndarray:
    """Byte tokens (``np.uint8``, read-only) of the embedded corpus, documents separated by ``EOS_ID``."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    return _load(root or stdlib_root(), int(max_bytes))


def split_corpus(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into (train, val) at the first document boundary after ``1 - val_fraction``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(tokens)
    cut = int(n * (1.0 - val_fraction))
    eos = np.flatnonzero(tokens[cut:] == EOS_ID)
    if len(eos) and cut + eos[0] + 1 < n:
        cut = cut + int(eos[0]) + 1
    cut = min(max(cut, 1), n - 1)
    return tokens[:cut], tokens[cut:]


def corpus_fingerprint(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()[:16]
