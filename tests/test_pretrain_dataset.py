"""Tests for intro2llm.data.pretrain_dataset: shards, windows, sampler state, DDP slicing, errors."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from intro2llm.data import pretrain_dataset as pd
from intro2llm.data.synthetic import TASKS, SyntheticConfig, pretrain_documents


class ByteTokenizer:
    """Bytes 0..255 plus EOS=256."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))


class BigVocabTokenizer(ByteTokenizer):
    """Ids above 65535 (needs uint32)."""

    eos_token_id = 70_000
    vocab_size = 70_001

    def encode(self, text):
        return [69_000 + b for b in text.encode("utf-8")]


DOCS = list(pretrain_documents(300, seed=0, config=SyntheticConfig(tasks=TASKS)))


def _stream(tok, docs):
    out = []
    for d in docs:
        out += tok.encode(d) + [tok.eos_token_id]
    return np.array(out, dtype=np.int64)


@pytest.fixture
def shard_dir(tmp_path):
    pd.write_shards(DOCS, ByteTokenizer(), tmp_path / "d", shard_tokens=1000)
    return tmp_path / "d"


def test_roundtrip_uint16(shard_dir):
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 257 and index["eos_token_id"] == 256
    expected = _stream(ByteTokenizer(), DOCS)
    assert index["num_tokens"] == expected.size and index["num_documents"] == len(DOCS)
    assert len(index["shards"]) == -(-expected.size // 1000)
    got = np.concatenate([np.fromfile(shard_dir / s["file"], dtype=np.uint16) for s in index["shards"]])
    np.testing.assert_array_equal(got.astype(np.int64), expected)
    assert not [f for f in os.listdir(shard_dir) if f.endswith(".tmp")]


def test_uint32_for_large_vocab(tmp_path):
    assert pd.dtype_for_vocab(65_536) == np.uint16
    assert pd.dtype_for_vocab(65_537) == np.uint32
    index = pd.write_shards(DOCS[:20], BigVocabTokenizer(), tmp_path)
    assert index["dtype"] == "uint32"
    ds = pd.PretrainDataset(tmp_path, 8)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), _stream(BigVocabTokenizer(), DOCS[:20]))


