"""`slimlm align`: a thin wrapper over `slimlm.align.align` (imports stay light: no torch, no TRL)."""

from __future__ import annotations

from typing import Annotated

import typer

from .._cli import JsonOut, Overwrite, Quiet, Resume, emit_json, settings_command
from ..config import AlignConfig


@settings_command
def align_command(
    model: Annotated[str, typer.Argument(help="The model to instruction-tune (e.g. the output of slimlm distill).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder (a Hugging Face checkpoint in the end).")],
    config: AlignConfig,
    resume: Resume = False,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
):
    """Instruction-tune a model: SFT on chat data (loss on assistant tokens), then DPO with --prefs."""
    from accelerate import PartialState

    from . import align

    result = align(model, out=out, config=config, resume=resume, overwrite=overwrite, progress=not quiet)
    if not PartialState().is_main_process:
        return
    if result.complete:
        parts = [f"{name.upper()} {s['steps']} steps, {s['tokens']:,} tokens" for name, s in result.stages.items()]
        print(f"aligned model written to {result.out} ({'; '.join(parts)})")
    else:
        print(f"stopped; checkpoint {result.checkpoint} (continue with --resume)")
    if as_json:
        emit_json(result.as_dict())


def register(app: typer.Typer) -> None:
    """Add the `align` command to the slimlm CLI."""
    app.command("align")(align_command)
