"""Training data for distillation: sources, weights, and the seeded order of windows.

Each source is tokenized once into a memory-mapped token cache (`slimlm.distill.tokens`);
windows of `seq_len` tokens are cut from a source's token stream on the fly (window w of a
source is its tokens [w * body, (w + 1) * body), after a BOS when the tokenizer adds one).
Several sources are mixed with weights by a seeded interleaving (`Mixture`).  The window at
stream position k is a pure function of (seed, sources, weights, budget, k), so "where the
run is in the data" is just the optimizer step counter: resuming needs no sampler state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._io import atomic_write_text
from ..data import DEFAULT_CORPUS, adds_bos
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
    if path.exists() or any(ch in source for ch in "*?["):
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:  # a glob
            from ..data import _files_of

            files = _files_of(source)
        root = str(path.resolve()) if path.exists() else source
        return [root] + [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return [source]


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
        atomic_write_text(path, "".join(json.dumps({"text": text}) + "\n" for text in texts))
    return str(path)


class WindowOrder:
    """The seeded, endless order in which training windows are visited.

    Epoch e visits every window once in the permutation seeded by (seed, e); position k of
    the stream is window ``perm_{k // n}[k % n]``.
    """

    def __init__(self, n_windows: int, seed: int | tuple[int, ...]):
        if n_windows < 1:
            raise SlimlmError("no training windows")
        self.n = n_windows
        self.seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)

    @lru_cache(maxsize=4)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch]).permutation(self.n)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Window indices at stream positions [start, start + count)."""
        return self.indices_of(np.arange(start, start + count))

    def indices_of(self, pos: np.ndarray) -> np.ndarray:
        """Window indices at the stream positions `pos`."""
        pos = np.asarray(pos, dtype=np.int64)
        out = np.empty(len(pos), dtype=np.int64)
        for epoch in np.unique(pos // self.n):
            sel = pos // self.n == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % self.n]
        return out


# ---- sources and weights ---------------------------------------------------------------------
def parse_sources(data, weights=None) -> list[tuple[str, float]]:
    """(source, weight) pairs, weights summing to 1, from what `distill(data=..., data_weights=...)` takes.

    `data`: one source (str or path), a list of sources (equal weights unless `weights`
    gives one per source), or a dict ``{source: weight}``.  Weights are relative (0.7/0.3
    and 7/3 are the same mix) and must be positive.
    """
    if data is None:
        data = DEFAULT_CORPUS
    if isinstance(data, dict):
        if weights is not None:
            raise SlimlmError("give the weights either in the data dict or as data_weights, not both")
        names, weights = list(data), list(data.values())
    elif isinstance(data, (str, os.PathLike)):
        names = [data]
    else:
        names = list(data)
    names = [str(n) for n in names]
    if not names:
        raise SlimlmError("no data source given")
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, str):
        weights = parse_weights(weights)
    weights = list(weights)
    if len(weights) != len(names):
        raise SlimlmError(f"{len(weights)} data weights for {len(names)} data sources; give one weight per --data")
    try:
        w = np.asarray(weights, dtype=float)
    except (TypeError, ValueError):
        raise SlimlmError(f"data weights must be numbers, got {weights}") from None
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise SlimlmError(f"data weights must be positive numbers, got {weights}")
    seen = set()
    for n in names:
        if n in seen:
            raise SlimlmError(f"data source {n} is listed twice")
        seen.add(n)
    w = w / w.sum()
    return [(n, float(x)) for n, x in zip(names, w)]


def parse_weights(text: str) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]."""
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SlimlmError(f"--data-weights takes numbers separated by commas, like 0.7,0.3; got '{text}'") from None


def describe_sources(sources: list[tuple[str, float]]):
    """How a run records its data: the source itself when there is one, else [[source, weight], ...]."""
    if len(sources) == 1:
        return sources[0][0]
    return [[s, round(w, 6)] for s, w in sources]


# ---- windows of one source -------------------------------------------------------------------
class SourceWindows:
    """Windows [first, first + count) of one source's cached token stream."""

    def __init__(self, shards, seq_len: int, bos_id: int | None, first: int, count: int):
        self.shards, self.seq_len, self.bos_id = shards, seq_len, bos_id
        self.body = seq_len - 1 if bos_id is not None else seq_len
        self.first, self.count = first, count

    def __len__(self) -> int:
        return self.count

    def rows(self, idx) -> np.ndarray:
        """Windows `idx` (relative to `first`) as an int64 array [len(idx), seq_len]."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        lead = 0
        if self.bos_id is not None:
            out[:, 0] = self.bos_id
            lead = 1
        for r, w in enumerate(idx):
            if not 0 <= w < self.count:
                raise IndexError(f"window {w} outside [0, {self.count})")
            out[r, lead:] = self.shards.read((self.first + int(w)) * self.body, self.body)
        return out


# ---- the mixture -----------------------------------------------------------------------------
MIX_BLOCK = 1024  # positions per block; each block holds every source in proportion to its weight
_MIX_TAG = 0x6D6978  # "mix": keeps the block permutations apart from the window permutations


class Mixture:
    """The seeded interleaving of several sources' windows: stream position -> (source, window).

    Positions come in blocks of `MIX_BLOCK`; each block holds source i ``quota_i`` times
    (its weight times the block, rounded by largest remainder, at least once), in an order
    seeded by (seed, block).  The j-th visit to source i reads window ``order_i[j]``, where
    ``order_i`` visits the source's windows in a fresh seeded permutation each epoch
    (`WindowOrder`).  Everything is computed from the position alone: random access, no state.
    With one source this is exactly ``WindowOrder(n, seed)``.
    """

    def __init__(self, counts: Sequence[int], weights: Sequence[float], seed: int):
        self.counts = [int(c) for c in counts]
        if len(self.counts) != len(weights):
            raise SlimlmError("one weight per source")
        self.seed = seed
        if len(self.counts) == 1:
            self.orders = [WindowOrder(self.counts[0], seed)]
            return
        if len(self.counts) > MIX_BLOCK // 4:
            raise SlimlmError(f"at most {MIX_BLOCK // 4} data sources can be mixed")
        self.orders = [WindowOrder(n, (seed, i)) for i, n in enumerate(self.counts)]
        raw = np.asarray(weights, dtype=float) / float(np.sum(weights)) * MIX_BLOCK
        q = np.floor(raw).astype(np.int64)
        for i in np.argsort(-(raw - q), kind="stable")[: MIX_BLOCK - int(q.sum())]:
            q[i] += 1
        while np.any(q < 1):  # every source appears in every block
            q[int(np.argmin(q))] += 1
            q[int(np.argmax(q))] -= 1
        self.quota = q
        self._base = np.repeat(np.arange(len(q)), q)
        self._offset = np.concatenate([[0], np.cumsum(q)[:-1]])

    @lru_cache(maxsize=8)
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position in block b, visit number within the block for that source)."""
        src = self._base[np.random.default_rng([self.seed, _MIX_TAG, b]).permutation(MIX_BLOCK)]
        order = np.argsort(src, kind="stable")
        rank = np.empty(MIX_BLOCK, dtype=np.int64)
        rank[order] = np.arange(MIX_BLOCK) - self._offset[src[order]]
        return src, rank

    def locate(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window index) of stream positions [start, start + count)."""
        if len(self.counts) == 1:
            return np.zeros(count, dtype=np.int64), self.orders[0].indices(start, count)
        pos = np.arange(start, start + count)
        src = np.empty(count, dtype=np.int64)
        visit = np.empty(count, dtype=np.int64)
        for b in np.unique(pos // MIX_BLOCK):
            sel = pos // MIX_BLOCK == b
            s, rank = self._block(int(b))
            r = pos[sel] % MIX_BLOCK
            src[sel] = s[r]
            visit[sel] = int(b) * self.quota[s[r]] + rank[r]
        win = np.empty(count, dtype=np.int64)
        for i in np.unique(src):
            sel = src == i
            win[sel] = self.orders[int(i)].indices_of(visit[sel])
        return src, win


class TrainingData:
    """The training stream: the window at each position, read from the token caches on demand."""

    def __init__(self, sources: list[SourceWindows], names: list[str], weights: list[float], seed: int):
        self.sources, self.names, self.weights = sources, names, weights
        self.mixture = Mixture([len(s) for s in sources], weights, seed)

    def windows(self, start: int, count: int) -> torch.Tensor:
        """The windows at stream positions [start, start + count) as a LongTensor [count, seq_len]."""
        src, win = self.mixture.locate(start, count)
        out = np.empty((count, self.sources[0].seq_len), dtype=np.int64)
        for i in np.unique(src):
            sel = src == i
            out[sel] = self.sources[int(i)].rows(win[sel])
        return torch.from_numpy(out)


def build_training_data(
    sources: list[tuple[str, float]],
    tokenizer,
    seq_len: int,
    need: int,
    heldout: int,
    seed: int,
    *,
    eval_source=None,
    text_field: str = "text",
    cache=None,
    progress: bool = False,
    say=None,
) -> tuple[TrainingData, np.ndarray]:
    """(training stream, held-out windows [n, seq_len]) for `need` training windows.

    Source i gets ``ceil(need * weight_i)`` training windows (fewer when it is shorter: it
    then repeats) and, without `eval_source`, its share of the `heldout` windows right after
    them (at most a fifth of what it has).  Only as many tokens as that are tokenized.
    """
    from .tokens import token_shards

    bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    body = seq_len - 1 if bos_id is not None else seq_len
    weights = [w for _, w in sources]
    parts, held = [], []
    for (name, _), (target, share) in zip(sources, window_plan(need, weights, heldout, eval_source is not None)):
        shards = token_shards(name, tokenizer, (target + share) * body, text_field=text_field, cache=cache,
                              progress=progress)
        n_train, n_held = split_windows(len(shards) // body, target, share)
        if n_train < 1:
            raise SlimlmError(f"data source {name} gives no training windows of {seq_len} tokens")
        parts.append(SourceWindows(shards, seq_len, bos_id, 0, n_train))
        if n_held:
            held.append(SourceWindows(shards, seq_len, bos_id, n_train, n_held).rows(np.arange(n_held)))
        if say is not None and n_train < target:
            say(f"note: {n_train} training windows of {name} for {target} needed; the data repeats "
                f"({target / n_train:.1f} epochs)")
    if eval_source is not None and heldout:
        shards = token_shards(eval_source, tokenizer, heldout * body, text_field=text_field, cache=cache,
                              progress=progress)
        n = min(heldout, len(shards) // body)
        held.append(SourceWindows(shards, seq_len, bos_id, 0, n).rows(np.arange(n)))
    held_rows = np.concatenate(held) if held else np.empty((0, seq_len), dtype=np.int64)
    return TrainingData(parts, [n for n, _ in sources], weights, seed), held_rows


def window_plan(need: int, weights: Sequence[float], heldout: int, separate_eval: bool) -> list[tuple[int, int]]:
    """(training windows wanted, held-out windows wanted) of each source, for `need` training windows.

    Source i is asked for ``ceil(need * weight_i)`` training windows and, unless the held-out
    windows come from a separate source, its share of the `heldout` windows.
    """
    shares = [0] * len(weights) if separate_eval else _apportion(heldout, weights)
    return [(max(1, math.ceil(need * w - 1e-9)), share) for w, share in zip(weights, shares)]


def split_windows(available: int, wanted: int, share: int) -> tuple[int, int]:
    """(training, held-out) windows of a source holding `available` windows (held-out right after training).

    A source shorter than asked gives all it has, with at most a fifth of it held out.
    """
    total = min(available, wanted + share)
    n_held = min(share, total // 5)
    return total - n_held, n_held


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder)."""
    raw = np.asarray(weights, dtype=float) / float(np.sum(weights)) * total
    q = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - q), kind="stable")[: total - int(q.sum())]:
        q[i] += 1
    return [int(x) for x in q]
