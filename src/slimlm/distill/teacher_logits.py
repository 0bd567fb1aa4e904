"""Teacher logits computed once: the teacher's top-K log-probabilities over a distillation's windows.

`write_cache(teacher, output, config)` (`slimlm teacher-logits`) runs the teacher once over the
windows that a distillation with the same data, seed, sequence length and budget reads (its
training windows and its held-out validation windows) and stores for every token the K most
probable next tokens, their log-probabilities and the log of the probability mass left over.
`TeacherLogitsCache.open(path)` reads it back: ``windows(position, count)`` gives the token ids
that `TrainingData.windows(position, count)` gives, with the teacher's targets for them
(`slimlm.distill.topk_loss.TeacherTargets`, what `slimlm.distill.topk_loss.FusedTopKLoss` takes).

Layout::

    CACHE/
      manifest.json               format, key, windows done per source, the stream last written for
      .lock                       held by the process that writes
      source-0/                   one folder per --data source, then one for --eval-data
        00000.ids.npy             [W, L]    token ids                       uint16 (uint32 past 65,536 tokens)
        00000.topk_ids.npy        [W, L, K] top-K next tokens, most probable first        idem
        00000.topk_logprobs.npy   [W, L, K] their log-probabilities         float16
        00000.rest_logmass.npy    [W, L]    log(1 - sum of the K probabilities), float16 (-inf when K = vocabulary)
        00001.ids.npy ...

Every file is a plain ``.npy`` read memory-mapped (``numpy.load(f, mmap_mode="r")``); a shard
holds ``shard_windows`` windows (fixed when the cache is made, about 256 MiB a shard).

Windows are stored by where they lie in their source (window w of a source is tokens
[w·body, (w+1)·body) of its token stream, after a BOS when the tokenizer adds one), not by
stream position.  A window's tokens do not depend on the budget; the order in which a
distillation visits them does (its permutation spans the training windows it has).  So a
larger budget only appends windows to each source (the held-out windows come right after the
training ones: windows [0, train + held-out) of each source are stored), and
``windows(position, ...)`` maps positions to (source, window) with the trainer's own
`Mixture`.  ``manifest.json`` is rewritten atomically after every batch, counting only windows
whose bytes are flushed: a killed run leaves a valid prefix, and the next run continues at the
first missing window.

The key (manifest ``key``) is what the stored values depend on: the teacher (its config, a
stamp of its weight files (names, sizes, modification times) and the compute dtype), the
tokenizer, the sources (their content stamps and weights), the text field, the seed, the
sequence length and K.  A cache is extended only under the same key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write_json, check_writable_output
from ..config import DistillConfig, TeacherLogitsConfig
from ..errors import SlimlmError
from .topk_loss import TeacherTargets

FORMAT = "slimlm-teacher-logits"
VERSION = 1
SHARD_BYTES = 256 * 2**20
FIELDS = ("ids", "topk_ids", "topk_logprobs", "rest_logmass")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


# ---- what a cache is keyed by --------------------------------------------------------------------


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_fingerprint(spec: str, config, dtype: torch.dtype) -> dict:
    """What identifies the teacher's outputs: its config, a stamp of its weight files, the compute dtype.

    The stamp is each weight file's name, size and modification time (hashing many GB would
    take minutes); a hub id without a local folder is stamped by its commit.
    """
    from ..models import resolve_model_path

    cfg = {k: v for k, v in config.to_dict().items()
           if k not in ("_name_or_path", "transformers_version", "_commit_hash", "_slimlm_source", "dtype",
                        "torch_dtype", "use_cache")}
    path = Path(resolve_model_path(spec))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or
                                                                       p.name.endswith(".index.json")))
        weights = [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    else:
        weights = [spec, getattr(config, "_commit_hash", None)]
    return {"config": _digest(cfg), "weights": _digest(weights), "dtype": str(dtype).replace("torch.", "")}


def cache_key(teacher: dict, tokenizer: str, sources: list[tuple[str, float]], eval_data, text_field: str,
              seed: int, seq_len: int, top_k: int) -> dict:
    """The manifest's key: everything the stored values and their order depend on."""
    from .data import source_fingerprint

    return {
        "format": FORMAT, "version": VERSION, "teacher": teacher, "tokenizer": tokenizer,
        "sources": [[_digest(source_fingerprint(name)), round(weight, 9)] for name, weight in sources],
        "eval_data": _digest(source_fingerprint(eval_data)) if eval_data else None,
        "text_field": text_field, "seed": seed, "seq_len": seq_len, "top_k": top_k,
    }


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a cache folder, or None when there is none (or it is not a cache's)."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _differences(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# ---- the teacher's targets of some windows ------------------------------------------------------------


@torch.no_grad()
def teacher_topk(model, input_ids: torch.Tensor, top_k: int, chunk_size: int = 512) -> TeacherTargets:
    """The teacher's top-K log-probabilities and rest mass at every position of `input_ids` [B, L].

    The LM head runs per chunk of tokens, as in online distillation (same head, same dtype,
    then fp32): a full [B, L, vocabulary] tensor never exists.  The rest mass is the
    logsumexp of the logits outside the top K minus the full one (exact, however small).
    """
    from .modules import decoder, lm_head

    hidden = decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    head = lm_head(model)
    ids, logprobs, rest = [], [], []
    for start in range(0, flat.shape[0], chunk_size):
        logits = head(flat[start:start + chunk_size]).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        values, top = logits.topk(top_k, dim=-1, sorted=True)
        logits.scatter_(1, top, float("-inf"))
        ids.append(top)
        logprobs.append(values - lse)
        rest.append((torch.logsumexp(logits, dim=-1, keepdim=True) - lse).squeeze(1))
    shape = tuple(input_ids.shape)
    return TeacherTargets(torch.cat(ids).reshape(*shape, top_k), torch.cat(logprobs).reshape(*shape, top_k),
                          torch.cat(rest).reshape(shape))


# ---- shards ----------------------------------------------------------------------------------------


def _id_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.uint32)


