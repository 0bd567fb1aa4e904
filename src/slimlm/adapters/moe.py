"""Mixture-of-experts families: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, gpt-oss.

transformers 5 stores a layer's routed experts as 3-D tensors in one experts module
(`mlp.experts`), e.g. gate_up_proj [experts, 2 x expert_ffn, hidden] and down_proj
[experts, hidden, expert_ffn], beside a router (`mlp.gate.weight`, one row per expert).
Pruning experts slices the expert dimension of both and the router's rows; pruning
expert neurons keeps, in each kept expert, its own best neurons (the same number in
every expert).  `num_experts_per_tok` is clamped to the experts kept.
"""

from .base import (
    ATTENTION_BIASES,
    EXPERT,
    EXPERT_FFN,
    EXPERT_GATE_UP,
    EXPERT_GATE_UP_INTERLEAVED,
    HEAD_DIM,
    HIDDEN,
    KV,
    ONE,
    Q,
    Q_HEADS,
    ROUTER,
    SHARED_FFN,
    Adapter,
    flagged,
    with_tensors,
)
from ..errors import SlimlmError

#: the router and the routed experts, as Qwen-MoE, Mixtral and OLMoE store them
ROUTED_EXPERTS = {
    "mlp.gate.weight": {0: ROUTER, 1: HIDDEN},
    "mlp.experts.gate_up_proj": {0: EXPERT, 1: EXPERT_GATE_UP, 2: HIDDEN},
    "mlp.experts.down_proj": {0: EXPERT, 1: HIDDEN, 2: EXPERT_FFN},
}

#: the same experts as checkpoints store them: one gate, up and down matrix per expert
CHECKPOINT_EXPERTS = {
    "mlp.experts.{e}.gate_proj.weight": {0: EXPERT_FFN, 1: HIDDEN},
    "mlp.experts.{e}.up_proj.weight": {0: EXPERT_FFN, 1: HIDDEN},
    "mlp.experts.{e}.down_proj.weight": {0: HIDDEN, 1: EXPERT_FFN},
}

MOE_KEYS = {"experts": "num_experts", "experts_per_token": "num_experts_per_tok", "moe_ffn": "moe_intermediate_size"}


def check_expert_alignment(shape) -> None:
    """transformers runs experts with torch's grouped_mm by default, which needs 16-byte aligned
    rows (seen with torch 2.13 on CPU: "strides should be multiple of 16 bytes"): multiples of 8 in bf16."""
    for name, value in (("hidden", shape.hidden), ("moe-ffn", shape.moe_ffn)):
        if value % 8:
            raise SlimlmError(
                f"--{name} {value}: mixture-of-experts models need the hidden and expert sizes divisible by 8 "
                "(transformers' default grouped_mm expert kernel needs 16-byte aligned rows)"
            )


class MoEAdapter(Adapter):
    """Every layer: attention + routed experts (no dense MLP)."""

    experts_module = "mlp.experts"
    checkpoint_expert_tensors = CHECKPOINT_EXPERTS

    def validate_shape(self, shape):
        super().validate_shape(shape)
        check_expert_alignment(shape)
    layer_tensors = {"norms": Adapter.layer_tensors["norms"], "attention": Adapter.layer_tensors["attention"], "moe": ROUTED_EXPERTS}
    moe_blocks = "attention+moe"

    def layer_blocks(self, config):
        return (self.moe_blocks,) * config.num_hidden_layers


class SparseStepMoEAdapter(MoEAdapter):
    """Qwen-MoE: layers listed in `mlp_only_layers` (or off the `decoder_sparse_step`) keep a dense MLP."""

    config_keys = {**Adapter.config_keys, **MOE_KEYS}

    def layer_blocks(self, config):
        dense = set(config.mlp_only_layers or ())
        step = config.decoder_sparse_step or 1
        return tuple(
            self.moe_blocks if i not in dense and config.num_experts > 0 and (i + 1) % step == 0 else "attention+mlp"
            for i in range(config.num_hidden_layers)
        )

    def adjust_config(self, c, plan):
        # After depth pruning the sparse-step rule no longer lines up: list the dense layers.
        blocks = plan.target_shape.layer_blocks
        c.mlp_only_layers = [i for i, b in enumerate(blocks) if "moe" not in b.split("+")]
        c.decoder_sparse_step = 1


class Qwen3MoeAdapter(SparseStepMoEAdapter):
    model_types = ("qwen3_moe",)
    layer_tensors = with_tensors(
        {**MoEAdapter.layer_tensors, "mlp": Adapter.layer_tensors["mlp"]},
        attention={**ATTENTION_BIASES, "self_attn.q_norm.weight": {0: HEAD_DIM}, "self_attn.k_norm.weight": {0: HEAD_DIM}},
    )
    optional_tensors = flagged(ATTENTION_BIASES, "attention_bias")


