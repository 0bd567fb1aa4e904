"""The adapter interface: everything family-specific that importance and pruning need.

An adapter says four things about a family:
- where the modules are (decoder layers, the norms whose outputs carry the hidden
  channels, the inputs of the attention output and MLP down projections, the experts
  module of a mixture-of-experts layer, the input projection of a Mamba mixer);
- for every weight tensor, which of its dimensions index which prunable axis
  (hidden channels, MLP neurons, query or key/value heads, experts, each expert's
  neurons, Mamba heads), grouped by the block of the layer that holds it
  (`norms`, `attention`, `mlp`, `moe`, `shared`, `mamba`);
- which blocks each layer has (every layer of a dense model has attention and an MLP;
  a hybrid's layers differ);
- which config keys hold each size, so a smaller config is written by the same table.

The tensor table drives slicing (prune.py), the magnitude baseline (importance.py)
and the analytic parameter count (below).  Importance and pruning only speak of
those axes; they never name a family.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..errors import SlimlmError
from ..models import decoder

# ---- axes: what one tensor dimension indexes ------------------------------------
HIDDEN = "hidden"  # hidden (embedding) channels, shared by the whole model
FFN = "ffn"  # neurons of a layer's dense MLP
GATE_UP = "gate_up"  # fused [gate; up] rows of a dense MLP
Q = "q"  # query-head rows (heads x head_dim)
KV = "kv"  # key/value-head rows
QKV = "qkv"  # fused [q; k; v] rows
Q_HEADS = "q_heads"  # one entry per query head (gpt-oss attention sinks)
# mixture of experts
ROUTER = "router"  # one router row per expert (every token computes all of them)
EXPERT = "expert"  # the expert index of a 3-D expert tensor (a token runs top-k of them)
EXPERT_FFN = "expert_ffn"  # the neurons of each kept expert: nested under EXPERT
EXPERT_GATE_UP = "expert_gate_up"  # each expert's [gate; up] rows: nested under EXPERT
EXPERT_GATE_UP_INTERLEAVED = "expert_gate_up_interleaved"  # [g0, u0, g1, u1, ...] (gpt-oss): nested
SHARED_FFN = "shared_ffn"  # neurons of the shared expert (one dense MLP beside the routed experts)
# Mamba-2 mixers (heads x head_dim inner channels, in n_groups groups of heads)
MAMBA_IN = "mamba_in"  # in_proj rows: [z | x | B | C | dt]
MAMBA_CONV = "mamba_conv"  # conv1d channels: [x | B | C]
MAMBA_INNER = "mamba_inner"  # inner channels (gated norm, out_proj columns)
MAMBA_HEADS = "mamba_heads"  # one entry per head (A_log, D, dt_bias)
# fixed dimensions: never sliced, named so that the parameter count knows their size
VOCAB = "vocab"
HEAD_DIM = "head_dim"  # per-head q/k norms (Qwen3, Gemma 3) act on head_dim
ONE = "one"
CONV_KERNEL = "conv_kernel"
KEEP = HEAD_DIM  # the name older adapters used

#: axes indexed per kept expert (a [experts, n] index), applied after the EXPERT dimension
NESTED_AXES = (EXPERT_FFN, EXPERT_GATE_UP, EXPERT_GATE_UP_INTERLEAVED)
FIXED_AXES = (VOCAB, HEAD_DIM, ONE, CONV_KERNEL)

#: the blocks a layer of a plain dense decoder has
DENSE_BLOCKS = ("attention", "mlp")


@dataclass(frozen=True)
class Shape:
    """The widths and depth of a decoder-only model (widths are uniform across layers).

    Dense models use the first eight fields.  Mixture-of-experts and Mamba sizes are 0
    when the model has none.  `layer_blocks` lists, per layer, the blocks it holds
    ("attention+moe+shared", "mamba", ...); it is empty for a plain dense model, whose
    every layer has attention and an MLP.
    """

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0  # top-k
    expert_groups: int = 0  # routing groups (experts are kept evenly per group); 0: one group
    moe_ffn: int = 0  # each routed expert's intermediate size
    shared_ffn: int = 0  # the shared expert's intermediate size
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 0
    mamba_state: int = 0
    mamba_conv: int = 0
    layer_blocks: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.layer_blocks, tuple):  # from JSON
            object.__setattr__(self, "layer_blocks", tuple(self.layer_blocks))

    def blocks(self, layer: int) -> tuple[str, ...]:
        """The blocks of one layer (the norms, which every layer has, not included)."""
        return tuple(self.layer_blocks[layer].split("+")) if self.layer_blocks else DENSE_BLOCKS

    def layers_with(self, block: str) -> list[int]:
        """Indices of the layers that hold `block` ("attention", "mlp", "moe", "shared", "mamba")."""
        return [i for i in range(self.layers) if block in self.blocks(i)]

    def as_dict(self) -> dict:
        """Plain dict; sizes a model does not have (MoE, Mamba) are left out."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in _DENSE_FIELDS and value == f.default:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_DENSE_FIELDS = ("layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "tied")


