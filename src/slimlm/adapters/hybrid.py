"""Hybrid Mamba-2 / attention families: Nemotron-H and Falcon-H1.

A Mamba-2 mixer has `heads` heads of `head_dim` channels in `groups` groups; the heads
of a group share that group's B and C (state projections).  Its input projection
writes [z | x | B | C | dt], the causal conv1d runs over [x | B | C], A_log, D and
dt_bias hold one value per head, and the gated RMSNorm normalises each group of
channels separately.  Pruning heads keeps the same number in every group
(Minitron-SSM), so B, C, the groups and the per-group norm stay valid; every tensor
above is sliced through the same kept heads.

- Nemotron-H: each layer is one block (`layers_block_type`: Mamba, attention, MLP or
  MoE with a shared expert), behind a single pre-norm; depth pruning trims the pattern.
- Falcon-H1: every layer runs attention and Mamba in parallel, then an MLP, with muP
  multipliers (scalars, kept); the Mamba width is written as `mamba_d_ssm`.
"""

from .base import (
    ATTENTION_BIASES,
    CONV_KERNEL,
    EXPERT,
    EXPERT_FFN,
    FFN,
    HIDDEN,
    MAMBA_CONV,
    MAMBA_HEADS,
    MAMBA_IN,
    MAMBA_INNER,
    MLP_BIASES,
    ONE,
    ROUTER,
    SHARED_FFN,
    VOCAB,
    Adapter,
    flagged,
)
from ..errors import SlimlmError
from .moe import check_expert_alignment

MAMBA_KEYS_NEMOTRON = {
    "mamba_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
    "mamba_groups": "n_groups",
    "mamba_state": "ssm_state_size",
    "mamba_conv": "conv_kernel",
}


def mamba_tensors(prefix: str) -> dict:
    return {
        f"{prefix}.in_proj.weight": {0: MAMBA_IN, 1: HIDDEN},
        f"{prefix}.in_proj.bias": {0: MAMBA_IN},
        f"{prefix}.conv1d.weight": {0: MAMBA_CONV, 1: ONE, 2: CONV_KERNEL},
        f"{prefix}.conv1d.bias": {0: MAMBA_CONV},
        f"{prefix}.dt_bias": {0: MAMBA_HEADS},
        f"{prefix}.A_log": {0: MAMBA_HEADS},
        f"{prefix}.D": {0: MAMBA_HEADS},
        f"{prefix}.norm.weight": {0: MAMBA_INNER},
        f"{prefix}.out_proj.weight": {0: HIDDEN, 1: MAMBA_INNER},
        f"{prefix}.out_proj.bias": {0: HIDDEN},
    }


def _renamed(rules: dict, old: str, new: str) -> dict:
    return {name.replace(old, new, 1): rule for name, rule in rules.items()}