def test_windows_are_contiguous_slices_across_shards(shard_dir):
    ds = pd.PretrainDataset(shard_dir, block_size=32, seed=1)
    stream = _stream(ByteTokenizer(), DOCS)
    crossed = 0
    for i in range(3 * len(ds)):  # three epochs
        start = ds.window_start(i)
        x, y = ds[i]
        assert x.shape == (32,) and y.shape == (32,) and x.dtype == np.int64
        np.testing.assert_array_equal(x, stream[start : start + 32])
        np.testing.assert_array_equal(y, stream[start + 1 : start + 33])
        crossed += (start // 1000) != ((start + 32) // 1000)
    assert crossed > 0  # some windows span two shard files


def test_epochs_disjoint_deterministic_and_reshuffled(shard_dir):
    ds = pd.PretrainDataset(shard_dir, block_size=32, seed=1)
    n = len(ds)
    assert n == (ds.num_tokens - 32) // 33
    e0 = [ds.window_start(i) for i in range(n)]
    e1 = [ds.window_start(i) for i in range(n, 2 * n)]
    for starts in (e0, e1):
        s = sorted(starts)
        assert all(b - a >= 33 for a, b in zip(s, s[1:]))  # no overlap within an epoch
        assert s[-1] + 33 <= ds.num_tokens
    assert e0 != e1
    same = pd.PretrainDataset(shard_dir, block_size=32, seed=1)
    assert [same.window_start(i) for i in range(n)] == e0
    other = pd.PretrainDataset(shard_dir, block_size=32, seed=2)
    assert [other.window_start(i) for i in range(n)] != e0


def test_loader_resume_exact(shard_dir):
    ds = pd.PretrainDataset(shard_dir, block_size=64)
    ref = pd.PretrainLoader(ds, 6)
    batches = [ref.next_batch() for _ in range(30)]  # crosses several epochs
    assert ref.epoch >= 1
    a = pd.PretrainLoader(ds, 6)
    for _ in range(12):
        a.next_batch()
    state = a.state_dict()
    b = pd.PretrainLoader(pd.PretrainDataset(shard_dir, block_size=64), 6)
    b.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    for i in range(12, 30):
        x, y = b.next_batch()
        assert x.dtype == torch.int64 and x.shape == (6, 64)
        torch.testing.assert_close(x, batches[i][0], rtol=0, atol=0)
        torch.testing.assert_close(y, batches[i][1], rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_the_global_batch(shard_dir, world_size):
    ds = pd.PretrainDataset(shard_dir, block_size=16)
    single = pd.PretrainLoader(ds, 8)
    ranks = [pd.PretrainLoader(ds, 8, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [rk.next_batch() for rk in ranks]
        assert all(p[0].shape == (8 // world_size, 16) for p in parts)
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y, rtol=0, atol=0)
    idx = [set(rk.indices(3)) for rk in ranks]
    assert set().union(*idx) == set(single.indices(3)) and sum(map(len, idx)) == 8


def test_resume_with_different_world_size(shard_dir):
    ds = pd.PretrainDataset(shard_dir, block_size=16)
    one = pd.PretrainLoader(ds, 4)
    for _ in range(3):
        one.next_batch()
    state = one.state_dict()
    expect = one.next_batch()[0]
    two = [pd.PretrainLoader(ds, 4, rank=r, world_size=2) for r in range(2)]
    for t in two:
        t.load_state_dict(state)
    torch.testing.assert_close(torch.cat([t.next_batch()[0] for t in two]), expect, rtol=0, atol=0)


def test_loader_state_mismatch_is_an_error(shard_dir):
    ds = pd.PretrainDataset(shard_dir, block_size=16)
    state = pd.PretrainLoader(ds, 4).state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        pd.PretrainLoader(ds, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        pd.PretrainLoader(pd.PretrainDataset(shard_dir, 16, seed=5), 4).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of world_size"):
        pd.PretrainLoader(ds, 5, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        pd.PretrainLoader(ds, 4, rank=2, world_size=2)


def test_missing_and_empty_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as e:
        pd.PretrainDataset(missing, 8)
    assert str(missing) in str(e.value) and isinstance(e.value, FileNotFoundError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        pd.PretrainDataset(empty, 8)
    # an index with zero tokens
    pd.write_shards([], ByteTokenizer(), tmp_path / "zero")
    with pytest.raises(ValueError, match="0 tokens"):
        pd.PretrainDataset(tmp_path / "zero", 8)
    # fewer tokens than one window
    pd.write_shards(["ab"], ByteTokenizer(), tmp_path / "tiny")
    with pytest.raises(ValueError, match="fewer than one window"):
        pd.PretrainDataset(tmp_path / "tiny", 8)
    with pytest.raises(ValueError, match="does not exist"):
        list(pd.read_text_documents(missing))


def test_ids_out_of_range(tmp_path):
    class Bad(ByteTokenizer):
        def encode(self, text):
            return [300]

    with pytest.raises(ValueError, match="token id 300"):
        pd.write_shards(["x"], Bad(), tmp_path / "bad")
    pd.write_shards(DOCS[:50], ByteTokenizer(), tmp_path / "ok")
    # the model's vocabulary is smaller than the data's: caught before training
    with pytest.raises(ValueError, match=r"token id 256 >= vocab_size 200"):
        pd.PretrainDataset(tmp_path / "ok", 8, vocab_size=200)
    # a shard that lost bytes
    shard = tmp_path / "ok" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match="shard_00000.bin"):
        pd.PretrainDataset(tmp_path / "ok", 8)


def test_crash_while_writing_leaves_no_partial_shard(tmp_path, monkeypatch):
    out = tmp_path / "crash"
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # die while the second shard is being written
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(pd.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        pd.write_shards(DOCS, ByteTokenizer(), out, shard_tokens=1000)
    files = sorted(os.listdir(out))
    assert files == ["shard_00000.bin"]  # the finished shard only: no temp file, no half shard, no index
    assert (out / "shard_00000.bin").stat().st_size == 2000
    with pytest.raises(ValueError, match="index.json"):
        pd.PretrainDataset(out, 8)


def test_interrupted_rewrite_keeps_the_old_dataset(shard_dir):
    before = pd.PretrainDataset(shard_dir, 8)
    old_tokens = before.read(0, before.num_tokens).copy()

    class Dies(ByteTokenizer):
        def __init__(self):
            self.n = 0

        def encode(self, text):
            self.n += 1
            if self.n > 200:  # after the first shards of the new data are written
                raise RuntimeError("killed")
            return [65] * 20

    with pytest.raises(RuntimeError):
        pd.write_shards(DOCS, Dies(), shard_dir, shard_tokens=1000)
    after = pd.PretrainDataset(shard_dir, 8)  # the old index and all its shards are untouched
    np.testing.assert_array_equal(after.read(0, after.num_tokens), old_tokens)
    # the next complete rewrite removes the interrupted one's orphan shards
    pd.write_shards(DOCS[:10], ByteTokenizer(), shard_dir, shard_tokens=1000)
    index = json.loads((shard_dir / "index.json").read_text())
    assert sorted(os.listdir(shard_dir)) == sorted(["index.json"] + [s["file"] for s in index["shards"]])


def test_rewrite_replaces_and_cleans_old_shards(shard_dir):
    n_old = len(json.loads((shard_dir / "index.json").read_text())["shards"])
    pd.write_shards(DOCS[:10], ByteTokenizer(), shard_dir, shard_tokens=1000)
    index = json.loads((shard_dir / "index.json").read_text())
    assert len(index["shards"]) == 1 < n_old
    assert sorted(os.listdir(shard_dir)) == ["index.json", index["shards"][0]["file"]]
    ds = pd.PretrainDataset(shard_dir, 8)
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), _stream(ByteTokenizer(), DOCS[:10]))


def test_read_text_documents(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert list(pd.read_text_documents(tmp_path)) == ["hello", "one", "two"]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        list(pd.read_text_documents(tmp_path / "e"))


def test_hugging_face_tokenizer_interop(tmp_path):
    # a real tokenizer object (tokenizers BPE wrapped by transformers), trained in memory: no download
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=300))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    assert hf.eos_token_id >= hf.vocab_size  # the added EOS is only counted by len(hf)
    index = pd.write_shards(DOCS[:100], hf, tmp_path)
    assert index["vocab_size"] == len(hf) and index["dtype"] == "uint16"
    ds = pd.PretrainDataset(tmp_path, 16)
    expected = np.concatenate([hf.encode(d) + [hf.eos_token_id] for d in DOCS[:100]])
    np.testing.assert_array_equal(ds.read(0, ds.num_tokens), expected)
    assert hf.decode(ds.read(0, len(hf.encode(DOCS[0]))).tolist()) == DOCS[0]


@settings(max_examples=25, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(0, 299), max_size=30), min_size=1, max_size=20),
    shard_tokens=st.integers(4, 64),
    as_numpy=st.booleans(),
)
def test_shard_roundtrip_property(docs, shard_tokens, as_numpy):
    with tempfile.TemporaryDirectory() as d:
        with pd.ShardWriter(d, 300, eos_token_id=299, shard_tokens=shard_tokens) as w:
            for ids in docs:
                w.add(np.array(ids, dtype=np.int64) if as_numpy else ids)
        expected = [t for ids in docs for t in ids + [299]]
        index = json.loads((Path(d) / "index.json").read_text())
        assert index["num_tokens"] == len(expected) and index["num_documents"] == len(docs)
        assert all(s["num_tokens"] == shard_tokens for s in index["shards"][:-1])
        got = [int(t) for s in index["shards"] for t in np.fromfile(Path(d) / s["file"], dtype=np.uint16)]
        assert got == expected
