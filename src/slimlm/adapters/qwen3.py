"""Qwen3: Llama's layout plus per-head q/k RMSNorms, which act on head_dim and stay whole."""

from .base import KEEP, Adapter


class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)
    layer_tensors = {
        **Adapter.layer_tensors,
        "self_attn.q_norm.weight": {0: KEEP},
        "self_attn.k_norm.weight": {0: KEEP},
    }
