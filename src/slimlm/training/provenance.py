"""The fields of `slimlm.json` that every trainer writes: versions, time, the parent model's record."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path


def now() -> str:
    """The creation time recorded in `slimlm.json` (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slimlm_version() -> str | None:
    from .. import __version__

    return __version__


def versions(*extra: str) -> dict:
    """Versions of torch, transformers, accelerate and the `extra` packages (e.g. 'trl')."""
    import importlib

    names = ("torch", "transformers", "accelerate", *extra)
    return {name: importlib.import_module(name).__version__ for name in names}


def parent_record(model_folder: str | Path | None) -> dict | None:
    """The `slimlm.json` of the input model, when it has one (the chain prune -> distill -> align)."""
    if not model_folder:
        return None
    path = Path(model_folder).expanduser() / "slimlm.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
