"""Bad input, every command: one line on stderr, exit code 2, no traceback, nothing written.

Each row is a mistake a user makes.  The check: exit code 2; no "Traceback" anywhere; one
line on stderr, naming the problem; the output's folder holds exactly what it held before
(hidden files included); the inputs are untouched (sizes and modification times); no code
from a model folder ran.  Almost every row fails before any model loads.

Not here yet (the training core owns them and adds its rows): a NaN at step 1 leaving run
files behind (issue 14 item 7, trainer part); unpickling on resume (item 10); fp32 master
weights for in-memory students (item 12).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from conftest import run_cli, save_tiny, tiny_tokenizer

TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}a: {{ m['content'] }}</s>"
            "{% else %}{{ m['role'][0] }}: {{ m['content'] }};{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}a: {% endif %}")


def _recipe(teacher, data, extra: str = "") -> str:
    return f"""teacher: {teacher}
data: {data}
importance:
  calib_samples: 4
  seq_len: 32
  heldout: 2
prune:
  hidden: 36
  ffn: 40
  heads: 3
distill:
  tokens: 256
  seq_len: 32
  micro_batch: 4
  global_batch: 4
  warmup: 1
  heldout: 2
eval:
  seq_len: 32
{extra}"""


def _copy_model(src: Path, dst: Path, config=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every input the rows refer to, made once: a good tiny model and broken ones, data, recipes."""
    root = tmp_path_factory.mktemp("bad-input")
    d = root / "inputs"
    d.mkdir()
    m = save_tiny("llama", d / "model", max_position_embeddings=1024)
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(m)
    (d / "corpus.txt").write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)
    (d / "garbage.txt").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4000)))
    (d / "garbage.jsonl").write_bytes((d / "garbage.txt").read_bytes())
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (d / "chats.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(4)))
    (d / "prompts.jsonl").write_text(json.dumps({"prompt": "say hi"}) + "\n")
    _copy_model(m, d / "unknown-type", {"model_type": "frobnet"})
    custom = _copy_model(m, d / "custom-code", {"model_type": "mycustom",
                                                 "auto_map": {"AutoConfig": "conf.MyConfig",
                                                              "AutoModelForCausalLM": "conf.MyModel"}})
    # The code a crafted folder would run: it leaves a mark next to the inputs if imported.
    (custom / "conf.py").write_text(f"open({str(root / 'CODE-RAN')!r}, 'w').write('yes')\n")
    (_copy_model(m, d / "bad-json") / "config.json").write_text('{"model_type": "llama", ')
    weights = (m / "model.safetensors").read_bytes()
    (_copy_model(m, d / "truncated") / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (_copy_model(m, d / "garbage-weights") / "model.safetensors").write_bytes(os.urandom(2000))
    (_copy_model(m, d / "no-weights") / "model.safetensors").unlink()
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=96)).save_pretrained(d / "gpt2")
    (_copy_model(m, d / "bad-generation-config") / "generation_config.json").write_text("{")
    (d / "scores-garbage.safetensors").write_bytes(os.urandom(500))
    (d / "scores-truncated.safetensors").write_bytes(weights[:300])
    (d / "run" / "model").mkdir(parents=True)
    (d / "run" / "model" / "eval.json").write_text(json.dumps({"model": "m", "perplexity": {"ppl": 3.0, "tokens": 9}}))
    (d / "good.yaml").write_text(_recipe(m, d / "corpus.txt"))
    (d / "bad-key.yaml").write_text(_recipe(m, d / "corpus.txt", "distill2:\n  tokens: 5\n"))
    (d / "truncated-teacher.yaml").write_text(_recipe(d / "truncated", d / "corpus.txt"))
    (d / "garbage-data.yaml").write_text(_recipe(m, d / "garbage.txt"))
    (d / "long-eval.yaml").write_text(_recipe(m, d / "corpus.txt").replace("eval:\n  seq_len: 32", "eval:\n  seq_len: 4096"))
    return root


