"""The output folder of a training run: checked before any work, cleaned up when a run fails before its first checkpoint.

Layout::

    OUT/                  the trained model in the end (a standard Hugging Face checkpoint, slimlm.json)
    OUT/metrics.jsonl     one JSON record per training / validation / error event
    OUT/run/config.json   the settings that shape training (compared on --resume)
    OUT/run/...           checkpoints and TensorBoard logs (the trainer's own layout)

A run that has `run/config.json` and no `slimlm.json` is unfinished: `--resume` continues it
(when it holds a checkpoint), `--overwrite` starts it again.  A run that fails before any
checkpoint exists removes what it wrote, so that the corrected command can simply be rerun.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .._io import atomic_write_json, check_writable_output
from ..errors import SlimlmError


class RunFolder:
    """A run's output folder `out`, its state folder `out/run`, and what this run wrote there."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).expanduser()
        self.run = self.out / "run"
        self.created_out = False  # set by prepare(): whether this run made `out` itself

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def settings_file(self) -> Path:
        return self.run / "config.json"

    def finished(self) -> bool:
        """The run ended with an exported model."""
        return (self.out / "slimlm.json").exists()

    def unfinished(self) -> bool:
        """A run was started here and has not exported its model."""
        return self.settings_file.exists() and not self.finished()

    # ---- checks before any work ------------------------------------------------------------
    def refuse_inputs(self, *specs, what: str = "one of the input models") -> None:
        """SlimlmError when the output folder is one of the input models (it would be replaced), resumed or not."""
        for spec in specs:
            if spec and Path(spec).expanduser().exists() and Path(spec).expanduser().resolve() == self.out.resolve():
                raise SlimlmError(f"the output {self.out} is {what}; choose another folder")

    def check_start(self, *, resume: bool, overwrite: bool, has_checkpoint: bool, where: Path | None = None,
                    inputs=()) -> None:
        """The output can take this run: something to resume, or a folder that may be (over)written and
        replaces none of the command's `inputs` (model folders, data files)."""
        if resume:
            if not has_checkpoint:
                raise SlimlmError(f"nothing to resume in {self.out} (no checkpoint under {where or self.run})")
            return
        if self.unfinished() and not overwrite:
            if has_checkpoint:
                raise SlimlmError(f"output {self.out} holds an unfinished run: pass --resume to continue it or "
                                  "--overwrite")
            raise SlimlmError(f"output {self.out} holds an unfinished run that has no checkpoint: pass --overwrite "
                              "to start again")
        check_writable_output(self.out, overwrite=overwrite, inputs=inputs)

    def check_same_run(self, settings: dict) -> None:
        """--resume must continue the same run: the settings that shape training must match the recorded ones."""
        if not self.settings_file.exists():
            return
        saved = json.loads(self.settings_file.read_text())
        differ = [k for k in settings if k in saved and saved[k] != settings[k]]
        if differ:
            detail = ", ".join(f"{k}: {saved[k]!r} -> {settings[k]!r}" for k in differ)
            raise SlimlmError(f"--resume with different settings than the run in {self.out} ({detail})")

    # ---- writing ---------------------------------------------------------------------------
    def prepare(self, *, resume: bool, overwrite: bool, settings: dict) -> None:
        """Main process only: clear a replaced run's state, create the run folder, record its settings."""
        self.created_out = not self.out.exists()
        if not resume and overwrite:
            shutil.rmtree(self.run, ignore_errors=True)
            # The old model files stay until the atomic export replaces the folder, but no longer
            # claim to be a finished run.
            for name in ("metrics.jsonl", "slimlm.json"):
                (self.out / name).unlink(missing_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_json(self.settings_file, settings)

    def remove_written(self) -> None:
        """Remove what a fresh run wrote: the whole output folder if it made it, else its run state and metrics."""
        if self.created_out:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        shutil.rmtree(self.run, ignore_errors=True)
        self.metrics_file.unlink(missing_ok=True)

    @contextmanager
    def removed_on_failure(self, has_checkpoint: Callable[[], bool], *, enabled: bool = True):
        """On any failure inside the block, remove what the run wrote unless a checkpoint exists to resume from.

        `enabled` is False on all but the main process (it alone writes the folder) and for resumed runs.
        """
        try:
            yield
        except BaseException:
            if enabled and not has_checkpoint():
                self.remove_written()
            raise


def resumable(out: str | os.PathLike) -> bool:
    """True when `out` holds an unfinished run of either trainer that `resume=True` can continue."""
    from .checkpoint import latest_checkpoint, last_trainer_checkpoint

    folder = RunFolder(out)
    if folder.finished():
        return False
    run = folder.run
    return (latest_checkpoint(run) is not None or (run / "sft" / "done.json").exists()
            or last_trainer_checkpoint(run / "sft") is not None)


def carry_run_state(out: Path, tmp: Path) -> None:
    """Bring the run's metrics and state from `out` into the export's new folder `tmp` (hard links: no copy, no risk)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if (out / "metrics.jsonl").exists():
        link(out / "metrics.jsonl", tmp / "metrics.jsonl")
    if (out / "run").is_dir():
        shutil.copytree(out / "run", tmp / "run", copy_function=link)
