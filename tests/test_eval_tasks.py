"""lm-eval tasks on an in-memory model: accuracy equals a direct log-likelihood computation."""

from __future__ import annotations

import bz2
import json

import pytest
import torch

from conftest import SHARED, tiny_model, tiny_tokenizer
from slimlm.errors import SlimlmError
from slimlm.evaluate import run_tasks
from slimlm.evaluate.local_data import read_hellaswag, read_local

ITEMS = [
    {"question": "the cat sat on the", "choices": ["mat.", "dog went home", "sky"], "answer": 0},
    {"question": "two plus two is", "choices": ["four", "seven", "a fish"], "answer": 0},
    {"question": "water is", "choices": ["dry", "wet", "blue and cold"], "answer": 1},
    {"question": "a b c d", "choices": ["e", "z y x", "q"], "answer": 0},
    {"question": "Sun rises in the", "choices": ["west", "east", "north pole"], "answer": 1},
    {"question": "1 2 3", "choices": ["5 6", "4", "9"], "answer": 1},
]

YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def direct_accuracy(model, tok, items) -> tuple[float, float]:
    """Score each choice as lm-eval defines it: log P(' ' + choice | question), summed over its tokens."""
    acc = acc_norm = 0
    for item in items:
        lls = []
        for choice in item["choices"]:
            ctx = tok(item["question"]).input_ids
            whole = tok(item["question"] + " " + choice).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        best = max(range(len(lls)), key=lls.__getitem__)
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(item["choices"][i]))
        acc += best == item["answer"]
        acc_norm += best_norm == item["answer"]
    return acc / len(items), acc_norm / len(items)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama", seed=3), tiny_tokenizer()


def write_hellaswag_text(path, items):
    """llama.cpp's format: 'label: context', gold, 4 endings; bz2-compressed."""
    lines = []
    for it in items:
        lines += [it["question"], str(it["answer"]), *it["choices"]]
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))


def test_local_tasks_match_direct_loglikelihood(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    task_dir = tmp_path / "my_tasks"
    task_dir.mkdir()
    (task_dir / "tiny_mc.yaml").write_text(YAML.format(path=data))
    hs = [dict(it, choices=it["choices"] + ["an extra ending"]) for it in ITEMS]  # HellaSwag has 4 endings
    hs_file = tmp_path / "hs.txt.bz2"
    write_hellaswag_text(hs_file, hs)

    results = run_tasks(
        model, tok, "tiny_mc,mc_local,hellaswag_local", batch_size=4, include_path=task_dir,
        task_data=[f"mc={data}", f"hellaswag={hs_file}"],
    )
    acc, acc_norm = direct_accuracy(model, tok, ITEMS)
    for task in ("tiny_mc", "mc_local"):
        assert results[task]["acc"] == pytest.approx(acc)
        assert results[task]["acc_norm"] == pytest.approx(acc_norm)
        assert results[task]["samples"] == len(ITEMS)
    hs_acc, hs_norm = direct_accuracy(model, tok, hs)
    assert results["hellaswag_local"]["acc"] == pytest.approx(hs_acc)
    assert results["hellaswag_local"]["acc_norm"] == pytest.approx(hs_norm)
    assert 0 < acc < 1 or 0 < acc_norm < 1 or 0 < hs_acc < 1  # a degenerate model would prove little

    limited = run_tasks(model, tok, ["mc_local"], limit=2, task_data={"mc": str(data)})
    assert limited["mc_local"]["samples"] == 2
    assert limited["mc_local"]["acc"] == pytest.approx(direct_accuracy(model, tok, ITEMS[:2])[0])


def test_hellaswag_formats(tmp_path):
    rows = [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he", "endings": ["a", "b", "c [title] d"], "label": "2"}]
    jl = tmp_path / "hs.jsonl"
    jl.write_text(json.dumps(rows[0]) + "\n")
    assert read_hellaswag(jl) == [{"query": "Cooking: A man cuts onions. He", "choices": ["a", "b", "c. d"], "gold": 2}]
    bad = tmp_path / "bad.txt"
    bad.write_text("ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(SlimlmError, match="gold index"):
        read_hellaswag(bad)


def test_shipped_hellaswag_file_parses():
    path = SHARED / "data" / "hellaswag_val_full.txt.bz2"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    docs = read_local("hellaswag", path)
    assert len(docs) == 10042
    assert all(len(d["choices"]) == 4 and 0 <= d["gold"] <= 3 for d in docs)
    assert docs[0]["query"].startswith("Roof shingle removal: A man is sitting on a roof.")


def test_user_mistakes_fail_before_any_work(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps(ITEMS[0]) + "\n")
    cases = [
        (dict(tasks="hellaswag_local"), "--task-data hellaswag=PATH"),
        (dict(tasks="mc_local", task_data=["mc"]), "NAME=PATH"),
        (dict(tasks="mc_local", task_data=["squad=x.jsonl"]), "unknown --task-data name"),
        (dict(tasks="mc_local", task_data=[f"mc={tmp_path / 'nope.jsonl'}"]), "not found"),
        (dict(tasks="mc_local", task_data=[f"mc={data}", f"hellaswag={data}"]), "add it to --tasks"),
        (dict(tasks="mc_local", task_data=[f"mc={data}"], include_path=tmp_path / "nope"), "task folder not found"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SlimlmError, match=message):
            run_tasks(model, tok, **kwargs)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(SlimlmError, match="index of the right choice"):
        run_tasks(model, tok, "mc_local", task_data={"mc": str(broken)})
