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
r spread over the other tokens the way the student spreads its own.  `TopKForwardKL`
computes this gradient chunk by chunk during the forward with the student's LM head applied
per chunk (as `slimlm.distill.loss._FusedHeadLoss` does for the online loss), so no
vocabulary-sized tensor outlives its chunk; with sharded heads (FSDP2 / ZeRO-3) or
``fused=False`` each chunk is checkpointed and differentiated by autograd instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .loss import IGNORE_INDEX, Head, LossOutput, _logits_into, as_head


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
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
        sums = torch.zeros(2, dtype=acc, device=hidden.device)
        dev = hidden.device.type
        low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        w_mm = weight.to(low) if low is not None else weight
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
            g = g.to(low or h.dtype)
            if grad_h is not None:
                grad_h[sl] = g @ w_mm
            if grad_w is not None:
                if low is not None:
                    grad_w.add_(torch.mm(g.t(), h.to(low)))
                else:
                    grad_w.addmm_(g.t().to(acc), h.to(acc))
            if grad_b is not None:
                grad_b += g.sum(0, dtype=acc)
            del g
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                              grad_b.to(bias.dtype) if grad_b is not None else None)
        return sums[0] * scale_kd + sums[1] * scale_ce, sums

    @staticmethod
    def backward(ctx, g_loss, _g_sums):
        grads = ctx.saved_tensors
        if not torch.equal(g_loss, torch.ones_like(g_loss)):
            grads = [None if t is None else t * g_loss.to(t.dtype) for t in grads]
        return (*grads, None, None, None, None, None)


class TopKForwardKL:
    """Forward KL to cached top-K teacher targets plus a rest bucket, averaged over tokens (see the module doc).

    ``loss = KL + ce_weight * CE`` where CE is the student's cross-entropy on `labels`.
    Only temperature 1: the cache holds log-probabilities at temperature 1, and the bucket's
    mass at another temperature cannot be recovered from them.

    Args:
        chunk_size: tokens per chunk (peak extra memory about 3 x chunk_size x V floats);
            0 for one chunk of all tokens.
        ce_weight: weight of the student cross-entropy term.
        fused: take each chunk's logit gradient during the forward (plain local head weights:
            one process, DDP); False, or a sharded head, checkpoints each chunk instead.
    """

    def __init__(self, chunk_size: int = 512, ce_weight: float = 0.0, fused: bool = True):
        self.chunk_size, self.ce_weight, self.fused = chunk_size, ce_weight, fused

    def __call__(
        self,
        student_hidden: torch.Tensor,
        student_head: Head,
        targets: TeacherTargets,
        *,
        labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
        student_softcap: float | None = None,
    ) -> LossOutput:
        """The loss of `student_hidden` [N, H] (final hidden states) against `targets` ([N, K], [N]).

        `student_head`: the LM head (weight [V, H], (weight, bias), a module or a callable);
        `mask` [N] bool: the tokens that count (the others are dropped before any matmul).
        """
        head = as_head(student_head, student_bias, student_softcap)
        targets = targets.flat()
        if mask is not None:
            keep = mask.reshape(-1).bool()
            student_hidden, targets = student_hidden[keep], targets[keep]
            labels = labels[keep] if labels is not None else None
        n = student_hidden.shape[0]
        with_ce = labels is not None and self.ce_weight > 0
        n_labels = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        scale_kd = 1.0 / max(n, 1)
        scale_ce = self.ce_weight / max(n_labels, 1) if with_ce else 0.0
        chunk = self.chunk_size if self.chunk_size > 0 else max(n, 1)
        lin = head.linear() if self.fused else None
        grads = torch.is_grad_enabled() and (student_hidden.requires_grad or (lin is not None and (
            lin[0].requires_grad or (lin[1] is not None and lin[1].requires_grad))))
        if lin is not None and grads:
            total, sums = _FusedTopKLoss.apply(
                student_hidden, lin[0], lin[1], (chunk, head.softcap, scale_kd, scale_ce),
                targets.topk_ids, targets.topk_logprobs, targets.rest_logmass, labels if with_ce else None)
            kl_sum, ce_sum = sums[0].detach(), sums[1].detach()
        else:
            total, kl_sum, ce_sum = self._chunked(student_hidden, head, targets, labels, with_ce, chunk, scale_kd,
                                                  scale_ce)
        return LossOutput(loss=total, kd=kl_sum / max(n, 1), ce=ce_sum / max(n_labels, 1), kl=kl_sum / max(n, 1),
                          n_tokens=n, n_labels=n_labels)

    @staticmethod
    def _chunked(hidden, head, targets, labels, with_ce, chunk, scale_kd, scale_ce):
        """Chunks differentiated by autograd, each checkpointed when gradients are needed."""

        def chunk_terms(h, ids, logprobs, rest, lab):
            return topk_kl_terms(head(h), TeacherTargets(ids, logprobs, rest), lab)

        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = kl_sum = ce_sum = hidden.new_zeros((), dtype=acc)
        grad = torch.is_grad_enabled()
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            args = (hidden[sl], targets.topk_ids[sl], targets.topk_logprobs[sl], targets.rest_logmass[sl],
                    labels[sl] if labels is not None else None)
            kl, ce = checkpoint(chunk_terms, *args, use_reentrant=False) if grad else chunk_terms(*args)
            total = total + kl * scale_kd + (ce * scale_ce if with_ce else 0.0)
            kl_sum, ce_sum = kl_sum + kl.detach(), ce_sum + ce.detach()
        return total, kl_sum, ce_sum
