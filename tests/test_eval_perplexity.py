"""Perplexity against a hand computation: HF's strided loop with a direct log-softmax."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from slimlm.errors import SlimlmError
from slimlm.evaluate import perplexity
from slimlm.evaluate.ppl import plan_windows


def bos_tokenizer():
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def hand_nll(model, ids: list[int], seq_len: int, stride: int, bos_id: int | None) -> tuple[float, int]:
    """The strided method written out: every window, every scored token, one log-softmax each."""
    body = seq_len - 1 if bos_id is not None else seq_len
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + body, len(ids))
        window = ([bos_id] if bos_id is not None else []) + ids[begin:end]
        offset = 1 if bos_id is not None else 0  # stream index i sits at window position i - begin + offset
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).logits[0].double(), dim=-1)
        for i in range(max(prev_end, 1 - offset), end):  # without BOS, token 0 has no context
            pos = i - begin + offset
            total -= logp[pos - 1, window[pos]].item()
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return total / count, count


TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs! "


@pytest.mark.parametrize("stride", [None, 5, 16])
@pytest.mark.parametrize("with_bos", [False, True])
def test_matches_hand_computation(tmp_path, stride, with_bos):
    model = tiny_model("llama")
    tok = bos_tokenizer() if with_bos else tiny_tokenizer()
    src = tmp_path / "t.txt"
    src.write_text(TEXT * 2)
    ids = tok(TEXT * 2, add_special_tokens=False).input_ids[:60]
    got = perplexity(model, tok, str(src), seq_len=16, stride=stride, max_tokens=60)
    want, count = hand_nll(model, ids, 16, min(stride or 15, 15), 1 if with_bos else None)
    assert got["tokens"] == count == (60 if with_bos else 59)  # each token scored once
    assert got["nll"] == pytest.approx(want, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["bos"] is with_bos


def test_batches_give_the_same_result(tmp_path):
    model, tok = tiny_model("qwen3"), tiny_tokenizer()
    src = tmp_path / "t.txt"
    src.write_text(TEXT)
    one = perplexity(model, tok, str(src), seq_len=24, stride=10, batch_size=1)
    many = perplexity(model, tok, str(src), seq_len=24, stride=10, batch_size=4)
    assert one["windows"] == 8
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5)
    assert many["tokens"] == one["tokens"] == len(tok(TEXT).input_ids) - 1


def test_documents_are_joined_with_eos(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ("first doc.", "second one!")) + "\n")
    ids = tok("first doc.").input_ids + [tok.eos_token_id] + tok("second one!").input_ids
    got = perplexity(model, tok, str(src), seq_len=8)
    want, count = hand_nll(model, ids, 8, 7, None)
    assert got["tokens"] == count and got["nll"] == pytest.approx(want, rel=1e-5)


def test_windows_cover_each_token_once():
    for n, seq_len, stride, bos in [(50, 16, None, False), (50, 16, 3, True), (16, 16, None, False), (7, 16, 4, True)]:
        windows = plan_windows(n, seq_len, stride, bos)
        assert sum(w.n_scored for w in windows) == (n if bos else n - 1)
        assert all(w.end - w.start <= seq_len - int(bos) for w in windows)
        assert windows[-1].end == n


def test_bad_settings_are_user_errors(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    src = tmp_path / "t.txt"
    src.write_text("a")
    with pytest.raises(SlimlmError, match="stride"):
        perplexity(model, tok, str(src), seq_len=8, stride=9)
    with pytest.raises(SlimlmError, match="too few tokens"):
        perplexity(model, tok, str(src), seq_len=8)
    with pytest.raises(SlimlmError, match="no readable data|not found"):
        perplexity(model, tok, str(tmp_path / "missing.txt"), seq_len=8)
