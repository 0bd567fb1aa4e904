"""Token caches: each data source tokenized once into memory-mapped shards, reused by every run.

Layout (folder: ``distill(token_cache=...)`` / ``--token-cache``, else ``$SLIMLM_TOKEN_CACHE``,
else ``slimlm.models.cache_dir() / "tokens"``, i.e. ``~/.cache/slimlm/tokens``)::

    tokens/
      corpus.txt-1a2b3c4d5e6f7a8b/    one folder per (tokenizer, source, text field)
        index.json                    the complete part: shards, tokens, pieces read, exhausted
        00000.bin 00001.bin ...       raw token ids, uint16 (uint32 for vocabularies over 65,535)
        .lock                         held by the process that writes

The token stream of a source is its documents, each followed by EOS (what
`slimlm.data.token_stream` gives), cut into shards of about `SHARD_TOKENS` tokens at
document-piece boundaries.  A shard exists for readers only once ``index.json`` (rewritten
atomically after each shard) lists it, so a tokenization that crashes leaves a valid
prefix, and the next call continues from it; ``exhausted`` says that the whole source is
in.  Tokenization stops as soon as the caller's ``min_tokens`` are in; a later run that
needs more extends the same cache.  Deleting a folder (or all of ``tokens/``) is always safe
when no run is using it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._io import atomic_write_json
from ..data import DEFAULT_CORPUS, iter_pieces
from ..errors import SlimlmError

VERSION = 1
SHARD_TOKENS = 64 * 2**20  # ~64M tokens: 128 MiB a shard in uint16
PIECE_CHARS = 16 * 2**20  # big plain-text files are read in pieces of about this many characters
BATCH_CHARS = 1 << 20  # characters handed to the tokenizer at once
BATCH_PIECES = 1024


def default_token_cache() -> Path:
    """$SLIMLM_TOKEN_CACHE, else the ``tokens`` folder of the slimlm cache (``~/.cache/slimlm/tokens``)."""
    env = os.environ.get("SLIMLM_TOKEN_CACHE")
    if env:
        return Path(env).expanduser()
    from ..models import cache_dir

    return cache_dir() / "tokens"


def usable_token_cache(folder: str | os.PathLike | None = None) -> Path:
    """The token cache folder (`folder`, else `default_token_cache()`), checked writable before any work."""
    from .._io import probe_writable

    path = Path(folder).expanduser() if folder is not None else default_token_cache()
    if path.exists() and not path.is_dir():
        raise SlimlmError(f"the token cache {path} is a file; give a folder with --token-cache")
    probe_writable(path, what="token cache", inside=True)
    return path


def stream_fingerprint(tokenizer) -> str:
    """A hash of what decides a tokenizer's ids for plain text: its full definition, class and EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and where it came from
        text = json.dumps(sorted(tokenizer.get_vocab().items())) + str(getattr(tokenizer, "name_or_path", ""))
    extra = [type(tokenizer).__name__, tokenizer.eos_token_id]
    return hashlib.sha256((text + json.dumps(extra, default=str)).encode()).hexdigest()[:16]


def cache_folder(source, tokenizer, text_field: str = "text", cache: str | os.PathLike | None = None) -> Path:
    """The cache folder of (tokenizer, source, text field), whether it exists yet or not."""
    from .data import source_fingerprint

    key = hashlib.sha256(
        json.dumps([VERSION, stream_fingerprint(tokenizer), source_fingerprint(source), text_field],
                   default=str).encode()
    ).hexdigest()[:16]
    return Path(cache if cache is not None else default_token_cache()).expanduser() / f"{_slug(source)}-{key}"


def _slug(source) -> str:
    if source is None:
        source = DEFAULT_CORPUS
    if not isinstance(source, (str, os.PathLike)):
        source = "+".join(str(s) for s in source)
    name = str(source).rstrip("/\\")
    name = name.rsplit("/", 1)[-1] or "data"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)[:40].lstrip(".") or "data"


