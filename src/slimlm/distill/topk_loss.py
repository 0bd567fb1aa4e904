"""Distillation from stored top-K teacher log-probabilities (a `slimlm teacher-logits` cache).

At each token the teacher's distribution is known through its K most probable next tokens
(log-probabilities t_i, i in K) and the log of the mass left over, log r with
r = 1 - sum_i exp(t_i).  The loss is the forward KL between two distributions over K + 1
outcomes, the K tokens and one bucket "any other token":

    KL = sum_{i in K} p_i (log p_i - log q_i) + r (log r - log q_rest),
    q_rest = 1 - sum_{i in K} q_i = sum_{v not in K} q_v,

with q the student's softmax over the whole vocabulary.  With K = the vocabulary, r = 0 and
this is the full forward KL.  The cache stores 16-bit values, so sum_i p_i + r is 1 only up
to rounding: the loss renormalises them (subtracts log(sum_i p_i + r)), so that the teacher
side is a distribution and the loss is >= 0.  log q_rest is computed without cancellation,
as the logsumexp of the student's logits outside K minus the full one, never as
log(1 - sum_i q_i) (which loses every digit once the student puts almost all its mass on K).

Gradient with respect to the student's logits s_v (temperature 1):

    v in K:      q_v - p_v
    v not in K:  q_v - r q_v / q_rest

that is q - P, where the target P is the teacher's top-K probabilities plus the bucket's mass
r spread over the other tokens the way the student spreads its own.  `FusedTopKLoss`
computes this gradient chunk by chunk during the forward with the student's LM head applied
per chunk (as `slimlm.distill.loss._FusedHeadLoss` does for the online loss), so no
vocabulary-sized tensor outlives its chunk; `CheckpointedTopKLoss` (sharded heads: FSDP2 /
ZeRO-3) checkpoints each chunk and lets autograd differentiate it; `PlainTopKLoss` keeps the
chunks' graphs (validation, where there is no backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .loss import (IGNORE_INDEX, Head, LinearHead, LossOutput, _accumulate_head_grads, _logits_into, as_head,
                   head_grad_buffers, scaled_saved_grads)


@dataclass
class TeacherTargets:
    """The teacher's distribution at each token, as a teacher-logits cache stores it.

    topk_ids [..., K] (int64): the K most probable next tokens, most probable first;
    topk_logprobs [..., K]: their log-probabilities (float16 as stored, or any float);
    rest_logmass [...]: log of the probability of every other token together (-inf when K
    is the whole vocabulary).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    rest_logmass: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[-1]

    def flat(self) -> "TeacherTargets":
        """Tokens on one axis: [N, K], [N, K], [N]."""
        k = self.top_k
        return TeacherTargets(self.topk_ids.reshape(-1, k), self.topk_logprobs.reshape(-1, k),
                              self.rest_logmass.reshape(-1))

    def __getitem__(self, index) -> "TeacherTargets":
        """The targets of some tokens (a slice or mask of the leading axes)."""
        return TeacherTargets(self.topk_ids[index], self.topk_logprobs[index], self.rest_logmass[index])

    def to(self, device) -> "TeacherTargets":
        return TeacherTargets(self.topk_ids.to(device), self.topk_logprobs.to(device), self.rest_logmass.to(device))


def _teacher_side(topk_logprobs: torch.Tensor, rest_logmass: torch.Tensor, dtype: torch.dtype):
    """(log p [n, K], log r [n, 1]) in `dtype`, renormalised so that sum p + r = 1 exactly."""
    log_p = topk_logprobs.to(dtype)
    log_r = rest_logmass.to(dtype).unsqueeze(1)
    log_total = torch.logaddexp(torch.logsumexp(log_p, dim=-1, keepdim=True), log_r)
    return log_p - log_total, log_r - log_total


def _bucket_term(log_r: torch.Tensor, log_q_rest: torch.Tensor) -> torch.Tensor:
    """r (log r - log q_rest) per token, 0 where r = 0 (0 log 0 = 0, whatever q_rest is)."""
    has_rest = log_r > float("-inf")
    # The masked values keep -inf out of the arithmetic (and NaN out of autograd's gradients).
    log_r_safe = torch.where(has_rest, log_r, torch.zeros_like(log_r))
    log_q_safe = torch.where(has_rest, log_q_rest, torch.zeros_like(log_q_rest))
    return (log_r_safe.exp() * has_rest * (log_r_safe - log_q_safe)).squeeze(1)


