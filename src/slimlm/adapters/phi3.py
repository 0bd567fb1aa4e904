"""Phi-3: fused qkv_proj ([q; k; v] rows) and gate_up_proj ([gate; up] rows)."""

from .base import FFN, GATE_UP, HIDDEN, Q, QKV, Adapter


class Phi3Adapter(Adapter):
    model_types = ("phi3",)
    layer_tensors = {
        "norms": Adapter.layer_tensors["norms"],
        "attention": {
            "self_attn.qkv_proj.weight": {0: QKV, 1: HIDDEN},
            "self_attn.o_proj.weight": {0: HIDDEN, 1: Q},
        },
        "mlp": {
            "mlp.gate_up_proj.weight": {0: GATE_UP, 1: HIDDEN},
            "mlp.down_proj.weight": {0: HIDDEN, 1: FFN},
        },
    }