class TokenShards:
    """A read-only view of a source's cached token stream (the shards listed when it was opened)."""

    def __init__(self, folder: Path, index: dict):
        self.folder = Path(folder)
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        counts = [s["tokens"] for s in index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def exhausted(self) -> bool:
        """True when the whole source is tokenized (not only a prefix)."""
        return bool(self.index["exhausted"])

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.folder / self.index["shards"][i]["file"], dtype=self.dtype, mode="r")
        return self._maps[i]

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the stream as int64 (crossing shard boundaries as needed)."""
        end = start + count
        if start < 0 or end > len(self):
            raise IndexError(f"tokens [{start}, {end}) outside the {len(self)} cached")
        out = np.empty(count, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < end:
            take = min(end, int(self.starts[i + 1])) - pos
            lo = pos - int(self.starts[i])
            out[pos - start:pos - start + take] = self._shard(i)[lo:lo + take]
            pos += take
            i += 1
        return out


def read_index(folder: Path) -> dict | None:
    try:
        index = json.loads((Path(folder) / "index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if index.get("version") == VERSION else None


def _enough(index: dict | None, min_tokens: int | None) -> bool:
    if index is None:
        return False
    return index["exhausted"] or (min_tokens is not None and index["tokens"] >= min_tokens)


def token_shards(
    source,
    tokenizer,
    min_tokens: int | None = None,
    *,
    text_field: str = "text",
    cache: str | os.PathLike | None = None,
    shard_tokens: int = SHARD_TOKENS,
    piece_chars: int = PIECE_CHARS,
    progress: bool = False,
) -> TokenShards:
    """The cached token stream of `source`, tokenizing (or extending the cache) only when needed.

    At least `min_tokens` tokens are cached on return, or the whole source when it is shorter
    (`min_tokens=None`: the whole source).  Safe against crashes (the next call continues the
    cache) and against concurrent callers (one tokenizes, the others wait on a file lock).
    """
    if isinstance(source, os.PathLike):
        source = str(source)
    folder = cache_folder(source, tokenizer, text_field, cache)
    index = read_index(folder)
    if not _enough(index, min_tokens):
        folder.mkdir(parents=True, exist_ok=True)
        with _lock(folder / ".lock"):
            index = read_index(folder)  # another process may have done the work meanwhile
            if not _enough(index, min_tokens):
                index = _tokenize(folder, index, source, tokenizer, min_tokens, text_field, shard_tokens,
                                  piece_chars, progress)
    return TokenShards(folder, index)


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (the one place the tokenizer runs)."""
    return tokenizer(texts, add_special_tokens=False).input_ids


