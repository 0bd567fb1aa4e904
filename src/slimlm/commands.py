"""Core CLI commands: `info`, `importance`, `prune`.  Each maps onto `slimlm.api`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import api
from .cli import app, emit_json

console = Console(stderr=True)

MODEL_HELP = "A local Hugging Face folder, a hub id, a .gguf file, or the embedded alias 'smollm2-135m'."
DATA_HELP = "Calibration text: .txt/.jsonl/.parquet/.csv files, folders, globs, a saved `datasets` folder, hf:NAME[:CONFIG][@SPLIT]; default: builtin:python-docs (ships with Python)."


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n < 1e9 else f"{n / 1e9:,.2f}B"


@app.command()
def info(
    model: str = typer.Argument(..., help=MODEL_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
):
    """Show a model's architecture, shape and parameter counts (no weights are loaded)."""
    result = api.info(model)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{model}", show_header=False)
    for key in ("family", "architecture", "layers", "hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "tied"):
        table.add_row(key, str(result[key]))
    table.add_row("parameters", f"{result['parameters']:,} ({_fmt_params(result['parameters'])})")
    table.add_row("without embeddings", f"{result['parameters_without_embeddings']:,} ({_fmt_params(result['parameters_without_embeddings'])})")
    Console().print(table)


@app.command()
def importance(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Scores file to write (safetensors)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    text_field: str = typer.Option("text", help="Field holding the text in JSONL/Parquet/datasets sources."),
    calib_samples: int = typer.Option(api.DEFAULT_CALIB_SAMPLES, help="Calibration windows for the hooked pass (paper: 1024)."),
    seq_len: int = typer.Option(api.DEFAULT_SEQ_LEN, help="Tokens per calibration window."),
    heldout: int = typer.Option(api.DEFAULT_HELDOUT, help="Extra held-out windows for the LM-loss depth metrics (0: skip them)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    importance_kind: str = typer.Option("activation", "--importance", help="activation (Minitron), or the baselines magnitude, random."),
    aggregation: str = typer.Option("mean,l2", help="Reduction over sequence, then batch: SEQ in mean/l2/var, BATCH in l2/mean/var."),
    depth_loss: bool = typer.Option(True, "--depth-loss/--no-depth-loss", help="Also measure the LM-loss increase when each layer alone is removed."),
    block_sizes: str = typer.Option("", help="Comma-separated K: also score every window of K consecutive layers (for --depth-metric block)."),
    seed: int = typer.Option(0, help="Seed for window sampling (and random importance)."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."),
    device_map: Optional[str] = typer.Option(None, help="Accelerate device map, e.g. 'auto' to spread a large model over GPUs and CPU (default: auto when a GPU is present)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
):
    """Estimate importance of hidden channels, MLP neurons, attention heads and layers."""
    ks = _parse_ints(block_sizes, "--block-sizes")
    scores = api.importance(
        model, output, data=data, text_field=text_field, calib_samples=calib_samples, seq_len=seq_len,
        heldout=heldout, batch_size=batch_size, importance_kind=importance_kind, aggregation=aggregation,
        depth_loss=depth_loss, block_sizes=ks, seed=seed, dtype=dtype, device_map=device_map, overwrite=overwrite,
    )
    result = {"output": str(output), "importance": importance_kind, "depth_metrics": sorted(scores.depth_scores),
              "block_sizes": sorted(scores.block_losses), **{k: scores.meta.get(k) for k in ("aggregation", "base_loss")}}
    console.print(f"[green]scores written to {output}[/green]")
    if json_out:
        emit_json(result)


def _parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        from .errors import SlimlmError

        raise SlimlmError(f"{flag} expects comma-separated integers, got '{text}'") from None


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the pruned checkpoint (written atomically)."),
    hidden: Optional[int] = typer.Option(None, help="Hidden (embedding) channels to keep."),
    ffn: Optional[int] = typer.Option(None, help="MLP neurons to keep in every layer."),
    heads: Optional[int] = typer.Option(None, help="Query heads to keep in every layer (same number in every KV group)."),
    kv_heads: Optional[int] = typer.Option(None, help="Key/value heads to keep (default: all; NVIDIA found KV pruning harmful)."),
    layers: Optional[int] = typer.Option(None, help="Layers to keep, chosen by --depth-metric."),
    drop_layers: Optional[str] = typer.Option(None, help="Layers to remove by index, e.g. 20-25 or 3,7 (0-based, inclusive)."),
    depth_metric: str = typer.Option("block", help="block (best contiguous block by LM loss), loss (one layer out), bi (block importance)."),
    scores: Optional[Path] = typer.Option(None, help="Reuse a scores file from `slimlm importance` (no forward pass)."),
    save_scores: Optional[Path] = typer.Option(None, help="Also save the scores computed here."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    text_field: str = typer.Option("text", help="Field holding the text in JSONL/Parquet/datasets sources."),
    calib_samples: int = typer.Option(api.DEFAULT_CALIB_SAMPLES, help="Calibration windows (paper: 1024)."),
    seq_len: int = typer.Option(api.DEFAULT_SEQ_LEN, help="Tokens per calibration window."),
    heldout: int = typer.Option(api.DEFAULT_HELDOUT, help="Held-out windows for the LM-loss depth metrics."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    importance_kind: str = typer.Option("activation", "--importance", help="activation (Minitron), magnitude or random (baselines)."),
    aggregation: str = typer.Option("mean,l2", help="Reduction over sequence, then batch (see `slimlm importance --help`)."),
    seed: int = typer.Option(0, help="Seed for window sampling (and random importance)."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."),
    device_map: Optional[str] = typer.Option(None, help="Accelerate device map for the importance pass (default: auto when a GPU is present)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
):
    """Prune a model in width and/or depth and write a standard Hugging Face checkpoint."""
    result = api.prune(
        model, output, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers,
        drop_layers=drop_layers, depth_metric=depth_metric, scores=scores, save_scores=save_scores, data=data,
        text_field=text_field, calib_samples=calib_samples, seq_len=seq_len, heldout=heldout, batch_size=batch_size,
        importance_kind=importance_kind, aggregation=aggregation, seed=seed, dtype=dtype, device_map=device_map,
        overwrite=overwrite,
    )
    b, a = result["parameters_before"], result["parameters_after"]
    s0, s1 = result["source_shape"], result["shape"]
    console.print(
        f"[green]pruned[/green] {model} -> {output}: layers {s0['layers']}->{s1['layers']}, hidden {s0['hidden']}->{s1['hidden']}, "
        f"ffn {s0['ffn']}->{s1['ffn']}, heads {s0['heads']}->{s1['heads']}, kv {s0['kv_heads']}->{s1['kv_heads']}; "
        f"parameters {_fmt_params(b)} -> {_fmt_params(a)} ({a / b:.1%})"
    )
    if json_out:
        emit_json(result)


@app.command()
def search(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Search folder: candidates, ranking, winner (resumable)."),
    target_params: float = typer.Option(..., help="Parameter target, e.g. 9e7."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    text_field: str = typer.Option("text", help="Field holding the text in JSONL/Parquet/datasets sources."),
    tolerance: float = typer.Option(0.05, help="Keep shapes within this fraction of the target."),
    max_width_prune: float = typer.Option(0.4, help="Largest fraction of any width axis to remove."),
    max_depth_prune: float = typer.Option(0.2, help="Largest fraction of layers to remove."),
    max_candidates: int = typer.Option(8, help="Distill at most this many candidates (closest to the target first)."),
    keep_heads: bool = typer.Option(False, "--keep-heads", help="Do not prune attention heads (the paper's choice)."),
    hidden_step: int = typer.Option(64, help="Grid step of the hidden size."),
    ffn_step: int = typer.Option(128, help="Grid step of the MLP size."),
    search_tokens: int = typer.Option(20000, help="Distillation tokens per candidate (paper: ~400 steps)."),
    scores: Optional[Path] = typer.Option(None, help="Reuse a scores file (else computed into OUT/scores.safetensors)."),
    calib_samples: int = typer.Option(api.DEFAULT_CALIB_SAMPLES, help="Calibration windows."),
    seq_len: int = typer.Option(api.DEFAULT_SEQ_LEN, help="Tokens per window (calibration and distillation)."),
    micro_batch: int = typer.Option(4, help="Distillation micro-batch."),
    global_batch: int = typer.Option(16, help="Distillation global batch."),
    lr: float = typer.Option(1e-4, help="Peak learning rate of the short distillations."),
    seed: int = typer.Option(0, help="Seed."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
):
    """Find the best uniform shape for a parameter budget: prune candidates, distill each briefly, rank by validation KL."""
    from .search import search_model

    results, winner = search_model(
        model, output, target_params, data=data, text_field=text_field, tolerance=tolerance,
        max_width_prune=max_width_prune, max_depth_prune=max_depth_prune, max_candidates=max_candidates,
        prune_heads=not keep_heads, hidden_step=hidden_step, ffn_step=ffn_step, search_tokens=search_tokens,
        scores=scores, calib_samples=calib_samples, seq_len=seq_len, micro_batch=micro_batch,
        global_batch=global_batch, lr=lr, seed=seed, dtype=dtype, say=console.print)
    table = Table(title="search ranking (validation KL to the teacher, lower is better)")
    for col in ("rank", "candidate", "parameters", "val KL", "val LM loss"):
        table.add_column(col)
    for i, row in enumerate(results, 1):
        table.add_row(str(i), row["candidate"], _fmt_params(row["params"]),
                      f"{row['val_kl']:.4f}" if row["val_kl"] is not None else "-",
                      f"{row['val_lm_loss']:.4f}" if row["val_lm_loss"] is not None else "-")
    Console().print(table)
    console.print(f"[green]winner {results[0]['candidate']} -> {winner}[/green]")
    if json_out:
        emit_json({"output": str(output), "winner": results[0], "winner_path": str(winner), "ranking": results})


@app.command("run")
def run_command(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe YAML (default: the embedded SmolLM2-135M recipe)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/<recipe name>)."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Redo from this stage: correct, importance, prune, distill, align, eval, report."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout."),
):
    """Run the whole recipe: teacher correction -> importance -> prune/search -> distill -> align -> eval -> report (resumable)."""
    from .pipeline import STAGES, run
    from .recipe import load_recipe

    if from_stage is not None and from_stage not in STAGES:
        from .errors import SlimlmError

        raise SlimlmError(f"--from expects one of {', '.join(STAGES)}, got '{from_stage}'")
    r, text = load_recipe(recipe)
    out = output or Path("runs") / (recipe.stem if recipe else "default")
    summary = run(r, text, out, from_stage=from_stage)
    table = Table(title=f"before / after ({out})")
    for col in ("model", "parameters", "perplexity", "prefill tok/s", "decode tok/s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for row in summary["rows"]:
        table.add_row(
            row["model"],
            _fmt_params(row["parameters"]) if row["parameters"] else "-",
            f"{row['ppl']:.2f}" if row["ppl"] else "-",
            f"{row['prefill_tok_s']:.0f}" if row["prefill_tok_s"] else "-",
            f"{row['decode_tok_s']:.1f}" if row["decode_tok_s"] else "-",
        )
    Console().print(table)
    if summary["report"]:
        Console().print(f"report: {summary['report']}")
    Console().print(f"student: {summary['student']}")
    if summary.get("aligned"):
        Console().print(f"aligned: {summary['aligned']}")
    if json_out:
        emit_json(summary)
