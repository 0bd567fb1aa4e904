"""`evaluate`: perplexity, tasks and speed of one model, and its `eval.json`."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .. import __version__
from .._io import atomic_write_json
from ..errors import SlimlmError
from .ppl import check_perplexity_args, perplexity
from .throughput import check_speed_args, speed as measure_speed
from .tasks import check_tasks, parse_task_data, parse_tasks, run_tasks

EVAL_FILE = "eval.json"


def count_parameters(model) -> int:
    """Parameters of `model`, tied (shared) tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def check_eval_args(
    ppl: str | Sequence[str] | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    text_field: str = "text",
    tasks: str | Sequence[str] | None = None,
    task_data: Sequence[str] | dict | None = None,
    include_path=None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    speed: bool = False,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
) -> dict:
    """Check every evaluation setting (and read the data sources) before a model loads.

    Returns the parsed ``{"tasks": [...], "task_data": {...}}``.
    """
    from ..data import check_source

    task_list, data = parse_tasks(tasks), parse_task_data(task_data)
    if ppl is None and not task_list and not speed:
        raise SlimlmError("nothing to evaluate: give --ppl DATA, --tasks NAMES and/or --speed")
    if data and not task_list:
        raise SlimlmError("--task-data is given but no --tasks")
    check_perplexity_args(seq_len, stride, max_tokens, batch_size)
    if speed:
        check_speed_args(batch_size, prompt_len, new_tokens, repeats)
    if limit is not None and limit <= 0:
        raise SlimlmError(f"--limit must be positive, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise SlimlmError(f"--num-fewshot must be at least 0, got {num_fewshot}")
    if ppl is not None:
        check_source(ppl, text_field)
    if task_list:
        check_tasks(task_list, data, include_path)
    return {"tasks": task_list, "task_data": data}


def evaluate(
    model,
    tokenizer=None,
    *,
    ppl: str | Sequence[str] | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    text_field: str = "text",
    tasks: str | Sequence[str] | None = None,
    task_data: Sequence[str] | dict | None = None,
    include_path=None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    speed: bool = False,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    dtype: str = "auto",
    save: bool = False,
    progress: bool = False,
) -> dict:
    """Evaluate one model: perplexity on `ppl`, lm-eval `tasks`, and/or `speed`.

    `model` is a loaded model (with its `tokenizer`) or anything `slimlm.models.load_model`
    takes (a folder, hub id, .gguf file, alias), loaded here in `dtype`.  With `save`, the
    results are merged into ``eval.json`` in the model's folder when it has a writable one.
    Returns ``{"model", "parameters", "perplexity"?, "tasks"?, "speed"?, ...}``.
    """
    parsed = check_eval_args(ppl, seq_len, stride, max_tokens, text_field, tasks, task_data, include_path,
                             limit, num_fewshot, speed, batch_size, prompt_len, new_tokens, repeats)
    spec, folder = None, None
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_model, load_tokenizer, resolve_model_path

        spec = str(model)
        folder = resolve_model_path(spec)
        tokenizer = tokenizer or load_tokenizer(spec)
        model = load_model(spec, dtype)
    elif tokenizer is None:
        raise SlimlmError("evaluating a model object needs its tokenizer")
    spec = spec or getattr(model.config, "_slimlm_source", None) or getattr(model.config, "_name_or_path", "model")
    result = {
        "model": spec,
        "path": str(Path(folder).resolve()) if folder and Path(folder).is_dir() else None,
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model.get_input_embeddings().weight.device),
        "slimlm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if ppl is not None:
        result["perplexity"] = perplexity(model, tokenizer, ppl, seq_len, stride, max_tokens, text_field, batch_size, progress)
    if parsed["tasks"]:
        result["tasks"] = run_tasks(model, tokenizer, parsed["tasks"], limit, num_fewshot, batch_size,
                                    parsed["task_data"], include_path)
    if speed:
        result["speed"] = measure_speed(model, tokenizer, batch_size, prompt_len, new_tokens, repeats)
    if save and result["path"]:
        result["saved_to"] = save_results(result, result["path"])
    return result


def save_results(result: dict, folder: str | os.PathLike) -> str | None:
    """Merge `result` into ``FOLDER/eval.json`` atomically; None when the folder is not writable.

    Sections of earlier runs that this one did not measure are kept; tasks merge one by one.
    """
    folder = Path(folder)
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return None
    path = folder / EVAL_FILE
    merged = load_results(path) or {}
    tasks = {**merged.get("tasks", {}), **result.get("tasks", {})}
    merged.update({k: v for k, v in result.items() if k != "saved_to"})
    if tasks:
        merged["tasks"] = tasks
    atomic_write_json(path, merged)
    return str(path)


def load_results(path: str | os.PathLike) -> dict | None:
    """An ``eval.json`` (a file or a folder holding one), or None when missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / EVAL_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

