"""Readers for the data of slimlm's shipped local tasks (``src/slimlm/tasks/*.yaml``).

Those tasks name no dataset on the hub: lm-eval calls `load` (their
``custom_dataset``) with the run's metadata, whose ``task_data`` maps a data name
(``hellaswag``, ``mc``) to a file the user gave.  Nothing here touches the network.

- ``hellaswag``: llama.cpp's text format, 6 lines per item (``label: context``, the
  gold index 0-3, the 4 endings), plain or compressed (.bz2/.gz/.xz); or JSONL rows of
  the hub's ``Rowan/hellaswag`` (``activity_label``, ``ctx_a``, ``ctx_b``, ``endings``,
  ``label``).  Text is cleaned like lm-eval's own hellaswag task.
- ``mc``: any multiple-choice JSONL with ``question`` (or ``query``), ``choices`` (a
  list of strings) and ``answer`` (or ``gold``/``label``: the index of the right choice).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
from functools import lru_cache
from pathlib import Path

from ..errors import SlimlmError

_OPENERS = {".bz2": bz2.open, ".gz": gzip.open, ".xz": lzma.open}


def _open_text(path: Path):
    opener = _OPENERS.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8")


def _base_suffix(path: Path) -> str:
    """The suffix under any compression suffix: data.jsonl.bz2 -> .jsonl."""
    name = path.name.lower()
    for comp in _OPENERS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return Path(name).suffix


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with _open_text(path) as f:
        if _base_suffix(path) == ".json":
            data = json.load(f)
            return data if isinstance(data, list) else data.get("data", [])
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SlimlmError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
    return rows


def clean_hellaswag(text: str) -> str:
    """lm-eval's hellaswag preprocessing: WikiHow '[title]' markers and brackets out."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_from_text(path: Path) -> list[dict]:
    with _open_text(path) as f:
        lines = [line.rstrip("\n") for line in f]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise SlimlmError(f"{path}: expected 6 lines per HellaSwag item, got {len(lines)} lines")
    docs = []
    for i in range(0, len(lines), 6):
        context, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        if gold not in {"0", "1", "2", "3"}:
            raise SlimlmError(f"{path}:{i + 2}: expected the gold index (0-3), got '{gold[:40]}'")
        docs.append({"query": clean_hellaswag(context), "choices": [clean_hellaswag(e) for e in endings], "gold": int(gold)})
    return docs


def _hellaswag_from_jsonl(path: Path) -> list[dict]:
    docs = []
    for n, row in enumerate(_read_jsonl(path), 1):
        try:
            ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
            docs.append(
                {
                    "query": clean_hellaswag(row["activity_label"] + ": " + ctx),
                    "choices": [clean_hellaswag(e) for e in row["endings"]],
                    "gold": int(row["label"]),
                }
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SlimlmError(f"{path}: item {n} is not a HellaSwag row (needs activity_label, ctx_a, ctx_b, endings, label)") from exc
    return docs


def read_hellaswag(path: str | os.PathLike) -> list[dict]:
    """HellaSwag items as ``{"query", "choices", "gold"}`` from the text or JSONL format."""
    path = Path(path).expanduser()
    if _base_suffix(path) in {".jsonl", ".json", ".ndjson"}:
        return _hellaswag_from_jsonl(path)
    return _hellaswag_from_text(path)


def _first(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in row:
            return row[k]
    return None


def read_multiple_choice(path: str | os.PathLike) -> list[dict]:
    """Multiple-choice items as ``{"query", "choices", "gold"}`` from JSONL."""
    path = Path(path).expanduser()
    docs = []
    for n, row in enumerate(_read_jsonl(path), 1):
        query = _first(row, ("question", "query", "context"))
        choices = row.get("choices")
        gold = _first(row, ("answer", "gold", "label"))
        gold = int(gold) if isinstance(gold, str) and gold.isdigit() else gold
        ok = isinstance(query, str) and isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
        if not ok or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise SlimlmError(
                f"{path}: item {n} needs 'question' (text), 'choices' (list of text) and 'answer' (index of the right choice)"
            )
        docs.append({"query": query, "choices": choices, "gold": gold})
    return docs


READERS = {"hellaswag": read_hellaswag, "mc": read_multiple_choice}


@lru_cache(maxsize=8)
def _read_cached(name: str, path: str, stamp: tuple) -> tuple[dict, ...]:
    return tuple(READERS[name](path))


def read_local(name: str, path: str | os.PathLike) -> list[dict]:
    """Items of local data `name` from `path`; parsed once per file version."""
    if name not in READERS:
        raise SlimlmError(f"unknown task data '{name}' (known: {', '.join(sorted(READERS))})")
    p = Path(path).expanduser()
    if not p.is_file():
        raise SlimlmError(f"task data file not found: {p}")
    stat = p.stat()
    docs = _read_cached(name, str(p.resolve()), (stat.st_size, stat.st_mtime_ns))
    if not docs:
        raise SlimlmError(f"{p} holds no {name} items")
    return list(docs)


def load(data_name: str, task_data: dict | None = None, **_unused):
    """lm-eval ``custom_dataset`` entry point: the local items as a validation split."""
    import datasets

    path = (task_data or {}).get(data_name)
    if path is None:
        raise SlimlmError(
            f"this task reads local {data_name} data: pass --task-data {data_name}=PATH "
            f"(from Python: run_tasks(..., task_data={{'{data_name}': PATH}}); lm_eval: --metadata "
            f"'{{\"task_data\": {{\"{data_name}\": \"PATH\"}}}}')"
        )
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(read_local(data_name, path))})
