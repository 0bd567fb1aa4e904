"""Importance scores against hand computations on the full activation tensors."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from slimlm.adapters import get_adapter
from slimlm.errors import SlimlmError
from slimlm.importance import (
    Scores,
    block_removal_losses,
    estimate_importance,
    layer_removal_losses,
    magnitude_scores,
    parse_aggregation,
)
from slimlm.config import PruneConfig
from slimlm.plan import PrunePlan, make_plan
from slimlm.prune import prune_model

WINDOWS = torch.randint(3, 96, (10, 16), generator=torch.Generator().manual_seed(0))


def _capture(model, fam_module_names):
    """Record raw activations with our own hooks (outputs of norms, inputs of projections)."""
    seen = {name: [] for name in fam_module_names}
    handles = []
    for name in fam_module_names:
        mod = model.get_submodule(name)
        if name.endswith(("o_proj", "down_proj")):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].detach())))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, n=name: seen[n].append(o.detach())))
    with torch.no_grad():
        model(WINDOWS, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def _hand(x, seq, batch):
    v = {"mean": x.abs().mean(1), "l2": x.norm(dim=1), "var": x.var(1, unbiased=False)}[seq].double()
    return {"l2": v.pow(2).sum(0).sqrt(), "mean": v.mean(0), "var": v.var(0, unbiased=False)}[batch].float()


@pytest.mark.parametrize("agg", ["mean,l2", "mean,mean", "l2,l2", "var,var"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_width_scores_equal_hand_aggregation(family, agg):
    model = tiny_model(family)
    adapter = get_adapter(model)
    seq, batch = parse_aggregation(agg)
    # batch_size 3 does not divide 10 windows: streaming accumulation must still match.
    scores = estimate_importance(model, WINDOWS, aggregation=agg, batch_size=3, progress=False)
    names = [f"model.layers.{i}.{s}" for i in range(4) for s in adapter.hidden_sites]
    names += [f"model.layers.{i}.mlp.down_proj" for i in range(4)]
    names += [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    acts = _capture(model, names)
    hidden = sum(_hand(acts[f"model.layers.{i}.{s}"], seq, batch) for i in range(4) for s in adapter.hidden_sites)
    assert torch.allclose(scores.hidden, hidden, rtol=1e-4, atol=1e-6)
    for i in range(4):
        ffn = _hand(acts[f"model.layers.{i}.mlp.down_proj"], seq, batch)
        assert torch.allclose(scores.ffn[i], ffn, rtol=1e-4, atol=1e-6)
        channels = _hand(acts[f"model.layers.{i}.self_attn.o_proj"], seq, batch)
        heads = channels.view(6, 12).norm(dim=1)
        assert torch.allclose(scores.heads[i], heads, rtol=1e-4, atol=1e-6)


def test_block_importance_equals_one_minus_cosine():
    model = tiny_model("llama")
    scores = estimate_importance(model, WINDOWS, batch_size=4, progress=False)
    with torch.no_grad():
        hs = model(WINDOWS, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(3):  # the last hidden state is after the final norm
        want = 1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean()
        assert abs(scores.depth_scores["bi"][i].item() - want.item()) < 1e-5


def _direct_loss(model, ids):
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def _without(model, drop):
    adapter = get_adapter(model)
    s = adapter.shape()
    keep = [i for i in range(s.layers) if i not in drop]
    full = list(range(s.hidden))
    plan = PrunePlan(
        s, full, keep, {i: list(range(s.ffn)) for i in keep}, {i: list(range(s.heads)) for i in keep},
        {i: list(range(s.kv_heads)) for i in keep},
    )
    return prune_model(model, plan)


def test_depth_loss_metrics_equal_direct_losses():
    model = tiny_model("qwen3")
    held = WINDOWS[:4]
    base, inc = layer_removal_losses(model, held, batch_size=3, progress=False)
    assert abs(base - _direct_loss(model, held)) < 1e-5
    for i in range(4):
        assert abs(inc[i].item() - (_direct_loss(_without(model, {i}), held) - base)) < 1e-4
    blocks = block_removal_losses(model, held, 2, batch_size=4, progress=False)
    for start in range(3):
        assert abs(blocks[start] - _direct_loss(_without(model, {start, start + 1}), held)) < 1e-4


def test_magnitude_scores_equal_weight_norms():
    model = tiny_model("llama")
    s = magnitude_scores(model)
    sd = model.state_dict()
    L0 = "model.layers.0."
    want_ffn = (sd[L0 + "mlp.gate_proj.weight"].pow(2).sum(1) + sd[L0 + "mlp.up_proj.weight"].pow(2).sum(1)
                + sd[L0 + "mlp.down_proj.weight"].pow(2).sum(0)).sqrt()
    assert torch.allclose(s.ffn[0], want_ffn, rtol=1e-5)
    q = sd[L0 + "self_attn.q_proj.weight"].view(6, 12, 48).pow(2).sum((1, 2))
    o = sd[L0 + "self_attn.o_proj.weight"].view(48, 6, 12).pow(2).sum((0, 2))
    assert torch.allclose(s.heads[0], (q + o).sqrt(), rtol=1e-5)
    # hidden: embedding column (tied head counted with it in the state dict) + every reader/writer
    col = sd["model.embed_tokens.weight"].pow(2).sum(0) * 2 + sd["model.norm.weight"].pow(2)
    for i in range(4):
        p = f"model.layers.{i}."
        col = col + sd[p + "input_layernorm.weight"].pow(2) + sd[p + "post_attention_layernorm.weight"].pow(2)
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            col = col + sd[p + n + ".weight"].pow(2).sum(0)
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            col = col + sd[p + n + ".weight"].pow(2).sum(1)
    assert torch.allclose(s.hidden, col.sqrt(), rtol=1e-5)


def test_scores_round_trip_and_reuse(tmp_path):
    model = tiny_model("llama")
    scores = estimate_importance(model, WINDOWS[:6], heldout=WINDOWS[6:], block_sizes=(1, 2), progress=False)
    scores.save(tmp_path / "s.safetensors")
    again = Scores.load(tmp_path / "s.safetensors")
    assert torch.equal(again.hidden, scores.hidden) and torch.equal(again.ffn, scores.ffn)
    assert again.block_losses == scores.block_losses and set(again.depth_scores) == {"bi", "loss"}
    shape = get_adapter(model).shape()
    t = PruneConfig(hidden=36, ffn=40, heads=3, layers=2, depth_metric="block")
    assert make_plan(again, shape, t) == make_plan(scores, shape, t)


def test_bad_aggregation_and_kind():
    with pytest.raises(SlimlmError, match="SEQ,BATCH"):
        parse_aggregation("median,l2")
    with pytest.raises(SlimlmError, match="unknown importance"):
        estimate_importance(tiny_model("llama"), WINDOWS, importance="taylor")


def test_scores_for_another_model_are_refused(tmp_path):
    scores = estimate_importance(tiny_model("llama"), None, importance="random")
    other = get_adapter(tiny_model("llama", hidden_size=36)).shape()
    with pytest.raises(SlimlmError, match="do not match"):
        scores.check_matches(other)
