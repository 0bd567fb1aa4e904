"""The two modules the trainer runs: a frozen teacher and the student with its loss.

Both are thin `nn.Module` wrappers so that Accelerate can prepare them as a whole: under
FSDP2 or ZeRO-3 the wrapper is the root module, so every parameter (including the LM head
used inside the chunked loss) is gathered by the usual module hooks.  They expose the
attributes Accelerate's FSDP2 auto-wrap looks for (`_no_split_modules`, the embeddings,
`base_model_prefix`) by delegating to the wrapped Hugging Face model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimlmError
from .loss import IGNORE_INDEX, CheckpointedKDLoss, FusedKDLoss, PlainKDLoss, as_head


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not hasattr(dec, "layers"):
        raise SlimlmError(f"{type(model).__name__} has no decoder with .layers; cannot distill it")
    return dec


def lm_head(model: nn.Module):
    """hidden -> logits for `model`, including Gemma-style final logit soft-capping."""
    return as_head(model.get_output_embeddings(), softcap=getattr(model.config, "final_logit_softcapping", None))


def logit_scale(model: nn.Module) -> float:
    """The factor a model applies to its logits after the LM head (Falcon-H1's lm_head_multiplier,
    Granite's 1 / logits_scaling); the heads of those families have no bias, so it scales the
    final hidden states instead."""
    c = model.config
    return float(getattr(c, "lm_head_multiplier", None) or 1.0) / float(getattr(c, "logits_scaling", None) or 1.0)


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


class _Delegating(nn.Module):
    """Expose what Accelerate's FSDP2 preparation reads from a Hugging Face model."""

    base_model_prefix = "base"

    @property
    def base(self) -> nn.Module:
        return decoder(self.hf_model)

    @property
    def _no_split_modules(self):
        return getattr(self.hf_model, "_no_split_modules", None)

    def get_input_embeddings(self):
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.hf_model.get_output_embeddings()


class TeacherForward(_Delegating):
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


class StudentObjective(_Delegating):
    """The student plus its training loss (KD, LM, optional hidden-state cosine).

    `forward(input_ids, teacher_hidden, teacher_taps, teacher_head)` returns a dict of
    scalars: ``loss`` (with grad) and detached ``kd``, ``ce``, ``kl``, ``hidden``.
    With ``metrics=True`` it instead returns token sums for validation: forward KL at
    temperature 1 and the LM loss, never the training loss.
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
    ):
        super().__init__()
        self.hf_model = student
        self.mode, self.loss_name, self.temperature = mode, loss, temperature
        self.ce_weight, self.hidden_loss, self.hidden_weight = ce_weight, hidden_loss, hidden_weight
        self.layer_map = list(layer_map or [])
        self.chunk_size, self.fused = chunk_size, fused
        # The training loss: fused where the head is a plain local weight (one process, DDP),
        # checkpointed chunks where it is sharded (FSDP2 / ZeRO-3); the trainer says which.
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

    def forward(self, input_ids, teacher_hidden=None, teacher_taps=None, teacher_head=None, metrics: bool = False):
        tap = [s for s, _ in self.layer_map] if (self.hidden_loss and not metrics) else []
        with tap_layers(self.hf_model, tap) as taps:
            hidden = decoder(self.hf_model)(input_ids=input_ids, use_cache=False).last_hidden_state
        labels = next_token_labels(input_ids).reshape(-1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if logit_scale(self.hf_model) != 1.0:
            flat = flat * logit_scale(self.hf_model)
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
        return {"loss": loss, "kd": out.kd, "ce": out.ce, "kl": out.kl, "hidden": h_loss.detach()}

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
