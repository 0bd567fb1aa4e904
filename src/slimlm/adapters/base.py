"""The adapter interface: everything family-specific that importance and pruning need.

An adapter says three things about a family:
- where the modules are (decoder layers, the norms whose outputs carry the hidden
  channels, the inputs of the attention output and MLP down projections);
- for every weight tensor, which of its dimensions index which prunable axis
  (hidden channels, MLP neurons of layer l, query or key/value heads of layer l);
- how the config changes when the shape changes.

Importance and pruning only speak of those axes; they never name a family.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SlimlmError

# Axis names used in tensor rules.
HIDDEN, FFN, Q, KV, QKV, GATE_UP, KEEP = "hidden", "ffn", "q", "kv", "qkv", "gate_up", "keep"


@dataclass(frozen=True)
class Shape:
    """The widths and depth of a (uniform) decoder-only model."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Adapter:
    """Base adapter for Llama-style decoder-only models."""

    #: `config.model_type` values this adapter handles
    model_types: tuple[str, ...] = ()
    layers_path = "model.layers"
    final_norm = "model.norm"
    #: norms (relative to a layer) whose outputs feed projections: hidden-channel sites
    hidden_sites: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attn_out = "self_attn.o_proj"
    mlp_down = "mlp.down_proj"
    #: tensors outside the layers: name -> {dim: axis}
    top_tensors: dict[str, dict[int, str]] = {
        "model.embed_tokens.weight": {1: HIDDEN},
        "model.norm.weight": {0: HIDDEN},
        "lm_head.weight": {1: HIDDEN},
    }
    #: tensors inside a layer, relative names: {dim: axis}
    layer_tensors: dict[str, dict[int, str]] = {
        "input_layernorm.weight": {0: HIDDEN},
        "post_attention_layernorm.weight": {0: HIDDEN},
        "self_attn.q_proj.weight": {0: Q, 1: HIDDEN},
        "self_attn.k_proj.weight": {0: KV, 1: HIDDEN},
        "self_attn.v_proj.weight": {0: KV, 1: HIDDEN},
        "self_attn.o_proj.weight": {0: HIDDEN, 1: Q},
        "mlp.gate_proj.weight": {0: FFN, 1: HIDDEN},
        "mlp.up_proj.weight": {0: FFN, 1: HIDDEN},
        "mlp.down_proj.weight": {0: HIDDEN, 1: FFN},
    }
    #: config keys holding one entry per layer, trimmed on depth pruning
    per_layer_config_keys: tuple[str, ...] = ("layer_types",)

    #: transformers' config for this family rejects hidden_size % num_attention_heads != 0
    #: on load, even with an explicit head_dim (seen in transformers 5.24: Llama, Gemma 3)
    hidden_divisible_by_heads = False

    def __init__(self, config):
        self.config = config

    def validate_shape(self, shape: "Shape") -> None:
        """Error when transformers would refuse to load a checkpoint of this shape."""
        if self.hidden_divisible_by_heads and shape.hidden % shape.heads:
            raise SlimlmError(
                f"{self.config.model_type} checkpoints need the hidden size divisible by the query heads "
                f"(transformers refuses to load hidden {shape.hidden} with {shape.heads} heads); pick sizes where it divides"
            )

    # ---- shape ---------------------------------------------------------------
    def shape(self, config=None) -> Shape:
        c = config or self.config
        heads = c.num_attention_heads
        return Shape(
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            ffn=c.intermediate_size,
            heads=heads,
            kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab=c.vocab_size,
            tied=bool(getattr(c, "tie_word_embeddings", False)),
        )

    def new_config(self, plan):
        """The config of the pruned model described by `plan`."""
        old = self.shape()
        c = copy.deepcopy(self.config)
        c.hidden_size = len(plan.kept_hidden)
        first = plan.kept_layers[0] if plan.kept_layers else 0
        c.intermediate_size = len(plan.kept_ffn[first]) if plan.kept_layers else old.ffn
        c.num_attention_heads = len(plan.kept_heads[first]) if plan.kept_layers else old.heads
        c.num_key_value_heads = len(plan.kept_kv_heads[first]) if plan.kept_layers else old.kv_heads
        c.head_dim = old.head_dim  # always explicit: hidden / heads no longer equals head_dim
        c.num_hidden_layers = len(plan.kept_layers)
        for key in self.per_layer_config_keys:
            value = getattr(c, key, None)
            if isinstance(value, (list, tuple)) and len(value) == old.layers:
                setattr(c, key, [value[i] for i in plan.kept_layers])
        for attr in ("_slimlm_source", "quantization_config"):
            if hasattr(c, attr):
                delattr(c, attr)
        return c

    # ---- modules -------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_path, _, name = self.layers_path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, layers)

    # ---- tensors -------------------------------------------------------------
    def tensor_rule(self, name: str) -> tuple[int | None, dict[int, str]]:
        """(layer index or None, {dim: axis}) for a weight name; error on an unknown tensor."""
        prefix = self.layers_path + "."
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix) :].partition(".")
            if rest in self.layer_tensors:
                return int(idx), self.layer_tensors[rest]
        elif name in self.top_tensors:
            return None, self.top_tensors[name]
        raise SlimlmError(f"{type(self).__name__} does not know the tensor '{name}'; cannot prune this checkpoint")

    def rename(self, name: str, new_layer_index: int) -> str:
        prefix = self.layers_path + "."
        rest = name[len(prefix) :].partition(".")[2]
        return f"{prefix}{new_layer_index}.{rest}"

    def axis_index(self, axis: str, layer: int | None, plan) -> torch.Tensor | None:
        """The kept positions along one tensor dimension (None: keep the whole dimension)."""
        s = plan.source_shape
        hd = s.head_dim
        if axis == HIDDEN:
            return torch.tensor(plan.kept_hidden, dtype=torch.long)
        if axis == FFN:
            return torch.tensor(plan.kept_ffn[layer], dtype=torch.long)
        if axis == Q:
            return _head_rows(plan.kept_heads[layer], hd)
        if axis == KV:
            return _head_rows(plan.kept_kv_heads[layer], hd)
        if axis == QKV:  # fused [q; k; v] rows
            q = _head_rows(plan.kept_heads[layer], hd)
            k = _head_rows(plan.kept_kv_heads[layer], hd) + s.heads * hd
            v = _head_rows(plan.kept_kv_heads[layer], hd) + (s.heads + s.kv_heads) * hd
            return torch.cat([q, k, v])
        if axis == GATE_UP:  # fused [gate; up] rows
            f = torch.tensor(plan.kept_ffn[layer], dtype=torch.long)
            return torch.cat([f, f + s.ffn])
        if axis == KEEP:
            return None
        raise ValueError(f"unknown axis {axis}")

    def adjust_tensor(self, name: str, tensor: torch.Tensor, plan, new_config) -> torch.Tensor:
        """Family-specific fix-ups after slicing (e.g. Gemma's embedding scale). Default: none."""
        return tensor

    def check_model(self, model: nn.Module) -> None:
        """Fail clearly when a loaded model does not look like this family expects."""
        layers = self.layers(model)
        for site in (*self.hidden_sites, self.attn_out, self.mlp_down):
            layers[0].get_submodule(site)

    # ---- analytic parameter count ----------------------------------------------
    def param_count(self, shape: Shape) -> int:
        """Parameters of a model of this family with `shape` (counted from the tensor rules)."""
        sizes = {
            HIDDEN: shape.hidden,
            FFN: shape.ffn,
            Q: shape.heads * shape.head_dim,
            KV: shape.kv_heads * shape.head_dim,
            QKV: (shape.heads + 2 * shape.kv_heads) * shape.head_dim,
            GATE_UP: 2 * shape.ffn,
        }
        per_layer = sum(self._rule_numel(rule, sizes, shape) for rule in self.layer_tensors.values())
        top = 0
        for name, rule in self.top_tensors.items():
            if name == "lm_head.weight" and shape.tied:
                continue
            top += self._rule_numel(rule, sizes, shape, vocab_dims=True)
        return top + shape.layers * per_layer

    def _rule_numel(self, rule, sizes, shape, vocab_dims=False) -> int:
        dims = sorted(rule)
        n = 1
        ndim = max(dims) + 1 if dims else 1
        if vocab_dims and ndim == 2 and len(rule) == 1:
            n *= shape.vocab
        for d in dims:
            axis = rule[d]
            n *= sizes.get(axis, shape.head_dim if axis == KEEP else 0)
        return n


def _head_rows(heads, head_dim: int) -> torch.Tensor:
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
