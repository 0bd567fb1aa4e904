"""Calibration and training text: reading sources, packing tokens into windows.

Sources: plain text, JSONL/JSON, Parquet and CSV files; folders and globs of them;
a `datasets` dataset saved to disk; a hub dataset name (``hf:NAME[:CONFIG][@SPLIT]``
or a bare name when it is not a local path).  The default corpus, ``builtin:python-docs``,
needs no download: it is the reference documentation that ships inside every CPython
(``pydoc_data.topics``).

`iter_texts` yields whole documents; `iter_pieces` is the streaming form (big plain-text
files in pieces cut at line breaks, with how much of the source is read) that the
distillation token cache uses.
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .config import DEFAULT_CORPUS
from .errors import SlimlmError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
TABLE_SUFFIXES = {".parquet", ".csv", ".arrow"}
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | TABLE_SUFFIXES


BUILTIN_CORPORA = ("python-docs", "python-docs-heldout", "python-docs-all")


def builtin_corpus(name: str = "python-docs") -> list[str]:
    """Documents of the embedded corpus: Python's reference documentation (`pydoc_data`).

    ``python-docs`` is nine topics in ten (for calibration and training),
    ``python-docs-heldout`` the tenth (for evaluation on text not trained on),
    ``python-docs-all`` every topic.
    """
    if name not in BUILTIN_CORPORA:
        raise SlimlmError(f"unknown builtin corpus '{name}' (available: {', '.join(BUILTIN_CORPORA)})")
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    if name == "python-docs":
        return [d for i, d in enumerate(docs) if i % 10 != 5]
    if name == "python-docs-heldout":
        return [d for i, d in enumerate(docs) if i % 10 == 5]
    return docs


def _files_of(source: str) -> list[Path]:
    try:
        if any(ch in source for ch in "*?["):
            files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(source), recursive=True))]
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KNOWN_SUFFIXES)
            else:
                files = [path]
        return [f for f in files if f.is_file()]
    except OSError as exc:  # a folder with unreadable parts (e.g. --data /)
        raise SlimlmError(f"cannot read the data folder {source}: {exc.strerror or exc}"
                          f"{f' ({exc.filename})' if exc.filename else ''}") from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    )


def _rows_from_dataset(ds, text_field: str, source: str) -> Iterator[tuple[str, float | None]]:
    """(text, fraction of the rows read so far, or None when the length is unknown)."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise SlimlmError(f"{source} has no field '{text_field}' (fields: {', '.join(columns)}); use --text-field")
    try:
        n = len(ds)
    except TypeError:  # a streamed dataset
        n = None
    for i, row in enumerate(ds):
        value = row.get(text_field)
        if isinstance(value, str) and value:
            yield value, (i + 1) / n if n else None


def check_is_text(path: Path, sample_bytes: int = 1 << 16) -> None:
    """Refuse a file that is not text (binary data, a compressed archive, a UTF-16 file): it would
    be tokenized as garbage and trained on.  Looks at its first `sample_bytes` bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(sample_bytes)
    except OSError as exc:
        raise SlimlmError(f"cannot read {path}: {exc.strerror or exc}") from None
    text = head.decode("utf-8", errors="replace")
    if len(head) == sample_bytes:
        text = text[:-1]  # the sample may end inside a character
    # NUL bytes never occur in text; a few undecodable bytes (a Latin-1 letter) are tolerated.
    if b"\0" in head or text.count("\ufffd") > max(8, len(text) // 100):
        raise SlimlmError(f"{path} is not UTF-8 text (binary data?); give text, JSONL, JSON, CSV or Parquet files")


def _pieces_of_file(path: Path, text_field: str, piece_chars: int | None) -> Iterator[tuple[str, bool, float]]:
    """(text, last piece of its document, fraction of the file read) for one file."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES or suffix not in KNOWN_SUFFIXES:
        check_is_text(path)
        size = path.stat().st_size
        if piece_chars is None or size <= piece_chars:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text, True, 1.0
            return
        # A big text file is one document read in pieces that end at a line break, so
        # that a corpus larger than memory never sits in memory whole.
        with open(path, encoding="utf-8", errors="replace") as f:
            piece = f.read(piece_chars) + f.readline()
            while piece:
                following = f.read(piece_chars)
                if following:
                    following += f.readline()
                yield piece, not following, min(f.buffer.tell() / size, 1.0) if following else 1.0
                piece = following
        return
    from datasets import load_dataset

    kind = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}[suffix]
    try:
        ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        raise SlimlmError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    for value, frac in _rows_from_dataset(ds, text_field, str(path)):
        yield value, True, 1.0 if frac is None else frac


