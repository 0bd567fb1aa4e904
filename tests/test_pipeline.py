"""`slimlm run` and recipes: the whole pipeline on a tiny model, resume, clear recipe errors."""

import json

import pytest

from conftest import save_tiny, run_cli
from slimlm.errors import SlimlmError
from slimlm.recipe import load_recipe, parse_recipe


run = run_cli


def _recipe(tmp_path, text_file, extra=""):
    teacher = save_tiny("llama", tmp_path / "teacher", max_position_embeddings=256)
    text = f"""
teacher: {teacher}
data: {text_file}
importance:
  calib_samples: 4
  seq_len: 32
  heldout: 2
prune:
  hidden: 36
  ffn: 40
  heads: 3
  layers: 3
distill:
  tokens: 1024
  seq_len: 32
  micro_batch: 4
  global_batch: 8
  warmup: 1
  heldout: 2
eval:
  ppl: {text_file}
  max_tokens: 256
  seq_len: 32
  speed: true
  prompt_len: 8
  new_tokens: 4
{extra}"""
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_whole_pipeline_then_resume(tmp_path, text_file, capsys):
    recipe = _recipe(tmp_path, text_file)
    out = tmp_path / "run"
    code, stdout, err = run(["run", recipe, "-o", out, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    rows = {r["model"]: r for r in summary["rows"]}
    assert rows["teacher"]["parameters"] > rows["student"]["parameters"] == rows["pruned"]["parameters"]
    assert all(rows[m]["ppl"] for m in rows)
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["correct", "importance", "teacher_logits", "prune", "distill", "align", "eval", "report"]
    assert stages["correct"]["skipped"] and stages["teacher_logits"]["skipped"] and stages["align"]["skipped"]
    # The run's evaluation travels with the models it measured: eval.json and the model card.
    student_eval = json.loads((out / "student" / "eval.json").read_text())
    assert student_eval["role"] == "student" and student_eval["perplexity"]["ppl"] == rows["student"]["ppl"]
    assert "Not evaluated yet" not in (out / "student" / "README.md").read_text()
    assert (out / "eval" / "teacher" / "eval.json").exists()
    assert (out / "report" / "report.html").exists() and (out / "student" / "config.json").exists()
    assert (out / "recipe.yaml").read_text() == recipe.read_text()
    # Rerun: every stage is skipped.
    code, _, err = run(["run", recipe, "-o", out], capsys)
    assert code == 0 and "stage" not in err
    # --from distill redoes distill and everything after, not before.
    code, _, err = run(["run", recipe, "-o", out, "--from", "eval"], capsys)
    assert code == 0 and "stage eval" in err and "stage distill" not in err and "stage importance" not in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("distill:\n  tokns: 5\n", "tiny.yaml:2: distill.tokns: unknown key (did you mean 'tokens'?)"),
        ("prune:\n  hidden: many\n", "tiny.yaml:2: prune.hidden: expected int, got 'many'"),
        ("teachr: x\n", "tiny.yaml:1: teachr: unknown key (did you mean 'teacher'?)"),
        ("prune:\n  hidden: 8\nsearch:\n  target_params: 100\n", "not both"),
        ("prune: [1, 2]\n", "tiny.yaml:1: prune: expected a mapping"),
        ("prune:\n  hidden: 8\n  x: [\n", "not valid YAML"),
        ("distill:\n  tokens: 10\n", "names no size"),
    ],
)
def test_bad_recipes_name_the_key_and_line(tmp_path, text, message):
    with pytest.raises(SlimlmError) as err:
        parse_recipe(text, "tiny.yaml")
    assert message in str(err.value)


def test_bad_recipe_from_cli_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  hidden: 8\n  colour: red\n")
    code, _, err = run(["run", bad, "-o", tmp_path / "r"], capsys)
    assert code == 2 and "bad.yaml:3: prune.colour: unknown key" in err
    assert not (tmp_path / "r").exists()


def test_default_recipe_is_valid():
    r, _ = load_recipe(None)
    assert r.teacher == "smollm2-135m" and r.mode == "prune"


def test_multi_gpu_distill_is_launched_through_accelerate():
    from slimlm.config import DistillConfig
    from slimlm.pipeline import launch_command

    config = DistillConfig(tokens=1000, seq_len=8192, lr=3e-4, data="corpus/", gradient_checkpointing=True,
                           tensorboard=False)
    cmd = launch_command("configs/accelerate/fsdp2_8gpu.yaml", "t", "runs/x/pruned", "runs/x/student", config,
                         overwrite=True)
    assert cmd[:7] == ["accelerate", "launch", "--config_file", "configs/accelerate/fsdp2_8gpu.yaml", "-m", "slimlm", "distill"]
    joined = " ".join(cmd)
    assert "--teacher t --student runs/x/pruned --out runs/x/student" in joined
    assert "--data corpus/ --tokens 1000 --seq-len 8192 --lr 0.0003" in joined and "--resume" not in joined
    assert "--gradient-checkpointing" in cmd and "--no-tensorboard" in cmd and cmd[-1] == "--overwrite"
    # every flag it builds is one `slimlm distill` accepts
    from typer.main import get_command

    from slimlm.cli import build_app

    params = {o for p in get_command(build_app()).commands["distill"].params for o in p.opts + p.secondary_opts}
    assert {a for a in cmd[7:] if a.startswith("--")} <= params


def test_search_mode_ranks_rungs_into_the_report_and_reruns_on_new_settings(tmp_path, text_file, capsys):
    teacher = save_tiny("llama", tmp_path / "teacher", max_position_embeddings=256)
    recipe = tmp_path / "search.yaml"

    def write(budget):
        recipe.write_text(f"""
teacher: {teacher}
data: {text_file}
importance: {{calib_samples: 4, seq_len: 32, heldout: 2}}
search: {{target_params: 70000, tolerance: 0.15, max_candidates: 3, reduction: 2, search_budget: {budget}, hidden_step: 12,
          ffn_step: 16}}
distill: {{tokens: 512, seq_len: 32, micro_batch: 4, global_batch: 8, warmup: 1, heldout: 2}}
eval: {{ppl: {text_file}, max_tokens: 128, seq_len: 32}}
""")

    write(2048)  # 8 steps of 8 x 32 tokens: rungs of 3 x 1 and 2 x 2 more steps
    out = tmp_path / "run"
    code, _, err = run(["run", recipe, "-o", out], capsys)
    assert code == 0, err
    rung1 = json.loads((out / "search" / "rungs" / "rung-1.json").read_text())
    assert (rung1["candidates"], rung1["steps"], rung1["kept"]) == (2, 3, 1)
    winner = rung1["ranking"][0]
    pruned = json.loads((out / "pruned" / "config.json").read_text())
    assert (pruned["hidden_size"], pruned["intermediate_size"]) == (winner["hidden"], winner["ffn"])
    assert "rung 1: 2 candidates at 3 steps" in (out / "report" / "report.md").read_text()
    # Other search settings: the stage runs again into a cleared search folder (no refusal).
    write(2560)
    code, _, err = run(["run", recipe, "-o", out], capsys)
    assert code == 0, err
    assert "stage search" in err
    assert json.loads((out / "search" / "ladder.json").read_text())["budget_steps"] == 10
    assert json.loads((out / "search" / "rungs" / "rung-1.json").read_text())["steps"] == 4