def window_bytes(seq_len: int, top_k: int, vocab: int) -> int:
    """Bytes one window takes on disk (ids, top-K ids, top-K log-probabilities, rest mass)."""
    ib = _id_dtype(vocab).itemsize
    return seq_len * (ib + top_k * (ib + 2) + 2)


class _SourceShards:
    """The shard files of one source: windows [shard * W, (shard + 1) * W) in shard `shard`."""

    def __init__(self, folder: Path, shard_windows: int, seq_len: int, top_k: int, id_dtype: np.dtype):
        self.folder, self.per_shard = Path(folder), shard_windows
        self.shapes = {"ids": (seq_len,), "topk_ids": (seq_len, top_k), "topk_logprobs": (seq_len, top_k),
                       "rest_logmass": (seq_len,)}
        self.dtypes = {"ids": id_dtype, "topk_ids": id_dtype, "topk_logprobs": np.dtype(np.float16),
                       "rest_logmass": np.dtype(np.float16)}
        self._open: dict[tuple[int, str], np.ndarray] = {}

    def path(self, shard: int, field: str) -> Path:
        return self.folder / f"{shard:05d}.{field}.npy"

    def _array(self, shard: int, field: str, write: bool) -> np.ndarray:
        key = (shard, field)
        if key not in self._open:
            self._open[key] = np.load(self.path(shard, field), mmap_mode="r+" if write else "r")
        return self._open[key]

    def reserve(self, end: int) -> None:
        """Make room for windows [0, end): every shard up to `end` holds the rows it needs.

        A shard is allocated with the rows this run writes into it, not its full capacity, so a
        small cache stays small; a later, larger run grows its last shard (a copy, then an
        atomic rename: a crash leaves the old file, whose windows the manifest still counts).
        """
        for shard in range(0, (end + self.per_shard - 1) // self.per_shard):
            rows = min(self.per_shard, end - shard * self.per_shard)
            for field in FIELDS:
                path = self.path(shard, field)
                old = np.load(path, mmap_mode="r") if path.exists() else None
                if old is not None and len(old) >= rows:
                    continue
                self._open.pop((shard, field), None)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtypes[field],
                                                shape=(rows, *self.shapes[field]))
                if old is not None:
                    arr[: len(old)] = old
                arr.flush()
                del arr, old
                os.replace(tmp, path)

    def write(self, first: int, values: dict[str, np.ndarray]) -> None:
        """Store windows [first, first + n) (n = len of each value), crossing shards as needed (`reserve` first)."""
        n = len(values["ids"])
        done = 0
        while done < n:
            shard, row = divmod(first + done, self.per_shard)
            take = min(n - done, self.per_shard - row)
            for field, value in values.items():
                self._array(shard, field, True)[row:row + take] = value[done:done + take]
            done += take

    def flush(self) -> None:
        for arr in self._open.values():
            if isinstance(arr, np.memmap):
                arr.flush()

    def close(self) -> None:
        self.flush()
        self._open.clear()

    def read(self, windows: np.ndarray) -> dict[str, np.ndarray]:
        """The stored values of `windows` (indices in this source), in that order."""
        windows = np.asarray(windows, dtype=np.int64)
        out = {f: np.empty((len(windows), *self.shapes[f]), dtype=self.dtypes[f]) for f in FIELDS}
        shards = windows // self.per_shard
        for shard in np.unique(shards):
            sel = np.nonzero(shards == shard)[0]
            rows = windows[sel] % self.per_shard
            for f in FIELDS:
                out[f][sel] = self._array(int(shard), f, False)[rows]
        return out


