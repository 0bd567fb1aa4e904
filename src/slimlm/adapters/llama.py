"""Llama (and SmolLM2, which is a Llama): the reference layout the base adapter describes."""

from .base import Adapter


class LlamaAdapter(Adapter):
    model_types = ("llama",)
    hidden_divisible_by_heads = True
