"""Knowledge-distillation losses computed in token chunks, so vocab-sized memory stays bounded.

A full-vocabulary logit tensor is large (vocab 128K x 8K tokens x fp32 = 4 GB, twice for
teacher and student, more for softmax and its gradient).  The losses here never build it:
they walk over the tokens in chunks and apply both LM heads inside each chunk.  Three
classes compute the same loss and gradients (each tested against `naive_kd_loss`):

- `FusedKDLoss` (one process, DDP: plain local head weights) takes the gradient of each
  chunk's logits during the forward and keeps only hidden- and weight-sized gradients
  (`_FusedHeadLoss`), so no logits are kept or recomputed;
- `CheckpointedKDLoss` (FSDP2 / ZeRO-3: sharded heads, gathered by their module call) wraps
  each chunk in `torch.utils.checkpoint`: its logits are freed after the forward and
  recomputed in backward;
- `PlainKDLoss` keeps each chunk's graph (validation, where there is no backward).

Either bounded path keeps peak extra memory at a few `chunk_size x vocab` tensors whatever
the sequence length.  `kd_loss` is the one-call form.

Losses (p = teacher distribution, q = student distribution, both at `temperature`):
- ``kl``: forward KL(p || q) = sum p (log p - log q)   (Minitron's choice)
- ``reverse-kl``: KL(q || p)
- ``jsd``: 0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2
- ``none``: no distillation term (plain LM loss through `ce_weight`)

The distillation term is multiplied by temperature**2 (Hinton et al.) so that its gradient
scale does not shrink as the temperature grows; at the default temperature 1 this is a no-op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import SlimlmError

LOSSES = ("kl", "reverse-kl", "jsd", "none")
IGNORE_INDEX = -100

Head = Union[torch.Tensor, tuple, Callable[[torch.Tensor], torch.Tensor]]


def check_loss_name(name: str) -> str:
    """Normalise a loss name (accepts ``forward-kl``, ``reverse_kl`` ...); SlimlmError if unknown."""
    key = str(name).lower().replace("_", "-")
    key = {"forward-kl": "kl", "fkl": "kl", "rkl": "reverse-kl", "js": "jsd"}.get(key, key)
    if key not in LOSSES:
        raise SlimlmError(f"unknown loss '{name}' (choose from {', '.join(LOSSES[:-1])})")
    return key


class LinearHead:
    """hidden -> logits: ``h @ weight.T + bias``, through a module or from tensors, with optional soft-capping.

    Calling a *module* (not its weight) matters under FSDP2 / ZeRO-3: the module call is what
    gathers its sharded weight.  `softcap` applies Gemma-style ``cap * tanh(logits / cap)``.
    `linear()` gives the plain (weight, bias) tensors when the fused loss may use them directly.
    """

    def __init__(self, fn: Callable, weight=None, bias=None, softcap: float | None = None):
        self.fn, self.weight, self.bias, self.softcap = fn, weight, bias, softcap

    def __call__(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of `h`; with `out`, written into that buffer (in place for a plain local weight)."""
        if out is None:
            logits = self.fn(h)
            return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits
        lin = self.linear()
        if lin is not None:
            _logits_into(out, h, *lin)
        else:
            out.copy_(self.fn(h))
        if self.softcap:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def linear(self):
        """(weight, bias) as plain local tensors, or None (an arbitrary callable, or a sharded weight)."""
        w = self.weight
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.numel() == 0 or hasattr(w, "ds_id"):
            return None  # ZeRO-3 partitions carry ds_id and are empty outside the module call
        if type(w).__name__ == "DTensor" or type(w.data).__name__ == "DTensor":
            return None  # FSDP2 shard
        return w, self.bias


def as_head(head: Head, bias: torch.Tensor | None = None, softcap: float | None = None) -> LinearHead:
    """A `LinearHead` from a weight tensor, a (weight, bias) pair, a module or a callable."""
    if isinstance(head, LinearHead):
        return head
    if isinstance(head, tuple):
        head, bias = head
    if isinstance(head, torch.Tensor):
        weight = head
        return LinearHead(lambda h: F.linear(h, weight, bias), weight, bias, softcap)
    if isinstance(head, torch.nn.Linear):
        return LinearHead(head, head.weight, head.bias, softcap)
    return LinearHead(head, softcap=softcap)


