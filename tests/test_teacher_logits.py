"""Teacher-logits cache: the trainer's windows, the teacher's top-K, resume, extend, key checks."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli, save_tiny
from slimlm.distill import teacher_logits as tl
from slimlm.distill.data import build_training_data, parse_sources
from slimlm.distill.teacher_logits import TeacherLogitsCache, write_cache
from slimlm.errors import SlimlmError
from slimlm.models import load_model, load_tokenizer

SETTINGS = dict(seq_len=16, global_batch=4, heldout=4, top_k=8, batch_size=3, seed=3)


@pytest.fixture
def teacher(tmp_path):
    return str(save_tiny("llama", tmp_path / "teacher"))


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 10 windows, so that every test crosses shard boundaries."""
    monkeypatch.setattr(tl, "SHARD_BYTES", 10 * tl.window_bytes(SETTINGS["seq_len"], SETTINGS["top_k"], 96))


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.npy"))}


def test_cache_holds_exactly_the_trainers_windows(tmp_path, teacher, text_file, small_shards):
    other = tmp_path / "other.txt"
    other.write_text("pack my box with five dozen liquor jugs. " * 300)
    data = [str(text_file), str(other)]
    summary = write_cache(teacher, tmp_path / "cache", data=data, data_weights="0.7,0.3", tokens=3000,
                          progress=False, **SETTINGS)
    cache = TeacherLogitsCache.open(tmp_path / "cache")
    need = cache.manifest["stream"]["need"]
    assert need == 188  # ceil(3000 / (4 x 16)) = 47 steps of 4 windows
    train, held = build_training_data(parse_sources(data, "0.7,0.3"), load_tokenizer(teacher), 16, need, 4,
                                      SETTINGS["seed"])
    # Past the end of the first epoch too (positions wrap into fresh permutations, as in training).
    for start, count in ((0, 188), (180, 30), (700, 7)):
        assert torch.equal(cache.windows(start, count).ids, train.windows(start, count))
    assert np.array_equal(cache.heldout().ids.numpy(), held)
    assert summary["windows"] == sum(s["windows"] for s in cache.sources)
    assert summary["bytes_per_token"] == 2 + 8 * (2 + 2) + 2


def test_a_short_source_repeats_as_in_training_at_every_budget(tmp_path, teacher, text_file):
    short = tmp_path / "short.txt"
    short.write_text("a short text that runs out. " * 20)  # about 35 windows of 15 tokens + BOS
    data = [str(text_file), str(short)]
    write_cache(teacher, tmp_path / "cache", data=data, tokens=4000, progress=False, **SETTINGS)
    cache = TeacherLogitsCache.open(tmp_path / "cache")
    assert cache.sources[1]["exhausted_windows"] < cache.manifest["stream"]["need"] / 2  # it repeats
    tok = load_tokenizer(teacher)
    for tokens in (4000, 1000):  # the written budget, and a smaller one read from the same cache
        stream = cache.stream(tokens=tokens)
        train, held = build_training_data(parse_sources(data), tok, 16, stream.need, 4, SETTINGS["seed"])
        assert torch.equal(stream.windows(0, 300).ids, train.windows(0, 300))
        assert np.array_equal(stream.heldout_windows().ids.numpy(), held)


def test_eval_data_windows_are_the_trainers_heldout(tmp_path, teacher, text_file):
    held_text = tmp_path / "held.txt"
    held_text.write_text("sphinx of black quartz, judge my vow. " * 50)
    write_cache(teacher, tmp_path / "cache", data=str(text_file), eval_data=str(held_text), tokens=1000,
                progress=False, **SETTINGS)
    cache = TeacherLogitsCache.open(tmp_path / "cache")
    train, held = build_training_data(parse_sources(str(text_file)), load_tokenizer(teacher), 16,
                                      cache.manifest["stream"]["need"], 4, SETTINGS["seed"], eval_source=str(held_text))
    assert np.array_equal(cache.heldout().ids.numpy(), held)
    assert torch.equal(cache.windows(0, 16).ids, train.windows(0, 16))


def test_topk_equals_a_direct_teacher_forward(tmp_path, teacher, text_file):
    write_cache(teacher, tmp_path / "cache", data=str(text_file), tokens=600, progress=False, **SETTINGS)
    cache = TeacherLogitsCache.open(tmp_path / "cache")
    got = cache.windows(0, 6)
    model = load_model(teacher, dtype="float32")
    with torch.no_grad():
        logp = model(got.ids).logits.double().log_softmax(-1)
    top = logp.topk(8, dim=-1)
    assert torch.equal(got.targets.topk_ids, top.indices)
    # float16 storage: about 3 significant digits
    torch.testing.assert_close(got.targets.topk_logprobs.double(), top.values, rtol=1e-3, atol=1e-3)
    rest = torch.log1p(-top.values.exp().sum(-1))
    torch.testing.assert_close(got.targets.rest_logmass.double(), rest, rtol=1e-3, atol=1e-3)
    assert got.targets.topk_logprobs.dtype == torch.float16


def test_topk_of_the_whole_vocabulary_leaves_no_rest(tmp_path, teacher):
    model = load_model(teacher, dtype="float32")
    ids = torch.randint(0, 96, (2, 9))
    t = tl.teacher_topk(model, ids, top_k=96, chunk_size=5)
    assert torch.isneginf(t.rest_logmass).all()
    torch.testing.assert_close(t.topk_logprobs.exp().sum(-1), torch.ones(2, 9))


