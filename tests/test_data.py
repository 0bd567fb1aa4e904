"""Calibration data: sources, packing, BOS handling, seeded sampling."""

import json

import pytest
import torch

from conftest import tiny_tokenizer
from slimlm.data import builtin_corpus, iter_texts, pack_windows
from slimlm.errors import SlimlmError


def test_sources_of_every_kind(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    import pandas as pd

    pd.DataFrame({"body": ["pq one", "pq two"]}).to_parquet(tmp_path / "c.parquet")
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["alpha text"]
    assert list(iter_texts(str(tmp_path / "b.jsonl"), "body")) == ["row 0", "row 1", "row 2"]
    assert list(iter_texts(str(tmp_path / "c.parquet"), "body")) == ["pq one", "pq two"]
    assert list(iter_texts(str(tmp_path / "*.parquet"), "body")) == ["pq one", "pq two"]
    folder = list(iter_texts(str(tmp_path), "body"))
    assert folder == ["alpha text", "row 0", "row 1", "row 2", "pq one", "pq two"]
    from datasets import Dataset

    Dataset.from_dict({"body": ["saved a", "saved b"]}).save_to_disk(tmp_path / "saved")
    assert list(iter_texts(str(tmp_path / "saved"), "body")) == ["saved a", "saved b"]


def test_missing_field_and_missing_file(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(SlimlmError, match="no field 'text'.*--text-field"):
        list(iter_texts(str(tmp_path / "b.jsonl")))
    with pytest.raises(SlimlmError, match="no readable data"):
        list(iter_texts(str(tmp_path / "nope.txt")))


def test_builtin_corpus_needs_no_download():
    docs = builtin_corpus()
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000


def test_packing_bos_and_determinism(text_file):
    tok = tiny_tokenizer()
    a = pack_windows(str(text_file), tok, 16, 5, seed=1, bos=True)
    b = pack_windows(str(text_file), tok, 16, 5, seed=1, bos=True)
    c = pack_windows(str(text_file), tok, 16, 5, seed=2, bos=True)
    assert a.input_ids.shape == (5, 16)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    # Without BOS, all windows in order are exactly the token stream cut in pieces.
    full = pack_windows(str(text_file), tok, 16, None, bos=False)
    stream = tok(text_file.read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]
    n = len(stream) // 16
    assert torch.equal(full.input_ids, torch.tensor(stream[: n * 16]).view(n, 16))


def test_too_little_text(text_file):
    with pytest.raises(SlimlmError, match="gives only"):
        pack_windows(str(text_file), tiny_tokenizer(), 64, 10_000)


def test_binary_files_are_refused_and_text_with_a_stray_latin1_byte_is_read(tmp_path):
    import gzip
    import random

    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    packed = tmp_path / "corpus.txt.gz"
    packed.write_bytes(gzip.compress(b"plain words " * 500))
    utf16 = tmp_path / "wide.txt"
    utf16.write_text("plain words " * 50, encoding="utf-16")
    for path in (garbage, packed, utf16):
        with pytest.raises(SlimlmError, match="not UTF-8 text"):
            list(iter_texts(str(path)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait, ".encode("latin-1") + b"plain words " * 100)
    assert list(iter_texts(str(latin1)))[0].startswith("caf\ufffd au lait")