@dataclass
class LossOutput:
    """`loss` carries the gradient; the others are detached values for logging."""

    loss: torch.Tensor
    kd: torch.Tensor  # distillation term (before temperature**2), mean over tokens
    ce: torch.Tensor  # student cross-entropy on `labels`, mean over counted tokens
    kl: torch.Tensor  # forward KL(teacher || student) at `temperature` (a metric for every loss kind)
    n_tokens: int
    n_labels: int


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_terms(kind: str, temperature: float, s_logits: torch.Tensor, t_logits: torch.Tensor | None,
                 labels: torch.Tensor | None):
    """Per-chunk sums: (distillation term, cross-entropy, forward KL metric)."""
    s_logits = _upcast(s_logits)  # softmax in fp32 even when the matmul ran in bf16
    zero = s_logits.new_zeros(())
    kd = kl = zero
    if t_logits is not None:
        log_q = F.log_softmax(s_logits / temperature, dim=-1)
        log_p = F.log_softmax(_upcast(t_logits) / temperature, dim=-1)
        fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
        if kind == "kl":
            kd = fkl.sum()
        elif kind == "reverse-kl":
            kd = (log_q.exp() * (log_q - log_p)).sum(-1).sum()
        elif kind == "jsd":
            log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
            kd = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1)).sum()
        kl = fkl.detach().sum()
    ce = zero
    if labels is not None:
        ce = F.cross_entropy(s_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return kd, ce, kl


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """out <- h @ weight.T + bias, straight into `out` when the dtypes allow (no new logits tensor)."""
    if h.dtype == weight.dtype == out.dtype and not torch.is_autocast_enabled(h.device.type):
        torch.mm(h, weight.t(), out=out)
        if bias is not None:
            out.add_(bias)
    else:
        out.copy_(F.linear(h, weight, bias))
    return out


def _log_normalizer_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis, [N, 1], using `scratch` (same shape) instead of new big tensors.

    Leaves exp(x - rowmax) in `scratch`.  Large temporaries matter on CPUs: a fresh 100 MB
    tensor costs more in page faults than an in-place pass over it.
    """
    m = x.amax(dim=-1, keepdim=True)
    torch.sub(x, m, out=scratch).exp_()
    return scratch.sum(dim=-1, keepdim=True).log_().add_(m)


def _forward_kl_grad_(s, t, p, labels, temperature, scale_kd, scale_ce):
    """Forward KL (+ optional cross-entropy) of one chunk and its gradient w.r.t. the student logits, by hand.

    d/ds [scale_kd * KL(p || q)] = scale_kd * (q - p) / T; d/ds [scale_ce * CE] = scale_ce * (softmax(s) - onehot).
    `s` (student logits), `t` (teacher logits) and `p` are fp32 (or fp64) [N, V] buffers owned by the
    caller and overwritten: no vocabulary-sized tensor is allocated.  Returns
    (gradient, a view of `s`; kd sum; ce sum; forward-KL sum).
    """
    ce = s.new_zeros(())
    ce_grad = None
    if labels is not None:
        valid = labels != IGNORE_INDEX
        idx = labels.clamp(min=0).unsqueeze(1)
        lse1 = _log_normalizer_(s, p)
        ce = ((lse1.squeeze(1) - s.gather(1, idx).squeeze(1)) * valid).sum()
        if scale_ce and temperature != 1:  # softmax at T = 1 is needed apart from q (rare: CE with T != 1)
            ce_grad = (s - lse1).exp_()
    if temperature != 1:
        s.div_(temperature)
        t.div_(temperature)
    log_z_q = lse1 if (labels is not None and temperature == 1) else _log_normalizer_(s, p)
    s.sub_(log_z_q)  # log q
    log_z_p = _log_normalizer_(t, p)  # p holds exp(t - max) ...
    p.div_(p.sum(dim=-1, keepdim=True))  # ... and now the teacher's distribution
    t.sub_(log_z_p).sub_(s)  # log p - log q
    kl = torch.dot(t.view(-1), p.view(-1))
    q = s.exp_()
    coef = scale_kd / temperature
    if labels is not None and scale_ce:
        rows = valid.nonzero().squeeze(1)
        if ce_grad is None:  # T == 1: the CE softmax is q itself
            q.mul_((coef + scale_ce * valid.to(q.dtype)).unsqueeze(1)).sub_(p, alpha=coef)
        else:
            q.sub_(p).mul_(coef).add_(ce_grad.mul_(valid.to(q.dtype).unsqueeze(1)), alpha=scale_ce)
        q.index_put_((rows, labels[rows]), q.new_full((rows.numel(),), -scale_ce), accumulate=True)
    else:
        q.sub_(p).mul_(coef)
    return q, kl, ce, kl.detach()


class HeadGradBuffers(NamedTuple):
    """What a fused loss's forward accumulates the LM head's gradients into (see `head_grad_buffers`)."""

    acc: torch.dtype  # accumulation dtype (fp32 or wider)
    grad_h: torch.Tensor | None
    grad_w: torch.Tensor | None
    grad_b: torch.Tensor | None
    low: torch.dtype | None  # the autocast dtype, when autocast is on
    w_mm: torch.Tensor  # the head weight as the matmuls use it


def head_grad_buffers(ctx, hidden, weight, bias) -> HeadGradBuffers:
    """Zeroed gradient buffers for the inputs that need one, and the head weight for the matmuls.

    Under autocast (bf16 mixed precision on GPUs) the head matmuls run in the autocast dtype, as a
    plain Linear's forward and backward would; the weight is cast once, not per chunk. In-place
    addmm_ is not autocast, so the weight gradient is taken as a low-precision product and
    accumulated in fp32."""
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (need_b and bias is not None) else None
    dev = hidden.device.type
    low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return HeadGradBuffers(acc, grad_h, grad_w, grad_b, low, weight.to(low) if low is not None else weight)


def _accumulate_head_grads(g, h, sl, w_mm, grad_h, grad_w, grad_b, low, acc) -> None:
    """Add one chunk's gradients, from `g` = dloss/dlogits of rows `sl`, to the hidden states, the LM
    head's weight and its bias (the fused losses' backward, computed in their forward).  `low`: the
    compute dtype when it is below `acc` (the accumulation dtype)."""
    if grad_h is not None:
        grad_h[sl] = g @ w_mm
    if grad_w is not None:
        if low is not None:
            grad_w.add_(torch.mm(g.t(), h.to(low)))
        else:
            grad_w.addmm_(g.t().to(acc), h.to(acc))
    if grad_b is not None:
        grad_b += g.sum(0, dtype=acc)


def scaled_saved_grads(ctx, g_loss) -> list:
    """The gradients a fused loss saved in its forward, times the incoming gradient of the loss."""
    grads = list(ctx.saved_tensors)
    if not torch.equal(g_loss, torch.ones_like(g_loss)):
        grads = [None if t is None else t * g_loss.to(t.dtype) for t in grads]
    return grads


@dataclass(frozen=True)
class _FusedPlan:
    """What `_FusedHeadLoss` needs besides tensors (autograd Functions take them as one argument)."""

    kind: str
    temperature: float
    teacher_head: LinearHead | None
    softcap: float | None
    chunk: int
    scale_kd: float
    scale_ce: float


class _FusedHeadLoss(torch.autograd.Function):
    """Student LM head + loss in token chunks, with the gradient taken during the forward.

    Each chunk's logits are built once: the loss's gradient with respect to them is computed
    right away (by hand for forward KL, the default, in three reused fp32 buffers; by
    autograd on the chunk's softmax terms otherwise) and turned into the gradients of the
    hidden states, head weight and bias with two matmuls; then the chunk's logits are
    dropped.  Backward only scales the stored gradients by the incoming one.  Compared with
    checkpointing the chunk, this skips the backward recomputation of both LM heads (the
    trick of fused linear cross-entropy kernels), at the cost of one weight-sized gradient
    buffer.  Only for plain local weights (single process, DDP).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _FusedPlan, t_hidden, t_logits, labels):
        kind, temperature, t_head, softcap, chunk = plan.kind, plan.temperature, plan.teacher_head, plan.softcap, plan.chunk
        scale_kd, scale_ce = plan.scale_kd, plan.scale_ce
        acc, grad_h, grad_w, grad_b, low, w_mm = head_grad_buffers(ctx, hidden, weight, bias)
        sums = torch.zeros(3, dtype=acc, device=hidden.device)
        by_hand = kind == "kl" and not softcap
        if by_hand:  # student logits, teacher logits, scratch: reused by every chunk
            rows = min(chunk, hidden.shape[0])
            bufs = [torch.empty(rows, weight.shape[0], dtype=acc, device=hidden.device) for _ in range(3)]
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            lab = labels[sl] if labels is not None else None
            if by_hand:
                s_buf, t_buf, p_buf = (b[: h.shape[0]] for b in bufs)
                _logits_into(s_buf, h, w_mm, bias)
                if t_logits is not None:
                    t_buf.copy_(t_logits[sl])
                else:
                    t_head(t_hidden[sl], out=t_buf)
                g, kd, ce, kl = _forward_kl_grad_(s_buf, t_buf, p_buf, lab, temperature, scale_kd, scale_ce)
            else:
                tl = t_logits[sl] if t_logits is not None else (t_head(t_hidden[sl]) if t_hidden is not None else None)
                raw = F.linear(h, w_mm, bias)  # no graph: grad mode is off inside forward
                with torch.enable_grad():
                    raw.requires_grad_()
                    capped = torch.tanh(raw / softcap) * softcap if softcap else raw
                    kd, ce, kl = _chunk_terms(kind, temperature, capped, tl, lab)
                    (g,) = torch.autograd.grad(kd * scale_kd + ce * scale_ce, raw)
                del raw, tl
            sums += torch.stack([kd.detach(), ce.detach(), kl]).to(acc)
            _accumulate_head_grads(g.to(low or h.dtype), h, sl, w_mm, grad_h, grad_w, grad_b, low, acc)
            del g
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                              grad_b.to(bias.dtype) if grad_b is not None else None)
        return sums[0] * scale_kd + sums[1] * scale_ce, sums

    @staticmethod
    def backward(ctx, g_loss, _g_sums):
        return (*scaled_saved_grads(ctx, g_loss), None, None, None, None)


