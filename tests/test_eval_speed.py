"""Speed: throughput numbers are sane, and the memory measure sees an allocation."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from slimlm.errors import SlimlmError
from slimlm.evaluate import speed
from slimlm.evaluate.throughput import _peak_memory, weights_bytes


def test_speed_reports_throughput_and_memory():
    # Gemma 3 mixes sliding-window and full attention caches (llama runs in test_eval_cli).
    model = tiny_model("gemma3_text")
    out = speed(model, tiny_tokenizer(), batch=2, prompt_len=8, new_tokens=3, repeats=2)
    assert out["prefill_tokens_per_s"] > 0 and out["decode_tokens_per_s"] > 0
    assert out["prefill_s"] == pytest.approx(2 * 8 / out["prefill_tokens_per_s"])
    assert out["weights_mb"] == pytest.approx(weights_bytes(model) / 2**20)
    assert out["peak_mem_mb"] >= out["weights_mb"]
    assert out["memory_method"] in {"rss_peak", "rss_sampled"}


def test_peak_memory_sees_a_transient_allocation():
    with _peak_memory(torch.device("cpu")) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched so that it is resident
        del block
    assert mem["bytes"] >= 48 * 2**20


def test_bad_settings():
    with pytest.raises(SlimlmError, match="--new-tokens"):
        speed(tiny_model("llama"), new_tokens=-1)
