"""`Distillation`, the one module the trainer gives Accelerate: its forward, its state dict, its FSDP2 hints."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from torch import nn

from slimlm.distill.loss import naive_kd_loss
from slimlm.distill.modules import Distillation, StudentObjective, TeacherForward


def _pair(**student):
    teacher = TeacherForward(tiny_model("llama", seed=1))
    objective = StudentObjective(tiny_model("llama", num_hidden_layers=2, **student), ce_weight=0.5, chunk_size=8)
    return Distillation(objective, teacher)


def test_forward_is_the_loss_of_the_full_logits():
    """One call runs teacher, student and chunked loss: the same value and gradients as the naive loss from
    both models' own logits (an independent computation through transformers' forward)."""
    model = _pair()
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in model.objective.named_parameters()}
    model.zero_grad()

    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    with torch.no_grad():
        t_logits = model.teacher.hf_model(ids).logits
    s_logits = model.objective.hf_model(ids).logits
    want = naive_kd_loss(s_logits.reshape(-1, 96), t_logits.reshape(-1, 96), labels=labels.reshape(-1), ce_weight=0.5)
    want.backward()
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-7)
    for name, p in model.objective.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for p in model.teacher.parameters())  # frozen: no gradient, no optimizer state

    sums = model(ids, metrics=True)  # validation: forward-KL and LM-loss token sums
    n = ids.numel()
    torch.testing.assert_close(sums[0] / n, naive_kd_loss(s_logits.reshape(-1, 96).detach(), t_logits.reshape(-1, 96)),
                               rtol=1e-5, atol=1e-7)


def test_state_dict_leaves_out_the_teacher_except_while_preparing():
    model = _pair()
    keys = list(model.state_dict())
    assert keys and all(k.startswith("objective.") for k in keys)
    with model.teacher_in_state_dict():
        assert any(k.startswith("teacher.hf_model.") for k in model.state_dict())
    # A checkpoint (the student only) loads strictly, directly and under a wrapper that prefixes "module."
    # as DDP does; the teacher keeps its weights.
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.load_state_dict(model.state_dict(), strict=True)
    wrapper = nn.Module()
    wrapper.module = model
    assert all(k.startswith("module.objective.") for k in wrapper.state_dict())
    wrapper.load_state_dict(wrapper.state_dict(), strict=True)
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    with pytest.raises(RuntimeError, match="Missing key"):  # a missing student weight is still an error
        partial = dict(model.state_dict())
        partial.pop(next(iter(partial)))
        model.load_state_dict(partial, strict=True)


def test_fsdp2_hints_wrap_the_layers_of_both_models_and_retie_after_meta():
    """Accelerate's FSDP2 preparation reads `_no_split_modules` (units) and calls `tie_weights` after moving
    the model to the meta device, which unties shared parameters."""
    teacher = TeacherForward(tiny_model("qwen2", seed=1))
    model = Distillation(StudentObjective(tiny_model("llama", num_hidden_layers=2)), teacher)
    assert {"LlamaDecoderLayer", "Qwen2DecoderLayer"} <= set(model._no_split_modules)
    assert not hasattr(model, "get_output_embeddings")  # no separate unit for the LM heads
    model.to(torch.device("meta"))
    model.tie_weights()
    for hf in (model.objective.hf_model, model.teacher.hf_model):
        assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
