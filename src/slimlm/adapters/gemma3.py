"""Gemma 3 (text): four norms per layer, per-head q/k norms, a scaled embedding.

Gemma multiplies embeddings by sqrt(hidden_size) and applies norm weights as
(1 + w).  After hidden pruning to fewer channels the factor shrinks, so the kept
embedding columns are scaled by sqrt(old/new) to keep the embedding output the same.
With tied embeddings that also scales the logits, which the final norm compensates.
"""

import math

from .base import HEAD_DIM, HIDDEN, Adapter, with_tensors


class ScaledEmbeddingMixin:
    """Keeps the output of an embedding scaled by sqrt(hidden_size) (Gemma 2 and 3)."""

    def adjust_tensor(self, name, tensor, plan, new_config):
        old, new = self.config.hidden_size, new_config.hidden_size
        if old == new:
            return tensor
        factor = math.sqrt(old / new)
        if name == "model.embed_tokens.weight":
            return tensor * factor
        if name == "model.norm.weight" and getattr(new_config, "tie_word_embeddings", False):
            return ((1.0 + tensor.float()) / factor - 1.0).to(tensor.dtype)
        return tensor


class Gemma3Adapter(ScaledEmbeddingMixin, Adapter):
    model_types = ("gemma3_text",)
    hidden_divisible_by_heads = True
    hidden_sites = ("input_layernorm", "pre_feedforward_layernorm")
    layer_tensors = with_tensors(
        Adapter.layer_tensors,
        norms={
            "pre_feedforward_layernorm.weight": {0: HIDDEN},
            "post_feedforward_layernorm.weight": {0: HIDDEN},
        },
        attention={"self_attn.q_norm.weight": {0: HEAD_DIM}, "self_attn.k_norm.weight": {0: HEAD_DIM}},
    )
