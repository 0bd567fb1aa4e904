"""Architecture adapters, one small file per family.  `get_adapter` picks one."""

from ..errors import SlimlmError
from .base import Adapter, Shape
from .dense import Gemma2Adapter, GraniteAdapter, Olmo2Adapter, SmolLM3Adapter
from .gemma3 import Gemma3Adapter
from .hybrid import FalconH1Adapter, NemotronHAdapter
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .moe import GptOssAdapter, MixtralAdapter, OlmoeAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter
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
    SmolLM3Adapter,
    Olmo2Adapter,
    GraniteAdapter,
    Gemma2Adapter,
    Qwen3MoeAdapter,
    Qwen2MoeAdapter,
    MixtralAdapter,
    OlmoeAdapter,
    GptOssAdapter,
    NemotronHAdapter,
    FalconH1Adapter,
)

SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)

#: families transformers has that slimlm knows and refuses, with the reason
REFUSED = {
    "qwen3_next": "its Gated DeltaNet (linear-attention) layers are not prunable yet",
    "qwen3_5_text": "its Gated DeltaNet (linear-attention) layers are not prunable yet",
    "qwen3_5": "its Gated DeltaNet (linear-attention) layers are not prunable yet",
    "qwen3_5_moe_text": "its Gated DeltaNet (linear-attention) layers are not prunable yet",
    "qwen3_5_moe": "its Gated DeltaNet (linear-attention) layers are not prunable yet",
    "granitemoehybrid": (
        "its config derives the Mamba width from mamba_expand x hidden_size (an integer), so pruned widths "
        "cannot be written; Nemotron-H and Falcon-H1 are the supported hybrids"
    ),
}


def get_adapter(config_or_model) -> Adapter:
    """The adapter for a model or config; a one-line error for unsupported families."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    if model_type in REFUSED:
        raise SlimlmError(f"cannot prune '{model_type}': {REFUSED[model_type]}; supported: {', '.join(SUPPORTED)}")
    raise SlimlmError(
        f"unsupported model family '{model_type}'; supported: {', '.join(SUPPORTED)}"
    )


__all__ = ["Adapter", "Shape", "get_adapter", "SUPPORTED", "ADAPTERS"]
