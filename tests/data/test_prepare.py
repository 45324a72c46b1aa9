"""seqpar.data.prepare / tokenizer: every input format, tokenizer round trips, meta.json and its use by train.py."""
import gzip
import json
import os

import numpy as np
import pytest

from seqpar.data.prepare import apply_meta, iter_documents, prepare, read_meta, token_dtype
from seqpar.data.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer, train_bpe

DOCS = ["Hello wörld! The first document.\n", "second document: 2 + 2 = 4\n", "dritte Zeile, ünïcode ✓\n"]


def _stream(out, meta):
    tr = np.fromfile(os.path.join(out, "train.bin"), dtype=meta["dtype"])
    va = np.fromfile(os.path.join(out, "val.bin"), dtype=meta["dtype"])
    return np.concatenate([tr, va])


def _expected(tok, docs):
    ids = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_id]
    return np.asarray(ids)


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = "naïve ✓ \x01\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # id = byte value, as the embedded corpus
    assert tok.decode(ids) == text and tok.vocab_size == 256 and tok.eos_id == 0


def test_bpe_round_trip_and_json(tmp_path):
    tok = train_bpe(DOCS * 20, vocab_size=300)
    assert 257 <= tok.vocab_size <= 300 and tok.eos_id == 0
    for d in DOCS + ["unseen text ✗ ünseen"]:
        assert tok.decode(tok.encode(d)) == d
    assert len(tok.encode(DOCS[0])) < len(DOCS[0].encode())  # merges were learned
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.kind == "file" and again.eos_id == 0 and again.encode(DOCS[1]) == tok.encode(DOCS[1])
    assert load_tokenizer(str(tmp_path)).encode(DOCS[2]) == tok.encode(DOCS[2])  # a directory holding one
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(DOCS, vocab_size=100)
    with pytest.raises(ValueError, match="file not found"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_hub_name_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        load_tokenizer("no-such-org/no-such-tokenizer")
    assert "\n" not in str(e.value) and "no-such-org/no-such-tokenizer" in str(e.value)


def _write_inputs(tmp_path):
    txt = [tmp_path / f"doc{i}.txt" for i in range(len(DOCS))]
    for p, d in zip(txt, DOCS):
        p.write_text(d, encoding="utf-8")
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)), encoding="utf-8")
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    return txt, jl, gz


def test_prepare_every_format_bytes(tmp_path):
    txt, jl, gz = _write_inputs(tmp_path)
    tok = byte_tokenizer()
    want = _expected(tok, DOCS)
    for name, inputs, kw in (("txt", [str(p) for p in txt], {}), ("jsonl", [str(jl)], {}),
                             ("gz", [str(gz)], {"field": "body"})):
        out = str(tmp_path / f"out_{name}")
        meta = prepare(inputs, out, tokenizer="bytes", val_fraction=0.2, **kw)
        assert meta["documents"] == 3 and meta["dtype"] == "uint16" and meta["vocab_size"] == 256
        assert meta["train_tokens"] + meta["val_tokens"] == len(want) and meta["val_tokens"] == round(0.2 * len(want))
        np.testing.assert_array_equal(_stream(out, meta), want)  # EOS after every document
        assert read_meta(out) == json.load(open(os.path.join(out, "meta.json")))
        assert Tokenizer.from_json(open(os.path.join(out, "tokenizer.json")).read(), eos_id=0).encode("ab") == [97, 98]
    with pytest.raises(ValueError, match="no field 'text'"):
        prepare([str(gz)], str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="file not found"):
        prepare([str(tmp_path / "nope.txt")], str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="val_fraction"):
        prepare([str(jl)], str(tmp_path / "bad"), val_fraction=1.0)


def test_prepare_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), str(path))
    meta = prepare([str(path)], str(tmp_path / "out"), val_fraction=0.1)
    np.testing.assert_array_equal(_stream(str(tmp_path / "out"), meta), _expected(byte_tokenizer(), DOCS))
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents([str(path)], field="body"))


def test_prepare_train_bpe_and_worker_pool(tmp_path):
    txt, jl, _ = _write_inputs(tmp_path)
    meta = prepare([str(jl)] * 4, str(tmp_path / "bpe"), tokenizer="train-bpe", vocab_size=280, val_fraction=0.1)
    tok = load_tokenizer(str(tmp_path / "bpe" / "tokenizer.json"))
    assert meta["vocab_size"] == tok.vocab_size and meta["tokenizer"]["kind"] == "bpe" and meta["eos_id"] == tok.eos_id
    want = _expected(tok, DOCS * 4)
    np.testing.assert_array_equal(_stream(str(tmp_path / "bpe"), meta), want)
    # two worker processes give the same stream, in order
    meta2 = prepare([str(jl)] * 4, str(tmp_path / "pool"), tokenizer=str(tmp_path / "bpe" / "tokenizer.json"),
                    val_fraction=0.1, workers=2, parallel_min_bytes=0)
    np.testing.assert_array_equal(_stream(str(tmp_path / "pool"), meta2), want)


def test_token_dtype_and_apply_meta():
    assert token_dtype(256) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    meta = {"vocab_size": 300, "eos_id": 0, "dtype": "uint16"}
    assert apply_meta(meta, "uint16", None, None) == ("uint16", 0, 300)
    assert apply_meta(meta, "uint16", 0, 512) == ("uint16", 0, 512)
    assert apply_meta(None, "uint32", 5, None) == ("uint32", 5, None)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        apply_meta(meta, "uint16", None, 256)
    with pytest.raises(ValueError, match="data.eos_id=3"):
        apply_meta(meta, "uint16", 3, None)
    with pytest.raises(ValueError, match="data.dtype=uint32"):
        apply_meta(dict(meta, dtype="uint16"), "uint32", None, None, default_dtype="uint16")


def test_train_reads_meta_and_rejects_mismatch(tmp_path):
    """build(): meta.json's vocab / dtype / eos reach the model and the data; a contradiction fails before training."""
    from seqpar.recipe import ConfigError, build, load_config, resolve_layout

    txt, jl, _ = _write_inputs(tmp_path)
    out = str(tmp_path / "bpe")
    meta = prepare([str(jl)] * 8, out, tokenizer="train-bpe", vocab_size=290, val_fraction=0.2)
    over = ["trainer.accelerator=cpu", "data.kind=memmap", f"data.path={out}", "data.seq_len=16", "data.batch_size=1",
            "data.packed=true", f"trainer.out_dir={tmp_path / 'run'}", "trainer.progress_bar=false"]
    cfg = load_config([os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug.yaml")], over)
    trainer, model, dm, _, _ = build(cfg, resolve_layout(cfg))
    assert model.config.vocab_size == meta["vocab_size"] and dm.eos_id == meta["eos_id"]
    info = [cb for cb in trainer.callbacks if type(cb).__name__ == "RunInfo"][0].info
    assert info["tokenizer"]["json"] and info["meta"]["vocab_size"] == meta["vocab_size"]
    cfg = load_config([os.path.join(os.path.dirname(__file__), "..", "..", "configs", "debug.yaml")],
                      over + ["model.overrides.vocab_size=256"])
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        build(cfg, resolve_layout(cfg))
