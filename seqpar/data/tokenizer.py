"""Tokenizers for ``seqpar prepare`` / ``generate`` / ``eval``: one class over Hugging Face ``tokenizers``.

Kinds (the ``--tokenizer`` argument of ``seqpar prepare``):

- ``bytes``: byte-level, id = byte value (256 ids), EOS = 0 (the NUL byte), the same ids as the embedded
  corpus (``data.kind=corpus``). Stored as a byte-level ``tokenizer.json`` without merges.
- ``train-bpe``: a byte-level BPE tokenizer trained on the input (``vocab_size`` ids, ``<|endoftext|>`` = EOS).
- a path to a ``tokenizer.json``, or a Hugging Face hub name (needs network access).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence

EOS_TOKEN = "<|endoftext|>"
# EOS candidates looked up, in order, in a tokenizer that was not made here
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]", "<|im_end|>")

__all__ = ["Tokenizer", "byte_tokenizer", "train_bpe", "load_tokenizer", "EOS_TOKEN"]


def _hf():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - a declared dependency
        raise ImportError("seqpar's tokenizers need the 'tokenizers' package (pip install tokenizers)") from None
    return tokenizers


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible map byte -> printable unicode character (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class Tokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` with the EOS id and the kind it was made by.

    Args:
        hf: the ``tokenizers.Tokenizer``.
        eos_id: id that ends a document (placed between documents by ``prepare``, stops ``generate``).
        kind: ``bytes`` | ``bpe`` | ``file`` | ``hub``; ``source``: the file or hub name it came from.
    """

    def __init__(self, hf, eos_id: int, kind: str, source: Optional[str] = None):
        self.hf, self.eos_id, self.kind, self.source = hf, int(eos_id), kind, source
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id must be in [0, {self.vocab_size}), got {eos_id}")

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        """text -> token ids (no EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """token ids -> text (special tokens such as EOS are dropped, invalid UTF-8 shows as U+FFFD)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self.hf.to_str()

    def info(self) -> dict:
        """What meta.json / a checkpoint records about the tokenizer (the json itself is stored beside it)."""
        return {"kind": self.kind, "source": self.source, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, path: str) -> None:
        """Write ``tokenizer.json``."""
        self.hf.save(path)

    @classmethod
    def from_json(cls, text: str, eos_id: Optional[int] = None, kind: str = "file", source: Optional[str] = None):
        hf = _hf().Tokenizer.from_str(text)
        return cls(hf, _find_eos(hf) if eos_id is None else eos_id, kind, source)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _find_eos(hf, eos_token: Optional[str] = None) -> int:
    names = (eos_token,) if eos_token else EOS_CANDIDATES
    for name in names:
        i = hf.token_to_id(name)
        if i is not None:
            return int(i)
    if eos_token:
        raise ValueError(f"eos_token {eos_token!r} is not in the tokenizer's vocabulary")
    raise ValueError(f"the tokenizer has none of the EOS tokens {list(EOS_CANDIDATES)}; name one with --eos-token")


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer: id = byte value, 256 ids, EOS = 0."""
    tk = _hf()
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = tk.decoders.ByteLevel()
    return Tokenizer(hf, eos_id=0, kind="bytes", source=None)


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (<= ``vocab_size`` ids, ``<|endoftext|>`` = id 0)."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 257 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be an int in [257, 2**32] (256 bytes + EOS at least), got {vocab_size!r}")
    tk = _hf()
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, eos_id=hf.token_to_id(EOS_TOKEN), kind="bpe", source=None)


def load_tokenizer(spec: str, eos_token: Optional[str] = None) -> Tokenizer:
    """``bytes``, a ``tokenizer.json`` path (or a directory holding one) or a Hugging Face hub name.

    ``train-bpe`` needs the input text: use :func:`train_bpe`. A hub name on a machine without network
    access raises a one-line ``ValueError``.
    """
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"tokenizer must be a non-empty str, got {spec!r}")
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "train-bpe":
        raise ValueError("tokenizer 'train-bpe' is trained on the input: use seqpar.data.tokenizer.train_bpe(texts, ...)")
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if os.path.isfile(path):
        tk = _hf()
        try:
            hf = tk.Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the Rust error as one line
            raise ValueError(f"tokenizer: cannot read {path}: {str(e).splitlines()[0]}") from None
        return Tokenizer(hf, _find_eos(hf, eos_token), "file", os.path.abspath(path))
    if path.endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ValueError(f"tokenizer: file not found: {spec}")
    tk = _hf()
    try:
        hf = tk.Tokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, ...: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"tokenizer: {spec!r} is neither bytes, train-bpe, a tokenizer.json file nor a Hugging Face hub "
            f"tokenizer that could be downloaded ({first[:200]})"
        ) from None
    return Tokenizer(hf, _find_eos(hf, eos_token), "hub", spec)


def tokenizer_from_meta(directory: str) -> Tokenizer:
    """The tokenizer of a prepared data directory (its tokenizer.json and meta.json)."""
    with open(os.path.join(directory, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(directory, "tokenizer.json")) as f:
        text = f.read()
    t = meta.get("tokenizer", {})
    return Tokenizer.from_json(text, eos_id=meta["eos_id"], kind=t.get("kind", "file"), source=t.get("source"))
