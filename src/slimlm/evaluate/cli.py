"""`slimlm eval` and `slimlm report`: thin layers over `slimlm.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console

from .._cli import JsonOut, Quiet, emit_json, settings_command
from ..config import EvalConfig

MODELS_HELP = "Models to evaluate, one after another: local folders, hub ids, .gguf files, or the alias 'smollm2-135m'."


@settings_command
def eval_command(
    models: Annotated[List[str], typer.Argument(help=MODELS_HELP)],
    config: EvalConfig,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Where chat_answers.jsonl goes: a folder or a .jsonl file (default: the first model's folder).")] = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
):
    """Perplexity, lm-eval tasks, speed and chat answers of one or more models, compared in one table."""
    from .compare import compare, comparison_table

    result = compare(models, config, output=output, progress=not quiet)
    err = Console(stderr=True)
    (err if json_out else Console()).print(comparison_table(result["models"]))
    if result.get("chat_answers"):
        err.print(f"chat answers written to {result['chat_answers']}")
    if json_out:
        emit_json(result)


def report_command(
    run_dir: Path = typer.Argument(..., help="A run folder: scores.safetensors, metrics.jsonl, model folders with eval.json."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Report folder (default: RUN_DIR/report)."),
    compare: Optional[List[Path]] = typer.Option(None, "--eval", help="More eval.json files (or model folders) for the before/after table. Repeatable."),
    json_out: JsonOut = False,
):
    """Write an HTML page (self-contained) and a Markdown report with plots of a run."""
    from .report import write_report

    out = write_report(run_dir, output, extra_evals=compare or [])
    Console(stderr=True).print(f"[green]report written to {out['html']} and {out['markdown']}[/green]")
    if json_out:
        emit_json(out)


def register(app: typer.Typer) -> None:
    """Add `eval` and `report` to the slimlm command line."""
    app.command("eval")(eval_command)
    app.command("report")(report_command)