SEARCH = ["--target-params", "8e4", "--hidden-step", "8", "--ffn-step", "8"]  # two candidates for the tiny model

# (command line, what the one line says).  {IN}: the inputs folder, {M}: the good model,
# {OUT}: a new output in the case's own folder {W}, which holds existing.txt, existing/keep.txt
# and .hidden.
CASES = [
    # usage errors (typer's own click exceptions)
    (["frobnicate"], "No such command"),
    (["info", "{M}", "--bogus"], "No such option: --bogus"),
    (["info"], "Missing argument"),
    (["prune", "{M}"], "Missing option '--output'"),
    (["prune", "{M}", "-o", "{OUT}", "--hidden", "3.5"], "Invalid value for '--hidden'"),
    (["eval", "{M}", "--ppl", "{IN}/corpus.txt", "--seq-len", "abc"], "Invalid value for '--seq-len'"),
    (["search", "{M}", "-o", "{OUT}", "--target-params", "many"], "Invalid value for '--target-params'"),
    # info
    (["info", "{IN}/unknown-type"], "unknown model type 'frobnet'; slimlm supports llama"),
    (["info", "{IN}/custom-code"], "auto_map), which slimlm never does"),
    (["info", "{IN}/bad-json"], "is not valid JSON"),
    (["info", "{IN}/nope"], "model not found"),
    (["info", "{IN}/gpt2"], "unsupported model family 'gpt2'"),
    # importance
    (["importance", "{M}", "-o", "{OUT}.safetensors", "--data", "{IN}/garbage.txt"], "not UTF-8 text"),
    (["importance", "{IN}/truncated", "-o", "{OUT}.safetensors"], "not a readable safetensors file"),
    (["importance", "{IN}/no-weights", "-o", "{OUT}.safetensors"], "has no weights"),
    (["importance", "{M}", "-o", "/proc/slimlm/scores.safetensors"], "cannot write the output"),
    (["importance", "{M}", "-o", "{M}/model.safetensors", "--overwrite"], "is a file of the input model"),
    (["importance", "{M}", "-o", "{W}/existing.txt"], "already exists"),
    (["importance", "{M}", "-o", "{W}/existing", "--overwrite"], "is a folder, and this command writes a file"),
    (["importance", "{M}", "-o", "{OUT}.safetensors", "--seq-len", "4096"], "past the model's limit"),
    (["importance", "{M}", "-o", "{OUT}.safetensors", "--dtype", "int3"], "unknown dtype 'int3'"),
    # prune
    (["prune", "{M}", "-o", "{M}", "--overwrite", "--hidden", "36"], "is the input"),
    (["prune", "{M}", "-o", "{IN}", "--overwrite", "--hidden", "36"], "holds the input"),
    (["prune", "{M}", "-o", "{W}/existing.txt", "--overwrite", "--hidden", "36"], "is a file, and this command writes a folder"),
    (["prune", "{IN}/garbage-weights", "-o", "{OUT}", "--hidden", "36"], "not a readable safetensors file"),
    (["prune", "{IN}/custom-code", "-o", "{OUT}", "--hidden", "36"], "auto_map"),
    (["prune", "{M}", "-o", "{OUT}", "--hidden", "36", "--scores", "{IN}/scores-garbage.safetensors"], "not a slimlm scores file"),
    (["prune", "{M}", "-o", "{OUT}", "--hidden", "36", "--scores", "{IN}/scores-truncated.safetensors"], "not a slimlm scores file"),
    (["prune", "{M}", "-o", "/proc/slimlm/out", "--hidden", "36"], "cannot write the output"),
    (["prune", "{M}", "-o", "{OUT}", "--hidden", "36", "--save-scores", "{M}/model.safetensors"], "is a file of the input model"),
    (["prune", "{M}", "-o", "{OUT}", "--hidden", "36", "--data", "{IN}/garbage.txt"], "not UTF-8 text"),
    (["prune", "{M}", "-o", "{OUT}", "--hidden", "36", "--device-map", "nowhere"], "--device-map must be"),
    (["prune", "{M}", "-o", "{OUT}", "--hidden", "36", "--save-scores", "/dev/null"], "not a regular file"),
    # search
    (["search", "{M}", "-o", "{OUT}", *SEARCH, "--data", "{IN}/garbage.txt"], "not UTF-8 text"),
    (["search", "{M}", "-o", "{OUT}", *SEARCH, "--scores", "{IN}/scores-garbage.safetensors"], "not a slimlm scores file"),
    (["search", "{IN}/truncated", "-o", "{OUT}", *SEARCH], "not a readable safetensors file"),
    (["search", "{M}", "-o", "/proc/slimlm/search", *SEARCH], "cannot write the search folder"),
    (["search", "{M}", "-o", "{OUT}", "--target-params", "1e12"], "--target-params must be between"),
    (["search", "{M}", "-o", "{W}/existing", *SEARCH], "already exists"),
    (["search", "{M}", "-o", "{OUT}", *SEARCH, "--seq-len", "4096"], "past the model's limit"),
    (["search", "{M}", "-o", "{OUT}", "--target-params", "nan"], "--target-params must be"),
    (["search", "{M}", "-o", "{OUT}", *SEARCH, "--hidden-step", "0"], "--hidden-step must be at least 1"),
    (["search", "{M}", "-o", "{OUT}", *SEARCH, "--max-width-prune", "1.5"], "--max-width-prune must be a fraction"),
    # distill
    (["distill", "-t", "{M}", "-s", "{IN}/truncated", "-o", "{OUT}", "--data", "{IN}/corpus.txt"], "not a readable safetensors file"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "{OUT}", "--data", "{IN}/garbage.txt"], "not UTF-8 text"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "/proc/slimlm/d", "--data", "{IN}/corpus.txt"], "cannot write the output"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "{OUT}", "--token-cache", "/proc/slimlm/cache"], "cannot write the token cache"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "{OUT}", "--tokens", "lots"], "--tokens must be a number"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "{OUT}", "--lr", "inf"], "--lr must be a finite number"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "{OUT}", "--temperature", "nan"], "--temperature must be"),
    (["distill", "-t", "{IN}/unknown-type", "-s", "{M}", "-o", "{OUT}"], "unknown model type 'frobnet'"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "{IN}", "--overwrite", "--data", "{IN}/corpus.txt"], "holds the input"),
    (["distill", "-t", "{M}", "-s", "{M}", "-o", "{OUT}", "--seq-len", "4096"], "max_position_embeddings"),
    (["distill", "-t", "{M}", "-s", "{IN}/bad-generation-config", "-o", "{OUT}"], "generation_config.json is not valid JSON"),
    # teacher-logits, and the commands that read its cache
    (["teacher-logits", "{M}", "-o", "{OUT}", "--data", "{IN}/garbage.txt"], "not UTF-8 text"),
    (["teacher-logits", "{IN}/truncated", "-o", "{OUT}"], "not a readable safetensors file"),
    (["teacher-logits", "{IN}/unknown-type", "-o", "{OUT}"], "unknown model type 'frobnet'"),
    (["teacher-logits", "{M}", "-o", "{IN}", "--overwrite"], "holds the input"),
    (["teacher-logits", "{M}", "-o", "{W}", "--overwrite", "--data", "{W}/existing.txt"], "holds the input"),
    (["teacher-logits", "{M}", "-o", "{W}/existing"], "already exists"),
    (["teacher-logits", "{M}", "-o", "{W}/existing.txt", "--overwrite"], "is a file, and this command writes a folder"),
    (["teacher-logits", "{M}", "-o", "/proc/slimlm/logits"], "cannot write the output"),
    (["teacher-logits", "{M}", "-o", "{OUT}", "--top-k", "100000"], "larger than the teacher's vocabulary"),
    (["teacher-logits", "{M}", "-o", "{OUT}", "--top-k", "0"], "--top-k must be at least 1"),
    (["teacher-logits", "{M}", "-o", "{OUT}", "--seq-len", "4096"], "max_position_embeddings"),
    (["distill", "-s", "{M}", "-o", "{OUT}", "--teacher-logits", "{W}/existing"], "is not a teacher-logits cache"),
    (["distill", "-s", "{M}", "-o", "{OUT}", "--teacher-logits", "{IN}/nope"], "nope"),
    (["search", "{M}", "-o", "{OUT}", *SEARCH, "--teacher-logits", "{W}/existing"], "is not a teacher-logits cache"),
    # correct-teacher
    (["correct-teacher", "{IN}/truncated", "-o", "{OUT}", "--data", "{IN}/corpus.txt"], "not a readable safetensors file"),
    (["correct-teacher", "{M}", "-o", "{OUT}", "--data", "{IN}/garbage.txt"], "not UTF-8 text"),
    (["correct-teacher", "{M}", "-o", "{M}", "--overwrite"], "is one of the input models"),
    (["correct-teacher", "{IN}/custom-code", "-o", "{OUT}"], "auto_map"),
    (["correct-teacher", "{M}", "-o", "{W}/existing", "--data", "{IN}/corpus.txt"], "already exists"),
    # eval
    (["eval", "{M}", "--ppl", "{IN}/corpus.txt", "--seq-len", "4096"], "past the limit"),
    (["eval", "{M}", "--speed", "--prompt-len", "1000", "--new-tokens", "32"], "past the limit"),
    (["eval", "{M}", "--ppl", "{IN}/garbage.txt"], "not UTF-8 text"),
    (["eval", "{IN}/truncated", "--ppl", "{IN}/corpus.txt"], "not a readable safetensors file"),
    (["eval", "{M}", "{IN}/unknown-type", "--ppl", "{IN}/corpus.txt"], "unknown model type"),
    (["eval", "{M}"], "nothing to evaluate"),
    (["eval", "{M}", "--tasks", "mc_local", "--task-data", "mc={IN}/prompts.jsonl", "--limit", "inf"], "--limit must be a finite number"),
    (["eval", "{M}", "--chat-prompts", "{IN}/prompts.jsonl", "-o", "/proc/slimlm/a.jsonl"], "cannot write the output /proc/slimlm/a.jsonl"),
    (["eval", "{M}", "--chat-prompts", "{IN}/prompts.jsonl", "-o", "{IN}/prompts.jsonl"], "is the input"),
    (["eval", "{IN}/gpt2", "--chat-prompts", "{IN}/prompts.jsonl"], "has no chat template"),
    # report
    (["report", "{W}/existing"], "nothing to report"),
    (["report", "{IN}/nope"], "run folder not found"),
    (["report", "{IN}/run", "-o", "/proc/slimlm/report"], "cannot write the report"),
    (["report", "{IN}/run", "-o", "{W}/existing"], "is not a slimlm report folder"),
    (["report", "{IN}/run", "--eval", "{IN}/corpus.txt"], "not a readable eval.json"),
    (["report", "{IN}/run", "-o", "/dev/null"], "is not a slimlm report folder"),
    # align
    (["align", "{M}", "--sft", "{IN}/garbage.txt", "-o", "{OUT}"], "chat data must be a JSONL file"),
    (["align", "{M}", "--sft", "{IN}/garbage.jsonl", "-o", "{OUT}"], "garbage.jsonl"),
    (["align", "{M}", "--sft", "{IN}/chats.jsonl", "--prefs", "{IN}/chats.jsonl", "-o", "{OUT}"], "missing field(s)"),
    (["align", "{IN}/truncated", "--sft", "{IN}/chats.jsonl", "-o", "{OUT}"], "not a readable safetensors file"),
    (["align", "{M}", "--sft", "{IN}/chats.jsonl", "-o", "{M}", "--overwrite"], "is the input model"),
    (["align", "{M}", "--sft", "{IN}/chats.jsonl", "-o", "{IN}", "--overwrite"], "holds the input"),
    (["align", "{M}", "--sft", "{IN}/chats.jsonl", "-o", "/proc/slimlm/a"], "cannot write the output"),
    (["align", "{M}", "--sft", "{IN}/chats.jsonl", "-o", "{OUT}", "--beta", "inf"], "--beta must be a finite number"),
    (["align", "{M}", "--sft", "{IN}/chats.jsonl", "-o", "{OUT}", "--seq-len", "4096"], "max_position_embeddings"),
    # card
    (["card", "{IN}/bad-json"], "is not valid JSON"),
    (["card", "{IN}/nope"], "no config.json"),
    (["card", "{IN}/unknown-type"], "unknown model type"),
    (["card", "{IN}/custom-code"], "auto_map"),
    # push (HF_HUB_OFFLINE is set for the tests)
    (["push", "{M}", "not-a-repo-id"], "REPO_ID must look like"),
    (["push", "{IN}/bad-json", "me/model"], "is not valid JSON"),
    (["push", "{IN}/truncated", "me/model"], "not a readable safetensors file"),
    (["push", "{M}", "me/model"], "offline mode"),
    # run
    (["run", "{IN}/bad-key.yaml", "-o", "{OUT}"], "bad-key.yaml:20: distill2: unknown key"),
    (["run", "{IN}/truncated-teacher.yaml", "-o", "{OUT}"], "not a readable safetensors file"),
    (["run", "{IN}/garbage-data.yaml", "-o", "{OUT}"], "not UTF-8 text"),
    (["run", "{IN}/long-eval.yaml", "-o", "{OUT}"], "eval.seq_len 4096 is past the teacher's limit"),
    (["run", "{IN}/good.yaml", "-o", "/proc/slimlm/run"], "cannot write the run folder"),
    (["run", "{IN}/good.yaml", "-o", "{OUT}", "--from", "polish"], "--from expects one of"),
    (["run", "{IN}/good.yaml", "-o", "{W}/existing"], "is not a slimlm run folder"),
    (["run", "{IN}/good.yaml", "-o", "{W}/existing.txt"], "is a file"),
]


