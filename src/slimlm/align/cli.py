"""`slimlm align`: a thin wrapper over `slimlm.align.align` (imports stay light: no torch, no TRL)."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the `align` command to the slimlm CLI."""

    @app.command("align")
    def align_cmd(
        model: str = typer.Argument(..., help="The model to instruction-tune (e.g. the output of slimlm distill)."),
        sft: str = typer.Option(..., "--sft", help="Chat data: JSONL of {\"messages\": [{\"role\", \"content\"}, ...]}."),
        prefs: Optional[str] = typer.Option(
            None, "--prefs", help="Preference pairs for DPO after SFT: JSONL of {\"prompt\", \"chosen\", \"rejected\"}."),
        out: str = typer.Option(..., "--out", "-o", help="Output folder (a Hugging Face checkpoint in the end)."),
        tokens: str = typer.Option("100k", "--tokens", "-n", help="SFT token budget: 100000, 1e5, 250k, 2M."),
        dpo_tokens: Optional[str] = typer.Option(None, "--dpo-tokens", help="DPO token budget (default: --tokens)."),
        seq_len: Optional[int] = typer.Option(
            None, "--seq-len", help="Longest example in tokens, longer ones truncated (default 1024, or the model's limit)."),
        micro_batch: int = typer.Option(4, "--micro-batch", help="Examples per forward pass per process."),
        global_batch: Optional[int] = typer.Option(
            None, "--global-batch", help="Examples per optimizer step (default micro-batch x processes)."),
        lr: float = typer.Option(2e-5, "--lr", help="Peak learning rate of SFT."),
        dpo_lr: float = typer.Option(1e-6, "--dpo-lr", help="Peak learning rate of DPO."),
        beta: float = typer.Option(0.1, "--beta", help="DPO's beta (strength of the pull towards the SFT model)."),
        warmup: int = typer.Option(40, "--warmup", help="Warm-up steps (clamped to 10% of each stage)."),
        chat_template_from: Optional[str] = typer.Option(
            None, "--chat-template-from", help="Take the chat template from this model (e.g. the teacher) or .jinja "
                                               "file when MODEL has none."),
        gradient_checkpointing: bool = typer.Option(
            False, "--gradient-checkpointing", help="Recompute layers in backward (less memory)."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps (0: never)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
        seed: int = typer.Option(0, "--seed", help="Seed of the data order."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last line."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ):
        """Instruction-tune a model: SFT on chat data (loss on assistant tokens), then DPO with --prefs."""
        from ..distill.cli import parse_count
        from . import align

        result = align(
            model, sft, out, prefs, tokens=parse_count(tokens),
            dpo_tokens=parse_count(dpo_tokens, "--dpo-tokens") if dpo_tokens else None, seq_len=seq_len,
            micro_batch=micro_batch, global_batch=global_batch, lr=lr, dpo_lr=dpo_lr, beta=beta, warmup=warmup,
            chat_template_from=chat_template_from, gradient_checkpointing=gradient_checkpointing,
            save_every=save_every, resume=resume, seed=seed, dtype=dtype, overwrite=overwrite, progress=not quiet,
        )
        from accelerate import PartialState

        from ..cli import emit_json

        if not PartialState().is_main_process:
            return
        if result.complete:
            parts = [f"{name.upper()} {s['steps']} steps, {s['tokens']:,} tokens" for name, s in result.stages.items()]
            print(f"aligned model written to {result.out} ({'; '.join(parts)})")
        else:
            print(f"stopped; checkpoint {result.checkpoint} (continue with --resume)")
        if as_json:
            emit_json(result.as_dict())