# ---- reading -------------------------------------------------------------------------------------


@dataclass
class CachedWindows:
    """Windows read from a cache: token ids [B, L] and the teacher's targets [B, L, K] at each position."""

    ids: torch.Tensor
    targets: TeacherTargets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> "CachedWindows":
        """Some of the windows (an index or slice of the first axis)."""
        return CachedWindows(self.ids[index], self.targets[index])

    def to(self, device) -> "CachedWindows":
        return CachedWindows(self.ids.to(device), self.targets.to(device))


def _as_tensors(values: dict[str, np.ndarray]) -> CachedWindows:
    ids = torch.from_numpy(values["ids"].astype(np.int64))
    targets = TeacherTargets(torch.from_numpy(values["topk_ids"].astype(np.int64)),
                             torch.from_numpy(values["topk_logprobs"]), torch.from_numpy(values["rest_logmass"]))
    return CachedWindows(ids, targets)


class CacheStream:
    """A distillation's stream over a cache: position -> window, as `TrainingData` maps them for that budget."""

    def __init__(self, cache: "TeacherLogitsCache", need: int, heldout: int, tokens: int | None = None,
                 global_batch: int | None = None):
        from .data import Mixture, split_windows, window_plan

        self.cache, self.need, self.heldout = cache, need, heldout
        self.tokens, self.global_batch = tokens, global_batch
        train = [s for s in cache.sources if s["role"] == "train"]
        weights = [s["weight"] for s in train]
        evals = [i for i, s in enumerate(cache.sources) if s["role"] == "eval"]
        self.train_counts, self.held = [], []  # held: (source index, first window, count)
        for i, (s, (wanted, share)) in enumerate(zip(train, window_plan(need, weights, heldout, bool(evals)))):
            available = s["exhausted_windows"] if s["exhausted_windows"] is not None else math.inf
            n_train, n_held = split_windows(available, wanted, share)
            self._check_covered(s, n_train + n_held)
            self.train_counts.append(n_train)
            if n_held:
                self.held.append((i, n_train, n_held))
        for i in evals:
            s = cache.sources[i]
            n = min(heldout, s["exhausted_windows"] if s["exhausted_windows"] is not None else heldout)
            self._check_covered(s, n)
            if n:
                self.held.append((i, 0, n))
        self.mixture = Mixture(self.train_counts, weights, cache.key["seed"])

    def _check_covered(self, source: dict, windows: int) -> None:
        if windows > source["windows"]:
            budget = ""
            if self.tokens is not None:
                budget = f" --tokens {self.tokens} --global-batch {self.global_batch} --heldout {self.heldout}"
            raise SlimlmError(
                f"the teacher-logits cache {self.cache.path} holds {source['windows']} windows of {source['name']}, "
                f"this distillation reads {windows}: extend it with `slimlm teacher-logits "
                f"{self.cache.manifest.get('teacher', 'TEACHER')} -o {self.cache.path}{budget}` (and the same data, "
                "seed and seq-len)")

    def windows(self, position: int, count: int) -> CachedWindows:
        """The windows at stream positions [position, position + count) and their targets."""
        src, win = self.mixture.locate(position, count)
        values = {}
        for i in np.unique(src):
            sel = np.nonzero(src == i)[0]
            got = self.cache.store(int(i)).read(win[sel])
            for f in FIELDS:
                if f not in values:
                    values[f] = np.empty((count, *got[f].shape[1:]), dtype=got[f].dtype)
                values[f][sel] = got[f]
        return _as_tensors(values)

    def heldout_windows(self) -> CachedWindows:
        """The held-out windows, in the order `build_training_data` returns them."""
        reads = [self.cache.store(i).read(np.arange(first, first + n)) for i, first, n in self.held]
        if not reads:
            return _as_tensors(self.cache.store(0).read(np.empty(0, dtype=np.int64)))
        return _as_tensors({f: np.concatenate([r[f] for r in reads]) for f in FIELDS})