#: optional biases of Llama-style attention and MLP projections (families opt in with a config flag)
ATTENTION_BIASES = {
    "self_attn.q_proj.bias": {0: Q},
    "self_attn.k_proj.bias": {0: KV},
    "self_attn.v_proj.bias": {0: KV},
    "self_attn.o_proj.bias": {0: HIDDEN},
}
MLP_BIASES = {"mlp.gate_proj.bias": {0: FFN}, "mlp.up_proj.bias": {0: FFN}, "mlp.down_proj.bias": {0: HIDDEN}}


def flagged(rules: dict, config_key: str) -> dict[str, str]:
    """{tensor: config_key} for `optional_tensors`: these tensors exist when the key is true."""
    return {name: config_key for name in rules}


def with_tensors(table: dict, **blocks: dict) -> dict:
    """`table` (block -> {tensor: rule}) with tensors added to (or replaced in) some blocks."""
    out = {name: dict(rules) for name, rules in table.items()}
    for block, rules in blocks.items():
        out.setdefault(block, {}).update(rules)
    return out


class Adapter:
    """Base adapter for Llama-style decoder-only models."""

    #: `config.model_type` values this adapter handles
    model_types: tuple[str, ...] = ()
    #: where the decoder layers' weights are named in the checkpoint (module access goes through
    #: `slimlm.models.decoder`, whose `.layers` these are)
    layers_path = "model.layers"
    #: norms (relative to a layer) whose outputs feed projections: hidden-channel sites
    hidden_sites: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    attn_out = "self_attn.o_proj"
    mlp_down = "mlp.down_proj"
    #: the experts module of a mixture-of-experts layer (its forward gets hidden states,
    #: top-k expert indices and top-k weights)
    experts_module: str | None = None
    #: the shared expert's down projection (its input: the shared expert's neurons)
    shared_down: str | None = None
    #: a Mamba mixer's input projection (its output holds z, x, B, C, dt)
    mamba_in_proj: str | None = None
    #: tensors outside the layers: name -> {dim: axis}
    top_tensors: dict[str, dict[int, str]] = {
        "model.embed_tokens.weight": {0: VOCAB, 1: HIDDEN},
        "model.norm.weight": {0: HIDDEN},
        "lm_head.weight": {0: VOCAB, 1: HIDDEN},
    }
    #: tensors inside a layer by block: block -> {relative name: {dim: axis}}
    layer_tensors: dict[str, dict[str, dict[int, str]]] = {
        "norms": {
            "input_layernorm.weight": {0: HIDDEN},
            "post_attention_layernorm.weight": {0: HIDDEN},
        },
        "attention": {
            "self_attn.q_proj.weight": {0: Q, 1: HIDDEN},
            "self_attn.k_proj.weight": {0: KV, 1: HIDDEN},
            "self_attn.v_proj.weight": {0: KV, 1: HIDDEN},
            "self_attn.o_proj.weight": {0: HIDDEN, 1: Q},
        },
        "mlp": {
            "mlp.gate_proj.weight": {0: FFN, 1: HIDDEN},
            "mlp.up_proj.weight": {0: FFN, 1: HIDDEN},
            "mlp.down_proj.weight": {0: HIDDEN, 1: FFN},
        },
    }
    #: tensors that exist only when a config flag is true (biases): relative name -> config key
    optional_tensors: dict[str, str] = {}
    #: relative names of persistent buffers: sliced like weights, not counted as parameters
    buffer_tensors: tuple[str, ...] = ()
    #: False where the model class never ties its LM head to the embedding, whatever the config says
    ties_embeddings = True
    #: checkpoint tensors the model itself ignores on load (dropped when pruning from disk)
    ignored_prefixes: tuple[str, ...] = ()
    #: name fragments transformers renames when loading a checkpoint: (on disk, in memory)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    #: routed experts as checkpoints store them, one 2-D tensor per expert ("{e}": the expert's
    #: number), in-memory names relative to a layer; transformers stacks them into the 3-D
    #: tensors on load and splits them again on save.  Their per-expert axes mean "this
    #: expert's neurons".
    checkpoint_expert_tensors: dict[str, dict[int, str]] = {}
    #: Shape field -> config key holding it (None: the family has no such size)
    config_keys: dict[str, str | None] = {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "ffn": "intermediate_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "vocab": "vocab_size",
    }
    #: config keys holding one entry per layer, trimmed on depth pruning
    per_layer_config_keys: tuple[str, ...] = ("layer_types",)

    #: transformers' config for this family rejects hidden_size % num_attention_heads != 0
    #: on load, even with an explicit head_dim (seen in transformers 5.24: Llama, Gemma 2/3)
    hidden_divisible_by_heads = False

    def __init__(self, config):
        self.config = config
        self.check_config()

    def check_config(self) -> None:
        """Error (one line) when this variant of the family cannot be pruned."""

    def validate_shape(self, shape: "Shape") -> None:
        """Error when transformers would refuse to load a checkpoint of this shape."""
        if self.hidden_divisible_by_heads and shape.heads and shape.hidden % shape.heads:
            raise SlimlmError(
                f"{self.config.model_type} checkpoints need the hidden size divisible by the query heads "
                f"(transformers refuses to load hidden {shape.hidden} with {shape.heads} heads); pick sizes where it divides"
            )

    # ---- shape ---------------------------------------------------------------
    def _read(self, c, field: str, default=0):
        key = self.config_keys.get(field)
        value = getattr(c, key, None) if key else None
        return default if value is None else value

    def shape(self, config=None) -> Shape:
        c = config or self.config
        heads = self._read(c, "heads")
        hidden = self._read(c, "hidden")
        values = {f.name: self._read(c, f.name) for f in fields(Shape) if f.name in self.config_keys}
        values["kv_heads"] = values.get("kv_heads") or heads
        values["head_dim"] = values.get("head_dim") or (hidden // heads if heads else 0)
        values["tied"] = self.ties_embeddings and bool(getattr(c, "tie_word_embeddings", False))
        values["layer_blocks"] = self.layer_blocks(c)
        values.setdefault("ffn", 0)
        values["layers"] = len(values["layer_blocks"]) or values["layers"]
        return Shape(**values)

    def layer_blocks(self, config) -> tuple[str, ...]:
        """Per layer, the blocks it holds joined by '+'; empty for a plain dense model."""
        return ()

    def new_config(self, plan):
        """The config of the pruned model described by `plan`."""
        new = plan.target_shape
        c = copy.deepcopy(self.config)
        # Every size is written, head_dim included: hidden / heads no longer equals it.
        for field, key in self.config_keys.items():
            if key is not None:
                setattr(c, key, getattr(new, field))
        self.trim_layer_keys(c, plan.kept_layers, plan.source_shape.layers)
        self.adjust_config(c, plan)
        for attr in ("_slimlm_source", "quantization_config"):
            if hasattr(c, attr):
                delattr(c, attr)
        return c

    def trim_layer_keys(self, c, kept_layers: list[int], n_layers: int) -> dict:
        """Shorten the per-layer config lists to `kept_layers` (in place); returns the old values."""
        old = {}
        for key in self.per_layer_config_keys:
            value = getattr(c, key, None)
            if isinstance(value, (list, tuple)) and len(value) == n_layers:
                old[key] = value
                setattr(c, key, [value[i] for i in kept_layers])
        return old

    def adjust_config(self, c, plan) -> None:
        """Family-specific config changes after pruning (in place). Default: none."""

    # ---- modules -------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return decoder(model).layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        decoder(model).layers = layers

    # ---- tensors -------------------------------------------------------------
    def tensor_rule(self, name: str) -> tuple[int | None, dict[int, str]]:
        """(layer index or None, {dim: axis}) for a weight name; error on an unknown tensor."""
        prefix = self.layers_path + "."
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix) :].partition(".")
            for rules in self.layer_tensors.values():
                if rest in rules:
                    return int(idx), rules[rest]
        elif name in self.top_tensors:
            return None, self.top_tensors[name]
        raise SlimlmError(f"{type(self).__name__} does not know the tensor '{name}'; cannot prune this checkpoint")

    def locate(self, name: str) -> tuple[int | None, dict[int, str], int | None]:
        """(layer, {dim: axis}, expert number or None) of a tensor, by its in-memory or checkpoint name."""
        memory = name
        for on_disk, in_memory in self.checkpoint_renames:
            memory = memory.replace(on_disk, in_memory, 1)
        prefix = self.layers_path + "."
        if self.checkpoint_expert_tensors and memory.startswith(prefix):
            idx, _, rest = memory[len(prefix) :].partition(".")
            number = _EXPERT_NUMBER.search(rest)
            if number:
                pattern = f"{rest[: number.start(1)]}{{e}}{rest[number.end(1) :]}"
                if pattern in self.checkpoint_expert_tensors:
                    return int(idx), self.checkpoint_expert_tensors[pattern], int(number.group(1))
        layer, rule = self.tensor_rule(memory)
        return layer, rule, None

    def is_ignored(self, name: str) -> bool:
        return name.startswith(self.ignored_prefixes) if self.ignored_prefixes else False

    def rename(self, name: str, new_layer_index: int, new_expert_index: int | None = None) -> str:
        """`name` with its layer (and expert) renumbered; works on in-memory and checkpoint names."""
        name = _LAYER_NUMBER.sub(str(new_layer_index), name, count=1)
        if new_expert_index is not None:
            name = _EXPERT_NUMBER.sub(str(new_expert_index), name, count=1)
        return name

    def axis_index(self, axis: str, layer: int | None, plan, expert: int | None = None) -> torch.Tensor | None:
        """The kept positions along one tensor dimension (None: keep the whole dimension).

        Nested axes (each expert's neurons) give a [kept experts, kept positions] index, or,
        for one expert's own tensor (`expert`: its position among the kept experts), its row.
        """
        s = plan.source_shape
        hd = s.head_dim
        if axis == HIDDEN:
            return torch.tensor(plan.kept_hidden, dtype=torch.long)
        if axis == FFN:
            return torch.tensor(plan.kept_ffn[layer], dtype=torch.long)
        if axis == Q:
            return _head_rows(plan.kept_heads[layer], hd)
        if axis == Q_HEADS:
            return torch.tensor(plan.kept_heads[layer], dtype=torch.long)
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
        if axis in (ROUTER, EXPERT):
            return torch.tensor(plan.kept_experts[layer], dtype=torch.long)
        if axis in NESTED_AXES:
            per_expert = plan.expert_neurons(layer)  # [kept experts, kept neurons]
            if expert is not None:
                return per_expert[expert]
            if axis == EXPERT_GATE_UP:
                return torch.cat([per_expert, per_expert + s.moe_ffn], dim=1)
            if axis == EXPERT_GATE_UP_INTERLEAVED:
                return torch.stack([2 * per_expert, 2 * per_expert + 1], dim=2).flatten(1)
            return per_expert
        if axis == SHARED_FFN:
            return torch.tensor(plan.kept_shared_ffn[layer], dtype=torch.long)
        if axis in (MAMBA_IN, MAMBA_CONV, MAMBA_INNER, MAMBA_HEADS):
            return _mamba_index(axis, plan.kept_mamba_heads[layer], s)
        if axis in FIXED_AXES:
            return None
        raise ValueError(f"unknown axis {axis}")

    def adjust_tensor(self, name: str, tensor: torch.Tensor, plan, new_config) -> torch.Tensor:
        """Family-specific fix-ups after slicing (e.g. Gemma's embedding scale). Default: none."""
        return tensor

    def check_model(self, model: nn.Module) -> None:
        """Fail clearly when a loaded model does not look like this family expects."""
        layers = self.layers(model)
        shape = self.shape()
        for i, layer in enumerate(layers):
            blocks = shape.blocks(i)
            for site, block in self.layer_sites():
                if block is None or block in blocks:
                    if site in self.hidden_sites and not _has(layer, site):
                        continue  # hybrids: each layer has only some of the norms
                    layer.get_submodule(site)

    def layer_sites(self) -> list[tuple[str, str | None]]:
        """(module path, block that holds it) of every hooked module."""
        sites = [(self.attn_out, "attention"), (self.mlp_down, "mlp")]
        sites += [(self.experts_module, "moe"), (self.shared_down, "shared"), (self.mamba_in_proj, "mamba")]
        return [(name, block) for name, block in sites if name is not None]

    # ---- analytic parameter count ----------------------------------------------
    def axis_sizes(self, shape: Shape) -> dict[str, int]:
        """The length of every axis for a model of `shape`."""
        inner = shape.mamba_heads * shape.mamba_head_dim
        bc = 2 * shape.mamba_groups * shape.mamba_state
        return {
            HIDDEN: shape.hidden,
            FFN: shape.ffn,
            GATE_UP: 2 * shape.ffn,
            Q: shape.heads * shape.head_dim,
            KV: shape.kv_heads * shape.head_dim,
            QKV: (shape.heads + 2 * shape.kv_heads) * shape.head_dim,
            Q_HEADS: shape.heads,
            ROUTER: shape.experts,
            EXPERT: shape.experts,
            EXPERT_FFN: shape.moe_ffn,
            EXPERT_GATE_UP: 2 * shape.moe_ffn,
            EXPERT_GATE_UP_INTERLEAVED: 2 * shape.moe_ffn,
            SHARED_FFN: shape.shared_ffn,
            MAMBA_IN: 2 * inner + bc + shape.mamba_heads,
            MAMBA_CONV: inner + bc,
            MAMBA_INNER: inner,
            MAMBA_HEADS: shape.mamba_heads,
            VOCAB: shape.vocab,
            HEAD_DIM: shape.head_dim,
            ONE: 1,
            CONV_KERNEL: shape.mamba_conv,
        }

    def has_tensor(self, name: str) -> bool:
        """Whether a parameter of that name exists in this model (buffers do not count)."""
        if name in self.buffer_tensors:
            return False
        key = self.optional_tensors.get(name)
        return key is None or bool(getattr(self.config, key, False))

    def param_count(self, shape: Shape, active: bool = False) -> int:
        """Parameters of a model of this family with `shape`, counted from the tensor rules.

        `active=True` counts what one token uses: of the routed experts only the top-k
        (shared experts, routers and everything else in full).  Integer arithmetic only, so
        the width fields of `shape` may also be numpy integer arrays (the search counts a
        whole grid of shapes in one call); `layers` and `layer_blocks` must be plain.
        """
        if self.shape().layer_blocks and len(shape.layer_blocks) != shape.layers:
            raise SlimlmError(
                f"counting the parameters of a {self.config.model_type} shape needs its layer pattern "
                "(Shape.layer_blocks, one entry per layer)"
            )
        sizes = self.axis_sizes(shape)

        def numel(rule: dict[int, str]):
            n = 1
            for axis in rule.values():
                n = n * sizes[axis]
            if active and EXPERT in rule.values():  # a token runs top-k of the experts
                return n // sizes[EXPERT] * shape.experts_per_token
            return n

        total = 0
        for name, rule in self.top_tensors.items():
            if self.has_tensor(name) and not (name == "lm_head.weight" and shape.tied):
                total = total + numel(rule)
        blocks = [shape.blocks(layer) for layer in range(shape.layers)]
        used = {b for layer_blocks in blocks for b in layer_blocks} | {"norms"}
        per_block = {
            block: sum(numel(rule) for name, rule in rules.items() if self.has_tensor(name))
            for block, rules in self.layer_tensors.items() if block in used
        }
        for layer_blocks in blocks:
            total = total + per_block.get("norms", 0) + sum(per_block.get(b, 0) for b in layer_blocks)
        return total


