"""Writing outputs safely: checked up front, written atomically, nothing left half-done.

Every output is first written into a temporary sibling named ``.NAME.tmp-PID-HOST-XXXX``
and renamed into place when complete, so a crash or a kill never leaves a half-written
NAME.  The PID and a short hash of the host name in that name let the next command that
writes NAME recognise temporaries whose owner process is gone and remove them.  Outputs
get the permissions the user's umask allows (``tempfile`` would make them private).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import SlimlmError

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[^.]*")


def _temp_prefix(out: Path, kind: str = "tmp") -> str:
    return f".{out.name}.{kind}-{os.getpid()}-{_HOST}-"


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def probe_writable(path: str | os.PathLike, what: str = "output", inside: bool = False) -> None:
    """Check that `path` can be created (`inside`: that the folder `path` can be written into), by
    creating and removing a temporary folder where it goes.

    `os.access` is no test: root passes it everywhere, even under ``/proc`` or on a read-only
    mount.  Missing parent folders are not created here; the probe runs in the nearest
    existing one.
    """
    path = Path(path).expanduser()
    where = _nearest_existing(path if inside else path.parent)
    if not where.is_dir():
        raise SlimlmError(f"cannot create the {what} {path}: {where} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=where))
    except OSError as exc:
        raise SlimlmError(f"cannot write the {what} {path}: {exc.strerror or exc} ({where})") from None


def can_write_into(folder: str | os.PathLike) -> bool:
    """Whether files can be created in the existing folder `folder` (`probe_writable`'s probe, as a yes/no)."""
    try:
        probe_writable(folder, inside=True)
    except SlimlmError:
        return False
    return True


def _inputs_clash(out: Path, inputs: Iterable) -> str | None:
    """Why writing `out` would destroy one of `inputs` (local paths; others are skipped), or None."""
    target = out.resolve()
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)):
            continue
        source = Path(item).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        if target == source:
            return f"the output {out} is the input {item}; choose another output"
        if target in source.parents:
            return f"the output {out} holds the input {item}, which replacing it would delete; choose another output"
        if target.parent == source and _is_model_file(target):
            return f"the output {out} is a file of the input model {item}; choose another output"
    return None


# What `from_pretrained` reads from a model folder: replacing one of these breaks the model.
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"}
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)")


def _is_model_file(path: Path) -> bool:
    return (path.parent / "config.json").is_file() and (
        path.name in _MODEL_FILES or bool(_WEIGHT_FILE.fullmatch(path.name)))


def check_writable_output(
    path: str | os.PathLike, overwrite: bool = False, *, inputs: Iterable = (), folder: bool = True
) -> Path:
    """Validate an output before any work starts: it replaces none of the command's `inputs`,
    it exists only with `overwrite` (an empty folder is fine), it replaces nothing of another
    kind (a file for a folder output or the reverse), and it can really be created there."""
    out = Path(path).expanduser()
    clash = _inputs_clash(out, inputs)
    if clash:
        raise SlimlmError(clash)
    remove_stale_temporaries(out, restore_only=True)
    if out.exists():
        if not out.is_dir() and not out.is_file():  # /dev/null, a FIFO: never replaced by a rename
            raise SlimlmError(f"output {out} is not a regular file or folder; choose another output")
        empty_dir = out.is_dir() and not any(out.iterdir())
        if not overwrite and not empty_dir:
            raise SlimlmError(f"output {out} already exists (pass --overwrite to replace it)")
        if folder and not out.is_dir():
            raise SlimlmError(f"output {out} is a file, and this command writes a folder; choose another output")
        if not folder and out.is_dir():
            raise SlimlmError(f"output {out} is a folder, and this command writes a file; choose another output")
    probe_writable(out)
    return out


def check_not_an_input(path: str | os.PathLike, inputs: Iterable) -> None:
    """Refuse an output that would replace (or delete, being a folder above it) one of `inputs`."""
    clash = _inputs_clash(Path(path).expanduser(), inputs)
    if clash:
        raise SlimlmError(clash)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_stale_temporaries(out: str | os.PathLike, restore_only: bool = False) -> list[Path]:
    """Remove the temporaries of `out` left by killed processes of this host (one line each on stderr).

    A ``.NAME.old-*`` left between the two renames of a replacement is the previous output:
    it is put back when NAME is missing, else removed.  `restore_only`: only put such an
    output back (what the up-front checks do, so that they see it).  Returns the paths dealt with.
    """
    out = Path(out).expanduser()
    if not out.parent.is_dir():
        return []
    dealt = []
    for entry in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        m = _TEMPORARY.fullmatch(entry.name)
        if not m or m["name"] != out.name or m["host"] != _HOST or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists() and not out.is_symlink():
            try:
                os.replace(entry, out)
            except FileNotFoundError:  # another process of the same run put it back first
                continue
            print(f"restored {out} from {entry.name}, left by process {m['pid']} (killed while replacing it)",
                  file=sys.stderr, flush=True)
        elif restore_only:
            continue
        else:
            _remove(entry)
            print(f"removed {entry}, a temporary left by process {m['pid']} (no longer running)",
                  file=sys.stderr, flush=True)
        dealt.append(entry)
    return dealt


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the portable way reads it by setting it (not thread-safe: only a fallback)
    os.umask(mask)
    return mask


def _file_mode(mode: int, umask: int) -> int:
    return (0o666 | (mode & 0o111)) & ~umask


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes a plain ``open``/``mkdir`` would (the umask's).

    Temporary folders and files are private (0700 / 0600) and keep that mode when renamed
    into place; a model on a shared machine must stay readable by the others.
    """
    umask = _umask()
    root = Path(root)
    entries = [root] + ([Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files] if root.is_dir() else [])
    for p in entries:
        if p.is_symlink():
            continue
        st = p.stat()
        os.chmod(p, (0o777 & ~umask) if p.is_dir() else _file_mode(st.st_mode, umask))


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing whatever is there (a file or a folder)."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    if out.is_dir() == tmp.is_dir() and not out.is_symlink() and not tmp.is_dir():
        os.replace(tmp, out)  # a file over a file: one atomic rename
        return
    # A folder cannot be renamed over a non-empty folder: move the old one aside first.  A kill
    # between the two renames leaves .NAME.old-*, which the next writer of NAME puts back.
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out, "old"), dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    _remove(old)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; rename it to `path` on success.

    On failure the temporary folder is removed and `path` is left as it was.  Temporaries
    of `path` left by killed processes are removed first.
    """
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _final_mode(p: Path) -> int:
    """A replaced file keeps its mode; a new one gets the umask's."""
    try:
        return p.stat().st_mode & 0o7777
    except OSError:
        return _file_mode(0, _umask())


def atomic_write_bytes_via(path: str | os.PathLike, writer) -> None:
    """Call `writer(tmp_path)` to produce a file, then rename it to `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(p)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(p), dir=p.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _final_mode(p))
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary file and a rename."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write_bytes_via(path, write)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
