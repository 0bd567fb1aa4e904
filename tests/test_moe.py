"""Mixture of experts: hand slicing of 3-D expert tensors, REAP / frequency / expert-neuron scores
against hand computations, the never-routed expert (ranked last, dropped first, logits unchanged
where the router renormalises), top-k clamping, shard-by-shard pruning, info and CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import MOE_FAMILIES, run_cli, save_tiny, tiny_model
from slimlm.adapters import get_adapter
from slimlm.errors import SlimlmError
from slimlm.importance import Scores, estimate_importance, expert_neurons, expert_output, random_scores
from slimlm.config import PruneConfig
from slimlm.plan import make_plan, top_per_group
from slimlm.prune import checkpoint_shards, prune_checkpoint, prune_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
WINDOWS = torch.randint(3, 96, (10, 16), generator=torch.Generator().manual_seed(0))
ROUTED = MOE_FAMILIES + ("nemotron_h",)
# Calibration that contains the test inputs (IDS as the start of two windows): every expert the
# test inputs reach is reached in calibration.
CALIBRATION = torch.cat([WINDOWS, torch.cat([IDS, torch.randint(3, 96, (2, 4), generator=torch.Generator().manual_seed(2))], 1)])


def _plan(model, seed=3, **targets):
    shape = get_adapter(model).shape()
    return make_plan(random_scores(shape, seed=seed), shape, PruneConfig(**targets))


def _experts_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _capture_routing(model, ids):
    """(hidden, top-k index, top-k weights, output) of every experts module, in layer order."""
    seen = []
    handles = []
    for m in _experts_modules(model):
        def pre(mod, args, store=seen):
            store.append([args[0].detach(), args[1].detach(), args[2].detach()])

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(lambda mod, a, out, store=seen: store[-1].append(out.detach())))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


# ---- slicing ------------------------------------------------------------------------------------


def test_qwen2_moe_pruned_tensors_equal_hand_slicing():
    model = tiny_model("qwen2_moe")
    plan = _plan(model, hidden=40, experts=4, moe_ffn=16, shared_ffn=20, heads=3, drop_layers="2")
    new = prune_model(model, plan)
    sd, nsd = model.state_dict(), new.state_dict()
    H = torch.tensor(plan.kept_hidden)
    for new_i, old_i in enumerate(plan.kept_layers):
        o, n = f"model.layers.{old_i}.mlp.", f"model.layers.{new_i}.mlp."
        E = plan.kept_experts[old_i]
        assert len(E) == 4 and len(plan.kept_expert_ffn[old_i]) == 4
        assert torch.equal(nsd[n + "gate.weight"], sd[o + "gate.weight"][E][:, H])
        gate_up, down = sd[o + "experts.gate_up_proj"], sd[o + "experts.down_proj"]  # [6, 48, 48], [6, 48, 24]
        for j, e in enumerate(E):
            f = torch.tensor(plan.kept_expert_ffn[old_i][j])  # this expert's own neurons
            want = torch.cat([gate_up[e, :24][f], gate_up[e, 24:][f]])[:, H]
            assert torch.equal(nsd[n + "experts.gate_up_proj"][j], want)
            assert torch.equal(nsd[n + "experts.down_proj"][j], down[e][H][:, f])
        S = torch.tensor(plan.kept_shared_ffn[old_i])
        assert torch.equal(nsd[n + "shared_expert.gate_proj.weight"], sd[o + "shared_expert.gate_proj.weight"][S][:, H])
        assert torch.equal(nsd[n + "shared_expert.down_proj.weight"], sd[o + "shared_expert.down_proj.weight"][H][:, S])
        assert torch.equal(nsd[n + "shared_expert_gate.weight"], sd[o + "shared_expert_gate.weight"][:, H])
    c = new.config
    assert (c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size, c.num_hidden_layers) == (4, 16, 20, 3)
    assert len(c.layer_types) == 3
    with torch.no_grad():
        new(IDS)


def test_gpt_oss_interleaved_biased_transposed_experts_and_sinks_equal_hand_slicing():
    model = tiny_model("gpt_oss")
    plan = _plan(model, hidden=40, experts=3, moe_ffn=16, heads=3)
    new = prune_model(model, plan)
    sd, nsd = model.state_dict(), new.state_dict()
    H = torch.tensor(plan.kept_hidden)
    for i in range(4):
        o, n = f"model.layers.{i}.", f"model.layers.{i}."
        E, Q = plan.kept_experts[i], plan.kept_heads[i]
        assert torch.equal(nsd[n + "mlp.router.weight"], sd[o + "mlp.router.weight"][E][:, H])
        assert torch.equal(nsd[n + "mlp.router.bias"], sd[o + "mlp.router.bias"][E])
        assert torch.equal(nsd[n + "self_attn.sinks"], sd[o + "self_attn.sinks"][Q])
        for j, e in enumerate(E):
            f = torch.tensor(plan.kept_expert_ffn[i][j])
            cols = torch.stack([2 * f, 2 * f + 1], dim=1).reshape(-1)  # gate and up of neuron f stay adjacent
            assert torch.equal(nsd[n + "mlp.experts.gate_up_proj"][j], sd[o + "mlp.experts.gate_up_proj"][e][H][:, cols])
            assert torch.equal(nsd[n + "mlp.experts.gate_up_proj_bias"][j], sd[o + "mlp.experts.gate_up_proj_bias"][e][cols])
            assert torch.equal(nsd[n + "mlp.experts.down_proj"][j], sd[o + "mlp.experts.down_proj"][e][f][:, H])
            assert torch.equal(nsd[n + "mlp.experts.down_proj_bias"][j], sd[o + "mlp.experts.down_proj_bias"][e][H])
    with torch.no_grad():
        new(IDS)


def test_top_k_is_clamped_to_the_experts_kept():
    model = tiny_model("mixtral")
    new = prune_model(model, _plan(model, experts=1))
    assert new.config.num_local_experts == 1 and new.config.num_experts_per_tok == 1
    assert new.generate(IDS[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("family", ["qwen2_moe", "nemotron_h"])
def test_sharded_checkpoint_prunes_like_memory(tmp_path, family):
    model = tiny_model(family)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="40KB")
    assert len(checkpoint_shards(src)) > 1
    targets = dict(hidden=40, experts=4, moe_ffn=16, shared_ffn=20, heads=3, drop_layers="2")
    if family == "nemotron_h":
        targets.update(mamba_heads=4, ffn=50, drop_layers="3")
    plan = _plan(model, **targets)
    prune_checkpoint(src, plan, tmp_path / "out", {"test": True})
    from_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    in_memory = prune_model(model, plan)
    a, b = from_disk.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- importance -----------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", None])
@pytest.mark.parametrize("family", ROUTED)
def test_the_hook_recomputes_what_the_experts_module_computes(family, implementation):
    model = tiny_model(family)
    if implementation:
        model.set_experts_implementation(implementation)
    for experts, (hidden, index, weights, out) in zip(_experts_modules(model), _capture_routing(model, IDS)):
        want = torch.zeros_like(out, dtype=torch.float32)
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            y = expert_output(experts, expert_neurons(experts, hidden[token], e), e)
            want.index_add_(0, token, y * weights[token, slot, None])
        torch.testing.assert_close(want, out.float(), rtol=1e-4, atol=1e-5)


SEQ_BY_HAND = {"mean": lambda x: x.abs().mean(0), "l2": lambda x: x.norm(dim=0), "var": lambda x: x.var(0, unbiased=False)}
BATCH_BY_HAND = {"l2": lambda v: v.norm(dim=0), "mean": lambda v: v.mean(0), "var": lambda v: v.var(0, unbiased=False)}


@pytest.mark.parametrize("agg", ["mean,l2", "l2,mean", "var,var"])
def test_reap_frequency_and_expert_neurons_equal_hand_computation(agg):
    seq, batch = agg.split(",")
    model = tiny_model("qwen3_moe")
    scores = estimate_importance(model, WINDOWS, aggregation=agg, batch_size=3, progress=False)
    routing = _capture_routing(model, WINDOWS)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert len(routing) == len(moe_layers) == scores.experts["reap"].shape[0] == 3
    for row, (hidden, index, weights, _) in zip(range(3), routing):
        mlp = model.model.layers[moe_layers[row]].mlp.experts
        for e in range(6):
            token, slot = torch.where(index == e)
            g, u = (hidden[token] @ mlp.gate_up_proj[e].T).chunk(2, dim=-1)
            inner = F.silu(g) * u  # Qwen3-MoE's expert by hand
            out = inner @ mlp.down_proj[e].T
            reap = (weights[token, slot] * out.norm(dim=-1)).mean() if len(token) else torch.tensor(0.0)
            assert scores.experts["reap"][row, e].item() == pytest.approx(reap.item(), rel=1e-4, abs=1e-7)
            assert scores.experts["frequency"][row, e].item() == pytest.approx(len(token) / len(hidden), rel=1e-6)
            # neurons: the sequence reduction over each window's routed tokens, then the batch one over windows
            window = token // WINDOWS.shape[1]
            per_window = torch.stack([SEQ_BY_HAND[seq](inner[window == w].double()) for w in window.unique()])
            want = BATCH_BY_HAND[batch](per_window).float()
            torch.testing.assert_close(scores.expert_ffn[row, e], want, rtol=1e-4, atol=1e-6)


def _silence(model, family, j):
    """Make expert j unreachable for the router in every MoE layer."""
    with torch.no_grad():
        if family == "gpt_oss":
            for layer in model.model.layers:
                layer.mlp.router.bias[j] = -1e4
        elif family == "nemotron_h":
            for layer in model.model.layers:
                if hasattr(layer.mixer, "gate"):
                    layer.mixer.gate.e_score_correction_bias[j] = -1e4  # used for the choice only
        else:
            # These routers have no bias: give them one.  Hidden channel 0 is made a constant
            # input (embedding column 0.3; no layer writes it or reads it but the routers), so its
            # normalised value is positive for every token; expert j alone gets a large negative
            # weight on it.
            model.get_input_embeddings().weight[:, 0] = 0.3
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p[0] = 0.0  # writes
                elif name.endswith("experts.down_proj"):
                    p[:, 0] = 0.0
                elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                    "up_proj.weight", "shared_expert_gate.weight")):
                    p[:, 0] = 0.0  # reads
                elif name.endswith("experts.gate_up_proj"):
                    p[:, :, 0] = 0.0
                elif name.endswith("layernorm.weight"):
                    p[0] = 1.0
            for layer in model.model.layers:
                if hasattr(layer.mlp, "experts"):
                    layer.mlp.gate.weight[:, 0] = 0.0
                    layer.mlp.gate.weight[j, 0] = -1e3


@pytest.mark.parametrize("family", ROUTED)
def test_a_never_routed_expert_is_ranked_last_and_dropped_first(family):
    model = tiny_model(family)
    j = 2
    _silence(model, family, j)
    assert all((index != j).all() for _, index, _, _ in _capture_routing(model, CALIBRATION))
    scores = estimate_importance(model, CALIBRATION, batch_size=4, progress=False)
    shape = get_adapter(model).shape()
    for kind in ("reap", "frequency"):
        table = scores.experts[kind]
        assert (table[:, j] == 0).all() and (table.argmin(dim=1) == j).all()
        assert (torch.cat([table[:, :j], table[:, j + 1 :]], dim=1) > 0).all()
        plan = make_plan(scores, shape, PruneConfig(experts=5, expert_importance=kind))
        assert all(kept == [0, 1, 3, 4, 5] for kept in plan.kept_experts.values())
        assert plan.info["expert_importance"] == kind


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "nemotron_h"])
def test_dropping_a_never_routed_expert_keeps_the_logits_where_the_router_renormalises(family):
    """Top-k routing that renormalises over the chosen experts (softmax then renormalise, softmax
    of the top-k logits, or normalised sigmoids) never sees an expert outside the top-k."""
    model = tiny_model(family)
    if family == "qwen3_moe":
        assert model.config.norm_topk_prob
    _silence(model, family, 2)
    scores = estimate_importance(model, CALIBRATION, batch_size=4, progress=False)
    new = prune_model(model, make_plan(scores, get_adapter(model).shape(), PruneConfig(experts=5)))
    assert get_adapter(new).shape().experts == 5
    with torch.no_grad():
        for ids in (WINDOWS, IDS):
            torch.testing.assert_close(new(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_expert_importance_kinds_from_one_scores_file(tmp_path):
    model = tiny_model("qwen2_moe")
    scores = estimate_importance(model, WINDOWS, batch_size=4, progress=False)
    assert set(scores.experts) == {"reap", "frequency", "magnitude"}
    scores.save(tmp_path / "s.safetensors")
    again = Scores.load(tmp_path / "s.safetensors")
    assert set(again.experts) == set(scores.experts)
    assert torch.equal(again.expert_ffn, scores.expert_ffn) and torch.equal(again.shared_ffn, scores.shared_ffn)
    shape = get_adapter(model).shape()
    again.check_matches(shape)
    for kind in ("reap", "frequency", "magnitude", "random"):
        plan = make_plan(again, shape, PruneConfig(experts=3, expert_importance=kind))
        table = again.expert_scores(kind)
        for row, layer in enumerate(shape.layers_with("moe")):
            assert plan.kept_experts[layer] == sorted(table[row].argsort(descending=True)[:3].tolist())
    assert make_plan(again, shape, PruneConfig(experts=3)).info["expert_importance"] == "reap"
    # the magnitude stored beside activation scores is the magnitude baseline's
    from slimlm.importance import magnitude_scores

    torch.testing.assert_close(again.experts["magnitude"], magnitude_scores(model).experts["magnitude"])
    with pytest.raises(SlimlmError, match="unknown expert importance"):
        make_plan(again, shape, PruneConfig(experts=3, expert_importance="taylor"))
    with pytest.raises(SlimlmError, match="no 'reap' expert importance"):
        make_plan(random_scores(shape), shape, PruneConfig(experts=3, expert_importance="reap"))


def test_expert_magnitude_equals_weight_norms():
    from slimlm.importance import magnitude_scores

    model = tiny_model("mixtral")
    s = magnitude_scores(model)
    sd = model.state_dict()
    p = "model.layers.1.mlp."
    gate_up, down, router = sd[p + "experts.gate_up_proj"], sd[p + "experts.down_proj"], sd[p + "gate.weight"]
    want = (gate_up.pow(2).sum((1, 2)) + down.pow(2).sum((1, 2)) + router.pow(2).sum(1)).sqrt()
    torch.testing.assert_close(s.experts["magnitude"][1], want, rtol=1e-5, atol=0)
    neurons = (gate_up[:, :24].pow(2).sum(2) + gate_up[:, 24:].pow(2).sum(2) + down.pow(2).sum(1)).sqrt()
    torch.testing.assert_close(s.expert_ffn[1], neurons, rtol=1e-5, atol=0)


def test_bad_moe_targets_are_rejected():
    dense = tiny_model("llama")
    with pytest.raises(SlimlmError, match="no mixture-of-experts"):
        _plan(dense, experts=2)
    with pytest.raises(SlimlmError, match="no shared expert"):
        _plan(tiny_model("mixtral"), shared_ffn=8)
    with pytest.raises(SlimlmError, match="no dense MLP"):
        _plan(tiny_model("mixtral"), ffn=8)
    with pytest.raises(SlimlmError, match="larger than the model's 6"):
        _plan(tiny_model("olmoe"), experts=7)


def test_grouped_routing_keeps_the_same_number_of_experts_per_group():
    assert top_per_group(torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2, 0.3]), 2, 4) == [1, 2, 3, 5]
    model = tiny_model("nemotron_h", n_group=2, topk_group=1)
    shape = get_adapter(model).shape()
    assert shape.expert_groups == 2
    with pytest.raises(SlimlmError, match="multiple of the 2 routing groups"):
        _plan(model, experts=3)
    adapter = get_adapter(model)
    with pytest.raises(SlimlmError, match="at least 2 experts per group"):
        adapter.validate_shape(_plan(model, experts=2).target_shape)
    plan = _plan(model, experts=4)
    assert all(sum(e < 3 for e in kept) == 2 for kept in plan.kept_experts.values())
    with torch.no_grad():
        prune_model(model, plan)(IDS)


def test_info_and_cli_prune_of_a_moe_checkpoint(tmp_path, capsys, text_file):
    src = save_tiny("qwen3_moe", tmp_path / "moe")
    code, out, err = run_cli(["info", src, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["experts"] == 6 and info["experts_per_token"] == 2 and info["moe_ffn"] == 24
    model = tiny_model("qwen3_moe")
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["active_parameters"] < info["parameters"]
    code, out, err = run_cli(["prune", src, "-o", tmp_path / "out", "--experts", "4", "--moe-ffn", "16",
                              "--expert-importance", "frequency", "--data", text_file, "--calib-samples", "4",
                              "--seq-len", "16", "--heldout", "0", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["shape"]["experts"] == 4 and result["active_parameters_after"] < result["parameters_after"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.num_experts == 4 and config.moe_intermediate_size == 16
    plan = json.loads((tmp_path / "out" / "slimlm.json").read_text())["plan"]
    assert plan["info"]["expert_importance"] == "frequency" and len(plan["kept_expert_ffn_masks"]["0"]) == 4
    code, out, err = run_cli(["prune", src, "-o", tmp_path / "bad", "--mamba-heads", "2"], capsys)
    assert code == 2 and "no Mamba layers" in err and not (tmp_path / "bad").exists()
