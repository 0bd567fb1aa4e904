"""Mistral: Llama's layout; `sliding_window` is a single value, nothing per layer."""

from .base import Adapter


class MistralAdapter(Adapter):
    model_types = ("mistral",)