def topk_kl_terms(student_logits: torch.Tensor, targets: TeacherTargets, labels: torch.Tensor | None = None):
    """(KL sum, cross-entropy sum) of one chunk of tokens, differentiable by autograd.

    `student_logits` [n, V]; `targets` flat ([n, K], [n]); `labels` [n] for the optional
    cross-entropy (IGNORE_INDEX entries skipped).
    """
    s = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
    ids = targets.topk_ids
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    # A finite floor (not -inf) outside the bucket keeps logsumexp's gradient finite when K covers everything.
    outside = s.scatter(1, ids, torch.finfo(s.dtype).min)
    log_q_rest = torch.logsumexp(outside, dim=-1, keepdim=True) - lse
    log_q_k = s.gather(1, ids) - lse
    log_p, log_r = _teacher_side(targets.topk_logprobs, targets.rest_logmass, s.dtype)
    kl = (log_p.exp() * (log_p - log_q_k)).sum() + _bucket_term(log_r, log_q_rest).sum()
    ce = s.new_zeros(())
    if labels is not None:
        valid = labels != IGNORE_INDEX
        picked = s.gather(1, labels.clamp(min=0).unsqueeze(1))
        ce = ((lse - picked).squeeze(1) * valid).sum()
    return kl, ce


def _topk_kl_grad_(s: torch.Tensor, scratch: torch.Tensor, targets: TeacherTargets, labels, scale_kd: float,
                   scale_ce: float):
    """KL and cross-entropy sums of one chunk, and their gradient w.r.t. the student logits, by hand.

    `s` (student logits) and `scratch` are [n, V] buffers owned by the caller and overwritten
    (the gradient is returned in `s`): no other vocabulary-sized tensor is allocated.
    """
    ids = targets.topk_ids
    s_k = s.gather(1, ids)  # [n, K]
    # logsumexp of the logits outside K, from its own maximum: exact however small the bucket is.
    scratch.copy_(s).scatter_(1, ids, float("-inf"))
    m_rest = scratch.amax(dim=-1, keepdim=True)
    m_rest = torch.where(torch.isfinite(m_rest), m_rest, torch.zeros_like(m_rest))  # K = V: nothing outside
    scratch.sub_(m_rest).exp_()  # exp(s_v - m_rest) outside K, 0 on K
    lse_rest = scratch.sum(dim=-1, keepdim=True).log_().add_(m_rest)  # -inf when K = V
    lse = torch.logaddexp(lse_rest, torch.logsumexp(s_k, dim=-1, keepdim=True))
    log_p, log_r = _teacher_side(targets.topk_logprobs, targets.rest_logmass, s.dtype)
    p = log_p.exp()
    kl = (p * (log_p - (s_k - lse))).sum() + _bucket_term(log_r, lse_rest - lse).sum()
    ce = s.new_zeros(())
    valid = None
    if labels is not None:
        valid = labels != IGNORE_INDEX
        picked = s.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        ce = ((lse.squeeze(1) - picked) * valid).sum()
    # The target P: p on K, r * exp(s_v - lse_rest) outside (the student's shape of the rest).
    spread = torch.where(log_r > float("-inf"), (log_r + m_rest - lse_rest).exp(), torch.zeros_like(log_r))
    scratch.mul_(spread).scatter_(1, ids, p)
    q = s.sub_(lse).exp_()
    if valid is not None and scale_ce:
        q.mul_((scale_kd + scale_ce * valid.to(q.dtype)).unsqueeze(1)).sub_(scratch, alpha=scale_kd)
        rows = valid.nonzero().squeeze(1)
        q.index_put_((rows, labels[rows]), q.new_full((rows.numel(),), -scale_ce), accumulate=True)
    else:
        q.sub_(scratch).mul_(scale_kd)
    return q, kl, ce


