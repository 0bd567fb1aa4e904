"""`evaluate`: perplexity, tasks and speed of one model, and its `eval.json`."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .. import __version__
from .._io import atomic_write_json, can_write_into
from ..config import EvalConfig
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


def check_eval_args(config: EvalConfig | None = None, **overrides) -> dict:
    """Check every evaluation setting (and read the data sources) before a model loads.

    Returns the parsed ``{"tasks": [...], "task_data": {...}}``.
    """
    from ..data import check_source
    from ..models import pick_dtype

    c = EvalConfig.make(config, **overrides)
    task_list, data = parse_tasks(c.tasks), parse_task_data(c.task_data)
    if c.ppl is None and not task_list and not c.speed and c.chat_prompts is None:
        raise SlimlmError("nothing to evaluate: give --ppl DATA, --tasks NAMES, --speed and/or --chat-prompts FILE")
    if c.chat_prompts is not None:
        from .chat import check_chat_args

        check_chat_args(c.chat_prompts, c.max_new_tokens)
    if data and not task_list:
        raise SlimlmError("--task-data is given but no --tasks")
    check_perplexity_args(c.seq_len, c.stride, c.max_tokens, c.batch_size)
    if c.speed:
        check_speed_args(c.batch_size, c.prompt_len, c.new_tokens, c.repeats)
    pick_dtype(c.dtype)
    if c.ppl is not None:
        check_source(c.ppl, c.text_field)
    if task_list:
        check_tasks(task_list, data, c.include_path)
    return {"tasks": task_list, "task_data": data}


def check_models(models: Sequence, config: EvalConfig | None = None, *, chat: bool = False, **overrides) -> None:
    """Check every model before any loads: its config, weights and tokenizer are readable, the lengths
    asked fit its positions, and (`chat`) its tokenizer has a chat template."""
    from ..models import load_config, load_tokenizer

    c = EvalConfig.make(config, **overrides)
    for spec in models:
        if not isinstance(spec, (str, os.PathLike)):
            continue
        model_config = load_config(str(spec))
        tokenizer = load_tokenizer(str(spec))
        if chat:
            from .chat import require_chat_template

            require_chat_template(tokenizer, str(spec))
        limit = getattr(model_config, "max_position_embeddings", None)
        if not limit:
            continue
        if c.ppl is not None and c.seq_len > limit:
            raise SlimlmError(f"--seq-len {c.seq_len} is past the limit of {spec}, {limit} positions")
        if c.speed and c.prompt_len + c.new_tokens > limit:
            raise SlimlmError(f"--prompt-len {c.prompt_len} + --new-tokens {c.new_tokens} is past the limit of {spec}, "
                              f"{limit} positions")


def evaluate(model, tokenizer=None, config: EvalConfig | None = None, *, progress: bool = False, **overrides) -> dict:
    """Evaluate one model: perplexity on `ppl`, lm-eval `tasks`, `speed` and chat answers (settings: `EvalConfig`).

    `model` is a loaded model (with its `tokenizer`) or anything `slimlm.models.load_model`
    takes (a folder, hub id, .gguf file, alias), loaded here in `dtype`.  With `save` (the
    default), the results are merged into ``eval.json`` in the model's folder when it has a
    writable one.  `chat_prompts` (a prompt file) adds greedy answers (``result["chat"]``,
    `max_new_tokens` each) rendered with the chat template; `chat_template` runs the lm-eval
    tasks with it too.  Returns ``{"model", "parameters", "perplexity"?, "tasks"?, "speed"?, ...}``.
    """
    c = EvalConfig.make(config, **overrides)
    parsed = check_eval_args(c)
    limit = int(c.limit) if c.limit is not None and c.limit >= 1 and c.limit == int(c.limit) else c.limit
    spec, folder = None, None
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_model, load_tokenizer, resolve_model_path

        check_models([model], c)
        spec = str(model)
        folder = resolve_model_path(spec)
        tokenizer = tokenizer or load_tokenizer(spec)
        model = load_model(spec, c.dtype)
    elif tokenizer is None:
        raise SlimlmError("evaluating a model object needs its tokenizer")
    spec = spec or getattr(model.config, "_slimlm_source", None) or getattr(model.config, "_name_or_path", "model")
    if c.chat_prompts is not None or c.chat_template:
        from .chat import require_chat_template

        require_chat_template(tokenizer, spec)
    result = {
        "model": spec,
        "path": str(Path(folder).resolve()) if folder and Path(folder).is_dir() else None,
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model.get_input_embeddings().weight.device),
        "slimlm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def done(section: str, summary: str) -> None:
        # Save after each part, so a long run that stops later keeps what it measured.
        if c.save and result["path"]:
            result["saved_to"] = save_results(result, result["path"])
        if progress:
            print(f"{spec}: {section} {summary}", file=sys.stderr, flush=True)

    if c.ppl is not None:
        r = result["perplexity"] = perplexity(model, tokenizer, c.ppl, c.seq_len, c.stride, c.max_tokens, c.text_field,
                                              c.batch_size, progress)
        done("perplexity", f"{r['ppl']:.4g} over {r['tokens']:,} tokens")
    if parsed["tasks"]:
        r = result["tasks"] = run_tasks(model, tokenizer, parsed["tasks"], limit, c.num_fewshot, c.batch_size,
                                        parsed["task_data"], c.include_path, apply_chat_template=c.chat_template)
        if c.chat_template:
            result["tasks_chat_template"] = True
        done("tasks", "; ".join(f"{t} {_main_metrics(m)}" for t, m in r.items()))
    if c.speed:
        r = result["speed"] = measure_speed(model, tokenizer, c.batch_size, c.prompt_len, c.new_tokens, c.repeats)
        done("speed", f"prefill {r['prefill_tokens_per_s']:.4g} tokens/s, decode {r['decode_tokens_per_s'] or 0:.4g} tokens/s, "
                      f"peak {r['peak_mem_mb']:.4g} MB")
    if c.chat_prompts is not None:
        from .chat import chat_answers

        r = result["chat"] = chat_answers(model, tokenizer, c.chat_prompts, c.max_new_tokens, progress)
        done("chat", f"{len(r['answers'])} answers")
    return result


def _main_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_stderr"))


def weights_stamp(folder: str | os.PathLike) -> str | None:
    """Names, sizes and modification times of a folder's weight files: changes when the model does."""
    files = sorted(p for p in Path(folder).glob("*") if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files) or None


def save_results(result: dict, folder: str | os.PathLike) -> str | None:
    """Merge `result` into ``FOLDER/eval.json`` atomically; None when the folder is not writable.

    Sections of earlier runs that this one did not measure are kept, unless the weights
    changed since (a new training run into the same folder); tasks merge one by one.
    """
    folder = Path(folder)
    if not folder.is_dir() or not can_write_into(folder):
        return None
    try:
        return _merge_results(result, folder)
    except OSError as exc:  # the disk filled or the folder changed meanwhile: results stay in memory
        print(f"warning: results not saved in {folder}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return None


def _merge_results(result: dict, folder: Path) -> str:
    path = folder / EVAL_FILE
    stamp = weights_stamp(folder)
    merged = load_results(path) or {}
    if merged.get("weights") != stamp:
        merged = {}
    result = {**result, "weights": stamp}
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

