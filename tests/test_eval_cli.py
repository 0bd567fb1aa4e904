"""`slimlm eval`: one run over a saved tiny model, eval.json beside it, errors before loading."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from slimlm.errors import SlimlmError
from slimlm.evaluate import evaluate, load_results, save_results
from slimlm.evaluate.cli import register


@pytest.fixture
def app():
    app = typer.Typer()
    register(app)
    return app


def test_eval_command_end_to_end(app, tiny_model_dir, text_file, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"question": q, "choices": ["yes", "no"], "answer": a}) + "\n" for q, a in (("is it", 0), ("no way", 1))))
    args = ["eval", str(tiny_model_dir), "--ppl", str(text_file), "--seq-len", "16", "--max-tokens", "64",
            "--tasks", "mc_local", "--task-data", f"mc={items}", "--speed", "--prompt-len", "8",
            "--new-tokens", "2", "--repeats", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    (model,) = out["models"]
    assert model["perplexity"]["tokens"] == 63 and model["perplexity"]["ppl"] > 1
    assert model["tasks"]["mc_local"]["samples"] == 2
    assert model["speed"]["decode_tokens_per_s"] > 0
    saved = load_results(tiny_model_dir)
    assert saved["perplexity"] == model["perplexity"] and saved["parameters"] == model["parameters"]


def test_results_merge_into_eval_json(tmp_path):
    """Later runs add sections; results of other weights are dropped."""
    save_results({"model": "m", "tasks": {"a": {"acc": 0.5}}, "speed": {"x": 1}}, tmp_path)
    save_results({"model": "m", "tasks": {"b": {"acc": 0.7}}, "perplexity": {"ppl": 3.0}}, tmp_path)
    merged = load_results(tmp_path / "eval.json")
    assert merged["tasks"] == {"a": {"acc": 0.5}, "b": {"acc": 0.7}}
    assert merged["speed"] == {"x": 1} and merged["perplexity"] == {"ppl": 3.0}
    (tmp_path / "model.safetensors").write_bytes(b"new weights")  # e.g. a new training run in the folder
    save_results({"model": "m", "perplexity": {"ppl": 2.0}}, tmp_path)
    assert load_results(tmp_path) == {"model": "m", "perplexity": {"ppl": 2.0}, "weights": load_results(tmp_path)["weights"]}


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "nothing to evaluate"),
        (["--ppl", "/nonexistent/file.txt"], "no readable data"),
        (["--speed", "--new-tokens", "-2"], "--new-tokens"),
        (["--ppl", "builtin:python-docs", "--stride", "999"], "--stride"),
        (["--tasks", "hellaswag_local"], "--task-data hellaswag=PATH"),
        (["--speed", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_mistakes_fail_before_a_model_loads(app, tiny_model_dir, monkeypatch, extra, message):
    import slimlm.models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(slimlm.models, "load_model", no_loading)
    result = CliRunner().invoke(app, ["eval", str(tiny_model_dir), *extra])
    assert isinstance(result.exception, SlimlmError), result.output
    assert message in str(result.exception)


def test_missing_model_is_a_user_error(app, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nope"), "--speed"])
    assert isinstance(result.exception, SlimlmError)


def test_real_cli_exits_2_with_one_line(capsys, tmp_path):
    from slimlm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", str(tmp_path / "missing-model"), "--speed"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_python_api_needs_a_tokenizer_with_a_model_object():
    from conftest import tiny_model

    with pytest.raises(SlimlmError, match="tokenizer"):
        evaluate(tiny_model("llama"), speed=True)
