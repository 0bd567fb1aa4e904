"""Qwen2: Llama's layout plus biases on the q/k/v projections."""

from .base import KV, Q, Adapter, with_tensors


class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
    layer_tensors = with_tensors(
        Adapter.layer_tensors,
        attention={
            "self_attn.q_proj.bias": {0: Q},
            "self_attn.k_proj.bias": {0: KV},
            "self_attn.v_proj.bias": {0: KV},
        },
    )

    def adjust_config(self, c, plan):
        # Layers at index >= max_window_layers use sliding windows; keep the same
        # layers sliding after depth pruning.
        mwl = getattr(self.config, "max_window_layers", None)
        if isinstance(mwl, int):
            c.max_window_layers = sum(1 for i in plan.kept_layers if i < mwl)