class Qwen2MoeAdapter(SparseStepMoEAdapter):
    """Qwen2-MoE: beside the routed experts, a shared expert scaled by a sigmoid gate."""

    model_types = ("qwen2_moe",)
    shared_down = "mlp.shared_expert.down_proj"
    moe_blocks = "attention+moe+shared"
    config_keys = {**SparseStepMoEAdapter.config_keys, "shared_ffn": "shared_expert_intermediate_size"}
    _qkv_biases = {name: rule for name, rule in ATTENTION_BIASES.items() if "o_proj" not in name}
    layer_tensors = with_tensors(
        {**MoEAdapter.layer_tensors, "mlp": Adapter.layer_tensors["mlp"]},
        attention=_qkv_biases,
        shared={
            "mlp.shared_expert.gate_proj.weight": {0: SHARED_FFN, 1: HIDDEN},
            "mlp.shared_expert.up_proj.weight": {0: SHARED_FFN, 1: HIDDEN},
            "mlp.shared_expert.down_proj.weight": {0: HIDDEN, 1: SHARED_FFN},
            "mlp.shared_expert_gate.weight": {0: ONE, 1: HIDDEN},
        },
    )
    optional_tensors = flagged(_qkv_biases, "qkv_bias")

    def adjust_config(self, c, plan):
        super().adjust_config(c, plan)
        mwl = getattr(self.config, "max_window_layers", None)
        if isinstance(mwl, int):  # the same layers keep sliding windows
            c.max_window_layers = sum(1 for i in plan.kept_layers if i < mwl)


class MixtralAdapter(MoEAdapter):
    """Mixtral: every layer routes; the experts' size is `intermediate_size`; the router renormalises the top-k."""

    model_types = ("mixtral",)
    checkpoint_renames = ((".block_sparse_moe.", ".mlp."),)
    checkpoint_expert_tensors = {
        "mlp.experts.{e}.w1.weight": {0: EXPERT_FFN, 1: HIDDEN},  # gate
        "mlp.experts.{e}.w3.weight": {0: EXPERT_FFN, 1: HIDDEN},  # up
        "mlp.experts.{e}.w2.weight": {0: HIDDEN, 1: EXPERT_FFN},  # down
    }
    config_keys = {
        **Adapter.config_keys,
        "ffn": None,
        "experts": "num_local_experts",
        "experts_per_token": "num_experts_per_tok",
        "moe_ffn": "intermediate_size",
    }


class OlmoeAdapter(MoEAdapter):
    """OLMoE: q/k RMSNorms over the whole projected width (sliced with the heads)."""

    model_types = ("olmoe",)
    config_keys = {**MixtralAdapter.config_keys, "experts": "num_experts"}
    layer_tensors = with_tensors(
        MoEAdapter.layer_tensors,
        attention={**ATTENTION_BIASES, "self_attn.q_norm.weight": {0: Q}, "self_attn.k_norm.weight": {0: KV}},
    )
    optional_tensors = flagged(ATTENTION_BIASES, "attention_bias")

    def validate_shape(self, shape):
        super().validate_shape(shape)
        # transformers sizes OLMoE's q_norm by hidden_size, its k_norm by
        # (hidden_size // heads) x kv_heads: both must equal the projected widths.
        if shape.hidden != shape.heads * shape.head_dim:
            raise SlimlmError(
                f"olmoe needs hidden = heads x head_dim (its q/k norms are sized from hidden_size): "
                f"hidden {shape.hidden} with {shape.heads} heads of {shape.head_dim}; prune --hidden and --heads together"
            )


class GptOssAdapter(MoEAdapter):
    """gpt-oss: biased experts with interleaved [g0, u0, g1, u1, ...] columns, stored transposed
    (gate_up_proj [experts, hidden, 2 x expert_ffn]); a biased router whose top-k logits are
    softmaxed (renormalised); one attention sink per query head."""

    model_types = ("gpt_oss",)
    checkpoint_expert_tensors = {}  # gpt-oss checkpoints keep the 3-D layout
    config_keys = MixtralAdapter.config_keys
    layer_tensors = with_tensors(
        MoEAdapter.layer_tensors,
        attention={**ATTENTION_BIASES, "self_attn.sinks": {0: Q_HEADS}},
    )
    layer_tensors["moe"] = {
        "mlp.router.weight": {0: ROUTER, 1: HIDDEN},
        "mlp.router.bias": {0: ROUTER},
        "mlp.experts.gate_up_proj": {0: EXPERT, 1: HIDDEN, 2: EXPERT_GATE_UP_INTERLEAVED},
        "mlp.experts.gate_up_proj_bias": {0: EXPERT, 1: EXPERT_GATE_UP_INTERLEAVED},
        "mlp.experts.down_proj": {0: EXPERT, 1: EXPERT_FFN, 2: HIDDEN},
        "mlp.experts.down_proj_bias": {0: EXPERT, 1: HIDDEN},
    }
    optional_tensors = flagged(ATTENTION_BIASES, "attention_bias")

    def validate_shape(self, shape):
        super().validate_shape(shape)
        if getattr(self.config, "quantization_config", None):
            raise SlimlmError(
                "this gpt_oss checkpoint is quantized (MXFP4); slimlm slices unquantized weights: save a dequantized "
                "copy first (from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True)).save_pretrained(...))"
            )
