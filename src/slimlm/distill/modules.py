"""The modules the trainer runs: a frozen teacher, the student with its loss, and `Distillation`, both in one.

`Distillation` is the one module the trainer gives Accelerate: under FSDP2 or ZeRO-3 it is the
root, and its forward runs the teacher, the student and the chunked loss (both LM heads
included), so no sharded module is ever called outside the root's forward and backward.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimlmError
from ..models import decoder
from .loss import IGNORE_INDEX, CheckpointedKDLoss, FusedKDLoss, PlainKDLoss, as_head
from .topk_loss import CheckpointedTopKLoss, FusedTopKLoss, PlainTopKLoss, TeacherTargets


def lm_head(model: nn.Module):
    """hidden -> logits for `model`, including Gemma-style final logit soft-capping."""
    return as_head(model.get_output_embeddings(), softcap=getattr(model.config, "final_logit_softcapping", None))


def logit_scale(model: nn.Module) -> float:
    """The factor a model applies to its logits after the LM head (Falcon-H1's lm_head_multiplier,
    Granite's 1 / logits_scaling); the heads of those families have no bias, so it scales the
    final hidden states instead."""
    c = model.config
    return float(getattr(c, "lm_head_multiplier", None) or 1.0) / float(getattr(c, "logits_scaling", None) or 1.0)


def router_loss_weight(config) -> float:
    """The weight of a MoE's router load-balancing loss (its config's `router_aux_loss_coef`).

    SlimlmError when transformers gives the family no such loss (dense models; Nemotron-H, whose
    router balances its experts with a score-correction bias instead).
    """
    if _router_loss_function(config) is None or getattr(config, "router_aux_loss_coef", None) is None:
        raise SlimlmError(f"--router-aux-loss: transformers has no router load-balancing loss for "
                          f"'{config.model_type}' (only for mixture-of-experts families that train with one)")
    return float(config.router_aux_loss_coef)


def _router_loss_function(config):
    """transformers' `load_balancing_loss_func` of the config's family (None when it has none)."""
    import importlib

    try:
        module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        return None
    return getattr(module, "load_balancing_loss_func", None)


def router_balance_loss(model: nn.Module, router_logits) -> torch.Tensor:
    """The load-balancing loss of `router_logits` (one [tokens, experts] tensor per MoE layer), unweighted:
    what the family's ForCausalLM adds (times router_aux_loss_coef) when it trains with output_router_logits."""
    from ..adapters import get_adapter

    shape = get_adapter(model).shape()
    return _router_loss_function(model.config)(tuple(router_logits), shape.experts, shape.experts_per_token)


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pair every student layer with an evenly spaced teacher layer (last with last)."""
    return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


def parse_layer_map(spec, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """'0:1,1:3' (student:teacher), a list of pairs, or None/'auto' for the default map."""
    if spec in (None, "", "auto"):
        return default_layer_map(student_layers, teacher_layers)
    pairs = spec
    if isinstance(spec, str):
        try:
            pairs = [tuple(int(x) for x in item.split(":")) for item in spec.split(",") if item.strip()]
        except ValueError:
            raise SlimlmError(f"bad --layer-map '{spec}': use student:teacher pairs like 0:1,1:3") from None
    pairs = [tuple(p) for p in pairs]
    for p in pairs:
        if len(p) != 2 or not (0 <= p[0] < student_layers) or not (0 <= p[1] < teacher_layers):
            raise SlimlmError(
                f"bad layer pair {p}: the student has {student_layers} layers, the teacher {teacher_layers}"
            )
    if not pairs:
        raise SlimlmError("--layer-map is empty")
    return pairs


@contextmanager
def tap_layers(model: nn.Module, indices):
    """Capture the outputs of decoder layers `indices` during one forward: yields a dict."""
    captured: dict[int, torch.Tensor] = {}
    layers = decoder(model).layers
    handles = []
    for i in sorted(set(indices)):
        def hook(_mod, _inp, out, i=i):
            captured[i] = out[0] if isinstance(out, (tuple, list)) else out

        handles.append(layers[i].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


class TeacherForward(nn.Module):
    """A frozen teacher returning final hidden states (and tapped layers), never logits."""

    def __init__(self, model: nn.Module, tap: tuple[int, ...] = ()):
        super().__init__()
        self.hf_model = model
        self.tap = tuple(tap)
        model.requires_grad_(False)
        model.eval()

    def train(self, mode: bool = True):  # the teacher stays in eval mode (no dropout) whatever happens
        return super().train(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor):
        with tap_layers(self.hf_model, self.tap) as taps:
            hidden = decoder(self.hf_model)(input_ids=input_ids, use_cache=False).last_hidden_state
        if logit_scale(self.hf_model) != 1.0:
            hidden = hidden * logit_scale(self.hf_model)
        if self.tap:
            norm = decoder(self.hf_model).norm
            taps = {i: norm(h) for i, h in taps.items()}
        return hidden, taps


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[b, s] = input_ids[b, s + 1]; the last position has no target."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


class StudentObjective(nn.Module):
    """The student plus its training loss (KD, LM, optional hidden-state cosine).

    `forward(input_ids, teacher_hidden, teacher_taps, teacher_head)` returns a dict of
    scalars: ``loss`` (with grad) and detached ``kd``, ``ce``, ``kl``, ``hidden``.
    With ``metrics=True`` it instead returns token sums for validation: forward KL at
    temperature 1 and the LM loss, never the training loss.

    With `cached_targets` the teacher's distribution comes from a teacher-logits cache:
    ``forward(input_ids, targets=TeacherTargets)``, and the KL (training and validation) is
    the top-K + rest-bucket KL of `slimlm.distill.topk_loss` (temperature 1, forward KL only).
    """

    def __init__(
        self,
        student: nn.Module,
        mode: str = "kd",
        loss: str = "kl",
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        hidden_loss: str | None = None,
        layer_map: list[tuple[int, int]] | None = None,
        hidden_weight: float = 1.0,
        teacher_hidden_size: int | None = None,
        chunk_size: int = 512,
        fused: bool = True,
        router_weight: float = 0.0,
        cached_targets: bool = False,
    ):
        super().__init__()
        # > 0: the training loss adds the student's router load-balancing loss with this weight
        self.router_weight = router_weight
        self.hf_model = student
        self.mode, self.loss_name, self.temperature = mode, loss, temperature
        self.ce_weight, self.hidden_loss, self.hidden_weight = ce_weight, hidden_loss, hidden_weight
        self.layer_map = list(layer_map or [])
        self.chunk_size, self.fused = chunk_size, fused
        # The training loss: FusedKDLoss needs the head weight as a plain local tensor (one process, DDP,
        # FSDP2's root unit) and falls back to checkpointed chunks by itself where a weight is
        # partitioned (ZeRO-3); fused=False forces CheckpointedKDLoss.  Cached targets: the same
        # choice of fused / checkpointed, for the top-K loss (forward KL, T = 1).
        if cached_targets:
            if mode != "kd" or loss != "kl" or temperature != 1.0 or hidden_loss:
                raise SlimlmError("cached teacher targets train with the forward KL at temperature 1 only")
            self.train_loss = (FusedTopKLoss if fused else CheckpointedTopKLoss)(chunk_size, ce_weight)
        else:
            loss_class = FusedKDLoss if fused else CheckpointedKDLoss
            self.train_loss = loss_class("none", chunk_size=chunk_size) if mode == "lm" else \
                loss_class(loss, temperature, ce_weight, chunk_size)
        hs = student.config.hidden_size
        # Width-pruned students have fewer hidden channels than the teacher: a learned linear map
        # (trained with the student, not exported) brings them to the teacher's width.
        self.proj = None
        if hidden_loss and teacher_hidden_size and teacher_hidden_size != hs:
            self.proj = nn.Linear(hs, teacher_hidden_size, bias=False)

    @property
    def student(self) -> nn.Module:
        return self.hf_model

    def forward(self, input_ids, teacher_hidden=None, teacher_taps=None, teacher_head=None, metrics: bool = False,
                targets: TeacherTargets | None = None):
        if targets is not None:
            return self._from_cached_targets(input_ids, targets, metrics)
        tap = [s for s, _ in self.layer_map] if (self.hidden_loss and not metrics) else []
        router = bool(self.router_weight) and not metrics
        with tap_layers(self.hf_model, tap) as taps:
            outputs, flat, labels = self._run_student(input_ids, router)
        t_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
        if metrics:  # called under no_grad: the plain chunks keep nothing
            kind = "kl" if t_flat is not None else "none"
            out = PlainKDLoss(kind, 1.0, 1.0, self.chunk_size)(flat, lm_head(self.hf_model), t_flat, teacher_head,
                                                              labels=labels)
            return torch.stack([out.kl * out.n_tokens, out.ce * out.n_labels,
                                flat.new_tensor(out.n_tokens), flat.new_tensor(out.n_labels)]).float()
        out = self.train_loss(flat, lm_head(self.hf_model), t_flat, teacher_head, labels=labels)
        loss = out.loss
        h_loss = loss.new_zeros(())
        if tap:
            h_loss = self._hidden_loss(taps, teacher_taps)
            loss = loss + self.hidden_weight * h_loss
        if router:
            loss = loss + self.router_weight * router_balance_loss(self.hf_model, outputs.router_logits)
        return {"loss": loss, "kd": out.kd, "ce": out.ce, "kl": out.kl, "hidden": h_loss.detach()}

    def _run_student(self, input_ids, router: bool):
        """The student's decoder on `input_ids`: (its outputs, the final hidden states flattened to
        [tokens, hidden] and scaled as the family scales its logits, the next-token labels)."""
        outputs = decoder(self.hf_model)(input_ids=input_ids, use_cache=False,
                                         **({"output_router_logits": True} if router else {}))
        hidden = outputs.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        if logit_scale(self.hf_model) != 1.0:
            flat = flat * logit_scale(self.hf_model)
        return outputs, flat, next_token_labels(input_ids).reshape(-1)

    def _from_cached_targets(self, input_ids, targets: TeacherTargets, metrics: bool):
        """The loss (or, with `metrics`, the validation sums) against a teacher-logits cache's targets."""
        router = bool(self.router_weight) and not metrics
        outputs, flat, labels = self._run_student(input_ids, router)
        if metrics:  # the top-K + bucket KL of every token and the LM loss, as sums
            out = PlainTopKLoss(self.chunk_size, ce_weight=1.0)(flat, lm_head(self.hf_model), targets, labels=labels)
            return torch.stack([out.kl * out.n_tokens, out.ce * out.n_labels,
                                flat.new_tensor(out.n_tokens), flat.new_tensor(out.n_labels)]).float()
        out = self.train_loss(flat, lm_head(self.hf_model), targets, labels=labels)
        loss = out.loss
        if router:
            loss = loss + self.router_weight * router_balance_loss(self.hf_model, outputs.router_logits)
        return {"loss": loss, "kd": out.kd, "ce": out.ce, "kl": out.kl, "hidden": loss.new_zeros(()).detach()}

    def _hidden_loss(self, student_taps, teacher_taps):
        """Mean over mapped pairs and tokens of 1 - cos(student state, teacher state), after the final norms."""
        norm = decoder(self.hf_model).norm
        terms = []
        for s, t in self.layer_map:
            hs = norm(student_taps[s])
            if self.proj is not None:
                hs = self.proj(hs)
            terms.append(1 - F.cosine_similarity(hs.float(), teacher_taps[t].float(), dim=-1).mean())
        return torch.stack(terms).mean()


