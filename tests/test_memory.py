"""The memory planner (`--dry-run`): measured activations, the plan against a real run's peak, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli, tiny_config
from slimlm.memory import activation_bytes_per_token, parse_bytes, plan_distill_memory

WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
import torch
from conftest import save_tiny
from pathlib import Path
def status(key):  # VmHWM is this address space's peak: ru_maxrss would carry the forking parent's over exec
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
shape, tmp = json.loads(sys.argv[1]), Path(sys.argv[2])
common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
              num_attention_heads=8, num_key_value_heads=4, head_dim=shape["hidden"] // 8, max_position_embeddings=1024)
teacher = save_tiny("llama", tmp / "t", num_hidden_layers=shape["t_layers"], **common)
student = save_tiny("llama", tmp / "s", num_hidden_layers=shape["s_layers"], **common)
corpus = tmp / "c.txt"
corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 50 + "\n") * 100)
from transformers import AutoConfig
from slimlm.distill import distill
from slimlm.memory import plan_distill_memory
plan = plan_distill_memory(AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student),
                           micro_batch=shape["mb"], seq_len=shape["seq"])
import gc; gc.collect()
base = status("VmRSS")
distill(str(teacher), str(student), str(corpus), tmp / "o", tokens=2 * shape["mb"] * shape["seq"], seq_len=shape["seq"],
        micro_batch=shape["mb"], eval_every=0, save_every=0, progress=False, tensorboard=False)
peak = status("VmHWM")
print(json.dumps({"measured": peak - base, "plan": plan.total}))
"""

# Weights-heavy and activation-heavy: each needs a few hundred MB, so the process's own baseline is noise.
SHAPES = [
    dict(vocab=8000, hidden=512, ffn=1536, t_layers=8, s_layers=4, mb=4, seq=128),
    dict(vocab=8000, hidden=384, ffn=1024, t_layers=4, s_layers=4, mb=8, seq=384),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shape", SHAPES, ids=["weights", "activations"])
def test_plan_is_within_25_percent_of_the_measured_peak(tmp_path, shape):
    """A real two-step distillation on the CPU: peak resident memory above the process's starting point,
    against the plan made from the configs alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_TRIM_THRESHOLD_": "0", "SLIMLM_TOKEN_CACHE": str(tmp_path / "tc")}
    tests = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(shape), str(tmp_path), tests],
                          capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["plan"] == pytest.approx(result["measured"], rel=0.25), result


def test_activations_are_what_autograd_really_keeps():
    """The meta-device trace against the tensors a real CPU forward saves for backward."""
    config = tiny_config("llama", vocab_size=500, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved(tokens):
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model.model(input_ids=torch.randint(0, 500, (1, tokens)), use_cache=False).last_hidden_state
        return sum(seen.values()) + hidden.numel() * hidden.element_size()

    real = (saved(128) - saved(64)) / 64
    assert activation_bytes_per_token(config, torch.float32) == pytest.approx(real, rel=0.1)


def test_a_plan_that_does_not_fit_suggests_one_that_does():
    big = tiny_config("llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)
    plan = plan_distill_memory(big, big, micro_batch=8, seq_len=2048, compute_dtype=torch.bfloat16,
                               device_memory=parse_bytes("8GB"))
    assert plan.fits is False and plan.suggestions
    assert any("FSDP2 over" in s for s in plan.suggestions)
    checkpointed = plan_distill_memory(big, big, micro_batch=8, seq_len=2048, compute_dtype=torch.bfloat16,
                                       gradient_checkpointing=True)
    assert checkpointed.total < plan.total
    sharded = plan_distill_memory(big, big, micro_batch=8, seq_len=2048, compute_dtype=torch.bfloat16,
                                  backend="fsdp2", processes=8)
    assert sharded.parts["AdamW state (2 x fp32)"] == pytest.approx(plan.parts["AdamW state (2 x fp32)"] / 8)
    assert parse_bytes("24GiB") == parse_bytes("24GB") == 24 * 2**30


def test_dry_run_loads_no_weights(tmp_path, capsys):
    """Folders with a config and no weights: a dry run plans them; nothing is written."""
    for name, layers in (("t", 4), ("s", 2)):
        tiny_config("llama", num_hidden_layers=layers).save_pretrained(tmp_path / name)
    code, out, err = run_cli(["distill", "-t", tmp_path / "t", "-s", tmp_path / "s", "-o", tmp_path / "out",
                              "--dry-run", "--device-memory", "1GB", "--seq-len", 64, "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out.strip().splitlines()[-1])["plans"]["distill"]
    assert plan["fits"] is True and plan["total"] > 0 and "activations" in plan["parts"]
    assert not (tmp_path / "out").exists()
    code, out, err = run_cli(["distill", "-t", tmp_path / "t", "-s", tmp_path / "s", "-o", tmp_path / "out",
                              "--dry-run", "--accelerate-config", tmp_path / "none.yaml"], capsys)
    assert code == 2 and "accelerate config not found" in err
