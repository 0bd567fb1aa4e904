"""Run feedback: metrics as JSON lines, TensorBoard when installed, and a tqdm progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path


class Monitor:
    """Writes `metrics.jsonl` (one record per line) and TensorBoard scalars; main process only."""

    def __init__(self, path: Path, tb_dir: Path | None, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = path
        self.tb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            # Drop records written after the checkpoint we resume from: they will be redone.
            from .._io import atomic_write_text

            keep = [line for line in path.read_text().splitlines() if line.strip() and _step(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        elif resume_step is None and path.exists():
            path.unlink()
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: JSONL only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(tb_dir), purge_step=resume_step)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_plain) + "\n")
        if self.tb is not None:
            kind = record.get("event", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "event") and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """A tqdm bar over optimizer steps (it shows the ETA); None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc, leave=True)


def fmt_rate(tokens_per_s: float) -> str:
    """Tokens per second for the progress bar: '950' or '12.3k'."""
    return f"{tokens_per_s / 1000:.1f}k" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f}"
