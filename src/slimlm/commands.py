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