# ---- the loss classes ------------------------------------------------------------------------------
@dataclass
class LossInputs:
    """One call's tensors after masking, with only what the loss kind uses (the rest None).

    `teacher_hidden` is set only when the teacher's logits are to be built from it; `labels`
    only when the cross-entropy term counts.
    """

    hidden: torch.Tensor
    head: LinearHead
    teacher_hidden: torch.Tensor | None
    teacher_head: LinearHead | None
    teacher_logits: torch.Tensor | None
    labels: torch.Tensor | None
    n_tokens: int
    n_labels: int
    kd_scale: float  # temperature**2 / tokens (0 for loss 'none')
    ce_scale: float  # the cross-entropy term's weight / counted labels (0 without the term)


class ChunkedKDLoss:
    """Distillation loss of a student against a teacher, averaged over tokens, computed in token chunks.

    A loss object holds the loss's settings; calling it takes the tensors:
    ``loss(student_hidden, student_head, teacher_hidden, teacher_head, labels=..., mask=...)``.

    Settings:
        loss: 'kl' (forward), 'reverse-kl', 'jsd' or 'none' (plain LM loss through the labels).
        temperature: softmax temperature of both distributions; the term is scaled by T**2.
        ce_weight: weight of the student cross-entropy on `labels` (computed at temperature 1).
        chunk_size: tokens per chunk; peak extra memory is about 4 x chunk_size x V floats.
            0 means one chunk of all tokens (full-logit memory).

    Call arguments:
        student_hidden: [N, Hs] final hidden states (after the final norm) of the student.
        student_head: the student LM head: weight [V, Hs], a (weight, bias) pair or a module.
        teacher_hidden / teacher_head: the same for the teacher (the teacher runs without grad);
            or `teacher_logits` [N, V] precomputed instead (then memory is the caller's).
        labels: [N] next-token ids for the cross-entropy term; IGNORE_INDEX (-100) entries are
            skipped.  Needed when `ce_weight > 0` or for loss 'none'.
        mask: [N] bool, the tokens that count; the others are dropped before any matmul.

    Returns a `LossOutput`; ``loss = T**2 * kd + ce_weight * ce``.  The three subclasses
    compute the same value and gradients with different memory and time: `PlainKDLoss`,
    `CheckpointedKDLoss`, `FusedKDLoss`.
    """

    def __init__(self, loss: str = "kl", temperature: float = 1.0, ce_weight: float = 0.0, chunk_size: int = 512):
        self.kind = check_loss_name(loss)
        if temperature <= 0:
            raise SlimlmError(f"temperature must be positive, got {temperature}")
        self.temperature, self.ce_weight, self.chunk_size = temperature, ce_weight, chunk_size

    def __call__(self, student_hidden, student_head: Head, teacher_hidden=None, teacher_head: Head | None = None, *,
                 teacher_logits=None, student_bias=None, teacher_bias=None, labels=None, mask=None,
                 student_softcap: float | None = None, teacher_softcap: float | None = None) -> LossOutput:
        x = self.inputs(student_hidden, student_head, teacher_hidden, teacher_head, teacher_logits, student_bias,
                        teacher_bias, labels, mask, student_softcap, teacher_softcap)
        return self.compute(x)

    def compute(self, x: LossInputs) -> LossOutput:
        raise NotImplementedError

    def chunk(self, n: int) -> int:
        """Tokens per chunk for `n` tokens (chunk_size 0: all of them)."""
        return self.chunk_size if self.chunk_size > 0 else max(n, 1)

    def inputs(self, hidden, head, t_hidden, t_head, t_logits, bias, t_bias, labels, mask, softcap,
               t_softcap) -> LossInputs:
        """Check the call, drop masked tokens, and keep only what this loss kind uses."""
        kind = self.kind
        if kind == "none" and labels is None:
            raise SlimlmError("loss 'none' needs labels (plain LM loss)")
        use_teacher = kind != "none" or t_hidden is not None or t_logits is not None
        if use_teacher and t_logits is None and (t_hidden is None or t_head is None):
            raise SlimlmError(f"loss '{kind}' needs the teacher's hidden states and LM head, or its logits")
        if mask is not None:
            keep = mask.reshape(-1).bool()
            hidden = hidden[keep]
            t_hidden = t_hidden[keep] if t_hidden is not None else None
            t_logits = t_logits[keep] if t_logits is not None else None
            labels = labels[keep] if labels is not None else None
        n = hidden.shape[0]
        with_ce = labels is not None and (self.ce_weight > 0 or kind == "none")
        n_labels = int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        return LossInputs(
            hidden=hidden, head=as_head(head, bias, softcap),
            teacher_hidden=t_hidden if (use_teacher and t_logits is None) else None,
            teacher_head=as_head(t_head, t_bias, t_softcap) if t_head is not None else None,
            teacher_logits=t_logits if use_teacher else None,
            labels=labels if with_ce else None, n_tokens=n, n_labels=n_labels,
            kd_scale=self.temperature**2 / max(n, 1) if kind != "none" else 0.0,
            ce_scale=((1.0 if kind == "none" else self.ce_weight) / max(n_labels, 1)) if with_ce else 0.0,
        )


