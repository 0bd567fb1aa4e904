"""Architecture search: candidates near the target, ranking by short distillation, restart."""

import json

import pytest
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM

from conftest import save_tiny, tiny_config
from slimlm.adapters import get_adapter
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.search import enumerate_candidates


def test_candidates_are_within_tolerance_and_counted_exactly():
    config = tiny_config("llama", hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=3,
                         head_dim=16, num_hidden_layers=10, vocab_size=96)
    adapter = get_adapter(config)
    total = adapter.param_count(adapter.shape())
    target = int(total * 0.7)
    cands = enumerate_candidates(adapter, target, hidden_step=16, ffn_step=32, max_candidates=None)
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
        enumerate_candidates(adapter, int(total * 0.2))


def test_search_cli_ranks_and_resumes(tmp_path, text_file, capsys):
    teacher = save_tiny("llama", tmp_path / "teacher", max_position_embeddings=256)
    args = ["search", teacher, "-o", tmp_path / "s", "--target-params", "70000", "--data", text_file,
            "--tolerance", "0.15", "--max-candidates", "3", "--search-tokens", "512", "--calib-samples", "4",
            "--seq-len", "32", "--micro-batch", "4", "--global-batch", "8", "--hidden-step", "12", "--ffn-step", "16",
            "--json"]
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    ranking = result["ranking"]
    assert len(ranking) == 3
    kls = [r["val_kl"] for r in ranking]
    assert kls == sorted(kls)
    assert (tmp_path / "s" / "winner" / "config.json").exists()
    assert (tmp_path / "s" / "ranking.md").exists()
    # A restart reuses every finished candidate (their result files are not rewritten).
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "s" / "candidates").glob("*/result.json")}
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None)
    capsys.readouterr()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
