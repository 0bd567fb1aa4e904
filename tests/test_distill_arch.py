"""Distillation of mixture-of-experts and hybrid students: logits only (no router auxiliary loss),
and the logits the loss sees are the model's own (Granite and Falcon-H1 scale theirs)."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import tiny_model, tiny_tokenizer
from slimlm.adapters import get_adapter
from slimlm.distill import distill
from slimlm.distill.modules import StudentObjective, TeacherForward, lm_head
from slimlm.importance import random_scores
from slimlm.config import PruneConfig
from slimlm.plan import make_plan
from slimlm.prune import prune_model

SEQ = 32


@pytest.mark.parametrize("family, targets", [
    ("qwen3_moe", dict(experts=4, moe_ffn=16)),
    ("nemotron_h", dict(experts=4, mamba_heads=4, drop_layers="3")),
])
def test_distill_a_pruned_moe_or_hybrid_student(family, targets, tmp_path, text_file):
    teacher = tiny_model(family)
    shape = get_adapter(teacher).shape()
    student = prune_model(teacher, make_plan(random_scores(shape, seed=1), shape, PruneConfig(**targets)))
    for model, name in ((teacher, "teacher"), (student, "student")):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    assert not student.config.output_router_logits  # no router auxiliary loss: logits only
    out = tmp_path / "out"
    result = distill(str(tmp_path / "teacher"), str(tmp_path / "student"), str(text_file), out, tokens=4 * 2 * SEQ,
                     seq_len=SEQ, micro_batch=2, lr=1e-3, warmup=0, eval_every=4, heldout=2, progress=False,
                     tensorboard=False)
    assert result.complete and result.steps == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["event"] == "train")
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert get_adapter(again).shape() == get_adapter(student).shape()
    ids = torch.randint(3, 96, (1, 6))
    assert again.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 9)


@pytest.mark.parametrize("family", ["granite", "falcon_h1", "qwen2_moe", "nemotron_h"])
def test_the_distillation_loss_sees_the_models_own_logits(family):
    """Validation sums of the student objective (forward KL to a teacher, LM loss) against the
    same quantities computed from `model(ids).logits`."""
    teacher, student = tiny_model(family, seed=0), tiny_model(family, seed=1)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_hidden, _ = TeacherForward(teacher)(ids)
        sums = StudentObjective(student, chunk_size=8)(ids, t_hidden, {}, lm_head(teacher), metrics=True)
        t_logits, s_logits = teacher(ids).logits.float(), student(ids).logits.float()
    kl = F.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="sum")
    ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1), reduction="sum")
    assert sums[0].item() == pytest.approx(kl.item(), rel=1e-4)
    assert sums[1].item() == pytest.approx(ce.item(), rel=1e-4)