class PlainKDLoss(ChunkedKDLoss):
    """Chunk by chunk with ordinary autograd: each chunk's logits stay in the graph until backward.

    The reference among the three, and the path of validation (no gradients, so nothing is kept).
    """

    checkpointed = False

    def compute(self, x: LossInputs) -> LossOutput:
        kind, temperature = self.kind, self.temperature

        def chunk_terms(sh, th, tl, lab):
            if tl is None and th is not None:
                with torch.no_grad():
                    tl = x.teacher_head(th)
            return _chunk_terms(kind, temperature, x.head(sh), tl, lab)

        acc = torch.promote_types(x.hidden.dtype, torch.float32)
        kd_sum = ce_sum = kl_sum = x.hidden.new_zeros((), dtype=acc)
        step = self.chunk(x.n_tokens)
        recompute = self.checkpointed and self.chunk_size > 0 and torch.is_grad_enabled()
        for start in range(0, x.n_tokens, step):
            sl = slice(start, start + step)
            args = [t[sl] if t is not None else None for t in (x.hidden, x.teacher_hidden, x.teacher_logits, x.labels)]
            kd, ce, kl = checkpoint(chunk_terms, *args, use_reentrant=False) if recompute else chunk_terms(*args)
            kd_sum = kd_sum + kd
            ce_sum = ce_sum + ce
            kl_sum = kl_sum + kl
        n, n_labels = max(x.n_tokens, 1), max(x.n_labels, 1)
        kd_mean, ce_mean = kd_sum / n, ce_sum / n_labels
        total = kd_mean * (temperature**2) if kind != "none" else kd_mean * 0.0
        if x.labels is not None:
            total = total + (ce_mean if kind == "none" else self.ce_weight * ce_mean)
        return LossOutput(loss=total, kd=kd_mean.detach(), ce=ce_mean.detach(), kl=(kl_sum / n).detach(),
                          n_tokens=x.n_tokens, n_labels=x.n_labels)


