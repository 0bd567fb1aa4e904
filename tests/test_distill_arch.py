"""Distillation of mixture-of-experts and hybrid students: logits only (no router auxiliary loss),
and the logits the loss sees are the model's own (Granite and Falcon-H1 scale theirs)."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

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
    teacher, student = _teacher_and_student(family, targets, tmp_path)
    student_config = AutoConfig.from_pretrained(student)
    assert not student_config.output_router_logits  # no router auxiliary loss: logits only
    out = tmp_path / "out"
    result = distill(teacher, student, str(text_file), out, tokens=4 * 2 * SEQ,
                     seq_len=SEQ, micro_batch=2, lr=1e-3, warmup=0, eval_every=4, heldout=2, progress=False,
                     tensorboard=False)
    assert result.complete and result.steps == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["event"] == "train")
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert get_adapter(again).shape() == get_adapter(student_config).shape()
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


def _teacher_and_student(family, targets, tmp_path):
    teacher = tiny_model(family)
    shape = get_adapter(teacher).shape()
    student = prune_model(teacher, make_plan(random_scores(shape, seed=1), shape, PruneConfig(**targets)))
    for model, name in ((teacher, "teacher"), (student, "student")):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    return str(tmp_path / "teacher"), str(tmp_path / "student")


STUDENTS = [("qwen2_moe", dict(experts=4, moe_ffn=16, shared_ffn=20)),
            ("nemotron_h", dict(experts=4, mamba_heads=4, drop_layers="3"))]


@pytest.mark.parametrize("family, targets", STUDENTS)
def test_resume_eval_and_card_of_a_moe_or_hybrid_student(family, targets, tmp_path, text_file):
    """A stopped and resumed distillation ends with the same weights as an uninterrupted one; the student's
    perplexity equals a direct log-likelihood; its model card shows its MoE / Mamba sizes and active count."""
    from safetensors.torch import load_file

    from slimlm.card import write_model_card
    from slimlm.evaluate import evaluate

    teacher, student = _teacher_and_student(family, targets, tmp_path)
    kw = dict(tokens=4 * 2 * SEQ, seq_len=SEQ, micro_batch=2, lr=2e-3, warmup=1, eval_every=0, save_every=0,
              heldout=2, progress=False, tensorboard=False)
    distill(teacher, student, str(text_file), tmp_path / "a", **kw)
    part = distill(teacher, student, str(text_file), tmp_path / "b", stop_after=2, **kw)
    assert not part.complete and part.steps == 2
    done = distill(teacher, student, str(text_file), tmp_path / "b", resume=True, **kw)
    assert done.complete and done.steps == 4
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "b"
    result = evaluate(str(out), ppl=str(text_file), seq_len=SEQ, max_tokens=SEQ - 1, save=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tiny_tokenizer()(text_file.read_text())["input_ids"][: SEQ - 1]
    x = torch.tensor([[tiny_tokenizer().bos_token_id] + ids]) if result["perplexity"]["bos"] else torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0, :-1]
    nll = F.cross_entropy(logits, x[0, 1:], reduction="mean").item()
    assert result["perplexity"]["nll"] == pytest.approx(nll, rel=1e-5)

    card = write_model_card(out).read_text()
    adapter = get_adapter(model)
    shape = adapter.shape()
    header = next(line for line in card.splitlines() if line.startswith("| family |"))
    values = card.splitlines()[card.splitlines().index(header) + 2]
    cells = dict(zip(header.strip("|").split(" | "), values.strip("|").split(" | ")))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells["experts"] == str(shape.experts) == "4" and cells["expert ffn"] == str(shape.moe_ffn)
    real_active = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() * (1 - shape.experts_per_token / shape.experts)
        for m in model.modules() if type(m).__name__.endswith("Experts") for p in m.parameters(recurse=False))
    assert cells["active parameters"] == f"{real_active / 1e6:,.1f}M"
    if shape.mamba_heads:
        assert cells["Mamba heads"] == "4"
    assert "| perplexity |" in card  # the evaluation just saved


ROUTER_LOSS_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"]


@pytest.mark.parametrize("family", ROUTER_LOSS_FAMILIES)
def test_the_router_aux_loss_is_what_transformers_adds(family):
    """With `router_weight`, the training loss is the KD loss plus weight x the aux loss that the family's
    own ForCausalLM computes from `output_router_logits` (an independent full forward)."""
    from slimlm.distill.modules import router_loss_weight

    teacher, student = tiny_model(family, seed=0), tiny_model(family, seed=1)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    weight = router_loss_weight(student.config)
    assert weight == student.config.router_aux_loss_coef > 0
    with torch.no_grad():
        t_hidden, _ = TeacherForward(teacher)(ids)
        plain = StudentObjective(student, chunk_size=8)(ids, t_hidden, {}, lm_head(teacher))
        with_aux = StudentObjective(student, chunk_size=8, router_weight=weight)(ids, t_hidden, {}, lm_head(teacher))
        aux = student(ids, output_router_logits=True).aux_loss
    assert aux.item() > 0 and torch.equal(with_aux["kd"], plain["kd"])
    assert with_aux["loss"].item() == pytest.approx(plain["loss"].item() + weight * aux.item(), rel=1e-5)


def test_distill_with_the_router_aux_loss_and_its_refusals(tmp_path, text_file):
    teacher, student = _teacher_and_student("qwen3_moe", dict(experts=4), tmp_path)
    kw = dict(tokens=2 * 2 * SEQ, seq_len=SEQ, micro_batch=2, warmup=0, eval_every=0, save_every=0, heldout=2,
              progress=False, tensorboard=False)
    result = distill(teacher, student, str(text_file), tmp_path / "aux", router_aux_loss=True, **kw)
    records = [json.loads(line) for line in (tmp_path / "aux" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert result.complete and all(r["loss"] > r["kd"] for r in train)  # the aux loss is in the training loss
    plain = distill(teacher, student, str(text_file), tmp_path / "plain", **kw)
    assert plain.complete
    first = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss"] == pytest.approx(first["kd"])  # off by default: logits only
    from slimlm.errors import SlimlmError

    for family, targets in (("nemotron_h", dict(experts=4)), ("llama", dict(ffn=40))):
        t, s = _teacher_and_student(family, targets, tmp_path / family)
        with pytest.raises(SlimlmError, match="no router load-balancing loss"):
            distill(t, s, str(text_file), tmp_path / family / "out", router_aux_loss=True, **kw)
        assert not (tmp_path / family / "out").exists()
