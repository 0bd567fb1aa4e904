"""The CLI as a user runs it: JSON output, saved checkpoints, clear errors, nothing half-written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny, run_cli


run = run_cli


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_info(tiny_model_dir, capsys):
    code, out, _ = run(["info", tiny_model_dir, "--json"], capsys)
    assert code == 0
    info = last_json(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["parameters_without_embeddings"] == info["parameters"] - 96 * 48
    assert info["family"] == "llama" and info["heads"] == 6


def test_prune_save_reload_generate_and_reuse_scores(tiny_model_dir, text_file, tmp_path, capsys):
    out1, scores = tmp_path / "p1", tmp_path / "scores.safetensors"
    args = ["--hidden", 36, "--ffn", 40, "--heads", 3, "--layers", 3, "--data", text_file,
            "--calib-samples", 6, "--seq-len", 16, "--heldout", 2, "--json"]
    code, out, err = run(["prune", tiny_model_dir, "-o", out1, "--save-scores", scores, *args], capsys)
    assert code == 0, err
    summary = last_json(out)
    assert summary["shape"]["layers"] == 3 and summary["shape"]["hidden"] == 36
    model = AutoModelForCausalLM.from_pretrained(out1)
    assert model.config.head_dim == 12 and model.config.num_attention_heads == 3
    assert sum(p.numel() for p in model.parameters()) == summary["parameters_after"]
    ids = torch.tensor([[1, 5, 6, 7]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
    prov = json.loads((out1 / "slimlm.json").read_text())
    assert prov["plan"]["kept_layers"] == summary["kept_layers"]
    assert prov["importance"]["data"] == str(text_file) and prov["importance"]["seed"] == 0
    assert (out1 / "tokenizer.json").exists()
    # Reusing the scores runs no forward pass and gives the identical checkpoint.
    out2 = tmp_path / "p2"
    code, out, err = run(["prune", tiny_model_dir, "-o", out2, "--scores", scores, *args], capsys)
    assert code == 0, err
    again = AutoModelForCausalLM.from_pretrained(out2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_importance_command_then_prune_other_sizes(tiny_model_dir, text_file, tmp_path, capsys):
    scores = tmp_path / "s.safetensors"
    code, out, err = run(["importance", tiny_model_dir, "-o", scores, "--data", text_file, "--calib-samples", 4,
                          "--seq-len", 16, "--heldout", 2, "--block-sizes", "1,2", "--json"], capsys)
    assert code == 0, err
    assert last_json(out)["depth_metrics"] == ["bi", "loss"]
    for metric in ("bi", "loss", "block"):
        code, _, err = run(["prune", tiny_model_dir, "-o", tmp_path / metric, "--scores", scores, "--layers", 2,
                            "--depth-metric", metric], capsys)
        assert code == 0, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--heads", 4], "multiple of"),
        (["--hidden", 1000], "larger than"),
        (["--hidden", 32, "--heads", 3], "divisible"),
        (["--layers", 2, "--drop-layers", "1"], "not both"),
        (["--drop-layers", "7-9"], "outside layers"),
        (["--data", "/no/such/file.txt", "--hidden", 36, "--seq-len", 16], "no readable data"),
        (["--seq-len", 4096, "--hidden", 36], "past the model's limit"),
        (["--importance", "taylor"], "unknown importance"),
        (["--aggregation", "max,l2"], "SEQ,BATCH"),
        (["--scores", "/no/such/scores.safetensors"], "scores file not found"),
        (["--calib-samples", 0], "at least 1"),
    ],
)
def test_bad_inputs_fail_fast_and_write_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    code, _, err = run(["prune", tiny_model_dir, "-o", out, *extra], capsys)
    assert code == 2
    assert message in err and err.strip().count("\n") == 0  # one line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_unsupported_family_and_missing_model(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    code, _, err = run(["prune", tmp_path / "gpt2", "-o", tmp_path / "x", "--hidden", 8], capsys)
    assert code == 2 and "unsupported model family 'gpt2'" in err and "llama" in err
    code, _, err = run(["info", tmp_path / "nope"], capsys)
    assert code == 2 and "not found" in err


def test_existing_output_is_not_clobbered(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["prune", tiny_model_dir, "-o", out, "--hidden", 36, "--importance", "random"], capsys)
    assert code == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma3_text", "mistral", "qwen3"])
def test_every_family_prunes_from_the_cli(family, tmp_path, capsys):
    src = save_tiny(family, tmp_path / family)
    out = tmp_path / "out"
    code, _, err = run(["prune", src, "-o", out, "--hidden", 36, "--ffn", 40, "--heads", 3, "--layers", 3,
                        "--depth-metric", "bi", "--importance", "magnitude"], capsys)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
