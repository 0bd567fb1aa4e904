"""Training windows for distillation: tokenized once, cached on disk, read in a seeded order.

The cache is a plain ``.npy`` file of int32 token ids [n_windows, seq_len], memory-mapped on
reading, named after a hash of everything that determines its content (tokenizer, source,
sequence length, token budget).  The order is a fixed function of the seed and the position,
so "where the run is in the data" is just the optimizer step counter: resuming needs no
sampler state.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import DEFAULT_CORPUS, adds_bos, pack_windows
from ..errors import SlimlmError


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__, adds_bos(tokenizer)]
    return hashlib.sha256((text + json.dumps(special, default=str)).encode()).hexdigest()[:16]


def source_fingerprint(source: str | Sequence[str] | None) -> list:
    """What identifies a source's content: local files by size and mtime, other sources by name."""
    if source is None:
        source = DEFAULT_CORPUS
    if not isinstance(source, str):
        return [source_fingerprint(s) for s in source]
    if source.startswith("builtin:"):
        return [source, sys.version]
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve())] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return [source]


def cached_windows(
    source,
    tokenizer,
    seq_len: int,
    n_windows: int,
    cache_dir: str | os.PathLike,
    text_field: str = "text",
) -> np.ndarray:
    """Up to `n_windows` consecutive windows of the source, from the cache or tokenized now.

    Reads only as much text as `n_windows` needs (fewer come back when the source is
    shorter).  Returns a read-only memory map of int32 ids [n, seq_len].
    """
    key = hashlib.sha256(
        json.dumps([tokenizer_fingerprint(tokenizer), source_fingerprint(source), seq_len, n_windows, text_field],
                   default=str).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir) / f"windows-{key}.npy"
    if not path.exists():
        body = seq_len - 1 if adds_bos(tokenizer) else seq_len
        windows = pack_windows(source, tokenizer, seq_len, None, text_field=text_field, max_tokens=n_windows * body)
        ids = windows.input_ids[:n_windows].numpy()
        if ids.size and int(ids.max()) >= 2**31:
            raise SlimlmError("token ids do not fit in int32")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".windows-", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, ids.astype(np.int32))
        os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written cache
    return np.load(path, mmap_mode="r")


def chat_text_source(source, tokenizer, cache_dir: str | os.PathLike) -> str:
    """Chat records (JSONL of ``messages``) rendered with the tokenizer's chat template, as a text source.

    The rendered texts are written once to ``cache_dir/chat-<hash>.jsonl`` (``{"text": ...}`` lines),
    named after the source and the template, so a resumed run reads the same file.
    """
    from ..chat import read_conversations, render_chat_texts, template_text

    key = hashlib.sha256(
        json.dumps([source_fingerprint(str(source)), template_text(tokenizer), tokenizer_fingerprint(tokenizer)],
                   default=str).encode()
    ).hexdigest()[:20]
    path = Path(cache_dir) / f"chat-{key}.jsonl"
    if not path.exists():
        texts = render_chat_texts(read_conversations(source, need_assistant=False), tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".chat-", suffix=".jsonl", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, path)
    return str(path)


class WindowOrder:
    """The seeded, endless order in which training windows are visited.

    Epoch e visits every window once in the permutation seeded by (seed, e); position k of
    the stream is window ``perm_{k // n}[k % n]``.
    """

    def __init__(self, n_windows: int, seed: int):
        if n_windows < 1:
            raise SlimlmError("no training windows")
        self.n = n_windows
        self.seed = seed

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Window indices at stream positions [start, start + count)."""
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.n]
        return out


def gather(windows: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Rows `idx` of the window array as a LongTensor."""
    return torch.from_numpy(np.asarray(windows[idx], dtype=np.int64))
