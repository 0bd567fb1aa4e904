"""Architecture adapters, one small file per family.  `get_adapter` picks one."""

from ..errors import SlimlmError
from .base import Adapter, Shape
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .phi3 import Phi3Adapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
    Gemma3Adapter,
    Phi3Adapter,
)

SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(config_or_model) -> Adapter:
    """The adapter for a model or config; a one-line error for unsupported families."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    raise SlimlmError(
        f"unsupported model family '{model_type}'; supported: {', '.join(SUPPORTED)}"
    )


__all__ = ["Adapter", "Shape", "get_adapter", "SUPPORTED", "ADAPTERS"]
