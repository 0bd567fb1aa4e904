"""Qwen3: Llama's layout plus per-head q/k RMSNorms, which act on head_dim and stay whole."""

from .base import HEAD_DIM, Adapter, with_tensors


class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)
    layer_tensors = with_tensors(
        Adapter.layer_tensors,
        attention={"self_attn.q_norm.weight": {0: HEAD_DIM}, "self_attn.k_norm.weight": {0: HEAD_DIM}},
    )
