"""Instruct models: `slimlm align` (SFT, DPO), `distill --chat`, `eval --chat-prompts`, chat templates kept (tiny models, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny, tiny_model, tiny_tokenizer, run_cli


# A simple chat template for the character-level tiny tokenizer; "</s>" (EOS) ends each assistant turn.
PLAIN = ("{% for m in messages %}{% if m['role'] == 'assistant' %}a: {{ m['content'] }}</s>"
         "{% else %}{{ m['role'][0] }}: {{ m['content'] }};{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}a: {% endif %}")
# The same with TRL's assistant markers.
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}a: {% generation %}{{ m['content'] }}</s>"
          "{% endgeneration %}{% else %}{{ m['role'][0] }}: {{ m['content'] }};{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}a: {% endif %}")

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "yes, ok"}]


run = run_cli


def _chat_tokenizer(template):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


def _save_chat_model(path, template=PLAIN, **overrides):
    save_tiny("llama", path, **overrides)
    if template is not None:
        _chat_tokenizer(template).save_pretrained(path)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    sft = _write_jsonl(root / "sft.jsonl", [
        {"messages": [{"role": "user", "content": f"add {i} and 1"}, {"role": "assistant", "content": f"it is {i + 1}"}]}
        for i in range(6)] + [{"messages": CONVERSATION}])
    prefs = _write_jsonl(root / "prefs.jsonl", [
        {"prompt": f"say {i}", "chosen": f"{i}", "rejected": "no"} for i in range(3)] + [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go away"}]}])
    return {"root": root, "sft": sft, "prefs": prefs, "model": _save_chat_model(root / "chat-model"),
            "plain": save_tiny("llama", root / "no-template"),
            "teacher": _save_chat_model(root / "teacher", MARKED)}


# ---- assistant-only loss -------------------------------------------------------------------
def _hand_labels(tok, msgs, trained):
    """input ids and labels built piece by piece: only assistant turns listed in `trained` (content + EOS) count."""
    ids, labels = [], []

    def enc(text):
        return tok(text, add_special_tokens=False).input_ids

    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head, body = enc("a: "), enc(m["content"]) + [tok.eos_token_id]
            ids += head + body
            labels += [-100] * len(head) + (body if i in trained else [-100] * len(body))
        else:
            piece = enc(f"{m['role'][0]}: {m['content']};")
            ids += piece
            labels += [-100] * len(piece)
    return ids, labels


@pytest.mark.parametrize("template,mode", [(MARKED, "assistant-only"), (PLAIN, "per-turn")])
def test_sft_trains_on_assistant_tokens_only(template, mode, tmp_path):
    from slimlm.align.trainer import make_sft_trainer, sft_loss_mask, sft_rows

    tok = _chat_tokenizer(template)
    assert sft_loss_mask(tok) == mode
    rows = sft_rows([CONVERSATION], mode)
    model = tiny_model("llama")
    trainer = make_sft_trainer(model, tok, rows, mode, output_dir=str(tmp_path), max_length=128,
                               per_device_train_batch_size=2)
    turns = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    if mode == "assistant-only":  # one example, both assistant turns trained
        expected = [_hand_labels(tok, CONVERSATION, set(turns))]
    else:  # one example per assistant turn, the earlier ones as context only
        expected = [_hand_labels(tok, CONVERSATION[:t + 1], {t}) for t in turns]
    ds = trainer.train_dataset
    assert [list(x) for x in ds["input_ids"]] == [e[0] for e in expected]
    assert [list(x) for x in ds["labels"]] == [e[1] for e in expected]

    # The trainer's loss on a collated batch equals cross-entropy over the assistant tokens, by hand.
    batch = trainer.data_collator([{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in range(len(ds))])
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(e[1]) for e in expected], batch_first=True,
                                             padding_value=-100)
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)


# ---- align end to end --------------------------------------------------------------------
def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_align_sft_then_dpo_writes_an_instruct_checkpoint(files, tmp_path, capsys):
    """SFT then DPO from the CLI, in bf16 mixed precision (as on a GPU; slow on CPUs, fine for a tiny model)."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "aligned"
    code, stdout, err = run(["align", files["model"], "--sft", files["sft"], "--prefs", files["prefs"], "-o", out,
                             "--tokens", "120", "--dpo-tokens", "100", "--seq-len", "64", "--micro-batch", "2",
                             "--lr", "1e-3", "--dtype", "bf16", "--json", "-q"], capsys)
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["complete"] and set(result["stages"]) == {"sft", "dpo"}
    sft, dpo = result["stages"]["sft"], result["stages"]["dpo"]
    assert sft["loss_mask"] == "per-turn" and sft["examples"] == 8 and sft["steps"] >= 2 and dpo["steps"] >= 1

    # A standard checkpoint, with the chat template, provenance and a model card.
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == PLAIN
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    before, after = _weights(files["model"]), _weights(out)
    assert {v.dtype for v in after.values()} == {torch.bfloat16}  # bf16 mixed precision, saved in bf16
    assert any(not torch.equal(before[k].bfloat16(), after[k]) for k in before)
    meta = json.loads((out / "slimlm.json").read_text())
    assert meta["kind"] == "align" and meta["source"] == str(files["model"]) and meta["dpo"]["beta"] == 0.1
    assert meta["hyperparameters"]["mixed_precision"] == "bf16" and "trl" in meta["versions"]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and {"sft", "dpo"} <= set(card.data.tags)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"sft", "dpo"}
    assert [r["step"] for r in records] == list(range(1, sft["steps"] + dpo["steps"] + 1))
    assert any("rewards/margins" in r for r in records if r["stage"] == "dpo")
    assert not (out / "run" / "export").exists() and not (out / "training_args.bin").exists()


