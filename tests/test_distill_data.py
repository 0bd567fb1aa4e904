"""Distillation data at scale: the token cache, windows read back from shards, weighted mixing, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, save_tiny, tiny_tokenizer

import slimlm.distill.tokens as tokens
from slimlm.data import pack_windows
from slimlm.distill import distill
from slimlm.distill.data import Mixture, SourceWindows, WindowOrder, build_training_data, parse_sources
from slimlm.distill.tokens import read_index, token_shards
from slimlm.errors import SlimlmError

SEQ = 32
LINE = "the quick brown fox jumps over the lazy dog. "


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("".join(f"{i} {LINE * (1 + i % 3)}\n" for i in range(200)))
    return p


@pytest.fixture
def tok():
    return tiny_tokenizer()


def _reference(path, tok):
    """The token stream of a one-document text file: its ids, then EOS."""
    return tok(path.read_text(), add_special_tokens=False).input_ids + [tok.eos_token_id]


def _no_tokenizing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokens, "encode_batch", boom)


# ---- the token cache -------------------------------------------------------------------------
def test_cache_is_reused_and_keyed_by_source_and_tokenizer(corpus, tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = token_shards(str(corpus), tok, cache=cache)
    assert first.exhausted and np.array_equal(first.read(0, len(first)), _reference(corpus, tok))
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("corpus.txt-")
    assert sorted(p.name for p in folders[0].iterdir()) == [".lock", "00000.bin", "index.json"]
    index = json.loads((folders[0] / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["tokens"] == len(first) and index["documents"] == 1

    _no_tokenizing(monkeypatch)
    again = token_shards(str(corpus), tok, cache=cache)  # no tokenizer call
    assert np.array_equal(again.read(0, len(again)), first.read(0, len(first)))
    data, _ = build_training_data(parse_sources(str(corpus)), tok, SEQ, 20, 4, 0, cache=cache)
    assert len(data.windows(0, 8)) == 8

    corpus.write_text(corpus.read_text() + "more text\n")  # the source changed: a new cache
    with pytest.raises(AssertionError, match="tokenized again"):
        token_shards(str(corpus), tok, cache=cache)


def test_windows_read_back_equal_direct_packing(corpus, tok, tmp_path):
    full = pack_windows(str(corpus), tok, SEQ, None).input_ids  # no BOS: this tokenizer adds none
    data, held = build_training_data(parse_sources(str(corpus)), tok, SEQ, 40, 5, 0, cache=tmp_path / "c")
    n = len(data.sources[0])
    assert n == 40 and len(held) == 5
    assert torch.equal(torch.from_numpy(data.sources[0].rows(np.arange(n))), full[:n])
    assert torch.equal(torch.from_numpy(held), full[n:n + 5])  # held out: the windows right after
    order = WindowOrder(n, 0).indices(0, 12)
    assert torch.equal(data.windows(0, 12), full[:n][torch.from_numpy(order)])
    # With BOS: each window is BOS + the next seq_len - 1 tokens, as pack_windows(bos=True) packs them.
    shards = token_shards(str(corpus), tok, cache=tmp_path / "c")
    with_bos = pack_windows(str(corpus), tok, SEQ, None, bos=True).input_ids
    rows = SourceWindows(shards, SEQ, tok.bos_token_id, 0, len(with_bos)).rows(np.arange(len(with_bos)))
    assert torch.equal(torch.from_numpy(rows), with_bos)


def test_a_source_larger_than_a_shard_spans_several(corpus, tok, tmp_path):
    ref = _reference(corpus, tok)
    # A plain-text file read in pieces (one document, EOS only at its end) and a JSONL source.
    shards = token_shards(str(corpus), tok, cache=tmp_path / "c", shard_tokens=1000, piece_chars=700)
    assert len(shards.index["shards"]) >= 5 and shards.index["pieces"] > 5 and shards.index["documents"] == 1
    assert np.array_equal(shards.read(0, len(shards)), ref)
    for boundary in shards.starts[1:-1]:  # reads across shard boundaries
        start = int(boundary) - 7
        assert np.array_equal(shards.read(start, 50), ref[start:start + 50])
    docs = [f"{i} {LINE * (1 + i % 4)}" for i in range(150)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shards = token_shards(str(jsonl), tok, cache=tmp_path / "c", shard_tokens=2000)
    want = [t for d in docs for t in tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    assert len(shards.index["shards"]) > 3 and shards.index["documents"] == 150
    assert np.array_equal(shards.read(0, len(shards)), want)
    full = pack_windows(str(jsonl), tok, SEQ, None).input_ids
    data, _ = build_training_data(parse_sources(str(jsonl)), tok, SEQ, len(full), 0, 0, cache=tmp_path / "c")
    assert torch.equal(torch.from_numpy(data.sources[0].rows(np.arange(len(full)))), full)


def test_only_what_is_needed_is_tokenized_and_a_bigger_need_extends_the_cache(corpus, tok, tmp_path):
    ref = _reference(corpus, tok)
    small = token_shards(str(corpus), tok, 3000, cache=tmp_path / "c", shard_tokens=1000, piece_chars=500)
    assert 3000 <= len(small) < 4000 and not small.exhausted
    more = token_shards(str(corpus), tok, 7000, cache=tmp_path / "c", shard_tokens=1000, piece_chars=500)
    assert more.index["shards"][:len(small.index["shards"])] == small.index["shards"]  # appended, not redone
    assert 7000 <= len(more) < 8000 and np.array_equal(more.read(0, len(more)), ref[:len(more)])
    # The earlier view still reads its own prefix.
    assert np.array_equal(small.read(0, len(small)), ref[:len(small)])


def test_a_killed_tokenization_leaves_no_complete_looking_cache(corpus, tok, tmp_path, monkeypatch):
    cache, ref = tmp_path / "c", _reference(corpus, tok)
    real, calls = tokens.encode_batch, []

    def dies(tokenizer, texts):
        calls.append(len(texts))
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed mid-way
        return real(tokenizer, texts)

    monkeypatch.setattr(tokens, "BATCH_PIECES", 2)
    monkeypatch.setattr(tokens, "encode_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        token_shards(str(corpus), tok, cache=cache, shard_tokens=1500, piece_chars=400)
    folder = next(p for p in cache.iterdir() if p.is_dir())
    index = read_index(folder)
    assert index is not None and not index["exhausted"] and index["tokens"] < len(ref)
    assert sorted(p.name for p in folder.glob("*.bin")) == [s["file"] for s in index["shards"]]
    assert not list(folder.glob("*.tmp"))  # the unfinished shard is gone
    pieces_done = index["pieces"]

    calls.clear()
    monkeypatch.setattr(tokens, "encode_batch", lambda t, texts: calls.append(len(texts)) or real(t, texts))
    done = token_shards(str(corpus), tok, cache=cache, shard_tokens=1500, piece_chars=400)
    assert done.exhausted and np.array_equal(done.read(0, len(done)), ref)
    assert sum(calls) == done.index["pieces"] - pieces_done  # continued, the finished shards kept

    # Killed before its first shard: nothing that looks like a cache at all.
    monkeypatch.setattr(tokens, "encode_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        token_shards(str(corpus), tok, cache=tmp_path / "c2")
    folder = next((tmp_path / "c2").iterdir())
    assert read_index(folder) is None and sorted(p.name for p in folder.iterdir()) == [".lock"]


# ---- mixing ----------------------------------------------------------------------------------
def test_weighted_mixing_keeps_the_proportions_and_is_seeded(tmp_path, tok):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("aaaa " * 2000)
    b.write_text("bbbb " * 1000)
    sources = parse_sources({str(a): 0.7, str(b): 0.3})
    assert sources == parse_sources([str(a), str(b)], "7,3")
    data, held = build_training_data(sources, tok, SEQ, 100, 4, 0, cache=tmp_path / "c")
    assert [len(s) for s in data.sources] == [70, 30] and len(held) == 4
    # The windows themselves tell their source: only 'a's or only 'b's.
    ids = data.windows(0, 100)
    is_a = (ids == tok.convert_tokens_to_ids("a")).any(1)
    is_b = (ids == tok.convert_tokens_to_ids("b")).any(1)
    assert bool((is_a ^ is_b).all()) and 60 <= int(is_a.sum()) <= 80

    mix = Mixture([70, 30], [0.7, 0.3], seed=0)
    src, win = mix.locate(0, 50_000)
    assert abs(np.mean(src == 0) - 0.7) < 0.002
    for i, n in ((0, 70), (1, 30)):  # each source: every window once per epoch
        visits = win[src == i]
        assert sorted(visits[:n]) == list(range(n)) and sorted(visits[n:2 * n]) == list(range(n))
    src2, win2 = mix.locate(12_345, 3000)  # random access: a pure function of the position
    assert np.array_equal(src2, src[12_345:15_345]) and np.array_equal(win2, win[12_345:15_345])
    same = Mixture([70, 30], [0.7, 0.3], seed=0).locate(0, 2000)
    other = Mixture([70, 30], [0.7, 0.3], seed=1).locate(0, 2000)
    assert np.array_equal(same[0], src[:2000]) and np.array_equal(same[1], win[:2000])
    assert not np.array_equal(other[0], src[:2000])
    three = Mixture([5, 5, 5], [0.0002, 0.0002, 0.9996], seed=3).locate(0, 1024 * 4)[0]
    assert np.bincount(three).tolist() == [4, 4, 4088]  # every source in every block of 1024, even tiny ones


def test_one_source_keeps_the_plain_seeded_order():
    src, win = Mixture([37], [1.0], seed=5).locate(10, 100)
    assert not src.any() and np.array_equal(win, WindowOrder(37, 5).indices(10, 100))


@pytest.mark.parametrize("data,weights,match", [
    (["a", "b"], [1.0], "2 data sources"),
    (["a", "b"], [1.0, 0.0], "positive"),
    (["a", "a"], None, "listed twice"),
    ({"a": 1.0}, [1.0], "not both"),
    (["a", "b"], "1,x", "--data-weights"),
])
def test_bad_mixtures_are_refused(data, weights, match):
    with pytest.raises(SlimlmError, match=match):
        parse_sources(data, weights)


def test_launch_command_passes_a_mixture():
    from slimlm.config import DistillConfig
    from slimlm.pipeline import launch_command

    cmd = launch_command("cfg.yaml", "t", "s", "out", DistillConfig(data={"a.txt": 0.7, "corpus/": 0.3}))
    assert " ".join(cmd).endswith("--data a.txt --data corpus/ --data-weights 0.7,0.3")
    plain = launch_command("c", "t", "s", "o", DistillConfig(data=["x", "y"]))
    assert cmd.count("--data") == 2 and "--data-weights" not in plain


# ---- resume at the exact data position -------------------------------------------------------
def test_resume_continues_at_the_exact_next_window_of_a_mixture(tmp_path, capsys):
    teacher = save_tiny("llama", tmp_path / "teacher")
    student = save_tiny("llama", tmp_path / "student", num_hidden_layers=2)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text((LINE * 30 + "\n") * 10)
    b.write_text("".join(f"{i}: pack my box with five dozen liquor jugs.\n" for i in range(400)))
    steps, gb = 4, 4
    common = ["--seq-len", SEQ, "--micro-batch", 2, "--global-batch", gb, "--lr", 2e-3, "--warmup", 1,
              "--eval-every", 0, "--save-every", 0, "--tokens", steps * gb * SEQ]
    # Straight through, from the command line: two --data and --data-weights.
    code, _, err = run_cli(["distill", "-t", teacher, "-s", student, "-o", tmp_path / "straight", "-q",
                            "--data", a, "--data", b, "--data-weights", "3,1", *common], capsys)
    assert code == 0, err
    # Stopped after 2 steps, then resumed, through the API.
    kw = dict(seq_len=SEQ, micro_batch=2, global_batch=gb, lr=2e-3, warmup=1, eval_every=0, save_every=0,
              progress=False, tensorboard=False)
    mix = {str(a): 3, str(b): 1}
    part = distill(str(teacher), str(student), mix, tmp_path / "resumed", steps * gb * SEQ, stop_after=2, **kw)
    state = json.loads((tmp_path / "resumed" / "run" / "checkpoints" / "step-00000002" / "trainer_state.json")
                       .read_text())
    assert not part.complete and state["data_position"] == 2 * gb
    done = distill(str(teacher), str(student), mix, tmp_path / "resumed", steps * gb * SEQ, resume=True, **kw)
    assert done.complete

    def losses(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["event"] == "train"]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # the same windows, step by step
    meta = json.loads((tmp_path / "resumed" / "slimlm.json").read_text())
    assert meta["data"] == [[str(a), 0.75], [str(b), 0.25]]
    from safetensors.torch import load_file

    x, y = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(
        str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(x[k], y[k]) for k in x)
    # A different mix is a different run.
    with pytest.raises(SlimlmError, match="different settings"):
        distill(str(teacher), str(student), {str(a): 1, str(b): 1}, tmp_path / "resumed", steps * gb * SEQ,
                resume=True, **kw)
