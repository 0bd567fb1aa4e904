"""Every family, old and new: identity prune, a real prune of every axis, save/reload/generate,
analytic parameter counts (total and active) against the real ones, family-specific rules."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ALL_FAMILIES, NEW_DENSE_FAMILIES, NEW_FAMILIES, tiny_config, tiny_model
from slimlm.adapters import get_adapter
from slimlm.errors import SlimlmError
from slimlm.importance import estimate_importance, random_scores
from slimlm.config import PruneConfig
from slimlm.plan import make_plan
from slimlm.prune import prune_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
WINDOWS = torch.randint(3, 96, (6, 16), generator=torch.Generator().manual_seed(0))


def every_axis(shape, family) -> dict:
    """Target sizes that prune every axis the model has (and one layer)."""
    t = dict(hidden=36, heads=3, layers=shape.layers - 1, depth_metric="bi")
    if shape.experts:  # grouped_mm expert kernels want multiples of 8
        t.update(hidden=40)
    if family == "olmoe":  # its q/k norms are sized from hidden_size: hidden = heads x head_dim
        t.update(hidden=32, heads=4, kv_heads=2)
    if shape.ffn:
        t["ffn"] = 50
    if shape.experts:
        t.update(experts=4, moe_ffn=16)
    if shape.shared_ffn:
        t["shared_ffn"] = 20
    if shape.mamba_heads:
        t["mamba_heads"] = 4
    return t


def real_active(model) -> int:
    """Parameters one token uses, counted on the model: routed experts count top_k / experts."""
    k = model.config.num_experts_per_tok if hasattr(model.config, "num_experts_per_tok") else None
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if type(module).__name__.endswith("Experts"):
            n = sum(p.numel() for p in module.parameters(recurse=False))
            total -= n - n * k // module.num_experts
    return total


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_keep_everything_reproduces_logits_and_reloads(family, tmp_path):
    model = tiny_model(family)
    shape = get_adapter(model).shape()
    new = prune_model(model, make_plan(random_scores(shape, seed=3), shape, PruneConfig()))
    with torch.no_grad():
        assert (new(IDS).logits - model(IDS).logits).abs().max().item() < 1e-4
    new.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert (again(IDS).logits - model(IDS).logits).abs().max().item() < 1e-4
    out = again.generate(IDS[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_axis_pruned_saves_reloads_and_generates(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    shape = adapter.shape()
    targets = PruneConfig(**every_axis(shape, family))
    scores = estimate_importance(model, WINDOWS, batch_size=4, progress=False)
    plan = make_plan(scores, shape, targets)
    adapter.validate_shape(plan.target_shape)
    new = prune_model(model, plan)
    got = get_adapter(new).shape()
    assert got == plan.target_shape
    new.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(again(IDS).logits, new(IDS).logits, atol=1e-5)
    assert again.generate(IDS[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True).shape == (1, 9)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_analytic_counts_total_and_active_equal_real(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    shape = adapter.shape()
    assert adapter.param_count(shape) == sum(p.numel() for p in model.parameters())
    assert adapter.param_count(shape, active=True) == real_active(model)
    plan = make_plan(random_scores(shape, seed=1), shape, PruneConfig(**every_axis(shape, family)))
    new = prune_model(model, plan)
    assert adapter.param_count(plan.target_shape) == sum(p.numel() for p in new.parameters())
    assert adapter.param_count(plan.target_shape, active=True) == real_active(new)
    if not shape.experts:
        assert adapter.param_count(shape, active=True) == adapter.param_count(shape)


def test_olmo2_qk_norms_are_sliced_with_their_heads():
    model = tiny_model("olmo2")
    shape = get_adapter(model).shape()
    plan = make_plan(random_scores(shape, seed=2), shape, PruneConfig(heads=2, kv_heads=1))
    new = prune_model(model, plan)
    for i in range(4):
        q, kv = plan.kept_heads[i], plan.kept_kv_heads[i]
        old_q = model.model.layers[i].self_attn.q_norm.weight.view(6, 12)
        old_k = model.model.layers[i].self_attn.k_norm.weight.view(3, 12)
        assert torch.equal(new.model.layers[i].self_attn.q_norm.weight, old_q[q].reshape(-1))
        assert torch.equal(new.model.layers[i].self_attn.k_norm.weight, old_k[kv].reshape(-1))
    with torch.no_grad():
        new(IDS)


def test_gemma2_scaled_embedding_and_softcapping_kept():
    model = tiny_model("gemma2")
    shape = get_adapter(model).shape()
    plan = make_plan(random_scores(shape, seed=2), shape, PruneConfig(hidden=36))
    new = prune_model(model, plan)
    H = torch.tensor(plan.kept_hidden)
    with torch.no_grad():  # the scaled embedding's output (weights x sqrt(hidden)) is unchanged on kept channels
        assert torch.allclose(new.get_input_embeddings()(IDS), model.get_input_embeddings()(IDS)[..., H], atol=1e-5)
        w = model.model.embed_tokens.weight[:, H] * math.sqrt(48 / 36)
        assert torch.allclose(new.model.embed_tokens.weight, w)
    assert new.config.final_logit_softcapping == model.config.final_logit_softcapping
    assert new.config.attn_logit_softcapping == model.config.attn_logit_softcapping


def test_granite_multipliers_kept():
    model = tiny_model("granite")
    shape = get_adapter(model).shape()
    new = prune_model(model, make_plan(random_scores(shape, seed=2), shape, PruneConfig(hidden=40, ffn=40)))
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert getattr(new.config, key) == getattr(model.config, key) != 1.0


def test_smollm3_per_layer_lists_follow_depth_pruning():
    model = tiny_model("smollm3")
    shape = get_adapter(model).shape()
    new = prune_model(model, make_plan(random_scores(shape, seed=2), shape, PruneConfig(drop_layers="1-2")))
    assert new.config.no_rope_layers == [model.config.no_rope_layers[i] for i in (0, 3)]
    assert new.config.layer_types == [model.config.layer_types[i] for i in (0, 3)]
    assert [layer.self_attn.use_rope for layer in new.model.layers] == [model.model.layers[i].self_attn.use_rope for i in (0, 3)]


@pytest.mark.parametrize("family", NEW_DENSE_FAMILIES)
def test_depth_pruned_dense_model_computes_the_original_without_those_layers(family):
    from slimlm.importance import layers_removed

    model = tiny_model(family)
    adapter = get_adapter(model)
    shape = adapter.shape()
    new = prune_model(model, make_plan(random_scores(shape, seed=2), shape, PruneConfig(drop_layers="1")))
    with torch.no_grad(), layers_removed(model, adapter, {1}):
        ref = model(IDS, use_cache=False).logits
    with torch.no_grad():
        assert torch.allclose(new(IDS).logits, ref, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_text", "granitemoehybrid"])
def test_refused_families_say_why_in_one_line(model_type):
    kw = {}
    if model_type == "granitemoehybrid":
        kw = dict(hidden_size=48, num_attention_heads=6, mamba_n_heads=8)
    config = AutoConfig.for_model(model_type, **kw)
    with pytest.raises(SlimlmError) as err:
        get_adapter(config)
    message = str(err.value)
    assert "\n" not in message and "supported: " in message and "nemotron_h" in message
    assert ("linear-attention" in message) == (model_type != "granitemoehybrid")


def test_hidden_sizes_transformers_refuses_are_refused_up_front():
    from slimlm.plan import target_shape

    adapter = get_adapter(tiny_config("gemma2"))
    with pytest.raises(SlimlmError, match="divisible"):
        adapter.validate_shape(target_shape(PruneConfig(hidden=40, heads=3), adapter.shape()))
    olmoe = get_adapter(tiny_config("olmoe"))
    with pytest.raises(SlimlmError, match="hidden = heads x head_dim"):
        olmoe.validate_shape(target_shape(PruneConfig(hidden=40), olmoe.shape()))
