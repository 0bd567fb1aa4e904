"""Logging helpers shared by slimlm's modules."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Raise one library logger to ERROR for the duration (slimlm prints its own summary of what it says)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
