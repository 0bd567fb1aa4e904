"""`slimlm eval` and `slimlm report`: thin layers over `slimlm.evaluate`."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

MODELS_HELP = "Models to evaluate, one after another: local folders, hub ids, .gguf files, or the alias 'smollm2-135m'."
PPL_HELP = "Text for perplexity: a .txt/.jsonl/.parquet file, folder, glob, saved dataset, hf:NAME[:CONFIG][@SPLIT] or builtin:python-docs."
TASKS_HELP = ("Comma-separated lm-eval tasks (any name lm-eval knows, a task YAML path) or slimlm's local tasks "
              "hellaswag_local and mc_local (their data via --task-data).")
TASK_DATA_HELP = ("NAME=PATH: a local file for a local task, e.g. hellaswag=hellaswag_val_full.txt.bz2 "
                  "(6-line text or Rowan/hellaswag JSONL) or mc=items.jsonl. Repeatable.")


def eval_command(
    models: List[str] = typer.Argument(..., help=MODELS_HELP),
    ppl: Optional[str] = typer.Option(None, "--ppl", help=PPL_HELP),
    seq_len: int = typer.Option(512, help="Perplexity window length in tokens (BOS included)."),
    stride: Optional[int] = typer.Option(None, help="Perplexity window step (default and most: --seq-len - 1; windows then share one context token)."),
    max_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens of the perplexity text."),
    text_field: str = typer.Option("text", help="Field holding the text in JSONL/Parquet/datasets sources."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help=TASKS_HELP),
    task_data: Optional[List[str]] = typer.Option(None, "--task-data", help=TASK_DATA_HELP),
    include_path: Optional[List[Path]] = typer.Option(None, "--include-path", help="A folder of your own lm-eval task YAMLs. Repeatable."),
    limit: Optional[float] = typer.Option(None, help="Items per task (a fraction of them when below 1)."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples per item (default: each task's own)."),
    speed: bool = typer.Option(False, "--speed", help="Measure prefill and decode tokens/s and peak memory."),
    batch_size: int = typer.Option(1, help="Batch size for perplexity, tasks and speed."),
    prompt_len: int = typer.Option(128, help="Prompt tokens for --speed."),
    new_tokens: int = typer.Option(32, help="Generated tokens for --speed."),
    repeats: int = typer.Option(3, help="Timed runs for --speed (the median is kept)."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."),
    save: bool = typer.Option(True, "--save/--no-save", help="Merge the results into eval.json in each model's folder."),
    chat_prompts: Optional[Path] = typer.Option(
        None, "--chat-prompts", help="Prompts to answer (greedy) with the chat template: JSONL with 'prompt' or "
                                     "'messages', or text with one prompt a line. Answers go side by side into chat_answers.jsonl."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Longest answer for --chat-prompts, in tokens."),
    chat_template: bool = typer.Option(False, "--chat-template", help="Run the lm-eval tasks with the chat template (instruct models)."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Where chat_answers.jsonl goes: a folder or a .jsonl file (default: the first model's folder)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
):
    """Perplexity, lm-eval tasks, speed and chat answers of one or more models, compared in one table."""
    from ..cli import emit_json
    from . import check_evaluation, evaluate

    settings = dict(ppl=ppl, seq_len=seq_len, stride=stride, max_tokens=max_tokens, text_field=text_field,
                    tasks=tasks, task_data=task_data, include_path=include_path or None,
                    limit=limit,
                    num_fewshot=num_fewshot, speed=speed, batch_size=batch_size, prompt_len=prompt_len,
                    new_tokens=new_tokens, repeats=repeats, chat_prompts=chat_prompts, max_new_tokens=max_new_tokens)
    # Everything is checked before the first model loads.
    check_evaluation(models, output=output, dtype=dtype, chat_template=chat_template, **settings)

    err = Console(stderr=True)
    results = []
    for spec in models:
        err.print(f"[bold]evaluating {spec}[/bold]")
        result = evaluate(spec, dtype=dtype, save=save, progress=True, chat_template=chat_template, **settings)
        if result.get("saved_to"):
            err.print(f"results saved to {result['saved_to']}")
        results.append(result)
        gc.collect()  # the model is gone: free it before the next one is measured
    table = comparison_table(results)
    (err if json_out else Console()).print(table)
    answers = None
    if chat_prompts is not None:
        from .chat import write_side_by_side

        answers = write_side_by_side(results, output)
        err.print(f"chat answers written to {answers}")
    if json_out:
        emit_json({"models": results, **({"chat_answers": answers} if answers else {})})


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def comparison_table(results: list[dict]) -> Table:
    """One column per model; rows for parameters, perplexity, each task metric, speed."""
    table = Table(title="slimlm eval")
    table.add_column("metric")
    for r in results:
        table.add_column(Path(str(r["model"])).name or str(r["model"]), justify="right")
    rows: list[tuple[str, list]] = [("parameters", [r.get("parameters") for r in results])]
    if any("perplexity" in r for r in results):
        rows.append(("perplexity", [r.get("perplexity", {}).get("ppl") for r in results]))
    task_metrics: dict[tuple[str, str], None] = {}
    for r in results:
        for task, metrics in r.get("tasks", {}).items():
            for metric, value in metrics.items():
                if isinstance(value, float) and not metric.endswith("_stderr") and metric != "limit":
                    task_metrics[(task, metric)] = None
    for task, metric in task_metrics:
        rows.append((f"{task} {metric}", [r.get("tasks", {}).get(task, {}).get(metric) for r in results]))
    if any("speed" in r for r in results):
        for key, label in (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
                           ("peak_mem_mb", "peak memory MB")):
            rows.append((label, [r.get("speed", {}).get(key) for r in results]))
    for label, values in rows:
        table.add_row(label, *(_fmt(v) for v in values))
    return table


def report_command(
    run_dir: Path = typer.Argument(..., help="A run folder: scores.safetensors, metrics.jsonl, model folders with eval.json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default: RUN_DIR/report)."),
    compare: Optional[List[Path]] = typer.Option(None, "--eval", help="More eval.json files (or model folders) for the before/after table. Repeatable."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
):
    """Write an HTML page (self-contained) and a Markdown report with plots of a run."""
    from ..cli import emit_json
    from .report import write_report

    out = write_report(run_dir, output, extra_evals=compare or [])
    Console(stderr=True).print(f"[green]report written to {out['html']} and {out['markdown']}[/green]")
    if json_out:
        emit_json(out)


def register(app: typer.Typer) -> None:
    """Add `eval` and `report` to the slimlm command line."""
    app.command("eval")(eval_command)
    app.command("report")(report_command)