class NemotronHAdapter(Adapter):
    model_types = ("nemotron_h",)
    hidden_sites = ("norm",)
    attn_out = "mixer.o_proj"
    mlp_down = "mixer.down_proj"
    experts_module = "mixer.experts"
    shared_down = "mixer.shared_experts.down_proj"
    mamba_in_proj = "mixer.in_proj"
    top_tensors = {
        "model.embeddings.weight": {0: VOCAB, 1: HIDDEN},
        "model.norm_f.weight": {0: HIDDEN},
        "lm_head.weight": {0: VOCAB, 1: HIDDEN},
    }
    layer_tensors = {
        "norms": {"norm.weight": {0: HIDDEN}},
        "attention": _renamed(Adapter.layer_tensors["attention"], "self_attn.", "mixer."),
        "mlp": {
            "mixer.up_proj.weight": {0: FFN, 1: HIDDEN},
            "mixer.up_proj.bias": {0: FFN},
            "mixer.down_proj.weight": {0: HIDDEN, 1: FFN},
            "mixer.down_proj.bias": {0: HIDDEN},
        },
        "moe": {
            "mixer.gate.weight": {0: ROUTER, 1: HIDDEN},
            "mixer.gate.e_score_correction_bias": {0: ROUTER},
            "mixer.experts.up_proj": {0: EXPERT, 1: EXPERT_FFN, 2: HIDDEN},
            "mixer.experts.down_proj": {0: EXPERT, 1: HIDDEN, 2: EXPERT_FFN},
        },
        "shared": {
            "mixer.shared_experts.up_proj.weight": {0: SHARED_FFN, 1: HIDDEN},
            "mixer.shared_experts.up_proj.bias": {0: SHARED_FFN},
            "mixer.shared_experts.down_proj.weight": {0: HIDDEN, 1: SHARED_FFN},
            "mixer.shared_experts.down_proj.bias": {0: HIDDEN},
        },
        "mamba": mamba_tensors("mixer"),
    }
    optional_tensors = {
        **flagged([n for n in layer_tensors["mlp"] if n.endswith(".bias")], "mlp_bias"),
        **flagged([n for n in layer_tensors["shared"] if n.endswith(".bias")], "mlp_bias"),
        "mixer.in_proj.bias": "use_bias",
        "mixer.out_proj.bias": "use_bias",
        "mixer.conv1d.bias": "use_conv_bias",
    }
    checkpoint_renames = (("backbone.", "model."),)
    checkpoint_expert_tensors = {
        "mixer.experts.{e}.up_proj.weight": {0: EXPERT_FFN, 1: HIDDEN},
        "mixer.experts.{e}.down_proj.weight": {0: HIDDEN, 1: EXPERT_FFN},
    }
    buffer_tensors = ("mixer.gate.e_score_correction_bias",)
    ties_embeddings = False  # NemotronHForCausalLM declares no tied weights
    #: multi-token-prediction weights, which the model ignores on load
    ignored_prefixes = ("mtp.",)
    config_keys = {
        **Adapter.config_keys,
        "layers": None,  # derived from layers_block_type
        "experts": "n_routed_experts",
        "experts_per_token": "num_experts_per_tok",
        "expert_groups": "n_group",
        "moe_ffn": "moe_intermediate_size",
        "shared_ffn": "moe_shared_expert_intermediate_size",
        **MAMBA_KEYS_NEMOTRON,
    }
    per_layer_config_keys = ("layers_block_type",)
    BLOCKS = {"linear_attention": "mamba", "full_attention": "attention", "mlp": "mlp", "moe": "moe+shared"}

    def check_config(self):
        if getattr(self.config, "moe_latent_size", None) is not None:
            raise SlimlmError("nemotron_h with a latent MoE projection (moe_latent_size) is not supported yet")

    def layer_blocks(self, config):
        return tuple(self.BLOCKS[kind] for kind in config.layers_block_type)

    def validate_shape(self, shape):
        super().validate_shape(shape)
        if shape.layer_blocks and not shape.layers_with("attention"):
            raise SlimlmError(
                "the pruned nemotron_h would keep no attention layer, which transformers cannot run with a cache; "
                "keep at least one attention layer"
            )
        if shape.layers_with("moe"):
            check_expert_alignment(shape)
        groups = shape.expert_groups
        if shape.experts and groups > 1:
            per_group = shape.experts // groups
            topk_group = getattr(self.config, "topk_group", 1)
            if per_group < 2 or topk_group * per_group < shape.experts_per_token:
                raise SlimlmError(
                    f"--experts {shape.experts}: the router scores each of its {groups} groups by its top-2 experts and "
                    f"picks {shape.experts_per_token} experts from {topk_group} groups; keep at least "
                    f"{max(2, -(-shape.experts_per_token // topk_group))} experts per group"
                )


class FalconH1Adapter(Adapter):
    model_types = ("falcon_h1",)
    hidden_sites = ("input_layernorm", "pre_ff_layernorm")
    mlp_down = "feed_forward.down_proj"
    mamba_in_proj = "mamba.in_proj"
    top_tensors = {**Adapter.top_tensors, "model.final_layernorm.weight": {0: HIDDEN}}
    del top_tensors["model.norm.weight"]
    layer_tensors = {
        "norms": {"input_layernorm.weight": {0: HIDDEN}, "pre_ff_layernorm.weight": {0: HIDDEN}},
        "attention": {**Adapter.layer_tensors["attention"], **ATTENTION_BIASES},
        "mlp": _renamed({**Adapter.layer_tensors["mlp"], **MLP_BIASES}, "mlp.", "feed_forward."),
        "mamba": mamba_tensors("mamba"),
    }
    optional_tensors = {
        **flagged(ATTENTION_BIASES, "attention_bias"),
        **flagged(_renamed(MLP_BIASES, "mlp.", "feed_forward."), "mlp_bias"),
        "mamba.in_proj.bias": "mamba_proj_bias",
        "mamba.out_proj.bias": "projectors_bias",
        "mamba.conv1d.bias": "mamba_conv_bias",
        "mamba.norm.weight": "mamba_rms_norm",
    }
    config_keys = {
        **Adapter.config_keys,
        "mamba_heads": "mamba_n_heads",
        "mamba_head_dim": "mamba_d_head",
        "mamba_groups": "mamba_n_groups",
        "mamba_state": "mamba_d_state",
        "mamba_conv": "mamba_d_conv",
    }
    per_layer_config_keys = ()  # layers_block_type is derived from num_hidden_layers

    def layer_blocks(self, config):
        return ("attention+mamba+mlp",) * config.num_hidden_layers

    def adjust_config(self, c, plan):
        new = plan.target_shape
        c.mamba_d_ssm = new.mamba_heads * new.mamba_head_dim  # else derived from hidden_size