def test_resume_after_an_interrupted_write_gives_the_same_bytes(tmp_path, teacher, text_file, small_shards, monkeypatch):
    settings = dict(data=str(text_file), tokens=1500, progress=False, **SETTINGS)
    write_cache(teacher, tmp_path / "whole", **settings)
    real, calls = tl.teacher_topk, []

    def dies_on_the_fifth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tl, "teacher_topk", dies_on_the_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        write_cache(teacher, tmp_path / "resumed", **settings)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert partial["sources"][0]["windows"] == 4 * SETTINGS["batch_size"]  # four batches counted, no more
    monkeypatch.setattr(tl, "teacher_topk", real)
    summary = write_cache(teacher, tmp_path / "resumed", **settings)
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert summary["new_windows"] == whole["sources"][0]["windows"] - 12
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_extend_computes_only_the_new_windows(tmp_path, teacher, text_file, small_shards, monkeypatch):
    settings = dict(data=str(text_file), progress=False, **SETTINGS)
    write_cache(teacher, tmp_path / "cache", tokens=600, **settings)
    before = TeacherLogitsCache.open(tmp_path / "cache")
    n_before = before.sources[0]["windows"]
    old = before.read(0, np.arange(n_before))
    real, seen = tl.teacher_topk, []

    def counting(model, ids, *args, **kwargs):
        seen.append(ids.clone())
        return real(model, ids, *args, **kwargs)

    monkeypatch.setattr(tl, "teacher_topk", counting)
    summary = write_cache(teacher, tmp_path / "cache", tokens=2000, **settings)
    monkeypatch.setattr(tl, "teacher_topk", real)
    after = TeacherLogitsCache.open(tmp_path / "cache")
    n_after = after.sources[0]["windows"]
    assert n_after > n_before and summary["new_windows"] == n_after - n_before
    assert sum(len(ids) for ids in seen) == n_after - n_before
    kept = after.read(0, np.arange(n_before))  # the old windows are untouched
    for name in ("topk_ids", "topk_logprobs", "rest_logmass"):
        assert torch.equal(getattr(kept.targets, name), getattr(old.targets, name))
    # ... and the extended cache holds what a cache made at the larger budget holds.
    write_cache(teacher, tmp_path / "fresh", tokens=2000, **settings)
    fresh = TeacherLogitsCache.open(tmp_path / "fresh")
    a, b = after.read(0, np.arange(n_after)), fresh.read(0, np.arange(n_after))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.targets.topk_ids, b.targets.topk_ids)
    torch.testing.assert_close(a.targets.topk_logprobs, b.targets.topk_logprobs, rtol=0, atol=1e-3)
    # The smaller budget's stream still reads from the extended cache, as its distillation would.
    small = after.stream(tokens=600)
    assert torch.equal(small.windows(0, 40).ids, before.windows(0, 40).ids)
    # A budget the cache does not cover is refused with the way out.
    with pytest.raises(SlimlmError, match="extend it"):
        after.stream(tokens=10**6)


def test_a_cache_with_another_key_is_refused(tmp_path, teacher, text_file, capsys):
    settings = dict(data=str(text_file), tokens=600, progress=False, **SETTINGS)
    write_cache(teacher, tmp_path / "cache", **settings)
    stamp = (tmp_path / "cache" / "manifest.json").read_bytes()
    for change in ({"top_k": 4}, {"seq_len": 32}, {"seed": 9}):
        with pytest.raises(SlimlmError, match="another"):
            write_cache(teacher, tmp_path / "cache", **{**settings, **change})
    args = ["teacher-logits", teacher, "-o", tmp_path / "cache", "--data", text_file, "--tokens", "600",
            "--seq-len", "16", "--global-batch", "4", "--heldout", "4", "--top-k", "4", "--seed", "3", "--quiet"]
    capsys.readouterr()
    code, _, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1 and "top_k" in err
    assert (tmp_path / "cache" / "manifest.json").read_bytes() == stamp  # nothing touched
    code, out, _ = run_cli(args + ["--overwrite", "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["top_k"] == 4
    assert TeacherLogitsCache.open(tmp_path / "cache").top_k == 4


def test_checks_before_any_output(tmp_path, teacher, text_file):
    with pytest.raises(SlimlmError, match="vocabulary"):
        write_cache(teacher, tmp_path / "a", data=str(text_file), top_k=97, progress=False)
    with pytest.raises(SlimlmError, match="max_position_embeddings"):
        write_cache(teacher, tmp_path / "a", data=str(text_file), seq_len=4096, progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(SlimlmError, match="already exists"):
        write_cache(teacher, tmp_path / "b", data=str(text_file), seq_len=16, progress=False)
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "notes.txt").exists()
    with pytest.raises(SlimlmError, match="not a teacher-logits cache"):
        TeacherLogitsCache.open(tmp_path / "b")


def test_a_distillation_is_checked_against_what_the_cache_was_written_for(tmp_path, teacher, text_file):
    write_cache(teacher, tmp_path / "cache", data=str(text_file), tokens=600, progress=False, **SETTINGS)
    cache = TeacherLogitsCache.open(tmp_path / "cache")
    tok = load_tokenizer(teacher)
    same = dict(tokenizer=tok, data=str(text_file), seed=SETTINGS["seed"], seq_len=16)
    cache.check_matches(**same)
    cache.check_matches(**same, teacher=teacher, dtype="float32")
    with pytest.raises(SlimlmError, match="another seed, seq_len"):
        cache.check_matches(**{**same, "seed": 0, "seq_len": 32})
    other = save_tiny("llama", tmp_path / "other", seed=1)
    with pytest.raises(SlimlmError, match="another teacher"):
        cache.check_matches(**same, teacher=str(other), dtype="float32")
