"""Chat data and chat templates, shared by `slimlm align`, `slimlm distill --chat` and `slimlm eval --chat-prompts`.

File formats (JSONL, one record a line; a ``.json`` file holding a list of records also works):

- conversations: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}``
- preferences: ``{"prompt": ..., "chosen": ..., "rejected": ...}``, each a string or a list of messages
  (a string prompt becomes one user message, a string answer one assistant message);
- prompts: ``{"prompt": "..."}`` or ``{"messages": [...]}`` records, or plain text with one prompt a line.

Every reader checks every record and names the file and line of the first bad one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import SlimlmError

ROLES = ("system", "user", "assistant", "tool")


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def read_records(path: str | os.PathLike, what: str) -> list[tuple[int | None, dict]]:
    """(line number, record) of a JSONL file (or a .json list); SlimlmError on anything unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SlimlmError(f"{what} file not found: {p}")
    if p.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise SlimlmError(f"{what} must be a JSONL file (.jsonl, or .json holding a list), got {p.name}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SlimlmError(f"cannot read {what} file {p}: {exc}") from None
    records: list[tuple[int | None, dict]] = []
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise SlimlmError(f"{p}: not valid JSON ({exc})") from None
        records = [(None, item) for item in items]
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((i, json.loads(line)))
            except ValueError as exc:
                raise SlimlmError(f"{p}:{i}: not a JSON line ({exc.msg})") from None
    for line, rec in records:
        if not isinstance(rec, dict):
            raise SlimlmError(f"{_where(p, line)}: expected a JSON object, got {type(rec).__name__}")
    if not records:
        raise SlimlmError(f"{what} file {p} holds no records")
    return records


def check_messages(messages, where: str, field: str = "messages") -> list[dict]:
    """A list of {role, content} dicts with string content; returned with only those two keys."""
    if not isinstance(messages, list) or not messages:
        raise SlimlmError(f"{where}: '{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise SlimlmError(f"{where}: {field}[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise SlimlmError(f"{where}: {field}[{j}] has role '{m['role']}' (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise SlimlmError(f"{where}: {field}[{j}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_conversations(path: str | os.PathLike, need_assistant: bool = True) -> list[list[dict]]:
    """The `messages` lists of a conversations file (each with an assistant turn when `need_assistant`)."""
    p = Path(path).expanduser()
    out = []
    for line, rec in read_records(p, "chat data"):
        where = _where(p, line)
        if "messages" not in rec:
            raise SlimlmError(f"{where}: no 'messages' field (fields: {', '.join(rec) or 'none'}); "
                              "chat data is JSONL of {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
        msgs = check_messages(rec["messages"], where)
        if need_assistant and not any(m["role"] == "assistant" for m in msgs):
            raise SlimlmError(f"{where}: the conversation has no assistant message to train on")
        out.append(msgs)
    return out


def _as_messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise SlimlmError(f"{where}: '{field}' is empty")
        return [{"role": role, "content": value}]
    return check_messages(value, where, field)


def read_preferences(path: str | os.PathLike) -> list[dict]:
    """Preference pairs as conversational ``{"prompt", "chosen", "rejected"}`` message lists."""
    p = Path(path).expanduser()
    out = []
    for line, rec in read_records(p, "preference data"):
        where = _where(p, line)
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise SlimlmError(f"{where}: missing field(s) {', '.join(missing)}; preference data is JSONL of "
                              "{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}")
        row = {"prompt": _as_messages(rec["prompt"], "user", where, "prompt")}
        for key in ("chosen", "rejected"):
            msgs = _as_messages(rec[key], "assistant", where, key)
            if msgs[-1]["role"] != "assistant":
                raise SlimlmError(f"{where}: '{key}' must end with an assistant message")
            row[key] = msgs
        if row["prompt"][-1]["role"] == "assistant":
            raise SlimlmError(f"{where}: the prompt must not end with an assistant message")
        out.append(row)
    return out


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts for generation: ``[{"prompt": text or None, "messages": [...]}, ...]``.

    A ``.jsonl``/``.json`` file holds ``prompt`` or ``messages`` records; any other file is plain
    text with one prompt a line.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SlimlmError(f"prompt file not found: {p}")
    out = []
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for line, rec in read_records(p, "prompt"):
            where = _where(p, line)
            if "messages" in rec:
                msgs = check_messages(rec["messages"], where)
                if msgs[-1]["role"] == "assistant":
                    msgs = msgs[:-1]  # a reference answer: the model writes its own
                if not msgs:
                    raise SlimlmError(f"{where}: no prompt before the assistant message")
                out.append({"prompt": rec.get("prompt") if isinstance(rec.get("prompt"), str) else None,
                            "messages": msgs})
            elif isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
                out.append({"prompt": rec["prompt"], "messages": [{"role": "user", "content": rec["prompt"]}]})
            else:
                raise SlimlmError(f"{where}: expected a 'prompt' string or a 'messages' list")
    else:
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                out.append({"prompt": line.strip(), "messages": [{"role": "user", "content": line.strip()}]})
    if not out:
        raise SlimlmError(f"prompt file {p} holds no prompts")
    return out


# ---------------------------------------------------------------- templates


def template_text(tokenizer) -> str | None:
    """The tokenizer's default chat template as text (None when it has none)."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), None)
    return t or None


def template_from(source: str) -> tuple[str, object | None]:
    """(template, its tokenizer or None) from a model name/folder, or from a Jinja file."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() in (".jinja", ".j2", ".txt", ".jinja2"):
            text = p.read_text(encoding="utf-8")
            if not text.strip():
                raise SlimlmError(f"the chat template file {p} is empty")
            return text, None
        if p.suffix.lower() == ".json":
            data = json.loads(p.read_text())
            if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
                return data["chat_template"], None
        raise SlimlmError(f"--chat-template-from {p}: expected a model folder or a .jinja template file")
    from .models import load_tokenizer

    tok = load_tokenizer(source)
    text = template_text(tok)
    if text is None:
        raise SlimlmError(f"--chat-template-from {source}: that model has no chat template either")
    return text, tok


def ensure_chat_template(tokenizer, source: str | None = None, what: str = "the model") -> str:
    """Give `tokenizer` a chat template: its own, or the one of `source` (model or .jinja file).

    A template taken from another tokenizer must only use special tokens that this
    tokenizer knows with the same ids, or the rendered text would not mean the same.
    Returns the template; SlimlmError when there is none.
    """
    own = template_text(tokenizer)
    if source is None:
        if own is None:
            raise SlimlmError(f"{what} has no chat template: pass --chat-template-from MODEL (e.g. the teacher) "
                              "or a .jinja file")
        return own
    text, other = template_from(source)
    if other is not None:
        mine = tokenizer.get_vocab()
        for token, tid in other.get_added_vocab().items():
            if token in text and mine.get(token) != tid:
                raise SlimlmError(f"the chat template of {source} uses the token {token!r}, which {what}'s tokenizer "
                                  "does not have with the same id")
    tokenizer.chat_template = text
    return text


def template_hash(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else None


def render_chat_texts(conversations: list[list[dict]], tokenizer) -> list[str]:
    """Each conversation rendered to text with the tokenizer's chat template (no generation prompt)."""
    out = []
    for msgs in conversations:
        try:
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
        except Exception as exc:  # jinja raises its own types (e.g. a template that refuses a role order)
            raise SlimlmError(f"the chat template cannot render a conversation: {exc}") from None
    return out
