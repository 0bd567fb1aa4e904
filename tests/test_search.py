"""Architecture search: candidates near the target, the successive-halving ladder and its compute, restart."""

import json

import pytest
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from conftest import save_tiny, tiny_config
from slimlm import search as search_module
from slimlm.adapters import get_adapter
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.search import enumerate_candidates, fit_ladder, ladder_steps, plan_ladder, rung_sizes


def _adapter():
    config = tiny_config("llama", hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=3,
                         head_dim=16, num_hidden_layers=10, vocab_size=96)
    return get_adapter(config)


def test_candidates_are_within_tolerance_and_counted_exactly():
    adapter = _adapter()
    total = adapter.param_count(adapter.shape())
    target = int(total * 0.7)
    cands = enumerate_candidates(adapter, target_params=target, hidden_step=16, ffn_step=32, max_candidates=None,
                                 max_width_prune=0.4, max_depth_prune=0.2)
    assert cands
    for c in cands:
        assert abs(c.params - target) <= 0.05 * target
        assert c.shape.layers >= 8 and c.shape.hidden >= 0.6 * 96 and c.shape.heads % 3 == 0
        assert c.shape.hidden % c.shape.heads == 0  # Llama configs need it to load
        cfg = tiny_config("llama", hidden_size=c.shape.hidden, intermediate_size=c.shape.ffn,
                          num_attention_heads=c.shape.heads, num_key_value_heads=3, head_dim=16,
                          num_hidden_layers=c.shape.layers, vocab_size=96)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
        model.tie_weights()
        assert sum(p.numel() for p in model.parameters()) == c.params
    # closest to the target first
    assert [abs(c.params - target) for c in cands] == sorted(abs(c.params - target) for c in cands)
    with pytest.raises(SlimlmError, match="no uniform shape"):
        enumerate_candidates(adapter, target_params=int(total * 0.2), max_width_prune=0.4, max_depth_prune=0.2)


