"""Core CLI commands: `info`, `importance`, `prune`, `search`, `run`.

Each parses its arguments into config objects (options generated from `slimlm.config`), calls
one Python function and prints the result; no orchestration lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from ._cli import DryRun, JsonOut, Model, Only, Overwrite, Quiet, emit_json, fmt_params, print_memory_plans, settings_command
from .config import DistillConfig, ImportanceConfig, MemoryConfig, PruneConfig, SearchConfig

console = Console(stderr=True)

ScoresIn = Annotated[Optional[Path], typer.Option("--scores", help="Reuse a scores file from `slimlm importance` (no forward pass).")]


def info(model: Model, json_out: JsonOut = False):
    """Show a model's architecture, shape and parameter counts (no weights are loaded)."""
    from . import api

    result = api.info(model)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{model}", show_header=False)
    for key in ("family", "architecture", "layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "tied",
                "experts", "experts_per_token", "moe_ffn", "shared_ffn", "mamba_heads", "mamba_head_dim", "mamba_groups"):
        if key in result:
            table.add_row(key, str(result[key]))
    table.add_row("parameters", f"{result['parameters']:,} ({fmt_params(result['parameters'])})")
    if result["active_parameters"] != result["parameters"]:
        table.add_row("active per token", f"{result['active_parameters']:,} ({fmt_params(result['active_parameters'])})")
    table.add_row("without embeddings", f"{result['parameters_without_embeddings']:,} ({fmt_params(result['parameters_without_embeddings'])})")
    Console().print(table)


@settings_command
def importance(
    model: Model,
    output: Annotated[Path, typer.Option("--output", "-o", help="Scores file to write (safetensors).")],
    config: ImportanceConfig,
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
):
    """Estimate importance of hidden channels, MLP neurons, attention heads and layers."""
    from . import api

    scores = api.importance(model, output, config, overwrite=overwrite, progress=not quiet)
    result = {"output": str(output), "importance": config.kind, "depth_metrics": sorted(scores.depth_scores),
              "block_sizes": sorted(scores.block_losses), **{k: scores.meta.get(k) for k in ("aggregation", "base_loss")}}
    console.print(f"[green]scores written to {output}[/green]")
    if json_out:
        emit_json(result)


@settings_command
def prune(
    model: Model,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the pruned checkpoint (written atomically).")],
    targets: PruneConfig,
    calibration: Annotated[ImportanceConfig, Only("data", "text_field", "calib_samples", "seq_len", "heldout",
                                                  "batch_size", "kind", "aggregation", "seed", "dtype", "device_map",
                                                  "offload")],
    scores: ScoresIn = None,
    save_scores: Annotated[Optional[Path], typer.Option("--save-scores", help="Also save the scores computed here.")] = None,
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
):
    """Prune a model in width and/or depth and write a standard Hugging Face checkpoint."""
    from . import api

    result = api.prune(model, output, targets, calibration, scores=scores, save_scores=save_scores, overwrite=overwrite,
                       progress=not quiet)
    b, a = result["parameters_before"], result["parameters_after"]
    s0, s1 = result["source_shape"], result["shape"]
    console.print(
        f"[green]pruned[/green] {model} -> {output}: layers {s0['layers']}->{s1['layers']}, hidden {s0['hidden']}->{s1['hidden']}, "
        f"ffn {s0['ffn']}->{s1['ffn']}, heads {s0['heads']}->{s1['heads']}, kv {s0['kv_heads']}->{s1['kv_heads']}"
        + "".join(f", {k} {s0[k]}->{s1[k]}" for k in ("experts", "moe_ffn", "shared_ffn", "mamba_heads") if k in s0)
        + f"; parameters {fmt_params(b)} -> {fmt_params(a)} ({a / b:.1%})"
        + (f", active {fmt_params(result['active_parameters_before'])} -> {fmt_params(result['active_parameters_after'])}"
           if "experts" in s0 else "")
    )
    if json_out:
        emit_json(result)


@settings_command
def search(
    model: Model,
    output: Annotated[Path, typer.Option("--output", "-o", help="Search folder: candidates, ranking, winner (resumable).")],
    config: SearchConfig,
    calibration: Annotated[ImportanceConfig, Only("data", "text_field", "calib_samples", "seed", "dtype")],
    distillation: Annotated[DistillConfig, Only("seq_len", "micro_batch", "global_batch", "lr", "min_lr", "warmup",
                                                "loss", "heldout", "chunk_size", "seed", "dtype", "text_field",
                                                "teacher_logits")],
    scores: Annotated[Optional[Path], typer.Option(
        "--scores", help="Reuse a scores file (else computed into OUT/scores.safetensors).")] = None,
    json_out: JsonOut = False,
    quiet: Quiet = False,
):
    """Find the best uniform shape for a parameter budget (total, or active for a MoE): candidates distilled in rungs, the
    best third kept each time."""
    from .search import search as run_search

    result = run_search(model, output, config, distillation, calibration, scores=scores, progress=not quiet)
    target, active = config.target()
    console.print(f"{result['candidates']} candidates within ±{config.tolerance:.0%} of {target / 1e6:.1f}M "
                  f"{'active ' if active else ''}parameters; {result['steps_used']} of {result['budget_steps']} "
                  "distillation steps spent")
    table = Table(title="search ranking (validation KL to the teacher at the last rung reached, lower is better)")
    moe = any(row.get("active_params") not in (None, row["params"]) for row in result["ranking"])
    for col in ("rank", "candidate", "parameters") + (("active",) if moe else ()) + ("rung", "steps", "val KL",
                                                                                     "val LM loss"):
        table.add_column(col)
    for i, row in enumerate(result["ranking"], 1):
        table.add_row(str(i), row["candidate"], fmt_params(row["params"]),
                      *([fmt_params(row["active_params"])] if moe else []), str(row["rung"]), str(row["steps"]),
                      f"{row['val_kl']:.4f}" if row["val_kl"] is not None else "-",
                      f"{row['val_lm_loss']:.4f}" if row["val_lm_loss"] is not None else "-")
    Console().print(table)
    console.print(f"[green]winner {result['winner']['candidate']} -> {result['winner_path']}[/green]")
    if json_out:
        emit_json(result)


@settings_command
def run_command(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML (default: the embedded SmolLM2-135M recipe).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder (default: runs/<recipe name>).")] = None,
    from_stage: Annotated[Optional[str], typer.Option(
        "--from", help="Redo from this stage: correct, importance, teacher_logits, prune, distill, align, eval, report.")] = None,
    memory: MemoryConfig = None,
    dry_run: DryRun = False,
    json_out: JsonOut = False,
    quiet: Quiet = False,
):
    """Run the whole recipe: teacher correction -> importance -> prune/search -> distill -> align -> eval -> report (resumable)."""
    from .evaluate.compare import comparison_table
    from .pipeline import run

    if dry_run:
        from .memory import plan_run
        from .recipe import load_recipe

        print_memory_plans(plan_run(load_recipe(recipe)[0], memory), json_out)
        return
    summary = run(recipe, output, from_stage=from_stage, progress=not quiet)
    Console().print(comparison_table(summary["results"], title=f"before / after ({summary['run']})"))
    if summary["report"]:
        Console().print(f"report: {summary['report']}")
    Console().print(f"student: {summary['student']}")
    if summary.get("aligned"):
        Console().print(f"aligned: {summary['aligned']}")
    if json_out:
        emit_json(summary)


def register(app: typer.Typer) -> None:
    """Add the core commands to the slimlm CLI."""
    app.command()(info)
    app.command()(importance)
    app.command()(prune)
    app.command()(search)
    app.command("run")(run_command)