def test_align_resume_gives_the_same_weights_and_takes_the_teachers_template(files, tmp_path):
    from slimlm.align import align

    kw = dict(tokens=150, seq_len=64, micro_batch=2, lr=1e-3, progress=False, tensorboard=False,
              chat_template_from=str(files["teacher"]))
    whole = align(str(files["plain"]), files["sft"], tmp_path / "whole", **kw)
    assert whole.complete and whole.stages["sft"]["loss_mask"] == "assistant-only"  # the teacher's marked template
    part = align(str(files["plain"]), files["sft"], tmp_path / "part", stop_after=1, save_every=0, **kw)
    assert not part.complete and part.checkpoint.endswith("checkpoint-1")
    assert not (tmp_path / "part" / "slimlm.json").exists()
    done = align(str(files["plain"]), files["sft"], tmp_path / "part", resume=True, **kw)
    assert done.complete and done.stages["sft"]["steps"] == whole.stages["sft"]["steps"] >= 3
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "part" / "chat_template.jinja").read_text() == MARKED
    meta = json.loads((tmp_path / "part" / "slimlm.json").read_text())
    assert meta["chat_template"]["from"] == str(files["teacher"])


def test_align_resume_unpickles_nothing_from_the_run_folder(files, tmp_path):
    """The Trainer's checkpoint files are read as tensors only (weights_only): a crafted object is refused in one
    line, never run; files it does not read on resume (training_args.bin, Accelerate's pickles) stay unread."""
    import pickle
    import shutil
    from pathlib import Path

    from slimlm.align import align
    from slimlm.errors import SlimlmError

    class Payload:  # creates `marker` when unpickled: stands for any code a crafted file could run
        def __reduce__(self):
            return (open, (str(marker), "w"))

    marker = tmp_path / "pwned"
    kw = dict(tokens=150, seq_len=64, micro_batch=2, lr=1e-3, progress=False, tensorboard=False)
    part = align(str(files["model"]), files["sft"], tmp_path / "part", stop_after=1, save_every=0, **kw)
    ckpt = Path(part.checkpoint)
    for name in ("training_args.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (ckpt / name).write_bytes(pickle.dumps(Payload()))
    shutil.copy(ckpt / "rng_state.pth", tmp_path / "rng_state.pth")
    (ckpt / "rng_state.pth").write_bytes(pickle.dumps({"python": Payload()}, protocol=2))
    with pytest.raises(SlimlmError, match="not plain tensors"):
        align(str(files["model"]), files["sft"], tmp_path / "part", resume=True, **kw)
    assert not marker.exists() and ckpt.exists()  # refused, and the checkpoint is kept
    shutil.copy(tmp_path / "rng_state.pth", ckpt / "rng_state.pth")
    done = align(str(files["model"]), files["sft"], tmp_path / "part", resume=True, **kw)
    assert done.complete and not marker.exists()


def test_align_that_fails_before_its_first_checkpoint_removes_what_it_wrote(files, tmp_path, monkeypatch):
    import slimlm.align.trainer as trainer
    from slimlm.align import align

    def boom(*args, **kwargs):
        raise RuntimeError("failed in the first step")

    kw = dict(tokens=150, seq_len=64, micro_batch=2, progress=False, tensorboard=False)
    monkeypatch.setattr(trainer, "_apply_budget", boom)
    with pytest.raises(RuntimeError, match="first step"):
        align(str(files["model"]), files["sft"], tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert align(str(files["model"]), files["sft"], tmp_path / "out", **kw).complete  # no --overwrite needed


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "chat data file not found"),
        ("no-messages", "no 'messages' field"),
        ("no-assistant", "no assistant message"),
        ("bad-json", "not a JSON line"),
        ("prefs-field", "missing field(s) rejected"),
        ("no-template", "has no chat template"),
        ("template-from-plain", "has no chat template either"),
        ("seq-len", "exceeds the model's max_position_embeddings"),
        ("resume", "nothing to resume"),
    ],
)
def test_align_bad_inputs_fail_before_work(files, tmp_path, capsys, case, match):
    model, sft, extra = files["model"], files["sft"], []
    if case == "missing":
        sft = tmp_path / "nope.jsonl"
    elif case == "no-messages":
        sft = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    elif case == "no-assistant":
        sft = _write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    elif case == "bad-json":
        sft = tmp_path / "t.jsonl"
        sft.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n')
        match = "t.jsonl:2: not a JSON line"
    elif case == "prefs-field":
        extra = ["--prefs", _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])]
    elif case == "no-template":
        model = files["plain"]
    elif case == "template-from-plain":
        model, extra = files["plain"], ["--chat-template-from", files["plain"]]
    elif case == "seq-len":
        extra = ["--seq-len", "4096"]
    elif case == "resume":
        extra = ["--resume"]
    out = tmp_path / "out"
    code, _, err = run(["align", model, "--sft", sft, "-o", out, *extra], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert match in err, err
    assert not out.exists()


# ---- the chat template through prune and distill, and distill --chat ----------------------
def test_template_survives_pruning_and_distill_chat_carries_the_teachers(files, tmp_path):
    from slimlm import api
    from slimlm.distill import distill
    from slimlm.distill.data import chat_text_source

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 5)
    pruned = tmp_path / "pruned"
    api.prune(str(files["model"]), pruned, hidden=36, ffn=40, heads=3, data=str(corpus), calib_samples=4, seq_len=32,
              heldout=2, progress=False)
    assert (pruned / "chat_template.jinja").read_text() == PLAIN

    # The student has no template; --chat renders the data with the teacher's, which the student keeps.
    student = save_tiny("llama", tmp_path / "student", num_hidden_layers=2)
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 12)
    out = tmp_path / "distilled"
    res = distill(str(files["teacher"]), str(student), str(chat), out, tokens=2 * 4 * 32, seq_len=32, micro_batch=4,
                  eval_every=0, chat=True, progress=False, tensorboard=False)
    assert res.complete
    assert (out / "chat_template.jinja").read_text() == MARKED
    meta = json.loads((out / "slimlm.json").read_text())
    assert meta["chat"] is True and meta["data"] == str(chat)
    from huggingface_hub import ModelCard

    assert "distilled" in ModelCard.load(out / "README.md").data.tags
    rendered = [json.loads(line)["text"] for line in open(chat_text_source(chat, _chat_tokenizer(MARKED), out / "run" / "cache"))]
    assert rendered == [_chat_tokenizer(MARKED).apply_chat_template(CONVERSATION, tokenize=False)] * 12
    assert rendered[0].startswith("s: be brief;u: hi there;a: hello</s>")
    # distill rendered the same file into the token cache, and tokenized it there.
    from pathlib import Path

    from slimlm.distill.tokens import default_token_cache

    rendered_by_distill = set(default_token_cache().glob("chat-*.jsonl"))
    path = Path(chat_text_source(chat, _chat_tokenizer(MARKED), default_token_cache()))
    assert path in rendered_by_distill
    assert any(p.is_dir() and p.name.startswith(path.name + "-") for p in default_token_cache().iterdir())

    # --chat without chat data is refused up front.
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="chat data must be a JSONL file"):
        distill(str(files["teacher"]), str(student), str(corpus), tmp_path / "x", tokens=64, seq_len=32, chat=True)