def test_the_hidden_grid_follows_the_head_counts():
    """SmolLM2's shape (9 query heads, 3 KV heads): multiples of 64 leave only hidden 384 and 576
    loadable (divisible by 6 or 9 heads); the grid steps by 72 for those head counts instead,
    so hidden 432 (the fidelity study's hand-picked shape) is a candidate."""
    from slimlm.config import SearchConfig
    from slimlm.search import axis_grids

    smollm2 = get_adapter(tiny_config("llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                      num_key_value_heads=3, head_dim=64, num_hidden_layers=30, vocab_size=49152))
    config = SearchConfig(target_params=67_000_000)
    grids = axis_grids(smollm2, config, active=False)
    assert grids["heads"] == [6, 9]
    assert grids["hidden"] == [288, 360, 432, 504, 576]
    shapes = {(c.shape.layers, c.shape.hidden, c.shape.heads, c.shape.ffn)
              for c in enumerate_candidates(smollm2, config, max_candidates=None)}
    assert (30, 432, 6, 768) in shapes
    assert all(h % heads == 0 and h % 8 == 0 for _, h, heads, _ in shapes)
    # A step that already fits the heads is unchanged: 32 heads, step 64.
    llama = get_adapter(tiny_config("llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                    num_key_value_heads=8, head_dim=128, num_hidden_layers=4, vocab_size=1000))
    grid = axis_grids(llama, SearchConfig(target_params=10**8, prune_heads=False), active=False)["hidden"]
    assert grid == list(range(1856, 4097, 64))
    # Families that do not need the division keep the plain step.
    qwen3 = get_adapter(tiny_config("qwen3", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                    num_key_value_heads=3, head_dim=64, num_hidden_layers=4, vocab_size=1000))
    assert not qwen3.hidden_divisible_by_heads
    assert axis_grids(qwen3, config, active=False)["hidden"] == [320, 384, 448, 512, 576]


def test_wider_default_caps_and_a_spread_of_candidates():
    adapter = _adapter()
    s = adapter.shape()
    target = int(adapter.param_count(s) * 0.5)
    every = enumerate_candidates(adapter, target_params=target, hidden_step=16, ffn_step=32, tolerance=0.2, max_candidates=None)
    # The defaults reach 55 % width and 40 % depth pruning (the former caps were 40 % and 20 %).
    assert min(c.shape.layers for c in every) == 6 and min(c.shape.hidden for c in every) < 0.6 * s.hidden
    spread = enumerate_candidates(adapter, target_params=target, hidden_step=16, ffn_step=32, tolerance=0.2, max_candidates=8)
    assert len(spread) == 8 and len({c.name for c in spread}) == 8
    assert spread[0] == every[0]  # the closest to the target comes first
    # The spread's shapes are farther apart than the 8 closest to the target are.
    def closest_pair(cands):
        x = [(c.shape.layers / s.layers, c.shape.hidden / s.hidden, c.shape.ffn / s.ffn, c.shape.heads / s.heads)
             for c in cands]
        return min(sum((p - q) ** 2 for p, q in zip(a, b)) for i, a in enumerate(x) for b in x[i + 1:])
    assert closest_pair(spread) > 2 * closest_pair(every[:8])


@pytest.mark.parametrize("n", [1, 2, 5, 8, 24, 27, 32])
@pytest.mark.parametrize("budget", [40, 81, 160, 1001])
@pytest.mark.parametrize("reduction", [2, 3, 4])
def test_ladder_accounting(n, budget, reduction):
    try:
        rungs = plan_ladder(n, budget, reduction)
    except SlimlmError:
        assert budget // len(rung_sizes(n, reduction)) < n  # rung 0 could not give one step to each
        return
    sizes = [r.candidates for r in rungs]
    assert sizes == rung_sizes(n, reduction) and sizes[0] == n
    if n > 1:
        assert all(b == -(-a // reduction) for a, b in zip(sizes, sizes[1:])) and -(-sizes[-1] // reduction) == 1
    used = ladder_steps(rungs)
    assert used == sum(r.candidates * r.added for r in rungs)
    assert budget - sizes[-1] < used <= budget  # less than one step per finalist left unspent
    assert [r.steps for r in rungs] == [sum(x.added for x in rungs[: i + 1]) for i in range(len(rungs))]
    assert all(r.added >= 1 for r in rungs)
    # rung r gets an equal share of what the earlier rungs left
    spent = 0
    for i, r in enumerate(rungs):
        assert r.candidates * r.added <= (budget - spent) // (len(rungs) - i)
        spent += r.candidates * r.added


def test_fit_ladder_drops_candidates_the_budget_cannot_pay_for():
    rungs = fit_ladder(27, 78, 3)  # the default budget at 4 x 512 tokens a step
    assert [(r.candidates, r.added, r.steps) for r in rungs] == [(26, 1, 1), (9, 2, 3), (3, 11, 14)]
    assert ladder_steps(rungs) == 77
    rungs = fit_ladder(27, 156, 3)  # at 4 x 256
    assert [(r.candidates, r.added) for r in rungs] == [(27, 1), (9, 7), (3, 22)] and ladder_steps(rungs) == 156
    with pytest.raises(SlimlmError, match="search budget"):
        fit_ladder(5, 0, 3)


SEARCH_ARGS = ["--target-params", "70000", "--tolerance", "0.15", "--max-candidates", "5", "--reduction", "2",
               "--search-budget", "5120", "--calib-samples", "4", "--seq-len", "32", "--micro-batch", "4",
               "--global-batch", "8", "--hidden-step", "12", "--ffn-step", "16", "--heldout", "4", "--json"]


def _run(args, capsys):
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_search_runs_the_ladder_ranks_every_rung_and_resumes(tmp_path, text_file, capsys, monkeypatch):
    teacher = save_tiny("llama", tmp_path / "teacher", max_position_embeddings=256)
    out = tmp_path / "s"
    args = ["search", teacher, "-o", out, "--data", text_file] + SEARCH_ARGS
    # 20 steps of 8 x 32 tokens for 5 candidates halved: rungs of 5 x 1, 3 x 2, 2 x 4 steps = 19 steps.
    real, calls = search_module._distill_candidate, []

    def dies_in_rung_one(teacher, student, folder, *a, **kw):
        calls.append(folder.parent.name)
        if len(calls) == 7:  # the second candidate of rung 1
            raise KeyboardInterrupt
        return real(teacher, student, folder, *a, **kw)

    monkeypatch.setattr(search_module, "_distill_candidate", dies_in_rung_one)
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    assert exc.value.code == 130  # interrupted
    capsys.readouterr()
    rung0 = sorted((out / "candidates").glob("*/rung-0.json"))
    assert len(rung0) == 5 and (out / "rungs" / "rung-0.md").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "candidates").glob("*/rung-*.json")}
    assert len(stamps) == 6  # rung 0 done, one candidate of rung 1

    calls.clear()
    monkeypatch.setattr(search_module, "_distill_candidate", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    result = _run(args, capsys)
    assert len(calls) == 2 + 2  # the rest of rung 1, then rung 2: nothing finished is redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    rungs = result["rungs"]
    assert [len(r) for r in rungs] == [5, 3, 2]
    assert [r[0]["steps"] for r in rungs] == [1, 3, 7]
    assert result["steps_used"] == 19 and result["budget_steps"] == 20
    for i, rows in enumerate(rungs):
        kls = [row["val_kl"] for row in rows]
        assert kls == sorted(kls) and all(k is not None for k in kls)
        saved = json.loads((out / "rungs" / f"rung-{i}.json").read_text())
        assert [row["candidate"] for row in saved["ranking"]] == [row["candidate"] for row in rows]
        assert (out / "rungs" / f"rung-{i}.md").read_text().count("\n| ") == len(rows) + 1
        if i + 1 < len(rungs):  # the best of each rung, and only they, run the next one
            assert {row["candidate"] for row in rungs[i + 1]} == {row["candidate"] for row in rows[: len(rungs[i + 1])]}
    # The winner is the last survivor, and OUT/winner is its student after the whole ladder.
    winner = result["winner"]
    assert winner["candidate"] == rungs[-1][0]["candidate"] == result["ranking"][0]["candidate"]
    config = json.loads((out / "winner" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        winner["hidden"], winner["ffn"], winner["layers"])
    metrics = [json.loads(x) for x in (out / "candidates" / winner["candidate"] / "student" / "metrics.jsonl")
               .read_text().splitlines()]
    assert max(m["step"] for m in metrics if m.get("event") == "train") == 7  # continued, not restarted
    assert [m["step"] for m in metrics if m.get("event") == "eval"] == [0, 1, 3, 7]
    assert len(result["ranking"]) == 5 and (out / "ranking.md").exists()
    # Eliminated candidates keep their results, not their checkpoints.
    assert not list((out / "candidates").glob("*/student/run/checkpoints"))

    calls.clear()
    again = _run(args, capsys)  # a finished search is read back, nothing distilled
    assert calls == [] and again["winner"]["candidate"] == winner["candidate"]
    with pytest.raises(SystemExit) as exc:  # other settings in the same folder are refused
        main([str(a) for a in ["search", teacher, "-o", out, "--data", text_file] + SEARCH_ARGS[:-1] + ["--seed", "1"]])
    assert exc.value.code == 2