class _FusedTopKLoss(torch.autograd.Function):
    """Student LM head + top-K loss in token chunks, the gradient taken during the forward.

    The same scheme as `slimlm.distill.loss._FusedHeadLoss`: each chunk's logits are built
    once in a reused buffer, the gradient w.r.t. them is computed by hand and turned into
    gradients of the hidden states, head weight and bias; backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, cfg, topk_ids, topk_logprobs, rest_logmass, labels):
        chunk, softcap, scale_kd, scale_ce = cfg
        acc, grad_h, grad_w, grad_b, low, w_mm = head_grad_buffers(ctx, hidden, weight, bias)
        sums = torch.zeros(2, dtype=acc, device=hidden.device)
        rows = min(chunk, hidden.shape[0])
        bufs = [torch.empty(rows, weight.shape[0], dtype=acc, device=hidden.device) for _ in range(3 if softcap else 2)]
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            s, scratch = (b[: h.shape[0]] for b in bufs[:2])
            _logits_into(s, h, w_mm, bias)
            if softcap:  # s = cap * tanh(raw / cap); d s / d raw = 1 - tanh^2, applied to the gradient below
                tanh = bufs[2][: h.shape[0]]
                torch.div(s, softcap, out=tanh).tanh_()
                torch.mul(tanh, softcap, out=s)
            targets = TeacherTargets(topk_ids[sl], topk_logprobs[sl], rest_logmass[sl])
            g, kl, ce = _topk_kl_grad_(s, scratch, targets, labels[sl] if labels is not None else None,
                                       scale_kd, scale_ce)
            if softcap:
                g.mul_(tanh.square_().neg_().add_(1))
            sums += torch.stack([kl.detach(), ce.detach()]).to(acc)
            _accumulate_head_grads(g.to(low or h.dtype), h, sl, w_mm, grad_h, grad_w, grad_b, low, acc)
            del g
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                              grad_b.to(bias.dtype) if grad_b is not None else None)
        return sums[0] * scale_kd + sums[1] * scale_ce, sums

    @staticmethod
    def backward(ctx, g_loss, _g_sums):
        return (*scaled_saved_grads(ctx, g_loss), None, None, None, None, None)


@dataclass
class TopKInputs:
    """One call's tensors after masking: flat targets, and labels only when the cross-entropy term counts."""

    hidden: torch.Tensor
    head: LinearHead
    targets: TeacherTargets
    labels: torch.Tensor | None
    n_tokens: int
    n_labels: int
    kd_scale: float  # 1 / tokens
    ce_scale: float  # the cross-entropy term's weight / counted labels (0 without the term)


class TopKLoss:
    """Forward KL to cached top-K teacher targets plus a rest bucket, averaged over tokens (see the module doc).

    A loss object holds the settings; calling it takes the tensors:
    ``loss(student_hidden, student_head, targets, labels=..., mask=...)``, the call style of
    `slimlm.distill.loss`'s classes, with the cache's `TeacherTargets` where those take the
    teacher.  ``loss = KL + ce_weight * CE`` (CE: the student's cross-entropy on `labels`).
    Temperature 1 only: the cache holds log-probabilities at temperature 1, and the bucket's
    mass at another temperature cannot be recovered from them.

    Settings:
        chunk_size: tokens per chunk (peak extra memory about 3 x chunk_size x V floats);
            0 for one chunk of all tokens.
        ce_weight: weight of the student cross-entropy term.

    Call arguments: `student_hidden` [N, H] (final hidden states), `student_head` (weight
    [V, H], (weight, bias), a module or a callable), `targets` ([N, K], [N] or any leading
    shape with N tokens), `labels` [N] (IGNORE_INDEX entries skipped), `mask` [N] bool (the
    tokens that count; the others are dropped before any matmul).

    The three subclasses compute the same value and gradients: `PlainTopKLoss`,
    `CheckpointedTopKLoss`, `FusedTopKLoss`.
    """

    checkpointed = False

    def __init__(self, chunk_size: int = 512, ce_weight: float = 0.0):
        self.chunk_size, self.ce_weight = chunk_size, ce_weight

    def __call__(self, student_hidden: torch.Tensor, student_head: Head, targets: TeacherTargets, *,
                 labels: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 student_bias: torch.Tensor | None = None, student_softcap: float | None = None) -> LossOutput:
        return self.compute(self.inputs(student_hidden, student_head, targets, labels, mask, student_bias,
                                        student_softcap))

    def chunk(self, n: int) -> int:
        """Tokens per chunk for `n` tokens (chunk_size 0: all of them)."""
        return self.chunk_size if self.chunk_size > 0 else max(n, 1)

    def inputs(self, hidden, head, targets, labels, mask, bias, softcap) -> TopKInputs:
        """Drop masked tokens; keep the labels only when the cross-entropy term counts."""
        targets = targets.flat()
        if mask is not None:
            keep = mask.reshape(-1).bool()
            hidden, targets = hidden[keep], targets[keep]
            labels = labels[keep] if labels is not None else None
        n = hidden.shape[0]
        n_labels = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        with_ce = labels is not None and self.ce_weight > 0
        return TopKInputs(hidden=hidden, head=as_head(head, bias, softcap), targets=targets,
                          labels=labels if with_ce else None, n_tokens=n, n_labels=n_labels,
                          kd_scale=1.0 / max(n, 1), ce_scale=self.ce_weight / max(n_labels, 1) if with_ce else 0.0)

    def compute(self, x: TopKInputs) -> LossOutput:
        raise NotImplementedError

    @staticmethod
    def output(x: TopKInputs, total: torch.Tensor, kl_sum: torch.Tensor, ce_sum: torch.Tensor) -> LossOutput:
        n, n_labels = max(x.n_tokens, 1), max(x.n_labels, 1)
        return LossOutput(loss=total, kd=kl_sum.detach() / n, ce=ce_sum.detach() / n_labels,
                          kl=kl_sum.detach() / n, n_tokens=x.n_tokens, n_labels=x.n_labels)


