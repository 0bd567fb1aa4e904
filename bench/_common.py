"""Shared bits of the benchmarks: the real teacher, the shared data folder, timing."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2-raw-test.txt"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
HELLASWAG = SHARED / "hellaswag_val_full.txt.bz2"


def parse_study(ap, name: str, full: dict, quick: dict, argv=None):
    """Parse a study's arguments: options left unset (None) take their `full` value, or their
    `quick` one with --quick, and --out defaults to bench/out/NAME (NAME-quick with --quick)."""
    a = ap.parse_args(argv)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.out = Path(a.out or Path(__file__).parent / "out" / (f"{name}-quick" if a.quick else name))
    return a


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms in a thread."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta_mb = (self.peak - self.base) / 2**20
