"""Shared fixtures: tiny random models of every supported family, built in memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread (and suffer least from a busy machine).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Distillation's token caches go to a pytest folder, not ~/.cache/slimlm/tokens."""
    if "SLIMLM_TOKEN_CACHE" not in os.environ:
        os.environ["SLIMLM_TOKEN_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
        yield
        os.environ.pop("SLIMLM_TOKEN_CACHE", None)
    else:
        yield

# Small but not degenerate: GQA with 2 query heads per KV group, head_dim != hidden/heads.
COMMON = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=12,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def tiny_config(family: str = "llama", **overrides):
    from transformers import AutoConfig

    kw = dict(COMMON)
    if family == "gemma3_text":
        kw.update(sliding_window=16, query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"] * 2)
    if family == "qwen2":
        kw.update(use_sliding_window=False)
    if family == "phi3":
        kw.update(tie_word_embeddings=False, original_max_position_embeddings=128)
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    # Random init leaves norms at 1 (or 0 for Gemma); perturb every parameter so that
    # slicing mistakes show up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


class ByteTokenizer:
    """Placeholder; tests that need a tokenizer use `tiny_tokenizer`."""


def tiny_tokenizer():
    """A small word-level tokenizer (vocab 96) built in memory, saved like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i, ch in enumerate(" abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/"):
        vocab[ch] = 4 + i
    while len(vocab) < 96:
        vocab[f"<extra{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama with a tokenizer: what `from_pretrained` and the CLI accept."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny(family: str, path: Path, **overrides) -> Path:
    model = tiny_model(family, **overrides)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)
    return p


def run_cli(args, capsys):
    """Run the `slimlm` CLI in-process; return (exit code, stdout, stderr)."""
    from slimlm.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