def _snapshot(folder: Path) -> dict:
    """Every entry under `folder` (hidden ones too), with the size and modification time of files."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:1] + [message]) for a, message in CASES])
def test_a_mistake_is_one_line_exit_2_and_writes_nothing(inputs, tmp_path, capsys, args, message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "existing.txt").write_text("mine")
    (work / "existing").mkdir()
    (work / "existing" / "keep.txt").write_text("mine")
    (work / ".hidden").write_text("mine")
    names = {"{IN}": str(inputs / "inputs"), "{M}": str(inputs / "inputs" / "model"), "{OUT}": str(work / "out"),
             "{W}": str(work)}

    def fill(arg: str) -> str:
        for key, value in names.items():
            arg = arg.replace(key, value)
        return arg

    work_before, inputs_before = _snapshot(work), _snapshot(inputs)
    code, out, err = run_cli([fill(a) for a in args], capsys)
    assert "Traceback" not in out + err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]
    assert _snapshot(work) == work_before
    assert _snapshot(inputs) == inputs_before
    assert not (inputs / "CODE-RAN").exists()


def test_the_table_covers_every_command():
    commands = {args[0] for args, _ in CASES}
    assert {"info", "importance", "prune", "search", "distill", "teacher-logits", "correct-teacher", "eval", "report",
            "align", "card", "push", "run"} <= commands
    assert len(CASES) >= 45
