"""Top-K + rest-bucket forward KL against a direct computation: full softmax, explicit bucket, autograd."""

import pytest
import torch

from slimlm.distill.loss import IGNORE_INDEX, naive_kd_loss
from slimlm.distill.topk_loss import CheckpointedTopKLoss, FusedTopKLoss, PlainTopKLoss, TeacherTargets

CLASSES = [FusedTopKLoss, CheckpointedTopKLoss, PlainTopKLoss]

N, H, V = 29, 12, 40


def _problem(k, dtype=torch.float64, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    teacher_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * sharp
    logp = teacher_logits.log_softmax(-1)
    values, ids = logp.topk(k, dim=-1)
    rest = torch.log1p(-values.exp().sum(-1)) if k < V else torch.full((N,), float("-inf"), dtype=torch.float64)
    return hidden, weight, bias, TeacherTargets(ids, values, rest), teacher_logits


def direct_loss(hidden, weight, bias, targets, labels=None, ce_weight=0.0, mask=None):
    """The definition, spelled out: q = softmax over the vocabulary, q_rest = the sum of q outside K."""
    hidden, weight, bias = hidden.double(), weight.double(), bias.double()
    q = torch.softmax(hidden @ weight.T + bias, dim=-1)
    in_k = torch.zeros_like(q, dtype=torch.bool).scatter_(1, targets.topk_ids, True)
    q_k = q.gather(1, targets.topk_ids)
    q_rest = (q * ~in_k).sum(-1)
    p = targets.topk_logprobs.double().exp()
    r = targets.rest_logmass.double().exp()
    total = p.sum(-1) + r  # 1 up to the storage rounding: renormalised, as the loss does
    p, r = p / total.unsqueeze(1), r / total
    bucket = torch.where(r > 0, r * (torch.log(r) - torch.log(q_rest)), torch.zeros_like(r))
    kl = (p * (torch.log(p) - torch.log(q_k))).sum(-1) + bucket
    keep = torch.ones(len(kl), dtype=torch.bool) if mask is None else mask
    loss = kl[keep].mean()
    if labels is not None and ce_weight:
        lab = labels[keep]
        valid = lab != IGNORE_INDEX
        ce = -torch.log(q[keep][valid, lab[valid]]).mean()
        loss = loss + ce_weight * ce
    return loss


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*tensors)
    return value.detach(), torch.autograd.grad(value, tensors)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("k", [1, 5, 17])
def test_value_and_gradient_equal_the_direct_computation(cls, k):
    hidden, weight, bias, targets, _ = _problem(k)
    loss = cls(chunk_size=8)  # 29 tokens: chunks of 8, 8, 8, 5
    got, g_got = _grads(lambda h, w, b: loss(h, (w, b), targets).loss, hidden, weight, bias)
    want, g_want = _grads(lambda h, w, b: direct_loss(h, w, b, targets), hidden, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_fp32_within_1e5_of_the_fp64_definition(cls):
    hidden, weight, bias, targets, _ = _problem(6, dtype=torch.float32, seed=1)
    t16 = TeacherTargets(targets.topk_ids, targets.topk_logprobs.half(), targets.rest_logmass.half())  # as stored
    loss = cls(chunk_size=10)
    got, g_got = _grads(lambda h, w, b: loss(h, (w, b), t16).loss, hidden, weight, bias)
    want, g_want = _grads(lambda h, w, b: direct_loss(h, w, b, t16), hidden.double(), weight.double(), bias.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_k_equal_to_the_vocabulary_is_the_full_forward_kl(cls):
    hidden, weight, bias, targets, teacher_logits = _problem(V)
    assert torch.isneginf(targets.rest_logmass).all()
    loss = cls(chunk_size=7)
    got, g_got = _grads(lambda h, w, b: loss(h, (w, b), targets).loss, hidden, weight, bias)
    want, g_want = _grads(lambda h, w, b: naive_kd_loss(h @ w.T + b, teacher_logits), hidden, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for a, b in zip(g_got, g_want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_masked_tokens_do_not_count_and_cross_entropy_is_added(cls):
    hidden, weight, bias, targets, _ = _problem(4, seed=2)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.3
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    labels[::5] = IGNORE_INDEX
    loss = cls(chunk_size=6, ce_weight=0.5)
    out = loss(hidden.clone().requires_grad_(), (weight, bias), targets, labels=labels, mask=mask)
    assert out.n_tokens == int(mask.sum()) and out.n_labels == int((labels[mask] != IGNORE_INDEX).sum())
    got, g_got = _grads(lambda h, w, b: loss(h, (w, b), targets, labels=labels, mask=mask).loss, hidden, weight, bias)
    want, g_want = _grads(lambda h, w, b: direct_loss(h, w, b, targets, labels, 0.5, mask), hidden, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert g_got[0][~mask].abs().max() == 0  # a masked token gets no gradient


def test_softcapped_head_fused_equals_autograd():
    hidden, weight, bias, targets, _ = _problem(5, seed=5, sharp=1.0)
    fused = FusedTopKLoss(chunk_size=9)
    plain = PlainTopKLoss(chunk_size=9)
    got, g_got = _grads(lambda h, w: fused(h, w, targets, student_softcap=2.0).loss, hidden, weight)
    want, g_want = _grads(lambda h, w: plain(h, w, targets, student_softcap=2.0).loss, hidden, weight)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_zero_when_the_student_is_the_teacher():
    hidden, weight, bias, _, _ = _problem(3, seed=6)
    logp = (hidden @ weight.T + bias).log_softmax(-1)
    values, ids = logp.topk(3, dim=-1)
    targets = TeacherTargets(ids, values, torch.log1p(-values.exp().sum(-1)))
    out = FusedTopKLoss(chunk_size=0)(hidden.clone().requires_grad_(), (weight, bias), targets)
    assert abs(out.loss.item()) < 1e-12 and out.kl.item() == pytest.approx(out.loss.item(), abs=1e-15)


def test_without_gradients_every_class_gives_the_value_and_the_lm_loss():
    hidden, weight, bias, targets, _ = _problem(6, seed=7)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        outs = [cls(chunk_size=8, ce_weight=1.0)(hidden, (weight, bias), targets, labels=labels) for cls in CLASSES]
    want_kl = direct_loss(hidden, weight, bias, targets)
    want_ce = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, labels)
    for out in outs:
        torch.testing.assert_close(out.kl, want_kl, rtol=1e-10, atol=0)
        torch.testing.assert_close(out.ce, want_ce, rtol=1e-10, atol=0)
        torch.testing.assert_close(out.loss, want_kl + want_ce, rtol=1e-10, atol=0)
