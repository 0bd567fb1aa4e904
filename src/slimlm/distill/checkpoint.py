"""Atomic training checkpoints through Accelerate (model, optimizer, scheduler, RNG) plus run state.

Layout under the run folder::

    checkpoints/step-00000040/   accelerator.save_state(...) + trainer_state.json
    checkpoints/latest           the name of the newest complete checkpoint

Every process writes its part into ``step-N.tmp``; the main process then renames it and
updates ``latest``, so a crash mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def save_checkpoint(accelerator, run_dir: Path, step: int, trainer_state: dict, keep: int = 1) -> Path:
    """Save the full training state at `step`; keep the newest `keep` checkpoints. Call on every process."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    from accelerate.utils import DistributedType

    # DeepSpeed would also store its partitions of the frozen teacher; the teacher is an input, not state.
    extra = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    with _quiet("accelerate.utils.other"):
        accelerator.save_state(str(tmp), **extra)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", trainer_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name + "\n")
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(len(done) - keep, 0)]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler and RNG from `path`; return its trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())


@contextmanager
def _quiet(name: str):
    """Silence one logger: Accelerate warns on every save that a tied LM head is stored once (expected)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def prepare_run_dir(out: Path, run_dir: Path, *, resume: bool, overwrite: bool, settings: dict) -> None:
    """Main process only: clear a replaced run's state, create the run folder, record its settings."""
    from .._io import atomic_write_json

    if not resume and overwrite:
        shutil.rmtree(run_dir, ignore_errors=True)
        # The old model files stay until the atomic export replaces the folder, but no longer
        # claim to be a finished run.
        for name in ("metrics.jsonl", "slimlm.json"):
            (Path(out) / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_json(run_dir / "config.json", settings)