class Distillation(nn.Module):
    """The student objective and the frozen teacher as one module: ``forward(input_ids)`` runs the teacher
    (no grad), the student and the loss, and returns `StudentObjective`'s dict (``metrics=True``: its sums).

    This is the module Accelerate prepares, so under FSDP2 and ZeRO-3 it is the root and every call
    into teacher and student happens inside its forward.  Under FSDP2 the decoder layers of both
    models become units (the union of their ``_no_split_modules``), and everything else, i.e. the
    embeddings, final norms and both LM heads, stays in the root unit, which is gathered from the
    start of the root's forward to the end of its backward.  The LM heads are therefore plain
    local tensors wherever the chunked loss uses them, in the forward and in a recomputation during
    backward, whatever the torch version; the fused loss can use them directly.  (Exposing the
    embeddings would let Accelerate carve the final norm and LM head into a separate grouped unit;
    torch 2.11 runs such a unit's hooks once per round of its modules, which an LM head called
    once per loss chunk breaks: the unit was resharded during backward and the head recomputed
    for an earlier chunk met sharded weights.)

    The teacher is not part of the state dict (checkpoints, export) except inside
    `teacher_in_state_dict()`, which the trainer uses around `accelerator.prepare`: Accelerate's
    FSDP2 loading fills every shard, the teacher's too, from the main process's state dict.
    """

    def __init__(self, objective: StudentObjective, teacher: TeacherForward | None = None):
        super().__init__()
        self.objective = objective
        self.teacher = teacher
        self._with_teacher = False
        # Loading a checkpoint leaves the teacher as it is: its keys are not expected there.
        self.register_load_state_dict_post_hook(Distillation._teacher_keys_not_missing)

    @property
    def _no_split_modules(self):
        """The decoder layer classes of both models: Accelerate's FSDP2 auto-wrap makes each layer a unit."""
        names = []
        for model in self._hf_models():
            names += [n for n in (getattr(model, "_no_split_modules", None) or []) if n not in names]
        return names

    def _hf_models(self):
        return [self.objective.hf_model] + ([self.teacher.hf_model] if self.teacher is not None else [])

    def tie_weights(self, *args, **kwargs):
        """Re-tie each model's embeddings and LM head (Accelerate calls this after moving the model to meta)."""
        for model in self._hf_models():
            if hasattr(model, "tie_weights"):
                model.tie_weights()

    def forward(self, input_ids: torch.Tensor, metrics: bool = False, targets=None):
        """`targets`: a teacher-logits cache's targets (`as_module_inputs`), used instead of the teacher."""
        if targets is not None:
            return self.objective(input_ids, metrics=metrics, targets=from_module_inputs(targets))
        t_hidden = t_taps = t_head = None
        if self.teacher is not None:
            t_head = lm_head(self.teacher.hf_model)
            if metrics or self.objective.mode == "kd":
                t_hidden, t_taps = self.teacher(input_ids)
        return self.objective(input_ids, t_hidden, t_taps, t_head, metrics=metrics)

    @contextmanager
    def teacher_in_state_dict(self):
        """Include the teacher's weights in `state_dict()` inside this block (model preparation)."""
        self._with_teacher = True
        try:
            yield self
        finally:
            self._with_teacher = False

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self._with_teacher:
            for key in [k for k in out if k.startswith(prefix + "teacher.")]:
                del out[key]
        return out

    def _teacher_keys_not_missing(self, incompatible_keys) -> None:
        if not self._with_teacher:  # keys are relative to the outermost module (DDP adds "module.")
            for key in [k for k in incompatible_keys.missing_keys if _TEACHER_KEY.match(k)]:
                incompatible_keys.missing_keys.remove(key)


def as_module_inputs(targets: TeacherTargets) -> tuple:
    """Cached targets as inputs of the root module: the log-probabilities passed as their bit patterns.

    FSDP2 with bf16 mixed precision casts every floating-point input of the root module to
    bf16, which would keep 8 of the 11 significant bits that the cache stores in float16; as
    integers they go through untouched (`from_module_inputs` turns them back).
    """
    return (targets.topk_ids, _as_bits(targets.topk_logprobs), _as_bits(targets.rest_logmass))


def from_module_inputs(inputs) -> TeacherTargets:
    """The `TeacherTargets` that `as_module_inputs` packed (a `TeacherTargets` passes through)."""
    if isinstance(inputs, TeacherTargets):
        return inputs
    ids, logprobs, rest = inputs
    return TeacherTargets(ids, _from_bits(logprobs), _from_bits(rest))


_BITS = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}
_FLOATS = {torch.int16: torch.float16, torch.int32: torch.float32, torch.int64: torch.float64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bfloat16:  # no bit type of its own: widen (exactly) to float32
        t = t.float()
    return t.view(_BITS[t.dtype])


def _from_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_FLOATS[t.dtype])


_TEACHER_KEY = re.compile(r"^(?:(?:module|_orig_mod)\.)*teacher\.")