class TeacherLogitsCache:
    """A teacher-logits cache opened for reading (`TeacherLogitsCache.open(path)`)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest
        self.key = manifest["key"]
        self.sources = manifest["sources"]
        self.top_k, self.seq_len, self.vocab = self.key["top_k"], self.key["seq_len"], manifest["vocab"]
        self._stores: dict[int, _SourceShards] = {}
        self._default: CacheStream | None = None

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TeacherLogitsCache":
        """Open the cache in `path`; SlimlmError when it is not one."""
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        if manifest is None:
            raise SlimlmError(f"{path} is not a teacher-logits cache (no manifest.json of `slimlm teacher-logits`)")
        key = manifest.get("key")
        if not isinstance(key, dict):
            raise SlimlmError(f"{path}/manifest.json is damaged (no key); write the cache again")
        if key.get("version") != VERSION:
            raise SlimlmError(f"{path} is a teacher-logits cache of format version {key.get('version')}; "
                              f"this slimlm reads version {VERSION}: write it again")
        try:
            return cls(path, manifest)
        except (KeyError, TypeError) as exc:
            raise SlimlmError(f"{path}/manifest.json is damaged (missing {exc}); write the cache again") from None

    def check_matches(self, *, tokenizer, data=None, data_weights=None, eval_data=None, text_field: str = "text",
                      seed: int = 0, seq_len: int, teacher: str | None = None, dtype="auto") -> None:
        """SlimlmError naming every setting of a distillation that differs from what the cache was written for.

        `teacher` (with its `dtype`), when given, must be the teacher the cache was made from.
        """
        from ..models import load_config, pick_dtype
        from .data import parse_sources, tokenizer_fingerprint

        want = self.key
        have = cache_key(want["teacher"], tokenizer_fingerprint(tokenizer), parse_sources(data, data_weights),
                         eval_data, text_field, seed, seq_len, want["top_k"])
        if teacher is not None:
            have["teacher"] = teacher_fingerprint(str(teacher), load_config(str(teacher)), pick_dtype(dtype))
        differ = _differences(want, have)
        if differ:
            raise SlimlmError(f"the teacher-logits cache {self.path} was written for another {', '.join(differ)} "
                              "than this distillation's")

    def check_files(self) -> None:
        """SlimlmError when a shard the manifest counts is missing, unreadable, too short or of another shape.

        Reads the ``.npy`` headers only (memory-mapped), so a damaged cache is found before training starts.
        """
        per_shard = self.manifest["shard_windows"]
        for i, entry in enumerate(self.sources):
            store = self.store(i)
            n = entry["windows"]
            for shard in range((n + per_shard - 1) // per_shard):
                rows = min(per_shard, n - shard * per_shard)
                for field in FIELDS:
                    path = store.path(shard, field)
                    try:
                        arr = np.load(path, mmap_mode="r")
                    except (OSError, ValueError) as exc:
                        raise SlimlmError(f"the teacher-logits cache {self.path} is damaged ({path.name} of "
                                          f"{entry['folder']}: {exc}); write it again") from None
                    if len(arr) < rows or arr.shape[1:] != store.shapes[field] or arr.dtype != store.dtypes[field]:
                        raise SlimlmError(f"the teacher-logits cache {self.path} is damaged ({entry['folder']}/"
                                          f"{path.name} holds {arr.dtype}{list(arr.shape)}); write it again")

    def store(self, source: int) -> _SourceShards:
        if source not in self._stores:
            self._stores[source] = _SourceShards(self.path / self.sources[source]["folder"],
                                                 self.manifest["shard_windows"], self.seq_len, self.top_k,
                                                 _id_dtype(self.vocab))
        return self._stores[source]

    def read(self, source: int, windows) -> CachedWindows:
        """Windows of one source by their index in that source (the storage order)."""
        windows = np.asarray(windows, dtype=np.int64)
        done = self.sources[source]["windows"]
        if len(windows) and (windows.min() < 0 or windows.max() >= done):
            raise IndexError(f"windows outside the {done} stored for source {source}")
        return _as_tensors(self.store(source).read(windows))

    def stream(self, tokens: int | None = None, global_batch: int | None = None,
               heldout: int | None = None) -> CacheStream:
        """The stream of a distillation with this budget (default: the one the cache was last written for)."""
        last = self.manifest["stream"]
        gb = global_batch or last["global_batch"]
        tokens = tokens if tokens is not None else last["tokens"]
        need = _training_windows(tokens, gb, self.seq_len)
        return CacheStream(self, need, last["heldout"] if heldout is None else heldout, tokens, gb)

    def windows(self, position: int, count: int) -> CachedWindows:
        """Windows at stream positions [position, position + count) of the stream last written for."""
        if self._default is None:
            self._default = self.stream()
        return self._default.windows(position, count)

    def heldout(self) -> CachedWindows:
        """The held-out windows of the stream last written for."""
        if self._default is None:
            self._default = self.stream()
        return self._default.heldout_windows()


def _training_windows(tokens: int, global_batch: int, seq_len: int) -> int:
    """Training windows a distillation of `tokens` reads: whole optimizer steps of `global_batch` windows."""
    return max(1, math.ceil(tokens / (global_batch * seq_len))) * global_batch


# ---- writing -------------------------------------------------------------------------------------


def write_cache(
    teacher,
    output: str | os.PathLike,
    config: TeacherLogitsConfig | None = None,
    *,
    overwrite: bool = False,
    replace: bool = False,
    progress: bool = True,
    loaded=None,
    **overrides,
) -> dict:
    """Run `teacher` over a distillation's windows and store its top-K log-probabilities in `output`.

    What `slimlm teacher-logits` runs.  Settings: a `TeacherLogitsConfig` and/or keyword
    overrides (`tokens`, `seq_len`, `top_k`, `data`, ...).  The windows are those a distillation
    with the same data, seed, sequence length, global batch and held-out count reads for
    `tokens` (see the module doc).  An existing cache with the same key is continued (after a
    crash) or extended (a larger budget); one with another key is refused.  `overwrite`
    replaces whatever `output` holds; `replace` replaces only a cache with another key (and continues
    or extends one with the same key: the pipeline's own cache).
    `loaded` is the teacher already in memory (`teacher` still names it, for the key).  Returns
    {"output", "windows", "new_windows", "tokens", "top_k", "bytes", "bytes_per_token", "seconds"}.
    """
    from ..models import load_model
    from .data import build_training_data
    from .tokens import _lock, default_token_cache

    c = TeacherLogitsConfig.make(config, **overrides)
    r = _check_request(teacher, output, c, overwrite=overwrite, replace=replace)
    out = r.out
    token_cache = Path(c.token_cache).expanduser() if c.token_cache else default_token_cache()

    if r.manifest is None and out.exists():  # start afresh: what was there goes (checked above)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _lock(out / ".lock"):
        manifest = read_manifest(out) or _new_manifest(r.key, r.sources, c, r.vocab, r.spec)
        data, _ = build_training_data(r.sources, r.tok, c.seq_len, r.need, c.heldout, c.seed, eval_source=c.eval_data,
                                      text_field=c.text_field, cache=token_cache, progress=progress)
        rows = _source_rows(data, r.sources, r.tok, c, token_cache, r.need)
        for entry, (_, _, exhausted) in zip(manifest["sources"], rows):
            entry["exhausted_windows"] = exhausted
        todo = [(i, src, manifest["sources"][i]["windows"], end) for i, (src, end, _) in enumerate(rows)
                if end > manifest["sources"][i]["windows"]]
        manifest["stream"] = {"tokens": c.tokens, "global_batch": r.global_batch, "need": r.need, "heldout": c.heldout}
        atomic_write_json(out / "manifest.json", manifest)
        new = sum(end - start for _, _, start, end in todo)
        if new:
            model = loaded if loaded is not None else load_model(r.spec, dtype=r.dtype)
            if loaded is None and torch.cuda.is_available():
                model.to("cuda")
            _compute(model, out, manifest, todo, c, r.vocab, progress)
    seconds = time.perf_counter() - t0
    windows = sum(s["windows"] for s in manifest["sources"])
    per_window = window_bytes(c.seq_len, c.top_k, r.vocab)
    summary = {"output": str(out), "windows": windows, "new_windows": new, "tokens": windows * c.seq_len,
               "top_k": c.top_k, "bytes": windows * per_window, "bytes_per_token": per_window / c.seq_len,
               "seconds": seconds}
    if progress:
        print(f"teacher logits: {windows:,} windows ({windows * c.seq_len:,} tokens, {new:,} windows new) in {out}; "
              f"top-{c.top_k}, {per_window / c.seq_len:.1f} bytes per token, {_size(windows * per_window)}",
              file=sys.stderr, flush=True)
    return summary


@dataclass(frozen=True)
class _Request:
    """What `write_cache` was asked for, checked: the teacher, its data, the key, and the cache
    to continue (`manifest`; None: `out` is written afresh, and replacing it was checked safe)."""

    spec: str
    vocab: int
    sources: list
    tok: object
    dtype: torch.dtype
    global_batch: int
    need: int
    key: dict
    out: Path
    manifest: dict | None


def _check_request(teacher, output, c: TeacherLogitsConfig, *, overwrite: bool, replace: bool) -> _Request:
    """Every check of `write_cache` before any work or output (see its doc for overwrite/replace)."""
    from ..data import check_source
    from ..models import load_config, load_tokenizer, pick_dtype
    from .data import parse_sources, tokenizer_fingerprint

    spec = str(teacher)
    t_cfg = load_config(spec)  # also when the teacher is loaded: the key must not depend on how
    vocab = int(t_cfg.vocab_size)
    if c.top_k > vocab:
        raise SlimlmError(f"--top-k {c.top_k} is larger than the teacher's vocabulary ({vocab})")
    limit = getattr(t_cfg, "max_position_embeddings", None)
    if limit and c.seq_len > limit:
        raise SlimlmError(f"--seq-len {c.seq_len} exceeds the teacher's max_position_embeddings ({limit})")
    sources = parse_sources(c.data, c.data_weights)
    for name, _ in sources:
        check_source(name, c.text_field)
    if c.eval_data:
        check_source(c.eval_data, c.text_field)
    tok = load_tokenizer(spec)
    dtype = pick_dtype(c.dtype)
    global_batch = c.global_batch or DistillConfig().micro_batch
    key = cache_key(teacher_fingerprint(spec, t_cfg, dtype), tokenizer_fingerprint(tok), sources, c.eval_data,
                    c.text_field, c.seed, c.seq_len, c.top_k)
    out = Path(output).expanduser()
    manifest = None if overwrite else read_manifest(out)
    if manifest is not None and manifest["key"] != key and replace:
        manifest, overwrite = None, True
    if manifest is not None and manifest["key"] != key:
        raise SlimlmError(f"{out} holds teacher logits for another {', '.join(_differences(manifest['key'], key))}; "
                          "choose another folder, or --overwrite to replace it")
    if manifest is None:  # what replacing `out` would delete must not be one of the inputs
        check_writable_output(out, overwrite=overwrite,
                              inputs=(spec, *(name for name, _ in sources), c.eval_data, c.token_cache))
    return _Request(spec, vocab, sources, tok, dtype, global_batch, _training_windows(c.tokens, global_batch, c.seq_len),
                    key, out, manifest)


def _new_manifest(key: dict, sources, c: TeacherLogitsConfig, vocab: int, spec: str) -> dict:
    entries = [{"name": name, "weight": weight, "role": "train", "folder": f"source-{i}", "windows": 0,
                "exhausted_windows": None} for i, (name, weight) in enumerate(sources)]
    if c.eval_data:
        entries.append({"name": str(c.eval_data), "weight": 0.0, "role": "eval", "folder": f"source-{len(entries)}",
                        "windows": 0, "exhausted_windows": None})
    return {"format": FORMAT, "key": key, "teacher": spec, "vocab": vocab,
            "shard_windows": max(1, SHARD_BYTES // window_bytes(c.seq_len, c.top_k, vocab)),
            "fields": {"ids": str(_id_dtype(vocab)), "topk_ids": str(_id_dtype(vocab)), "topk_logprobs": "float16",
                       "rest_logmass": "float16"},
            "sources": entries, "stream": None}


def _source_rows(data, sources, tok, c: TeacherLogitsConfig, token_cache, need: int) -> list:
    """(windows of each source as `SourceWindows`, windows to store, windows the source has when exhausted)."""
    from ..data import adds_bos
    from .data import SourceWindows, split_windows, window_plan
    from .tokens import token_shards

    out = []
    plan = window_plan(need, [w for _, w in sources], c.heldout, bool(c.eval_data))
    for part, (wanted, share) in zip(data.sources, plan):
        available = len(part.shards) // part.body
        n_train, n_held = split_windows(available, wanted, share)
        assert n_train == len(part), "the window counts must be those of build_training_data"
        windows = SourceWindows(part.shards, part.seq_len, part.bos_id, 0, n_train + n_held)
        out.append((windows, n_train + n_held, available if part.shards.exhausted else None))
    if c.eval_data:
        bos_id = tok.bos_token_id if adds_bos(tok) else None
        body = c.seq_len - 1 if bos_id is not None else c.seq_len
        shards = token_shards(c.eval_data, tok, c.heldout * body, text_field=c.text_field, cache=token_cache)
        n = min(c.heldout, len(shards) // body)
        out.append((SourceWindows(shards, c.seq_len, bos_id, 0, n), n,
                    len(shards) // body if shards.exhausted else None))
    return out


def _compute(model, out: Path, manifest: dict, todo, c: TeacherLogitsConfig, vocab: int, progress: bool) -> None:
    """Run the teacher over the missing windows, batch by batch, recording each batch in the manifest."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total = sum(end - start for _, _, start, end in todo)
    bar = tqdm(total=total, desc="teacher logits", unit="win", dynamic_ncols=True, disable=not progress)
    t0 = time.perf_counter()
    done_windows = 0
    try:
        for i, windows, start, end in todo:
            entry = manifest["sources"][i]
            store = _SourceShards(out / entry["folder"], manifest["shard_windows"], c.seq_len, c.top_k,
                                  _id_dtype(vocab))
            store.reserve(end)
            try:
                for first in range(start, end, c.batch_size):
                    last = min(first + c.batch_size, end)
                    ids = windows.rows(np.arange(first, last))
                    t = teacher_topk(model, torch.from_numpy(ids).to(device), c.top_k, c.chunk_size)
                    store.write(first, {
                        "ids": ids.astype(store.dtypes["ids"]),
                        "topk_ids": t.topk_ids.cpu().numpy().astype(store.dtypes["topk_ids"]),
                        "topk_logprobs": t.topk_logprobs.cpu().numpy().astype(np.float16),
                        "rest_logmass": t.rest_logmass.cpu().numpy().astype(np.float16),
                    })
                    store.flush()  # the bytes are on disk before the manifest counts them
                    entry["windows"] = last
                    atomic_write_json(out / "manifest.json", manifest)
                    done_windows += last - first
                    bar.set_postfix_str(f"{done_windows * c.seq_len / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                                        refresh=False)
                    bar.update(last - first)
            finally:
                store.close()
    finally:
        bar.close()


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