def iter_texts(source: str | Sequence[str] | None, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one source (or several, in order)."""
    for text, _, _ in iter_pieces(source, text_field):
        yield text


def iter_pieces(
    source: str | Sequence[str] | None, text_field: str = "text", piece_chars: int | None = None
) -> Iterator[tuple[str, bool, float | None]]:
    """The documents of `source` as ``(text, last, fraction)`` triples, for streaming readers.

    A plain-text file larger than `piece_chars` characters comes in pieces of about that
    size ending at line breaks (``last`` is False for all but its final piece); every
    other document is one piece.  ``fraction`` estimates how much of the source is read
    (from file sizes, or row counts), None where unknown (hub streams).  With
    `piece_chars=None` the pieces are exactly the documents of `iter_texts`.
    """
    if source is None:
        source = DEFAULT_CORPUS
    if not isinstance(source, str):
        sources = list(source)
        sizes = [source_bytes(s) for s in sources]
        total = sum(sizes) if all(sizes) else None
        before = 0
        for i, s in enumerate(sources):
            for text, last, frac in iter_pieces(s, text_field, piece_chars):
                if total:
                    frac = None if frac is None else (before + frac * sizes[i]) / total
                else:
                    frac = None if frac is None else (i + frac) / len(sources)
                yield text, last, frac
            before += sizes[i] or 0
        return
    if source.startswith("builtin:"):
        docs = builtin_corpus(source.split(":", 1)[1])
        for i, doc in enumerate(docs):
            yield doc, True, (i + 1) / len(docs)
        return
    if source.startswith("hf:"):
        for text, frac in _hub_rows(source[3:], text_field):
            yield text, True, frac
        return
    path = Path(source).expanduser()
    if _is_saved_dataset(path):
        from datasets import load_from_disk

        for text, frac in _rows_from_dataset(load_from_disk(str(path)), text_field, source):
            yield text, True, frac
        return
    files = _files_of(source)
    if files:
        sizes = [max(f.stat().st_size, 1) for f in files]
        total, before = sum(sizes), 0
        for f, size in zip(files, sizes):
            for text, last, frac in _pieces_of_file(f, text_field, piece_chars):
                yield text, last, (before + frac * size) / total
            before += size
        return
    if path.exists() or any(ch in source for ch in "*?[") or source.startswith((".", "/", "~")):
        raise SlimlmError(f"no readable data in {source}")
    for text, frac in _hub_rows(source, text_field):
        yield text, True, frac


def source_bytes(source: str | Sequence[str] | None) -> int | None:
    """The size of a source's local files in bytes (characters for the builtin corpus); None when unknown."""
    if source is None:
        source = DEFAULT_CORPUS
    if not isinstance(source, str):
        sizes = [source_bytes(s) for s in source]
        return sum(sizes) if all(sizes) else None
    if source.startswith("builtin:"):
        try:
            return sum(map(len, builtin_corpus(source.split(":", 1)[1])))
        except SlimlmError:
            return None
    if source.startswith("hf:"):
        return None
    path = Path(source).expanduser()
    if _is_saved_dataset(path):
        return None
    files = _files_of(source)
    return sum(f.stat().st_size for f in files) or None if files else None


def _hub_rows(name: str, text_field: str) -> Iterator[tuple[str, float | None]]:
    from datasets import load_dataset

    split = "train"
    if "@" in name:
        name, split = name.split("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    try:
        ds = load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        raise SlimlmError(f"data '{name}' is not a local file, folder or saved dataset, and the hub could not provide it") from exc
    yield from _rows_from_dataset(ds, text_field, name)


def check_source(source: str | Sequence[str] | None, text_field: str = "text") -> None:
    """Fail early (before any model loads) when a data source is unusable (reads only up to the first text)."""
    for text, _, _ in iter_pieces(source, text_field, piece_chars=1 << 20):
        if text.strip():
            return
    raise SlimlmError(f"data source {source} holds no text")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of encoded text."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def token_stream(texts: Iterable[str], tokenizer, max_tokens: int | None = None) -> Iterator[list[int]]:
    """Token ids of each document, with EOS between documents (no BOS: packing adds it)."""
    eos = tokenizer.eos_token_id
    total = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if eos is not None:
            ids = ids + [eos]
        yield ids
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            return


@dataclass
class Windows:
    """Fixed-length token windows, shape [n, seq_len]."""

    input_ids: torch.Tensor
    source: str
    seed: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for i in range(0, len(self), batch_size):
            yield self.input_ids[i : i + batch_size]

    def split(self, n_heldout: int) -> tuple["Windows", "Windows"]:
        """(main, held-out) with the last `n_heldout` windows held out."""
        n_heldout = min(n_heldout, max(len(self) - 1, 0))
        cut = len(self) - n_heldout
        return (Windows(self.input_ids[:cut], self.source, self.seed), Windows(self.input_ids[cut:], self.source, self.seed))


def pack_windows(
    source: str | Sequence[str] | None,
    tokenizer,
    seq_len: int,
    n_windows: int | None,
    seed: int = 0,
    text_field: str = "text",
    bos: bool | None = None,
    max_tokens: int | None = None,
) -> Windows:
    """Pack the source's documents into windows of `seq_len` tokens and sample `n_windows`.

    Documents are joined with EOS; each window starts with BOS when the tokenizer
    adds one (or `bos=True`).  Sampling is seeded and so deterministic; `n_windows=None`
    keeps every window in order.
    """
    if seq_len < 2:
        raise SlimlmError(f"--seq-len must be at least 2, got {seq_len}")
    if n_windows is not None and n_windows < 1:
        raise SlimlmError(f"the number of samples must be at least 1, got {n_windows}")
    use_bos = adds_bos(tokenizer) if bos is None else bos
    body = seq_len - 1 if use_bos else seq_len
    if n_windows is not None and max_tokens is None:
        # Read a generous multiple of what is needed, so sampling still spreads
        # over the corpus without tokenizing all of a huge one.
        max_tokens = max(body * n_windows * 8, 1 << 16)
    flat: list[int] = []
    for ids in token_stream(iter_texts(source, text_field), tokenizer, max_tokens):
        flat.extend(ids)
    n_avail = len(flat) // body
    if n_avail == 0:
        raise SlimlmError(f"data source {source or DEFAULT_CORPUS} has fewer than {seq_len} tokens")
    chunks = torch.tensor(flat[: n_avail * body], dtype=torch.long).view(n_avail, body)
    if use_bos:
        chunks = torch.cat([torch.full((n_avail, 1), tokenizer.bos_token_id, dtype=torch.long), chunks], dim=1)
    if n_windows is not None:
        if n_windows > n_avail:
            raise SlimlmError(
                f"data source {source or DEFAULT_CORPUS} gives only {n_avail} windows of {seq_len} tokens, {n_windows} asked"
            )
        order = random.Random(seed).sample(range(n_avail), n_windows)
        chunks = chunks[torch.tensor(order)]
    return Windows(chunks, str(source or DEFAULT_CORPUS), seed)
