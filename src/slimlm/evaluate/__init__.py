"""Evaluation: perplexity, LM Evaluation Harness tasks, speed; and run reports.

    from slimlm.evaluate import evaluate
    evaluate("pruned/", ppl="wiki.test.raw", tasks="hellaswag_local",
             task_data={"hellaswag": "hellaswag_val.txt.bz2"}, limit=200, speed=True)

Names load on first use: `slimlm --help` imports `slimlm.evaluate.cli`, which must not pull in torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "perplexity": "ppl",
    "check_eval_args": "runner",
    "check_models": "runner",
    "count_parameters": "runner",
    "evaluate": "runner",
    "load_results": "runner",
    "save_results": "runner",
    "speed": "throughput",
    "SHIPPED_TASKS_DIR": "tasks",
    "run_tasks": "tasks",
    "compare": "compare",
    "comparison_rows": "compare",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
