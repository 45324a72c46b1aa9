"""seqpar.data: corpus determinism, shifted labels, memmap files, recall task, cu_seqlens packing, sampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seqpar.data import (
    EOS_ID,
    IGNORE_INDEX,
    MemmapTokenDataset,
    RecallDataset,
    SeqDataModule,
    TokenWindowDataset,
    collate_tokens,
    corpus_fingerprint,
    cyclic_window,
    load_corpus,
    make_loader,
    split_corpus,
)

SMALL = 1 << 18


def test_corpus_is_deterministic_bytes():
    a = load_corpus(SMALL)
    assert a.dtype == np.uint8 and len(a) == SMALL and not a.flags.writeable
    from seqpar.data import corpus as corpus_mod

    corpus_mod._load.cache_clear()
    b = load_corpus(SMALL)
    assert a is not b and corpus_fingerprint(a) == corpus_fingerprint(b)
    assert np.array_equal(load_corpus(SMALL // 2), a[: SMALL // 2])  # a prefix: same file order
    assert (a == EOS_ID).sum() >= 1 and b"import" in a.tobytes()
    train, val = split_corpus(a, 0.1)
    assert len(train) + len(val) == len(a)
    assert train[-1] == EOS_ID or EOS_ID not in val[:-1]  # cut at a document boundary when there is one
    assert 0.05 < len(val) / len(a) < 0.2


def test_windows_shift_and_wrap():
    tokens = np.arange(10, dtype=np.uint16)
    ds = TokenWindowDataset(tokens, seq_len=4)
    assert len(ds) == 2  # (10 - 1) // 4 non-overlapping windows
    s = ds[1]
    assert s["input_ids"].dtype == torch.int64
    assert s["input_ids"].tolist() == [4, 5, 6, 7] and s["labels"].tolist() == [5, 6, 7, 8]
    long = TokenWindowDataset(tokens, seq_len=25, num_samples=3)  # longer than the stream: repeated
    s = long[2]
    assert s["input_ids"].tolist() == [(50 + i) % 10 for i in range(25)]
    assert s["labels"].tolist() == [(51 + i) % 10 for i in range(25)]
    assert cyclic_window(tokens, 8, 5).tolist() == [8, 9, 0, 1, 2]
    with pytest.raises(IndexError):
        ds[2]


def test_long_sequences_from_corpus():
    ds = TokenWindowDataset(load_corpus(SMALL), seq_len=1 << 20, num_samples=2)  # 1M tokens > the stream
    s = ds[1]
    assert s["input_ids"].shape == (1 << 20,) and torch.equal(s["input_ids"][1:], s["labels"][:-1])


def test_packed_cu_seqlens():
    E = 0
    tokens = np.array([5, 6, E, 7, 8, 9, E, 3, E, 4, 4, 4], dtype=np.uint8)
    ds = TokenWindowDataset(tokens, seq_len=10, packed=True, eos_id=E)
    s = ds[0]
    assert s["input_ids"].tolist() == [5, 6, E, 7, 8, 9, E, 3, E, 4]
    assert s["cu_seqlens"].dtype == torch.int32 and s["cu_seqlens"].tolist() == [0, 3, 7, 9, 10]
    # no prediction across a document boundary: the EOS position's label is ignored
    assert s["labels"].tolist() == [6, E, IGNORE_INDEX, 8, 9, E, IGNORE_INDEX, E, IGNORE_INDEX, 4]
    b = collate_tokens([s])
    assert b["input_ids"].shape == (1, 10) and b["cu_seqlens"].shape == (5,)
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_tokens([s, s])
    with pytest.raises(ValueError, match="batch_size=1"):
        SeqDataModule(packed=True, batch_size=2)
    dm = SeqDataModule(seq_len=4096, batch_size=1, packed=True, max_bytes=SMALL)
    batch = next(iter(dm.train_dataloader()))
    cu = batch["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == 4096 and bool((cu[1:] > cu[:-1]).all())
    ids = batch["input_ids"][0]
    for start in cu[1:-1].tolist():
        assert ids[start - 1] == EOS_ID


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_memmap_dataset(tmp_path, dtype):
    data = (np.arange(1000) * 7 % 50000).astype(dtype)
    path = tmp_path / "train.bin"
    data.tofile(path)
    (data[:200]).tofile(tmp_path / "val.bin")
    ds = MemmapTokenDataset(str(path), seq_len=16, dtype=dtype)
    assert len(ds) == 999 // 16 and isinstance(ds.tokens, np.memmap)
    s = ds[3]
    assert s["input_ids"].tolist() == data[48:64].tolist() and s["labels"].tolist() == data[49:65].tolist()
    import pickle

    ds2 = pickle.loads(pickle.dumps(ds))  # workers / spawn: reopened, not copied
    assert torch.equal(ds2[3]["input_ids"], s["input_ids"])
    dm = SeqDataModule("memmap", seq_len=16, batch_size=4, path=str(tmp_path), dtype=dtype)
    dm.setup()
    assert len(dm.train_dataset) == 62 and len(dm.val_dataset) == 199 // 16
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a multiple"):
        MemmapTokenDataset(str(odd), seq_len=4, dtype=dtype)
    with pytest.raises(FileNotFoundError):
        MemmapTokenDataset(str(tmp_path / "missing.bin"), seq_len=4, dtype=dtype)


def test_recall_task_needs_the_first_shard():
    ds = RecallDataset(seq_len=256, num_samples=8, num_pairs=8, num_queries=3, vocab_size=256, seed=1)
    s, s2 = ds[5], RecallDataset(seq_len=256, num_samples=8, num_pairs=8, num_queries=3, seed=1)[5]
    assert torch.equal(s["input_ids"], s2["input_ids"]) and not torch.equal(s["input_ids"], ds[4]["input_ids"])
    ids, labels = s["input_ids"], s["labels"]
    pairs = {int(ids[2 * i]): int(ids[2 * i + 1]) for i in range(8)}
    (pos,) = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
    assert len(pos) == 3
    for p in pos.tolist():
        assert ids[p - 1] == RecallDataset.QUERY and p >= 256 - 9  # queries at the very end (last SP shard)
        assert labels[p] == pairs[int(ids[p])]  # the answer is the value stored in the first tokens
    K = ds.num_keys
    filler = ids[16: 256 - 9]
    assert bool((filler >= 2 + 2 * K).all())  # the filler never contains keys, values or QUERY
    with pytest.raises(ValueError, match="too short"):
        RecallDataset(seq_len=20, num_pairs=8, num_queries=4)


def test_sampler_dp_shards_and_resume():
    ds = TokenWindowDataset(np.arange(1000, dtype=np.int64), seq_len=4, num_samples=248)
    full = [b["input_ids"][:, 0].tolist() for b in make_loader(ds, 4, seed=3)]
    shards = [[b["input_ids"][:, 0].tolist() for b in make_loader(ds, 2, num_replicas=2, rank=r, seed=3)]
              for r in range(2)]
    # dp=2 x batch 2 reads exactly the samples of dp=1 x batch 4, step by step
    for step, batch in enumerate(full[: len(shards[0])]):
        assert sorted(batch) == sorted(shards[0][step] + shards[1][step])
    again = [b["input_ids"][:, 0].tolist() for b in make_loader(ds, 4, seed=3)]
    assert again == full  # seeded
    loader = make_loader(ds, 4, seed=3)
    loader.sampler.set_epoch(1)
    epoch1 = [b["input_ids"][:, 0].tolist() for b in loader]
    assert epoch1 != full and sorted(sum(epoch1, [])) == sorted(sum(full, []))

    # resume after 5 steps of dp=1 x 4 under dp=2 x 2: the same next samples
    loader = make_loader(ds, 4, seed=3)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "samples_consumed": 20}
    resumed = []
    for r in range(2):
        ld = make_loader(ds, 2, num_replicas=2, rank=r, seed=3)
        ld.load_state_dict(state)
        assert len(ld) == len(shards[r])  # the epoch length is unchanged, batches 0..4 are skipped
        resumed.append([b["input_ids"][:, 0].tolist() for b in ld])
        assert ld.state_dict()["samples_consumed"] == len(shards[r]) * 2 * 2
    assert sorted(resumed[0][0] + resumed[1][0]) == sorted(full[5])
    assert resumed[0] == shards[0][5:]
