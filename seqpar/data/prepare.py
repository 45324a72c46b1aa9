"""``seqpar prepare``: text files -> ``train.bin`` / ``val.bin`` token files + ``tokenizer.json`` + ``meta.json``.

Inputs: plain text such as ``.txt``, ``.md``, ``.py`` (one document per file), ``.jsonl`` / ``.jsonl.gz`` (one document per line, in the ``text``
field or ``field``), ``.parquet`` (a string column ``field``; needs ``pyarrow``). The token stream is the
documents in input order, each followed by the tokenizer's EOS id (so ``data.packed=true`` finds the
documents); the last ``val_fraction`` of it is ``val.bin``, the rest ``train.bin``, both flat arrays of
``uint16`` (vocabularies up to 65536) or ``uint32``, nanoGPT style. ``meta.json`` records the vocabulary
size, EOS id, dtype, token / document counts and the tokenizer, and ``train.py data.kind=memmap
data.path=DIR`` reads it.

Large inputs are encoded by a pool of worker processes (``workers``), batches of documents in order.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
from typing import Iterator, List, Optional, Sequence

import numpy as np

from .tokenizer import Tokenizer, load_tokenizer, train_bpe

META_FORMAT = "seqpar-memmap-1"
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")

__all__ = ["prepare", "iter_documents", "read_meta", "token_dtype", "META_FORMAT"]


def token_dtype(vocab_size: int) -> str:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _suffix(path: str) -> str:
    low = path.lower()
    for s in (".jsonl.gz", ".jsonl", ".parquet"):
        if low.endswith(s):
            return s
    if low.endswith((".gz", ".bz2", ".xz", ".zst", ".zip", ".bin", ".npy", ".arrow", ".json")):
        raise ValueError(f"input: {path} has an unsupported type; expected .jsonl, .jsonl.gz, .parquet or plain text")
    return ".txt"


def iter_documents(paths: Sequence[str], field: str = "text") -> Iterator[str]:
    """Yield the documents (str) of every input file in order."""
    for path in paths:
        kind = _suffix(path)
        if kind == ".txt":
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()
        elif kind in (".jsonl", ".jsonl.gz"):
            opener = gzip.open if kind == ".jsonl.gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"input: {path}:{lineno} is not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or field not in rec:
                        raise ValueError(f"input: {path}:{lineno} has no field {field!r} (choose it with --field)")
                    if not isinstance(rec[field], str):
                        raise ValueError(f"input: {path}:{lineno} field {field!r} is {type(rec[field]).__name__}, not a string")
                    yield rec[field]
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"input: reading {path} needs pyarrow (pip install pyarrow)") from None
            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise ValueError(f"input: {path} has no column {field!r} (columns: {pf.schema_arrow.names}; use --field)")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    if value is not None:
                        yield value


def _batches(docs: Iterator[str], max_chars: int = 1 << 20) -> Iterator[List[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


_WORKER_TOK: Optional[Tokenizer] = None


def _worker_init(tok_json: str, eos_id: int) -> None:
    global _WORKER_TOK
    _WORKER_TOK = Tokenizer.from_json(tok_json, eos_id=eos_id)


def _encode_batch(batch: List[str], tok: Optional[Tokenizer] = None):
    """Documents -> (token ids with an EOS after each document, n chars)."""
    tok = tok or _WORKER_TOK
    parts = []
    for ids in tok.encode_batch(batch):
        parts.append(np.asarray(ids, dtype=np.int64))
        parts.append(np.array([tok.eos_id], dtype=np.int64))
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), sum(len(d) for d in batch), len(batch)


def _input_bytes(paths: Sequence[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def prepare(
    inputs: Sequence[str],
    out_dir: str,
    tokenizer: str = "bytes",
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    field: str = "text",
    eos_token: Optional[str] = None,
    workers: Optional[int] = None,
    parallel_min_bytes: int = 16 << 20,
    progress: Optional[bool] = None,
) -> dict:
    """Tokenize ``inputs`` into ``out_dir``; returns the meta dict that is written to ``meta.json``.

    Args:
        inputs: paths of .txt / .jsonl / .jsonl.gz / .parquet files (read in order).
        out_dir: created if needed; gets train.bin, val.bin, tokenizer.json, meta.json.
        tokenizer: ``bytes`` | ``train-bpe`` | a tokenizer.json path | a Hugging Face hub name.
        vocab_size: size of the ``train-bpe`` vocabulary (EOS included; small inputs may give fewer ids).
        val_fraction: share of the token stream (its end) written to val.bin, in [0, 1).
        field: JSON key / parquet column holding the text.
        eos_token: EOS token of a FILE / NAME tokenizer (default: the first of the usual names it has).
        workers: encoding processes (default: CPU count); used when the input has >= ``parallel_min_bytes``.
        progress: tqdm progress bar on stderr (None: when stderr is a terminal).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("input: give at least one file")
    for p in inputs:
        if not os.path.isfile(p):
            raise ValueError(f"input: file not found: {p}")
        _suffix(p)
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    from tqdm.auto import tqdm

    if tokenizer == "train-bpe":
        tok = train_bpe(iter_documents(inputs, field), vocab_size, show_progress=bool(progress))
    else:
        tok = load_tokenizer(tokenizer, eos_token=eos_token)
    dtype = token_dtype(tok.vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    all_path = os.path.join(out_dir, "all.bin.tmp")
    total_in = _input_bytes(inputs)
    workers = workers or os.cpu_count() or 1
    use_pool = workers > 1 and total_in >= parallel_min_bytes
    n_tokens = n_docs = 0
    bar = tqdm(total=total_in, unit="B", unit_scale=True, desc="tokenize", disable={False: True, True: False}.get(progress))  # None: off unless a terminal
    try:
        with open(all_path, "wb") as f:
            if use_pool:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one Rust thread pool per worker process
                ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
                with ctx.Pool(workers, initializer=_worker_init, initargs=(tok.to_json(), tok.eos_id)) as pool:
                    results = pool.imap(_encode_batch, _batches(iter_documents(inputs, field)))
                    for ids, chars, docs in results:
                        f.write(ids.astype(dtype).tobytes())
                        n_tokens, n_docs = n_tokens + len(ids), n_docs + docs
                        bar.update(min(chars, max(0, total_in - bar.n)))
            else:
                for batch in _batches(iter_documents(inputs, field)):
                    ids, chars, docs = _encode_batch(batch, tok)
                    f.write(ids.astype(dtype).tobytes())
                    n_tokens, n_docs = n_tokens + len(ids), n_docs + docs
                    bar.update(min(chars, max(0, total_in - bar.n)))
        bar.close()
        if n_docs == 0 or n_tokens <= n_docs:
            raise ValueError(f"input: no text found in {inputs}")
        stream = np.memmap(all_path, dtype=dtype, mode="r")
        n_val = int(round(n_tokens * val_fraction))
        if val_fraction > 0:
            n_val = max(2, n_val)
        n_train = n_tokens - n_val
        if n_train < 2:
            raise ValueError(f"input: {n_tokens} tokens are too few for val_fraction={val_fraction}")
        np.asarray(stream[:n_train]).tofile(os.path.join(out_dir, "train.bin"))
        np.asarray(stream[n_train:]).tofile(os.path.join(out_dir, "val.bin"))
        del stream
    finally:
        bar.close()
        if os.path.exists(all_path):
            os.remove(all_path)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    meta = {
        "format": META_FORMAT,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype,
        "train_tokens": int(n_train),
        "val_tokens": int(n_val),
        "documents": int(n_docs),
        "tokenizer": {"kind": tok.kind, "source": tok.source, "file": "tokenizer.json"},
        "inputs": [os.path.abspath(p) for p in inputs],
        "field": field,
        "val_fraction": float(val_fraction),
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def read_meta(path: str) -> Optional[dict]:
    """meta.json of a prepared directory (or of the directory of a .bin file); None when there is none.

    Raises ValueError when the file exists but lacks vocab_size / eos_id / dtype or is not JSON.
    """
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"data: {meta_path} is not valid JSON ({e.msg})") from None
    missing = [k for k in ("vocab_size", "eos_id", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"data: {meta_path} lacks {missing}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"data: {meta_path} has dtype {meta['dtype']!r}, expected uint16 or uint32")
    return meta


def apply_meta(meta: Optional[dict], dtype: Optional[str], eos_id: Optional[int], vocab_size: Optional[int],
               default_dtype: str = "uint16", where: str = "meta.json"):
    """Reconcile a run's data settings with a prepared directory's meta.json.

    Returns ``(dtype, eos_id, vocab_size)``: meta.json's values where the run left them unset (``dtype`` at
    its default, ``eos_id`` / ``vocab_size`` None); a setting that contradicts meta.json raises ValueError,
    so does a ``vocab_size`` smaller than the tokenizer's.
    """
    if meta is None:
        return dtype, eos_id, vocab_size
    if dtype not in (None, default_dtype, meta["dtype"]):
        raise ValueError(f"data.dtype={dtype} but {where} says the tokens are {meta['dtype']} (drop data.dtype)")
    if eos_id is not None and int(eos_id) != int(meta["eos_id"]):
        raise ValueError(f"data.eos_id={eos_id} but {where} says the tokenizer's EOS is {meta['eos_id']} (drop data.eos_id)")
    if vocab_size is not None and int(vocab_size) < int(meta["vocab_size"]):
        raise ValueError(f"model vocab_size={vocab_size} is smaller than the tokenizer's {meta['vocab_size']} ids ({where}); "
                         f"drop model.overrides.vocab_size or set it >= {meta['vocab_size']}")
    return meta["dtype"], int(meta["eos_id"]), int(vocab_size if vocab_size is not None else meta["vocab_size"])
