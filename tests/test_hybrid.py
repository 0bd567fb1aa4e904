"""Hybrid Mamba-2 / attention models (Nemotron-H, Falcon-H1): group-aware Mamba-head slicing by
hand, an exact head-removal property, depth pruning of the layer pattern, and the importance of
Mamba heads and of the hybrid layers' norms against hand computations."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from slimlm.adapters import get_adapter
from slimlm.errors import SlimlmError
from slimlm.importance import estimate_importance, layers_removed, random_scores
from slimlm.config import PruneConfig
from slimlm.plan import make_plan
from slimlm.prune import prune_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
WINDOWS = torch.randint(3, 96, (6, 16), generator=torch.Generator().manual_seed(0))
NH, HD, G, N = 8, 6, 2, 8  # Mamba heads, head_dim, groups, state size of the tiny configs
INNER = NH * HD


def _plan(model, seed=3, **targets):
    shape = get_adapter(model).shape()
    return make_plan(random_scores(shape, seed=seed), shape, PruneConfig(**targets))


def _head_channels(heads):
    return torch.tensor([h * HD + c for h in heads for c in range(HD)])


def test_nemotron_h_mamba_mlp_moe_and_attention_slices_equal_hand_slicing():
    model = tiny_model("nemotron_h")
    plan = _plan(model, hidden=40, mamba_heads=4, ffn=48, heads=3, experts=4, moe_ffn=16, shared_ffn=16)
    new = prune_model(model, plan)
    sd, nsd = model.state_dict(), new.state_dict()
    H = torch.tensor(plan.kept_hidden)
    for i, kind in enumerate(model.config.layers_block_type):
        o = n = f"model.layers.{i}."
        assert torch.equal(nsd[n + "norm.weight"], sd[o + "norm.weight"][H])
        if kind != "linear_attention":
            continue
        heads = plan.kept_mamba_heads[i]
        assert [h // (NH // G) for h in heads] == [0, 0, 1, 1]  # two heads in each group
        ch = _head_channels(heads)
        w = sd[o + "mixer.in_proj.weight"]
        z, x, bc, dt = w[:INNER], w[INNER : 2 * INNER], w[2 * INNER : 2 * INNER + 2 * G * N], w[2 * INNER + 2 * G * N :]
        want = torch.cat([z[ch], x[ch], bc, dt[heads]])[:, H]
        assert torch.equal(nsd[n + "mixer.in_proj.weight"], want)
        conv = sd[o + "mixer.conv1d.weight"]
        assert torch.equal(nsd[n + "mixer.conv1d.weight"], torch.cat([conv[:INNER][ch], conv[INNER:]]))
        conv_b = sd[o + "mixer.conv1d.bias"]
        assert torch.equal(nsd[n + "mixer.conv1d.bias"], torch.cat([conv_b[:INNER][ch], conv_b[INNER:]]))
        for name in ("A_log", "D", "dt_bias"):
            assert torch.equal(nsd[n + f"mixer.{name}"], sd[o + f"mixer.{name}"][heads])
        assert torch.equal(nsd[n + "mixer.norm.weight"], sd[o + "mixer.norm.weight"][ch])
        assert torch.equal(nsd[n + "mixer.out_proj.weight"], sd[o + "mixer.out_proj.weight"][H][:, ch])
    c = new.config
    assert (c.mamba_num_heads, c.n_groups, c.mamba_head_dim) == (4, 2, 6)
    mixer = new.model.layers[0].mixer
    assert mixer.norm.group_size * c.n_groups == mixer.intermediate_size == 24
    assert (c.intermediate_size, c.n_routed_experts, c.moe_intermediate_size, c.moe_shared_expert_intermediate_size) == (48, 4, 16, 16)
    assert new.generate(IDS[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True).shape == (1, 9)


@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1"])
def test_mamba_heads_stay_grouped_and_the_model_runs(family, tmp_path):
    model = tiny_model(family)
    for keep in (2, 6):
        plan = _plan(model, mamba_heads=keep)
        for heads in plan.kept_mamba_heads.values():
            per_group = [sum(h // (NH // G) == g for h in heads) for g in range(G)]
            assert per_group == [keep // G] * G and heads == sorted(heads)
        new = prune_model(model, plan)
        new.save_pretrained(tmp_path / str(keep))
        again = AutoModelForCausalLM.from_pretrained(tmp_path / str(keep), dtype=torch.float32)
        assert get_adapter(again).shape().mamba_heads == keep
        with torch.no_grad():
            torch.testing.assert_close(again(IDS).logits, new(IDS).logits)
        assert again.generate(IDS[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True).shape == (1, 9)
    with pytest.raises(SlimlmError, match="multiple of the 2 Mamba groups"):
        _plan(model, mamba_heads=3)
    if family == "falcon_h1":
        assert new.config.mamba_d_ssm == 6 * HD and new.config.mamba_n_heads == 6


def test_removing_mamba_heads_that_write_nothing_leaves_the_logits_unchanged():
    """Without the gated norm (which couples a group's heads), a Mamba head whose out_proj columns
    are zero contributes nothing: removing it must leave every other head's computation (its z, x,
    dt, conv channels, A, D, and its group's B, C) intact, so the logits stay the same."""
    model = tiny_model("falcon_h1", mamba_rms_norm=False)
    silent = [1, 6]  # one head of each group
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mamba.out_proj.weight[:, _head_channels(silent)] = 0.0
    shape = get_adapter(model).shape()
    scores = random_scores(shape, seed=0)
    scores.mamba_heads[:, silent] = -1.0  # ranked last
    new = prune_model(model, make_plan(scores, shape, PruneConfig(mamba_heads=6)))
    assert all(heads == [0, 2, 3, 4, 5, 7] for heads in new_plan_heads(scores, shape))
    with torch.no_grad():
        torch.testing.assert_close(new(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)
    a = model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(new.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True), a)


def new_plan_heads(scores, shape):
    return make_plan(scores, shape, PruneConfig(mamba_heads=6)).kept_mamba_heads.values()


def test_nemotron_h_depth_pruning_trims_the_layer_pattern(tmp_path):
    model = tiny_model("nemotron_h")
    adapter = get_adapter(model)
    plan = _plan(model, drop_layers="1,3")
    new = prune_model(model, plan)
    kinds = model.config.layers_block_type
    assert new.config.layers_block_type == [kinds[i] for i in (0, 2, 4, 5)]
    assert new.config.num_hidden_layers == 4 and new.config.hybrid_override_pattern == "M*ME"
    assert plan.target_shape.layer_blocks == ("mamba", "attention", "mamba", "moe+shared")
    assert adapter.param_count(plan.target_shape) == sum(p.numel() for p in new.parameters())
    with torch.no_grad(), layers_removed(model, adapter, {1, 3}):
        ref = model(IDS, use_cache=False).logits
    assert model.config.layers_block_type == kinds  # restored
    with torch.no_grad():
        torch.testing.assert_close(new(IDS).logits, ref, rtol=0, atol=1e-5)
    new.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention", "moe"]
    assert again.generate(IDS[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True).shape == (1, 9)


def test_nemotron_h_without_attention_layers_is_refused():
    # transformers 5.24's hybrid cache needs one attention layer (get_seq_length fails without)
    model = tiny_model("nemotron_h")
    with pytest.raises(SlimlmError, match="attention layer"):
        get_adapter(model).validate_shape(_plan(model, drop_layers="2").target_shape)


def test_depth_metric_choice_on_a_hybrid_keeps_pattern_and_counts_consistent():
    model = tiny_model("nemotron_h")
    adapter = get_adapter(model)
    scores = estimate_importance(model, WINDOWS, batch_size=3, progress=False)
    plan = make_plan(scores, adapter.shape(), PruneConfig(layers=4, depth_metric="bi"))
    new = prune_model(model, plan)
    assert get_adapter(new).shape() == plan.target_shape
    assert adapter.param_count(plan.target_shape) == sum(p.numel() for p in new.parameters())
    from slimlm.plan import target_shape

    unknown = target_shape(PruneConfig(layers=4), adapter.shape())
    assert unknown.layer_blocks == ()  # which layers stay is not known before the plan
    with pytest.raises(SlimlmError, match="layer pattern"):
        adapter.param_count(unknown)


def _hand(x, seq="mean", batch="l2"):
    v = {"mean": x.abs().mean(1), "l2": x.norm(dim=1)}[seq].double()
    return {"l2": v.pow(2).sum(0).sqrt(), "mean": v.mean(0)}[batch].float()


@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1"])
def test_mamba_heads_and_hybrid_norms_importance_equal_hand_computation(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    scores = estimate_importance(model, WINDOWS, batch_size=4, progress=False)
    seen = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        for site in adapter.hidden_sites:
            handles.append(layer.get_submodule(site).register_forward_hook(
                lambda m, a, o, k=(i, site): seen.setdefault(k, []).append(o.detach())))
        if hasattr(layer, "mamba") or getattr(layer, "block_type", None) == "linear_attention":
            proj = layer.get_submodule(adapter.mamba_in_proj)
            handles.append(proj.register_forward_hook(lambda m, a, o, k=(i, "x"): seen.setdefault(k, []).append(o.detach())))
    with torch.no_grad():
        model(WINDOWS, use_cache=False)
    for h in handles:
        h.remove()
    sites = [k for k in seen if k[1] != "x"]
    assert len(sites) == scores.hidden_sites.shape[0] == (6 if family == "nemotron_h" else 8)
    hidden = sum(_hand(torch.cat(seen[k])) for k in sites)  # every layer's norms, Mamba layers' included
    torch.testing.assert_close(scores.hidden, hidden, rtol=1e-4, atol=1e-6)
    mamba_layers = [k for k in seen if k[1] == "x"]
    assert scores.mamba_heads.shape == (len(mamba_layers), NH)
    for row, key in enumerate(mamba_layers):
        x = torch.cat(seen[key])[..., INNER : 2 * INNER]  # the x part of [z | x | B | C | dt]
        heads = _hand(x).view(NH, HD).norm(dim=-1)
        torch.testing.assert_close(scores.mamba_heads[row], heads, rtol=1e-4, atol=1e-6)


def test_mamba_head_magnitude_counts_each_heads_own_weights():
    from slimlm.importance import magnitude_scores

    model = tiny_model("falcon_h1")
    s = magnitude_scores(model)
    sd = model.state_dict()
    p = "model.layers.2.mamba."
    per_head = lambda sq: sq.view(NH, HD).sum(-1)  # noqa: E731
    w = sd[p + "in_proj.weight"].pow(2).sum(1)
    want = per_head(w[:INNER]) + per_head(w[INNER : 2 * INNER]) + w[-NH:]
    want += per_head(sd[p + "conv1d.weight"].pow(2).sum((1, 2))[:INNER]) + per_head(sd[p + "conv1d.bias"].pow(2)[:INNER])
    want += sum(sd[p + n].pow(2) for n in ("A_log", "D", "dt_bias"))
    want += per_head(sd[p + "norm.weight"].pow(2)) + per_head(sd[p + "out_proj.weight"].pow(2).sum(0))
    torch.testing.assert_close(s.mamba_heads[2], want.sqrt(), rtol=1e-5, atol=0)


def test_moe_and_mamba_plan_round_trips_through_json():
    import json

    from slimlm.plan import PrunePlan

    model = tiny_model("nemotron_h")
    plan = _plan(model, hidden=40, mamba_heads=4, experts=4, moe_ffn=16, shared_ffn=16, drop_layers="3")
    data = json.loads(json.dumps(plan.to_dict()))
    assert set(data["kept_expert_ffn_masks"]) == {"1", "5"} and len(data["kept_expert_ffn_masks"]["1"]) == 4
    assert PrunePlan.from_dict(data) == plan
    assert data["target_shape"]["layer_blocks"] == ["mamba", "moe+shared", "attention", "mamba", "moe+shared"]