class PlainTopKLoss(TopKLoss):
    """Chunk by chunk with ordinary autograd (each chunk's logits kept until backward); the path of validation."""

    def compute(self, x: TopKInputs) -> LossOutput:
        def chunk_terms(h, ids, logprobs, rest, lab):
            return topk_kl_terms(x.head(h), TeacherTargets(ids, logprobs, rest), lab)

        acc = torch.promote_types(x.hidden.dtype, torch.float32)
        total = kl_sum = ce_sum = x.hidden.new_zeros((), dtype=acc)
        step = self.chunk(x.n_tokens)
        recompute = self.checkpointed and self.chunk_size > 0 and torch.is_grad_enabled()
        t = x.targets
        for start in range(0, x.n_tokens, step):
            sl = slice(start, start + step)
            args = (x.hidden[sl], t.topk_ids[sl], t.topk_logprobs[sl], t.rest_logmass[sl],
                    x.labels[sl] if x.labels is not None else None)
            kl, ce = checkpoint(chunk_terms, *args, use_reentrant=False) if recompute else chunk_terms(*args)
            total = total + kl * x.kd_scale + ce * x.ce_scale
            kl_sum, ce_sum = kl_sum + kl.detach(), ce_sum + ce.detach()
        return self.output(x, total, kl_sum, ce_sum)


class CheckpointedTopKLoss(PlainTopKLoss):
    """Each chunk in `torch.utils.checkpoint`: logits freed after the forward, rebuilt in backward (any head,
    sharded ones included: FSDP2 / ZeRO-3)."""

    checkpointed = True


class FusedTopKLoss(CheckpointedTopKLoss):
    """The student head and the loss in one autograd Function taking each chunk's logit gradient in the forward
    (`_FusedTopKLoss`): plain local head weights (one process, DDP) with gradients; otherwise as
    `CheckpointedTopKLoss`."""

    def compute(self, x: TopKInputs) -> LossOutput:
        lin = x.head.linear()
        needs_grad = lin is not None and torch.is_grad_enabled() and (
            x.hidden.requires_grad or lin[0].requires_grad or (lin[1] is not None and lin[1].requires_grad))
        if not needs_grad:
            return super().compute(x)
        t = x.targets
        total, sums = _FusedTopKLoss.apply(x.hidden, lin[0], lin[1],
                                           (self.chunk(x.n_tokens), x.head.softcap, x.kd_scale, x.ce_scale),
                                           t.topk_ids, t.topk_logprobs, t.rest_logmass, x.labels)
        return self.output(x, total, sums[0], sums[1])