_LAYER_NUMBER = re.compile(r"(?<=layers\.)\d+(?=\.)")
_EXPERT_NUMBER = re.compile(r"(?<=experts\.)(\d+)(?=\.)")


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _head_rows(heads, head_dim: int) -> torch.Tensor:
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _mamba_index(axis: str, kept_heads, s: Shape) -> torch.Tensor:
    """Kept positions of a Mamba-2 tensor dimension for the kept heads.

    in_proj rows are [z (inner) | x (inner) | B, C (2 x groups x state) | dt (heads)];
    conv1d channels are [x | B, C]; B and C are shared by the heads of a group, so they
    stay whole (every group keeps heads).
    """
    heads = torch.as_tensor(list(kept_heads), dtype=torch.long)
    inner_rows = _head_rows(heads, s.mamba_head_dim)
    inner = s.mamba_heads * s.mamba_head_dim
    bc = torch.arange(2 * s.mamba_groups * s.mamba_state)
    if axis == MAMBA_HEADS:
        return heads
    if axis == MAMBA_INNER:
        return inner_rows
    if axis == MAMBA_CONV:
        return torch.cat([inner_rows, inner + bc])
    return torch.cat([inner_rows, inner + inner_rows, 2 * inner + bc, 2 * inner + len(bc) + heads])
