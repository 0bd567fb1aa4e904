"""Pruning: identity, hand slicing, GQA rules, depth, save/reload/generate, shards."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, NEW_DENSE_FAMILIES, NEW_FAMILIES, tiny_model
from slimlm.adapters import get_adapter
from slimlm.errors import SlimlmError
from slimlm.importance import random_scores
from slimlm.config import PruneConfig
from slimlm.plan import PrunePlan, choose_heads, make_plan, parse_layer_range
from slimlm.prune import checkpoint_shards, prune_checkpoint, prune_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def _plan(model, **targets):
    shape = get_adapter(model).shape()
    return make_plan(random_scores(shape, seed=3), shape, PruneConfig(**targets))


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_everything_reproduces_logits(family):
    model = tiny_model(family)
    new = prune_model(model, _plan(model))
    with torch.no_grad():
        diff = (new(IDS).logits - model(IDS).logits).abs().max().item()
    assert diff < 1e-5


@pytest.mark.parametrize("family", ("llama", "qwen2", "qwen3"))
def test_pruned_tensors_equal_hand_slicing(family):
    model = tiny_model(family)
    plan = _plan(model, hidden=32, ffn=50, heads=3, layers=3, depth_metric="bi")
    new = prune_model(model, plan)
    sd, nsd = model.state_dict(), new.state_dict()
    H = torch.tensor(plan.kept_hidden)
    hd = 12
    assert torch.equal(nsd["model.embed_tokens.weight"], sd["model.embed_tokens.weight"][:, H])
    assert torch.equal(nsd["model.norm.weight"], sd["model.norm.weight"][H])
    for new_i, old_i in enumerate(plan.kept_layers):
        o, n = f"model.layers.{old_i}.", f"model.layers.{new_i}."
        F_ = torch.tensor(plan.kept_ffn[old_i])
        Qh = torch.tensor(plan.kept_heads[old_i])
        KVh = torch.tensor(plan.kept_kv_heads[old_i])
        # heads as a [heads, head_dim, hidden] view: slicing whole heads by hand
        q = sd[o + "self_attn.q_proj.weight"].view(6, hd, 48)[Qh][:, :, H].reshape(-1, 32)
        assert torch.equal(nsd[n + "self_attn.q_proj.weight"], q)
        k = sd[o + "self_attn.k_proj.weight"].view(3, hd, 48)[KVh][:, :, H].reshape(-1, 32)
        assert torch.equal(nsd[n + "self_attn.k_proj.weight"], k)
        ow = sd[o + "self_attn.o_proj.weight"].view(48, 6, hd)[H][:, Qh].reshape(32, -1)
        assert torch.equal(nsd[n + "self_attn.o_proj.weight"], ow)
        assert torch.equal(nsd[n + "mlp.gate_proj.weight"], sd[o + "mlp.gate_proj.weight"][F_][:, H])
        assert torch.equal(nsd[n + "mlp.down_proj.weight"], sd[o + "mlp.down_proj.weight"][H][:, F_])
        assert torch.equal(nsd[n + "input_layernorm.weight"], sd[o + "input_layernorm.weight"][H])
        if family == "qwen2":
            qb = sd[o + "self_attn.q_proj.bias"].view(6, hd)[Qh].reshape(-1)
            assert torch.equal(nsd[n + "self_attn.q_proj.bias"], qb)
        if family == "qwen3":  # per-head norms act on head_dim: untouched
            assert torch.equal(nsd[n + "self_attn.q_norm.weight"], sd[o + "self_attn.q_norm.weight"])
    assert new.config.head_dim == hd and new.config.num_attention_heads == 3
    assert new.config.num_hidden_layers == 3


def test_phi3_fused_projections_sliced_per_part():
    model = tiny_model("phi3")
    plan = _plan(model, hidden=40, ffn=60, heads=3)
    new = prune_model(model, plan)
    sd, nsd = model.state_dict(), new.state_dict()
    H = torch.tensor(plan.kept_hidden)
    for layer in range(4):
        w = sd[f"model.layers.{layer}.self_attn.qkv_proj.weight"]
        q, k, v = w[: 6 * 12].view(6, 12, 48), w[72:108].view(3, 12, 48), w[108:].view(3, 12, 48)
        Qh, KVh = torch.tensor(plan.kept_heads[layer]), torch.tensor(plan.kept_kv_heads[layer])
        want = torch.cat([q[Qh].reshape(-1, 48), k[KVh].reshape(-1, 48), v[KVh].reshape(-1, 48)])[:, H]
        assert torch.equal(nsd[f"model.layers.{layer}.self_attn.qkv_proj.weight"], want)
        gu = sd[f"model.layers.{layer}.mlp.gate_up_proj.weight"]
        F_ = torch.tensor(plan.kept_ffn[layer])
        want = torch.cat([gu[:80][F_], gu[80:][F_]])[:, H]
        assert torch.equal(nsd[f"model.layers.{layer}.mlp.gate_up_proj.weight"], want)
    with torch.no_grad():
        assert new(IDS).logits.shape == (2, 12, 96)


def test_gemma_scaled_embedding_keeps_its_function():
    model = tiny_model("gemma3_text")
    plan = _plan(model, hidden=32)
    new = prune_model(model, plan)
    H = torch.tensor(plan.kept_hidden)
    with torch.no_grad():
        # The embedding output (weights times sqrt(hidden)) is the same on kept channels.
        old_e = model.get_input_embeddings()(IDS)[..., H]
        new_e = new.get_input_embeddings()(IDS)
        assert torch.allclose(new_e, old_e, atol=1e-5)
        # With tied embeddings, the final norm compensates the logit scale:
        # lm_head((1 + w') * x) == E[:, H] @ ((1 + w)[H] * x)
        x = torch.randn(5, 32)
        w_old = model.model.norm.weight[H]
        w_new = new.model.norm.weight
        want = (x * (1 + w_old)) @ model.lm_head.weight[:, H].T
        got = new.lm_head(x * (1 + w_new))
        assert torch.allclose(got, want, atol=1e-4)


def test_gqa_every_group_keeps_the_same_number_of_heads():
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.5, 0.4, 0.3, 0.7])  # 4 KV groups of 2
    heads, kv = choose_heads(scores, n_kv=4, keep_heads=4, keep_kv=4)
    assert heads == [1, 2, 4, 7] and kv == [0, 1, 2, 3]
    heads, kv = choose_heads(scores, n_kv=4, keep_heads=2, keep_kv=2)
    # groups ranked by the L2 norm of their heads: (0.1,0.9) and (0.8,0.2) win
    assert kv == [0, 1] and heads == [1, 2]


@pytest.mark.parametrize(
    "targets, message",
    [
        (dict(heads=4), "multiple of the 3 key/value heads"),
        (dict(heads=9), "larger than the model's 6"),
        (dict(kv_heads=2, heads=3), "multiple of the 2"),
        (dict(hidden=0), "at least 1"),
        (dict(layers=2, drop_layers="0-1"), "not both"),
        (dict(drop_layers="0-3"), "every layer"),
        (dict(drop_layers="2-9"), "outside layers"),
        (dict(depth_metric="nope"), "unknown depth metric"),
    ],
)
def test_bad_targets_are_rejected(targets, message):
    model = tiny_model("llama")
    with pytest.raises(SlimlmError, match=message):
        _plan(model, **targets)


def test_kv_head_pruning_keeps_gqa_valid():
    model = tiny_model("llama")
    plan = _plan(model, kv_heads=2, heads=4)
    new = prune_model(model, plan)
    assert new.config.num_key_value_heads == 2 and new.config.num_attention_heads == 4
    for layer in range(4):
        heads, kv = plan.kept_heads[layer], plan.kept_kv_heads[layer]
        assert [h // 2 for h in heads] == [g for g in kv for _ in range(2)]
    with torch.no_grad():
        new(IDS)


@pytest.mark.parametrize("family", ("llama", "qwen3", "gemma3_text"))
def test_depth_removal_then_generate_with_cache(family):
    model = tiny_model(family)
    plan = _plan(model, drop_layers="1-2")
    new = prune_model(model, plan)
    assert plan.kept_layers == [0, 3]
    assert [layer.self_attn.layer_idx for layer in new.model.layers] == [0, 1]
    if family == "gemma3_text":
        assert new.config.layer_types == [model.config.layer_types[0], model.config.layer_types[3]]
    out = new.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
    assert out.shape == (1, 10)
    # The depth-pruned model computes exactly the original with those layers skipped.
    from slimlm.importance import layers_removed

    with torch.no_grad(), layers_removed(model, get_adapter(model), {1, 2}):
        ref = model(IDS, use_cache=False).logits
    with torch.no_grad():
        assert torch.allclose(new(IDS).logits, ref, atol=1e-5)


def test_parse_layer_range():
    assert parse_layer_range("3-5,8", 10) == [3, 4, 5, 8]
    with pytest.raises(SlimlmError):
        parse_layer_range("x", 10)


def test_plan_round_trips_through_json():
    model = tiny_model("llama")
    plan = _plan(model, hidden=40, layers=3, depth_metric="loss" if False else "bi")
    again = PrunePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan


@pytest.mark.parametrize("family", ("llama", "phi3", "gemma3_text"))
def test_sharded_checkpoint_prunes_like_memory(tmp_path, family):
    model = tiny_model(family)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    assert len(checkpoint_shards(src)) > 1
    plan = _plan(model, hidden=36, ffn=40, heads=3, drop_layers="2")
    prune_checkpoint(src, plan, tmp_path / "out", {"test": True})
    from_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    in_memory = prune_model(model, plan)
    a, b = from_disk.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "out" / "slimlm.json").read_text()) == {"test": True}


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_parameter_count_matches_real(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    plan = _plan(model, hidden=40, ffn=64, heads=3, layers=3, depth_metric="bi")
    new = prune_model(model, plan)
    assert adapter.param_count(adapter.shape()) == sum(p.numel() for p in model.parameters())
    assert adapter.param_count(plan.target_shape) == sum(p.numel() for p in new.parameters())


def test_shapes_transformers_cannot_load_are_refused():
    adapter = get_adapter(tiny_model("llama"))
    from slimlm.plan import target_shape

    with pytest.raises(SlimlmError, match="divisible"):
        adapter.validate_shape(target_shape(PruneConfig(hidden=32, heads=3), adapter.shape()))


WIDTH = {"hidden": 36, "ffn": 40, "heads": 3}


@pytest.mark.parametrize("family, targets", [(f, {}) for f in FAMILIES + NEW_FAMILIES] + [
    (f, WIDTH) for f in FAMILIES + NEW_DENSE_FAMILIES], ids=lambda v: v if isinstance(v, str) else ("width" if v else "keep-all"))
def test_training_the_pruned_student_leaves_the_teacher_unchanged(family, targets):
    """Every tensor of a model pruned in memory owns its storage (KEEP axes too): one AdamW step on
    the student leaves the teacher bitwise unchanged."""
    teacher = tiny_model(family)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_model(teacher, _plan(teacher, **targets))
    teacher_storages = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    shared = [k for k, t in student.state_dict().items() if t.untyped_storage().data_ptr() in teacher_storages]
    assert not shared
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    student(IDS, labels=IDS).loss.backward()
    optimizer.step()
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())  # it trained
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
