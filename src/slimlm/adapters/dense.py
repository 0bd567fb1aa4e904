"""Newer dense families: SmolLM3, OLMo 2 and 3, Granite, Gemma 2.

- SmolLM3: Llama's layout; some layers skip RoPE (`no_rope_layers`, one entry per layer).
- OLMo 2/3: no pre-norms (each sublayer's output is normalised before the residual add),
  and q/k RMSNorms over the whole projected width (heads x head_dim), so they are sliced
  with the heads.  Their hidden-channel sites are those two post-norms.
- Granite: Llama's layout with scalar multipliers (embedding, residual, attention,
  logits), which do not depend on any width and stay as they are.
- Gemma 2: Gemma 3's four norms and scaled embedding, without q/k norms; attention and
  final-logit soft-capping are scalars.
"""

from .base import (
    ATTENTION_BIASES,
    HIDDEN,
    KV,
    MLP_BIASES,
    Q,
    Adapter,
    flagged,
    with_tensors,
)
from .gemma3 import ScaledEmbeddingMixin

_BIASES = {**flagged(ATTENTION_BIASES, "attention_bias"), **flagged(MLP_BIASES, "mlp_bias")}


class SmolLM3Adapter(Adapter):
    model_types = ("smollm3",)
    layer_tensors = with_tensors(Adapter.layer_tensors, attention=ATTENTION_BIASES, mlp=MLP_BIASES)
    optional_tensors = _BIASES
    per_layer_config_keys = ("layer_types", "no_rope_layers")


class Olmo2Adapter(Adapter):
    model_types = ("olmo2", "olmo3")
    hidden_sites = ("post_attention_layernorm", "post_feedforward_layernorm")
    layer_tensors = with_tensors(
        {name: rules for name, rules in Adapter.layer_tensors.items() if name != "norms"},
        norms={"post_attention_layernorm.weight": {0: HIDDEN}, "post_feedforward_layernorm.weight": {0: HIDDEN}},
        attention={**ATTENTION_BIASES, "self_attn.q_norm.weight": {0: Q}, "self_attn.k_norm.weight": {0: KV}},
    )
    optional_tensors = flagged(ATTENTION_BIASES, "attention_bias")


class GraniteAdapter(Adapter):
    model_types = ("granite",)
    layer_tensors = with_tensors(Adapter.layer_tensors, attention=ATTENTION_BIASES, mlp=MLP_BIASES)
    optional_tensors = _BIASES


class Gemma2Adapter(ScaledEmbeddingMixin, Adapter):
    model_types = ("gemma2",)
    hidden_divisible_by_heads = True
    hidden_sites = ("input_layernorm", "pre_feedforward_layernorm")
    layer_tensors = with_tensors(
        Adapter.layer_tensors,
        norms={"pre_feedforward_layernorm.weight": {0: HIDDEN}, "post_feedforward_layernorm.weight": {0: HIDDEN}},
        attention=ATTENTION_BIASES,
    )
    optional_tensors = flagged(ATTENTION_BIASES, "attention_bias")
