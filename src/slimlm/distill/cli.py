"""`slimlm distill`, `slimlm correct-teacher` and `slimlm teacher-logits`: thin wrappers over `slimlm.distill`.

Imports stay light here (no torch) so that `slimlm --help` is fast; the trainer loads on use.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .._cli import DryRun, JsonOut, Model, Overwrite, Quiet, Resume, emit_json, print_memory_plans, settings_command
from ..config import CorrectConfig, DistillConfig, MemoryConfig, TeacherLogitsConfig, parse_count

__all__ = ["register", "parse_count"]

Out = Annotated[str, typer.Option("--out", "-o", help="Output folder (a Hugging Face checkpoint in the end).")]


def _report(result, as_json: bool, what: str) -> None:
    from accelerate import PartialState

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


@settings_command
def distill_command(
    student: Annotated[str, typer.Option("--student", "-s", help="Student model (e.g. the output of slimlm prune).")],
    out: Out,
    config: DistillConfig,
    memory: MemoryConfig,
    teacher: Annotated[Optional[str], typer.Option(
        "--teacher", "-t", help="Teacher model: folder, hub id, .gguf or alias (with --teacher-logits: optional, checked "
                                "against the cache).")] = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    dry_run: DryRun = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
):
    """Distill a teacher into a (pruned) student with the Minitron loss (forward KL on logits).

    With --teacher-logits CACHE (written by `slimlm teacher-logits`) the teacher is not loaded.
    """
    if dry_run:
        from ..memory import plan_distill

        # With a cache no teacher is loaded: plan for the student alone.
        planned = None if config.teacher_logits else teacher
        print_memory_plans([("", plan_distill(planned, student, config, memory))], as_json)
        return
    from . import distill

    result = distill(teacher, student, out=out, config=config, resume=resume, overwrite=overwrite,
                     progress=not quiet)
    _report(result, as_json, "distilled student" if config.mode == "kd" else "LM-trained student")


@settings_command
def correct_teacher_command(
    model: Annotated[str, typer.Argument(help="The teacher to fine-tune on the distillation data.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder for the corrected teacher.")],
    config: CorrectConfig,
    resume: Resume = False,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
):
    """Teacher correction: fine-tune the teacher with the LM loss on the data the student will see."""
    from . import correct_teacher

    result = correct_teacher(model, out, config=config, resume=resume, overwrite=overwrite,
                             progress=not quiet)
    _report(result, as_json, "corrected teacher")


@settings_command
def teacher_logits_command(
    teacher: Model,
    output: Annotated[str, typer.Option("--output", "-o", help="Cache folder (continued or extended when it exists).")],
    config: TeacherLogitsConfig,
    overwrite: Overwrite = False,
    as_json: JsonOut = False,
    quiet: Quiet = False,
):
    """Run the teacher once over a distillation's windows; store its top-K log-probabilities (resumable, extendable)."""
    from .teacher_logits import write_cache

    result = write_cache(teacher, output, config, overwrite=overwrite, progress=not quiet)
    if as_json:
        emit_json(result)


def register(app: typer.Typer) -> None:
    """Add the `distill`, `correct-teacher` and `teacher-logits` commands to the slimlm CLI."""
    app.command("distill")(distill_command)
    app.command("correct-teacher")(correct_teacher_command)
    app.command("teacher-logits")(teacher_logits_command)
