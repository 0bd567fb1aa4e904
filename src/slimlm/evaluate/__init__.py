"""Evaluation: perplexity, LM Evaluation Harness tasks, speed; and run reports.

    from slimlm.evaluate import evaluate
    evaluate("pruned/", ppl="wiki.test.raw", tasks="hellaswag_local",
             task_data={"hellaswag": "hellaswag_val.txt.bz2"}, limit=200, speed=True, save=True)
"""

from .ppl import perplexity
from .runner import check_eval_args, check_evaluation, check_models, count_parameters, evaluate, load_results, save_results
from .throughput import speed
from .tasks import SHIPPED_TASKS_DIR, run_tasks

__all__ = [
    "SHIPPED_TASKS_DIR",
    "check_eval_args",
    "check_evaluation",
    "check_models",
    "count_parameters",
    "evaluate",
    "load_results",
    "perplexity",
    "run_tasks",
    "save_results",
    "speed",
]
