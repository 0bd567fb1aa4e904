"""Llama (and SmolLM2, which is a Llama): the reference layout the base adapter describes."""

from .base import ATTENTION_BIASES, MLP_BIASES, Adapter, flagged, with_tensors


class LlamaAdapter(Adapter):
    model_types = ("llama",)
    hidden_divisible_by_heads = True
    layer_tensors = with_tensors(Adapter.layer_tensors, attention=ATTENTION_BIASES, mlp=MLP_BIASES)
    optional_tensors = {**flagged(ATTENTION_BIASES, "attention_bias"), **flagged(MLP_BIASES, "mlp_bias")}