def _tokenize(folder: Path, index: dict | None, source, tokenizer, min_tokens, text_field, shard_tokens,
              piece_chars, progress) -> dict:
    eos = tokenizer.eos_token_id
    if index is None:
        vocab = max(len(tokenizer), (eos or 0) + 1)
        index = {
            "version": VERSION, "source": source if isinstance(source, str) or source is None else list(source),
            "text_field": text_field,
            "tokenizer": {"class": type(tokenizer).__name__, "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
                          "fingerprint": stream_fingerprint(tokenizer)},
            "dtype": "uint16" if vocab <= 2**16 else "uint32",
            "shards": [], "tokens": 0, "pieces": 0, "documents": 0, "exhausted": False,
        }
    listed = {s["file"] for s in index["shards"]}
    for stray in folder.iterdir():  # a crashed run's unfinished shard
        if stray.name not in listed and stray.name not in ("index.json", ".lock"):
            stray.unlink()
    dtype = np.dtype(index["dtype"])
    limit = np.iinfo(dtype).max
    state = dict(index)
    state["shards"] = list(index["shards"])
    start_tokens = state["tokens"]
    bar = _Progress(progress, _slug(source), start_tokens, min_tokens)

    shard = {"file": None, "tmp": None, "handle": None, "tokens": 0}
    pieces = state["pieces"]
    documents = state["documents"]

    def open_shard():
        name = f"{len(state['shards']):05d}.bin"
        shard.update(file=name, tmp=folder / (name + ".tmp"), tokens=0)
        shard["handle"] = open(shard["tmp"], "wb")

    def close_shard(exhausted: bool):
        if shard["handle"] is not None:
            handle = shard["handle"]
            shard["handle"] = None
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            if shard["tokens"]:
                os.replace(shard["tmp"], folder / shard["file"])
                state["shards"].append({"file": shard["file"], "tokens": shard["tokens"]})
            else:
                os.unlink(shard["tmp"])
        state.update(tokens=sum(s["tokens"] for s in state["shards"]), pieces=pieces, documents=documents,
                     exhausted=exhausted)
        atomic_write_json(folder / "index.json", state)  # only now is the shard part of the cache

    def batches():
        batch, chars, skip = [], 0, state["pieces"]
        for piece in iter_pieces(source, text_field, piece_chars):
            if skip:  # already cached (a crashed or shorter earlier run): read past it
                skip -= 1
                bar.skip(piece[2])
                continue
            batch.append(piece)
            chars += len(piece[0])
            if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    try:
        done = False
        for batch in batches():
            for (text, last, frac), ids in zip(batch, encode_batch(tokenizer, [p[0] for p in batch])):
                if last and eos is not None:
                    ids = list(ids) + [eos]
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.max() > limit or arr.min() < 0):
                    raise SlimlmError(f"token id {int(arr.max())} does not fit the cache's {dtype}")
                if shard["handle"] is None:
                    open_shard()
                shard["handle"].write(arr.astype(dtype).tobytes())
                shard["tokens"] += arr.size
                pieces += 1
                documents += bool(last)
                total = state["tokens"] + shard["tokens"]
                bar.update(total, frac)
                if min_tokens is not None and total >= min_tokens:
                    close_shard(False)
                    done = True
                    break
                if shard["tokens"] >= shard_tokens:
                    close_shard(False)
            if done:
                break
        else:
            close_shard(True)  # the whole source is in
    finally:
        bar.close(state["tokens"] if state["exhausted"] or _enough(state, min_tokens) else None)
        if shard["handle"] is not None:  # interrupted: the unfinished shard never becomes visible
            shard["handle"].close()
            Path(shard["tmp"]).unlink(missing_ok=True)
    return state


class _Progress:
    """The tokenization bar: percent of the source (file sizes) or of the tokens needed, tokens/s, ETA."""

    def __init__(self, enabled: bool, name: str, start_tokens: int, min_tokens: int | None):
        self.bar = None
        self.enabled = enabled
        self.name = name
        self.start = start_tokens
        self.goal = min_tokens
        self.t0 = time.perf_counter()
        self.last = 0.0

    def _open(self, frac):
        from tqdm.auto import tqdm

        if frac is not None or self.goal is not None:
            self.bar = tqdm(total=100, desc=f"tokenize {self.name}", dynamic_ncols=True, leave=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
            self.percent = True
        else:
            self.bar = tqdm(desc=f"tokenize {self.name}", unit="tok", unit_scale=True, dynamic_ncols=True, leave=True)
            self.percent = False

    def skip(self, frac):
        if self.enabled and self.bar is None:
            self._open(frac)
            self.bar.set_postfix_str("skipping what is cached", refresh=False)

    def update(self, tokens: int, frac, force: bool = False):
        if not self.enabled:
            return
        if self.bar is None:
            self._open(frac)
        now = time.perf_counter()
        if now - self.last < 0.2 and not force:
            return
        self.last = now
        new = tokens - self.start
        rate = new / max(now - self.t0, 1e-9)
        if self.percent:
            p = frac or 0.0
            if self.goal is not None and self.goal > self.start:
                p = max(p, new / (self.goal - self.start))
            self.bar.set_postfix_str(f"{_fmt(tokens)} tokens, {_fmt(rate)} tok/s", refresh=False)
            self.bar.update(max(0.0, min(100.0, 100.0 * p) - self.bar.n))
        else:
            self.bar.update(max(0, new - self.bar.n))

    def close(self, tokens: int | None = None, frac=None):
        if self.bar is not None:
            if tokens is not None:
                self.update(tokens, 1.0 if frac is None and self.percent else frac, force=True)
            self.bar.close()


def _fmt(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


@contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on `path` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
