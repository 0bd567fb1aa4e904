"""LM Evaluation Harness tasks, run on a model already in memory.

Every task lm-eval knows by name works, plus the local tasks slimlm ships in
``slimlm/tasks/`` (``hellaswag_local``, ``mc_local``: their data comes from files the
user names with ``task_data``), plus task YAMLs in any folder the user adds
(``include_path``) or given as a path.  Local tasks need no network.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from .._logging import quiet_logger
from ..errors import SlimlmError
from .local_data import READERS, read_local

SHIPPED_TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
# Shipped local task -> the name of the data it reads from `task_data`.
LOCAL_TASK_DATA = {"hellaswag_local": "hellaswag", "mc_local": "mc"}


def parse_task_data(items: Sequence[str] | dict | None) -> dict[str, str]:
    """``["hellaswag=PATH", ...]`` (or a dict) -> ``{"hellaswag": "/abs/PATH"}``, checked."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else [_split_pair(s) for s in items]
    out: dict[str, str] = {}
    for name, path in pairs:
        name = name.strip().removesuffix("_local")
        if name not in READERS:
            raise SlimlmError(f"unknown --task-data name '{name}' (known: {', '.join(sorted(READERS))})")
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise SlimlmError(f"--task-data {name}: file not found: {p}")
        out[name] = str(p.resolve())
    return out


def _split_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SlimlmError(f"--task-data expects NAME=PATH (e.g. hellaswag=hellaswag_val.txt.bz2), got '{text}'")
    return name, path.strip()


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c']."""
    if not tasks:
        return []
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    return [t.strip() for item in items for t in item.split(",") if t.strip()]


def _include_paths(include_path) -> tuple[str, ...]:
    extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path or [])
    for p in extra:
        if not Path(p).expanduser().is_dir():
            raise SlimlmError(f"task folder not found: {p}")
    return (str(SHIPPED_TASKS_DIR), *(str(Path(p).expanduser().resolve()) for p in extra))


@lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], defaults: bool, metadata_json: str):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults, metadata=json.loads(metadata_json))


def task_manager(tasks: Sequence[str], task_data: dict[str, str] | None = None, include_path=None):
    """A TaskManager that knows every task in `tasks`, or a SlimlmError naming the unknown ones.

    Indexing lm-eval's own ~15,000 tasks takes ~20 s on a small CPU, so a manager of
    only the local folders is tried first.
    """
    paths = _include_paths(include_path)
    meta = json.dumps({"task_data": task_data or {}}, sort_keys=True)

    def unknown(tm) -> list[str]:
        return [t for t in tasks if t not in tm.all_tasks and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]

    tm = _task_manager(paths, False, meta)
    if unknown(tm):
        tm = _task_manager(paths, True, meta)
    missing = unknown(tm)
    if missing:
        raise SlimlmError(f"unknown task(s): {', '.join(missing)} (not an lm-eval task, nor in {', '.join(paths)})")
    return tm


def check_tasks(tasks: Sequence[str], task_data: dict[str, str] | None = None, include_path=None):
    """Validate tasks and their local data before any model loads; returns the TaskManager."""
    task_data = task_data or {}
    tm = task_manager(tasks, task_data, include_path)
    for task in tasks:
        name = LOCAL_TASK_DATA.get(task)
        if name is not None and name not in task_data:
            raise SlimlmError(f"task {task} reads a local file: pass --task-data {name}=PATH")
    used = {LOCAL_TASK_DATA[t] for t in tasks if t in LOCAL_TASK_DATA}
    # A user's own task YAML may read task data too (through local_data.load).
    own_tasks = bool(include_path) or any(t.endswith((".yaml", ".yml")) for t in tasks)
    for name, path in task_data.items():
        if name not in used and not own_tasks:
            task = next(t for t, n in LOCAL_TASK_DATA.items() if n == name)
            raise SlimlmError(f"--task-data {name} is read by the task {task}: add it to --tasks")
        read_local(name, path)  # parse now: a bad file should fail before a model loads
    return tm


def _metrics(entry: dict) -> dict:
    """lm-eval's ``{"acc,none": x, "alias": ...}`` -> ``{"acc": x}`` (other filters keep their suffix)."""
    out = {}
    for key, value in entry.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = value
    return out


def run_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    task_data: Sequence[str] | dict | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    apply_chat_template: bool = False,
) -> dict[str, dict]:
    """Run lm-eval tasks on an in-memory model; returns ``{task: {metric: value, ...}}``.

    `tasks` are lm-eval task, group or tag names, YAML paths, or slimlm's local tasks;
    `task_data` feeds the local tasks (``{"hellaswag": PATH}`` or ``["hellaswag=PATH"]``);
    `limit` caps the items per task (a fraction when < 1), as in lm-eval; `apply_chat_template`
    renders each request with the tokenizer's chat template (instruct models).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = parse_tasks(tasks)
    if not tasks:
        raise SlimlmError("no tasks given")
    data = parse_task_data(task_data)
    tm = check_tasks(tasks, data, include_path)
    try:
        # lm-eval logs every step at INFO/WARNING (e.g. that a model object was passed).
        with quiet_logger("lm_eval"):
            out = lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                log_samples=False,
                bootstrap_iters=1000,  # stderr of non-mean metrics; lm-eval's 100k is slow on CPU
                apply_chat_template=apply_chat_template,
            )
    except (ConnectionError, OSError) as exc:
        # lm-eval's own tasks download their data from the hub on first use.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlimlmError(f"a task's data could not be loaded (offline, or not on the hub?): {first}") from exc
    results = {}
    for task, entry in out["results"].items():
        metrics = _metrics(entry)
        samples = out.get("n-samples", {}).get(task, {})
        metrics["samples"] = samples.get("effective")
        metrics["num_fewshot"] = out.get("n-shot", {}).get(task)
        metrics["limit"] = limit
        results[task] = metrics
    return results
