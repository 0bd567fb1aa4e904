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
NEW_DENSE_FAMILIES = ("smollm3", "olmo2", "olmo3", "granite", "gemma2")
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss")
HYBRID_FAMILIES = ("nemotron_h", "falcon_h1")
NEW_FAMILIES = NEW_DENSE_FAMILIES + MOE_FAMILIES + HYBRID_FAMILIES
ALL_FAMILIES = FAMILIES + NEW_FAMILIES

# Small, with the structure that slicing mistakes would break: 6 experts (top-2) of 24
# neurons, a dense layer among MoE layers (Qwen3-MoE), a shared expert (Qwen2-MoE,
# Nemotron-H), 8 Mamba heads of 6 channels in 2 groups, a per-group gated norm, biases,
# and multipliers that are not 1.
NEW_CONFIGS = {
    "smollm3": dict(attention_bias=True),
    "olmo2": dict(),
    "olmo3": dict(sliding_window=16),
    "granite": dict(embedding_multiplier=1.5, residual_multiplier=0.7, attention_multiplier=0.2, logits_scaling=1.3),
    "gemma2": dict(sliding_window=16, query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"] * 2),
    "qwen3_moe": dict(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2,
                      use_sliding_window=False),
    "mixtral": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, head_dim=8),
    "gpt_oss": dict(intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"] * 2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "nemotron_h": dict(num_hidden_layers=None, layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"],
                       mamba_num_heads=8, mamba_head_dim=6, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
                       n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                       moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1),
    "falcon_h1": dict(mamba_d_ssm=48, mamba_n_heads=8, mamba_d_head=6, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
                      mamba_chunk_size=8, mamba_rms_norm=True, embedding_multiplier=1.5, lm_head_multiplier=0.7,
                      ssm_out_multiplier=0.8, attention_in_multiplier=1.2, mlp_multipliers=[1.1, 0.9],
                      ssm_multipliers=[1.0, 1.1, 0.9, 1.2, 0.8]),
}


def tiny_config(family: str = "llama", **overrides):
    from transformers import AutoConfig

    kw = dict(COMMON)
    if family == "gemma3_text":
        kw.update(sliding_window=16, query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"] * 2)
    if family == "qwen2":
        kw.update(use_sliding_window=False)
    if family == "phi3":
        kw.update(tie_word_embeddings=False, original_max_position_embeddings=128)
    kw.update(NEW_CONFIGS.get(family, {}))
    kw.update(overrides)
    kw = {k: v for k, v in kw.items() if v is not None}
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