class CheckpointedKDLoss(PlainKDLoss):
    """Each chunk wrapped in `torch.utils.checkpoint`: its logits are freed after the forward and rebuilt in backward.

    Costs a second head matmul for student and teacher in backward (the loss takes ~1.5-2x as
    long); works with any head, including a sharded one gathered by its module call (FSDP2 /
    ZeRO-3).  With chunk_size 0 (one chunk) there is nothing to save and it runs plain.
    """

    checkpointed = True


class FusedKDLoss(CheckpointedKDLoss):
    """The student head and the loss in one autograd Function that takes each chunk's logit gradient in the forward.

    Only hidden- and weight-sized gradients are kept, no logits are kept or recomputed: the
    fastest bounded-memory path (see `_FusedHeadLoss`).  It needs the student head as plain
    local tensors (one process, DDP) and gradients; otherwise (a sharded head, or no grad) it
    computes as `CheckpointedKDLoss`.
    """

    def compute(self, x: LossInputs) -> LossOutput:
        lin = x.head.linear()
        needs_grad = lin is not None and torch.is_grad_enabled() and (
            x.hidden.requires_grad or lin[0].requires_grad or (lin[1] is not None and lin[1].requires_grad))
        if not needs_grad:
            return super().compute(x)
        # The teacher head runs inside the Function's forward, where grad mode is off: it builds no graph.
        plan = _FusedPlan(self.kind, self.temperature, x.teacher_head, x.head.softcap, self.chunk(x.n_tokens),
                          x.kd_scale, x.ce_scale)
        total, sums = _FusedHeadLoss.apply(x.hidden, lin[0], lin[1], plan, x.teacher_hidden, x.teacher_logits,
                                           x.labels)
        n, n_labels = max(x.n_tokens, 1), max(x.n_labels, 1)
        return LossOutput(loss=total, kd=sums[0].detach() / n, ce=sums[1].detach() / n_labels,
                          kl=sums[2].detach() / n, n_tokens=x.n_tokens, n_labels=x.n_labels)


