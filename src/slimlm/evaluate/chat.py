"""Chat answers: greedy generation for a prompt file with the chat template, models side by side.

    slimlm eval teacher/ student/ aligned/ --chat-prompts prompts.jsonl --max-new-tokens 128

writes ``chat_answers.jsonl`` (one line per prompt: the prompt and every model's answer) and
keeps each model's answers in its results (``eval.json``) for the report.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .._io import atomic_write_text, can_write_into
from ..chat import read_prompts, template_text
from ..errors import SlimlmError

ANSWERS_FILE = "chat_answers.jsonl"


def check_chat_args(chat_prompts, max_new_tokens: int) -> list[dict]:
    """The prompts of `chat_prompts` (checked), before any model loads."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SlimlmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    return read_prompts(chat_prompts)


def require_chat_template(tokenizer, spec: str) -> None:
    if template_text(tokenizer) is None:
        raise SlimlmError(f"{spec} has no chat template (needed for --chat-prompts / --chat-template)")


def chat_answers(model, tokenizer, chat_prompts, max_new_tokens: int = 128, progress: bool = False) -> dict:
    """Greedy answers of `model` to every prompt of the file, rendered with the chat template.

    Returns ``{"prompts": PATH, "max_new_tokens": N, "answers": [{"prompt", "messages", "answer", "new_tokens"}]}``.
    """
    import torch

    prompts = check_chat_args(chat_prompts, max_new_tokens)
    require_chat_template(tokenizer, str(getattr(model.config, "_slimlm_source", None) or "the model"))
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for i, p in enumerate(prompts):
        enc = tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = enc["input_ids"].to(device)
        mask = enc.get("attention_mask")
        mask = mask.to(device) if mask is not None else torch.ones_like(ids)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, num_beams=1)
        new = out[0, ids.shape[1]:]
        answers.append({"prompt": p["prompt"], "messages": p["messages"],
                        "answer": tokenizer.decode(new, skip_special_tokens=True).strip(), "new_tokens": int(new.numel())})
        if progress:
            print(f"  chat prompt {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    return {"prompts": str(Path(chat_prompts).expanduser().resolve()), "max_new_tokens": max_new_tokens,
            "answers": answers}


def model_labels(results: list[dict]) -> list[str]:
    """Short, distinct names of the evaluated models (their folder names)."""
    labels = []
    for r in results:
        name = Path(str(r.get("model"))).name or str(r.get("model"))
        label, k = name, 2
        while label in labels:
            label, k = f"{name} ({k})", k + 1
        labels.append(label)
    return labels


def answers_path(results: list[dict], output: str | os.PathLike | None) -> Path:
    """Where ``chat_answers.jsonl`` goes: `output` (a .jsonl file or a folder), else the first model's folder."""
    if output is not None:
        p = Path(output).expanduser()
        return p if p.suffix == ".jsonl" else p / ANSWERS_FILE
    first = results[0].get("path") if results else None
    if first and Path(first).is_dir() and can_write_into(first):
        return Path(first) / ANSWERS_FILE
    return Path.cwd() / ANSWERS_FILE


def write_side_by_side(results: list[dict], output: str | os.PathLike | None = None) -> str | None:
    """One JSON line per prompt with every model's answer; returns the file (None when no model has answers)."""
    import json

    with_chat = [r for r in results if r.get("chat")]
    if not with_chat:
        return None
    labels = model_labels(with_chat)
    rows = []
    for i, first in enumerate(with_chat[0]["chat"]["answers"]):
        row = {"prompt": first["prompt"], "messages": first["messages"], "answers": {}}
        for label, r in zip(labels, with_chat):
            items = r["chat"]["answers"]
            row["answers"][label] = items[i]["answer"] if i < len(items) else None
        rows.append(row)
    path = answers_path(results, output)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return str(path)