# ---- eval --chat-prompts and lm-eval with the chat template ---------------------------------
def test_eval_chat_prompts_side_by_side_and_in_the_report(files, tmp_path, capsys):
    import shutil

    a = _save_chat_model(tmp_path / "model-a")
    b = _save_chat_model(tmp_path / "model-b", MARKED, seed=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is 2 and 2?\n\nsay hi\n")
    code, stdout, err = run(["eval", a, b, "--chat-prompts", prompts, "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (a / "chat_answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["what is 2 and 2?", "say hi"]
    assert all(set(r["answers"]) == {"model-a", "model-b"} for r in rows)
    # Greedy answers equal a plain generate() with the template.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(a), AutoModelForCausalLM.from_pretrained(a)
    enc = tok.apply_chat_template([{"role": "user", "content": "say hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert rows[1]["answers"]["model-a"] == tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    saved = json.loads((b / "eval.json").read_text())
    assert len(saved["chat"]["answers"]) == 2 and saved["chat"]["max_new_tokens"] == 5

    # The report shows the answers.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for m in (a, b):
        shutil.copytree(m, run_dir / m.name)
    code, _, err = run(["report", run_dir], capsys)
    assert code == 0, err
    md = (run_dir / "report" / "report.md").read_text()
    assert "## Chat answers" in md and "say hi" in md

    # JSONL prompts, --output, and a model without a template is refused before any loads.
    jl = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "yo"}]}])
    code, _, err = run(["eval", a, "--chat-prompts", jl, "--max-new-tokens", "2", "--no-save", "-o", tmp_path / "ans"],
                       capsys)
    assert code == 0, err
    assert len((tmp_path / "ans" / "chat_answers.jsonl").read_text().splitlines()) == 2
    code, _, err = run(["eval", a, files["plain"], "--chat-prompts", jl], capsys)
    assert code == 2 and "has no chat template" in err


def test_tasks_get_apply_chat_template(files, monkeypatch):
    import lm_eval

    from slimlm.evaluate import tasks

    seen = {}

    def fake_evaluate(**kwargs):
        seen.update(kwargs)
        return {"results": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(tasks, "check_tasks", lambda *a, **k: None)
    tasks.run_tasks(tiny_model("llama"), _chat_tokenizer(PLAIN), "anything", apply_chat_template=True)
    assert seen["apply_chat_template"] is True


# ---- the align stage of `slimlm run` ----------------------------------------------------------
def test_run_recipe_with_an_align_stage(files, tmp_path, capsys):
    from slimlm.recipe import parse_recipe
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="align.prefs needs align.sft"):
        parse_recipe("prune: {hidden: 36}\nalign: {prefs: p.jsonl}")
    teacher = _save_chat_model(tmp_path / "teacher", max_position_embeddings=256)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 10)
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(f"""
teacher: {teacher}
data: {corpus}
importance: {{calib_samples: 4, seq_len: 32, heldout: 2}}
prune: {{hidden: 36, ffn: 40, heads: 3}}
distill: {{tokens: 256, seq_len: 32, micro_batch: 4, global_batch: 4, warmup: 1, heldout: 2}}
align: {{sft: {files['sft']}, prefs: {files['prefs']}, tokens: 60, seq_len: 64, micro_batch: 2}}
eval: {{ppl: {corpus}, max_tokens: 128, seq_len: 32, speed: false}}
""")
    out = tmp_path / "run"
    code, stdout, err = run(["run", recipe, "-o", out, "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert [r["model"] for r in summary["rows"]] == ["teacher", "pruned", "student", "aligned"]
    assert all(r["ppl"] for r in summary["rows"]) and summary["aligned"] == str(out / "aligned")
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["correct", "importance", "teacher_logits", "prune", "distill", "align", "eval", "report"]
    assert set(stages["align"]["stages"]) == {"sft", "dpo"}
    assert (out / "aligned" / "chat_template.jinja").read_text() == PLAIN
    assert (out / "pruned" / "README.md").exists() and (out / "student" / "README.md").exists()