def kd_loss(
    student_hidden: torch.Tensor,
    student_head: Head,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    loss: str = "kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int = 512,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    recompute: bool = True,
    fused: bool = True,
) -> LossOutput:
    """The chunked distillation loss in one call (see `ChunkedKDLoss` for the arguments).

    `fused` picks `FusedKDLoss` (which falls back to checkpointing where it cannot fuse);
    otherwise `recompute` picks `CheckpointedKDLoss`, and False `PlainKDLoss`.
    """
    cls = FusedKDLoss if fused else (CheckpointedKDLoss if recompute else PlainKDLoss)
    return cls(loss, temperature, ce_weight, chunk_size)(
        student_hidden, student_head, teacher_hidden, teacher_head, teacher_logits=teacher_logits,
        student_bias=student_bias, teacher_bias=teacher_bias, labels=labels, mask=mask,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap)


def naive_kd_loss(student_logits, teacher_logits=None, *, labels=None, mask=None, loss="kl", temperature=1.0,
                  ce_weight=0.0) -> torch.Tensor:
    """The same loss from full logits [N, V] (reference for tests and benchmarks; O(N x V) memory)."""
    kind = check_loss_name(loss)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        student_logits = student_logits[keep]
        teacher_logits = teacher_logits[keep] if teacher_logits is not None else None
        labels = labels[keep] if labels is not None else None
    kd, ce, _ = _chunk_terms(kind, temperature, student_logits, teacher_logits if kind != "none" else None, labels)
    n = student_logits.shape[0]
    total = kd / n * temperature**2 if kind != "none" else kd * 0.0
    if labels is not None and (ce_weight > 0 or kind == "none"):
        ce_mean = ce / max(int((labels != IGNORE_INDEX).sum()), 1)
        total = total + (ce_mean if kind == "none" else ce_weight * ce_mean)
    return total
