"""`slimlm distill` and `slimlm correct-teacher`: thin wrappers over `slimlm.distill.distill`.

Imports stay light here (no torch) so that `slimlm --help` is fast; the trainer loads on use.
"""

import re
from typing import List, Optional

import typer

from ..errors import SlimlmError

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str, what: str = "--tokens") -> int:
    """'100000', '1e5', '100k', '2.5M', '94B' -> an integer."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if not m:
        raise SlimlmError(f"{what} must be a number like 100000, 1e5, 250k or 2M, got '{text}'")
    value = int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))
    if value < 1:
        raise SlimlmError(f"{what} must be at least 1, got '{text}'")
    return value


def _report(result, as_json: bool, what: str) -> None:
    from accelerate import PartialState

    from ..cli import emit_json

    if not PartialState().is_main_process:  # under a launcher, one process reports
        return

    m = result.metrics or {}
    parts = [f"{result.steps} steps", f"{result.tokens:,} tokens"]
    if "val_kl" in m:
        parts.append(f"val KL {m['val_kl']:.4f}")
    if "val_lm_loss" in m:
        parts.append(f"val LM loss {m['val_lm_loss']:.4f}")
    if result.complete:
        print(f"{what} written to {result.out} ({', '.join(parts)})")
    else:
        print(f"stopped at step {result.steps}; checkpoint {result.checkpoint} (continue with --resume)")
    if as_json:
        emit_json(result.as_dict())


DATA_HELP = ("Training text source (file, folder, glob, saved dataset, hub name; default builtin:python-docs). "
             "Repeat to mix several sources: --data a.txt --data corpus/ (equal weights, or --data-weights).")
WEIGHTS_HELP = ("Mixing weights, one per --data in the same order, comma-separated: --data-weights 0.7,0.3 "
                "(relative; the windows are interleaved in a seeded order that keeps these proportions).")
CACHE_HELP = ("Folder of the token caches (default $SLIMLM_TOKEN_CACHE or ~/.cache/slimlm/tokens); each "
              "source is tokenized once there and reused. Delete it to clear the cache.")


def data_arg(data: Optional[List[str]]):
    """The repeatable --data as distill() takes it: None (default corpus), one source, or a list."""
    if not data:
        return "builtin:python-docs"
    return data[0] if len(data) == 1 else list(data)


def register(app: typer.Typer) -> None:
    """Add the `distill` and `correct-teacher` commands to the slimlm CLI."""

    @app.command("distill")
    def distill_cmd(
        teacher: str = typer.Option(..., "--teacher", "-t", help="Teacher model: folder, hub id, .gguf or alias."),
        student: str = typer.Option(..., "--student", "-s", help="Student model (e.g. the output of slimlm prune)."),
        data: Optional[List[str]] = typer.Option(None, "--data", "-d", help=DATA_HELP),
        data_weights: Optional[str] = typer.Option(None, "--data-weights", help=WEIGHTS_HELP),
        token_cache: Optional[str] = typer.Option(None, "--token-cache", help=CACHE_HELP),
        out: str = typer.Option(..., "--out", "-o", help="Output folder (a Hugging Face checkpoint in the end)."),
        tokens: str = typer.Option("100k", "--tokens", "-n", help="Token budget: 100000, 1e5, 250k, 2M, 94B."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per training window."),
        micro_batch: int = typer.Option(4, "--micro-batch", help="Windows per forward pass per process."),
        global_batch: Optional[int] = typer.Option(
            None, "--global-batch", help="Windows per optimizer step (default micro-batch x processes)."),
        lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate."),
        min_lr: float = typer.Option(1e-5, "--min-lr", help="Final learning rate of the cosine decay."),
        warmup: int = typer.Option(40, "--warmup", help="Warm-up steps (clamped to 10% of the run)."),
        loss: str = typer.Option("kl", "--loss", help="kl (forward KL, Minitron), reverse-kl or jsd."),
        temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature of the KD loss."),
        ce_weight: float = typer.Option(0.0, "--ce-weight", help="Weight of an added student cross-entropy term."),
        hidden_loss: Optional[str] = typer.Option(
            None, "--hidden-loss", help="'cosine': also match intermediate hidden states."),
        layer_map: Optional[str] = typer.Option(
            None, "--layer-map", help="Student:teacher layer pairs for --hidden-loss, e.g. 0:1,1:3 (default evenly spaced)."),
        mode: str = typer.Option("kd", "--mode", help="kd (distillation) or lm (plain LM loss, a baseline)."),
        chunk_size: int = typer.Option(
            512, "--chunk-size", help="Tokens per loss chunk (vocabulary-sized memory is a few chunk x vocab tensors); 0: one chunk."),
        gradient_checkpointing: bool = typer.Option(
            False, "--gradient-checkpointing", help="Recompute student layers in backward (less memory)."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validate every N steps (0: never)."),
        heldout: int = typer.Option(16, "--heldout", help="Held-out windows for validation."),
        eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Separate held-out text source."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: never)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data order and initialisation."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16."),
        text_field: str = typer.Option("text", "--text-field", help="Text column of JSON/Parquet/CSV/datasets sources."),
        chat: bool = typer.Option(
            False, "--chat", help="--data is chat JSONL ({\"messages\": [...]}), rendered with the chat template: "
                                  "an instruct teacher gives an instruct student."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Distill a teacher into a (pruned) student with the Minitron loss (forward KL on logits)."""
        from . import distill

        result = distill(
            teacher, student, data_arg(data), out, parse_count(tokens), data_weights=data_weights,
            token_cache=token_cache,
            seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, lr=lr, min_lr=min_lr,
            warmup=warmup, loss=loss, temperature=temperature, ce_weight=ce_weight, hidden_loss=hidden_loss,
            layer_map=layer_map, mode=mode, eval_every=eval_every, heldout=heldout, eval_data=eval_data,
            save_every=save_every, resume=resume, seed=seed, dtype=dtype, text_field=text_field,
            overwrite=overwrite, progress=not quiet, chunk_size=chunk_size,
            gradient_checkpointing=gradient_checkpointing, chat=chat,
        )
        _report(result, as_json, "distilled student" if mode == "kd" else "LM-trained student")

    @app.command("correct-teacher")
    def correct_teacher_cmd(
        model: str = typer.Argument(..., help="The teacher to fine-tune on the distillation data."),
        data: Optional[List[str]] = typer.Option(None, "--data", "-d", help=DATA_HELP),
        data_weights: Optional[str] = typer.Option(None, "--data-weights", help=WEIGHTS_HELP),
        token_cache: Optional[str] = typer.Option(None, "--token-cache", help=CACHE_HELP),
        out: str = typer.Option(..., "--out", "-o", help="Output folder for the corrected teacher."),
        tokens: str = typer.Option("100k", "--tokens", "-n", help="Token budget: 100000, 1e5, 250k, 2M."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per training window."),
        micro_batch: int = typer.Option(4, "--micro-batch", help="Windows per forward pass per process."),
        global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Windows per optimizer step."),
        lr: float = typer.Option(1e-5, "--lr", help="Peak LR; Minitron uses a fifth of the teacher's original."),
        min_lr: Optional[float] = typer.Option(None, "--min-lr", help="Final LR (default lr / 10)."),
        warmup: int = typer.Option(120, "--warmup", help="Warm-up steps (clamped to 10% of the run)."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validate every N steps (0: never)."),
        heldout: int = typer.Option(16, "--heldout", help="Held-out windows for validation."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: never)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
        seed: int = typer.Option(0, "--seed"),
        dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16, fp16."),
        text_field: str = typer.Option("text", "--text-field"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Teacher correction: fine-tune the teacher with the LM loss on the data the student will see."""
        from . import distill

        result = distill(
            None, model, data_arg(data), out, parse_count(tokens), mode="lm", data_weights=data_weights,
            token_cache=token_cache, seq_len=seq_len, micro_batch=micro_batch,
            global_batch=global_batch, lr=lr, min_lr=lr / 10 if min_lr is None else min_lr, warmup=warmup,
            eval_every=eval_every, heldout=heldout, save_every=save_every, resume=resume, seed=seed, dtype=dtype,
            text_field=text_field, overwrite=overwrite, progress=not quiet,
        )
        _report(result, as_json, "corrected teacher")
