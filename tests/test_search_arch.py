"""Search and pipeline on mixture-of-experts and hybrid models: candidate shapes keep the layer pattern
and are counted exactly (total and active, against the pruned models), the active-parameter target,
the CLI and recipe on a tiny MoE, and the report's expert and Mamba-head plots."""

import json
import re

import pytest
import torch
from transformers import AutoConfig

from conftest import run_cli, save_tiny, tiny_model
from slimlm import search as search_module
from slimlm.adapters import get_adapter
from slimlm.config import SearchConfig
from slimlm.errors import SlimlmError
from slimlm.importance import random_scores
from slimlm.plan import make_plan
from slimlm.prune import prune_model
from slimlm.recipe import parse_recipe
from slimlm.search import axis_grids, enumerate_candidates, model_axes, prune_targets
from test_families import real_active

CASES = {
    "qwen3_moe": dict(mlp_only_layers=[]),  # every layer routes: depth is searched too
    "qwen3_moe-dense-layer": dict(),  # layer 1 is dense (conftest): the layers differ, depth stays
    "qwen2_moe": dict(),
    "mixtral": dict(),
    "nemotron_h": dict(),
    "falcon_h1": dict(),
}


def _model(case):
    return tiny_model(case.split("-")[0], **CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_candidates_keep_the_layer_pattern_and_are_counted_exactly(case):
    model = _model(case)
    adapter = get_adapter(model)
    s = adapter.shape()
    target = int(adapter.param_count(s) * 0.75)
    cands = enumerate_candidates(adapter, target_params=target, tolerance=0.1, hidden_step=8, ffn_step=8,
                                 expert_step=1, max_candidates=None)
    assert cands
    uniform = len(set(s.layer_blocks)) <= 1
    for axis in model_axes(s):  # every axis the family has is searched (depth only with uniform layers)
        values = {getattr(c.shape, axis) for c in cands}
        assert len(values) > 1 if (axis != "layers" or uniform) else values == {s.layers}, axis
    scores = random_scores(s, seed=1)
    for c in cands[:: max(1, len(cands) // 8)]:
        assert abs(c.params - target) <= 0.1 * target
        assert c.shape.layer_blocks == s.layer_blocks[: c.shape.layers]
        if s.experts:
            assert c.shape.hidden % 8 == 0 and c.shape.moe_ffn % 8 == 0  # grouped_mm alignment
            assert c.shape.experts_per_token == min(s.experts_per_token, c.shape.experts)
        if s.mamba_heads:
            assert c.shape.mamba_heads % s.mamba_groups == 0
        plan = make_plan(scores, s, prune_targets(c.shape, s, depth_metric="bi"))
        assert plan.target_shape == c.shape
        new = prune_model(model, plan)  # counted on the real pruned model
        assert sum(p.numel() for p in new.parameters()) == c.params
        assert real_active(new) == c.active_params


def test_an_active_target_keeps_the_experts_and_a_total_target_prunes_them():
    model = _model("qwen3_moe")
    adapter = get_adapter(model)
    s = adapter.shape()
    target = int(adapter.param_count(s, active=True) * 0.8)
    active = enumerate_candidates(adapter, target_active_params=target, tolerance=0.1, hidden_step=8, ffn_step=8,
                                  max_candidates=None)
    assert {c.shape.experts for c in active} == {s.experts}
    assert len({c.shape.moe_ffn for c in active}) > 1
    assert all(abs(c.active_params - target) <= 0.1 * target for c in active)
    assert [abs(c.active_params - target) for c in active] == sorted(abs(c.active_params - target) for c in active)
    total = enumerate_candidates(adapter, target_params=int(adapter.param_count(s) * 0.8), tolerance=0.1,
                                 hidden_step=8, ffn_step=8, expert_step=1, max_candidates=None)
    experts = {c.shape.experts for c in total}
    assert min(experts) < s.experts and min(experts) >= s.experts_per_token


def test_exactly_one_target(tmp_path, capsys):
    adapter = get_adapter(_model("qwen3_moe"))
    for kw in ({}, {"target_params": 1e5, "target_active_params": 1e5}):
        with pytest.raises(SlimlmError, match="exactly one of --target-params and --target-active-params"):
            enumerate_candidates(adapter, **kw)
    assert SearchConfig(target_active_params=5e4).target() == (50000, True)
    with pytest.raises(SlimlmError, match="between 0 and the model's .* active parameters"):
        enumerate_candidates(adapter, target_active_params=adapter.param_count(adapter.shape(), active=True))
    code, _, err = run_cli(["search", "m", "-o", tmp_path / "s"], capsys)
    assert code == 2 and "exactly one of --target-params and --target-active-params" in err
    with pytest.raises(SlimlmError, match=r"recipe: a search section needs exactly one of target_params and"):
        parse_recipe("search: {target_params: 1e6, target_active_params: 1e5}\n")
    assert parse_recipe("search: {target_active_params: 1.0e+5}\n").search.target() == (100000, True)


def test_a_large_grid_is_thinned_keeping_the_original_sizes(monkeypatch):
    adapter = get_adapter(_model("nemotron_h"))
    s = adapter.shape()
    config = SearchConfig(target_params=1e5, hidden_step=2, ffn_step=2, expert_step=1)
    full = axis_grids(adapter, config, active=False)
    monkeypatch.setattr(search_module, "MAX_GRID", 60)
    thin = axis_grids(adapter, config, active=False)
    sizes = [len(v) for v in thin.values()]
    assert 30 < torch.tensor(sizes).prod().item() <= 60
    for axis, values in thin.items():
        assert values[-1] == getattr(s, axis) and set(values) <= set(full[axis])


SEARCH_ARGS = ["--tolerance", "0.15", "--max-candidates", "3", "--reduction", "2", "--search-budget", "1536",
               "--calib-samples", "4", "--seq-len", "32", "--micro-batch", "4", "--global-batch", "8",
               "--hidden-step", "8", "--ffn-step", "8", "--heldout", "2", "--json"]


def test_search_a_moe_for_an_active_target_end_to_end(tmp_path, text_file, capsys):
    teacher = save_tiny("qwen3_moe", tmp_path / "teacher", max_position_embeddings=256, mlp_only_layers=[])
    adapter = get_adapter(tiny_model("qwen3_moe", mlp_only_layers=[]))
    target = int(adapter.param_count(adapter.shape(), active=True) * 0.8)
    out = tmp_path / "s"
    code, stdout, err = run_cli(["search", teacher, "-o", out, "--data", text_file, "--target-active-params", target]
                                + SEARCH_ARGS, capsys)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    winner = result["winner"]
    assert winner["experts"] == 6 and abs(winner["active_params"] - target) <= 0.15 * target
    config = AutoConfig.from_pretrained(out / "winner")
    assert (config.num_experts, config.moe_intermediate_size, config.hidden_size, config.num_hidden_layers) == (
        winner["experts"], winner["moe_ffn"], winner["hidden"], winner["layers"])
    assert "| expert ffn |" in (out / "ranking.md").read_text() and "| active |" in (out / "ranking.md").read_text()
    assert "active" in err  # the printed ranking shows active parameters


def test_recipe_prunes_experts_end_to_end_and_the_report_plots_them(tmp_path, text_file, capsys):
    teacher = save_tiny("qwen3_moe", tmp_path / "teacher", max_position_embeddings=256)
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(f"""
teacher: {teacher}
data: {text_file}
importance: {{calib_samples: 4, seq_len: 32, heldout: 2}}
prune: {{experts: 4, moe_ffn: 16, expert_importance: frequency}}
distill: {{tokens: 256, seq_len: 32, micro_batch: 4, warmup: 1, heldout: 2}}
eval: {{ppl: {text_file}, max_tokens: 128, seq_len: 32}}
""")
    out = tmp_path / "run"
    code, _, err = run_cli(["run", recipe, "-o", out], capsys)
    assert code == 0, err
    pruned, student = (AutoConfig.from_pretrained(out / role) for role in ("pruned", "student"))
    assert (pruned.num_experts, pruned.moe_intermediate_size) == (4, 16) == (
        student.num_experts, student.moe_intermediate_size)
    plan = json.loads((out / "pruned" / "slimlm.json").read_text())["plan"]
    assert plan["info"]["expert_importance"] == "frequency"
    from slimlm.importance import Scores

    freq = Scores.load(out / "scores.safetensors").experts["frequency"]  # one row per MoE layer (0, 2, 3)
    for row, layer in zip(freq, (0, 2, 3)):
        kept = plan["kept_experts"][str(layer)]
        dropped = [e for e in range(6) if e not in kept]
        assert len(kept) == 4 and row[kept].min() >= row[dropped].max()  # the most routed experts stay
    md = (out / "report" / "report.md").read_text()
    assert "![Expert importance](scores0_experts.png)" in md
    assert (out / "report" / "scores0_experts.png").stat().st_size > 1000
    for role in ("pruned", "student"):
        assert json.loads((out / role / "eval.json").read_text())["perplexity"]["ppl"] > 1


def test_expert_panels_show_reap_per_layer_and_frequency_as_is():
    from slimlm.evaluate.report import expert_panels, score_figures

    g = torch.Generator().manual_seed(0)
    reap, freq = torch.rand(3, 6, generator=g), torch.rand(3, 6, generator=g)
    freq[1, 2] = 0.0  # a never-routed expert
    panels = expert_panels({"experts_reap": reap, "experts_frequency": freq, "experts_magnitude": torch.rand(3, 6)})
    assert [p[0] for p in panels] == ["REAP (router-weighted activation norm)", "routing frequency"]
    assert torch.allclose(torch.from_numpy(panels[0][1]), reap / reap.max(dim=1, keepdim=True).values)
    assert torch.equal(torch.from_numpy(panels[1][1]), freq)
    baseline = expert_panels({"experts_magnitude": reap})
    assert [p[0] for p in baseline] == ["magnitude (baseline)"]
    mamba = torch.rand(2, 8, generator=g)
    figs = score_figures("x_", {"tensors": {"experts_reap": reap, "mamba_heads": mamba}, "meta": {}})
    assert [f.name for f in figs] == ["x_experts", "x_mamba_heads"] and all(f.png[:4] == b"\x89PNG" for f in figs)
    assert expert_panels({"heads": reap}) == []


def test_search_rungs_of_a_moe_show_its_axes_in_the_report(tmp_path):
    from slimlm.evaluate.report import write_report
    from slimlm.search import LADDER_FILE, Rung, write_rung

    search = tmp_path / "run" / "search"
    search.mkdir(parents=True)
    (search / LADDER_FILE).write_text("{}")

    def row(name, kl, experts):
        return {"candidate": name, "layers": 4, "hidden": 48, "ffn": 0, "heads": 6, "kv_heads": 3, "experts": experts,
                "moe_ffn": 16, "params": 90_000, "active_params": 40_000, "rung": 0, "steps": 1, "val_kl": kl,
                "val_lm_loss": 4.0}

    write_rung(search, Rung(0, 2, 1, 1), [row("A", 0.5, 6), row("B", 0.6, 4)], kept=1)
    write_report(tmp_path / "run")
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "| rank | candidate | layers | hidden | heads | experts | expert ffn | parameters | active | steps |" in md
    assert re.search(r"^\| 2 \| B \| 4 \| 48 \| 6 \| 4 \| 16 \| 0.09M \| 0.04M \| 1 \|", md, re.M)


@pytest.mark.parametrize("family", ["qwen2_moe", "nemotron_h"])
def test_the_memory_planners_student_config_has_the_pruned_moe_and_mamba_sizes(family):
    from slimlm.config import PruneConfig
    from slimlm.memory import student_config

    model = tiny_model(family)
    s = get_adapter(model).shape()
    targets = PruneConfig(hidden=40, experts=4, moe_ffn=16, shared_ffn=20, mamba_heads=4 if s.mamba_heads else None)
    planned = student_config(model.config, targets)
    real = prune_model(model, make_plan(random_scores(s, seed=0), s, targets)).config
    assert get_adapter(planned).shape() == get_adapter(real).shape()


def test_a_search_recipe_with_an_active_target_prunes_the_winner(tmp_path, text_file, capsys):
    teacher = save_tiny("qwen3_moe", tmp_path / "teacher", max_position_embeddings=256, mlp_only_layers=[])
    adapter = get_adapter(tiny_model("qwen3_moe", mlp_only_layers=[]))
    target = int(adapter.param_count(adapter.shape(), active=True) * 0.8)
    recipe = tmp_path / "search.yaml"
    recipe.write_text(f"""
teacher: {teacher}
data: {text_file}
importance: {{calib_samples: 4, seq_len: 32, heldout: 2}}
search: {{target_active_params: {target}, tolerance: 0.15, max_candidates: 3, reduction: 2, search_budget: 1024,
          hidden_step: 8, ffn_step: 8}}
distill: {{tokens: 256, seq_len: 32, micro_batch: 4, global_batch: 8, warmup: 1, heldout: 2}}
eval: {{ppl: {text_file}, max_tokens: 128, seq_len: 32}}
""")
    out = tmp_path / "run"
    code, _, err = run_cli(["run", recipe, "-o", out], capsys)
    assert code == 0, err
    winner = json.loads((out / "search" / "ranking.json").read_text())[0]
    pruned = AutoConfig.from_pretrained(out / "pruned")
    assert (pruned.hidden_size, pruned.moe_intermediate_size, pruned.num_attention_heads, pruned.num_experts) == (
        winner["hidden"], winner["moe_ffn"], winner["heads"], 6)
    assert "| expert ffn |" in (out / "report" / "report.md").read_text()
