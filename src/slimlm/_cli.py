"""What every command module of the CLI uses: options built from the config classes, shared flags, JSON output.

`settings_command` turns a function whose parameters include config objects (annotated with a
`slimlm.config.Settings` class) into a typer command with one option per setting, so a setting's
flag, default and help are those declared in `slimlm.config`.  The function receives the config
objects, built, parsed and checked.  Imports stay light (no torch): `slimlm --help` must be fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from .config import Settings, flag_of

# ---- inputs and run flags shared by several commands: one declaration each -----------------------

MODEL_HELP = "A local Hugging Face folder, a hub id, a .gguf file, or the embedded alias 'smollm2-135m'."

Model = Annotated[str, typer.Argument(help=MODEL_HELP)]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line of stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in the output folder from its last checkpoint.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Print the memory each device would need (and what would fit) and exit; loads no weights.")]


def print_memory_plans(plans, as_json: bool) -> None:
    """What --dry-run prints: each plan's lines (and one JSON object with --json)."""
    for title, plan in plans:
        print(f"{title}:" if title else "", *plan.lines(), sep="\n")
    if as_json:
        emit_json({"dry_run": True, "plans": {title or "distill": plan.as_dict() for title, plan in plans}})


def emit_json(obj: dict) -> None:
    """Print one JSON object as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(obj, default=str), flush=True)


def fmt_params(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n < 1e9 else f"{n / 1e9:,.2f}B"


# ---- options from config classes ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Only:
    """Show only these settings of a config on this command (`Annotated[DistillConfig, Only(...)]`)."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        object.__setattr__(self, "names", names)


@dataclasses.dataclass(frozen=True)
class Without:
    """Show every setting of a config except these on this command."""

    names: tuple[str, ...]

    def __init__(self, *names: str):
        object.__setattr__(self, "names", names)


def _option_type(cls, f: dataclasses.Field):
    cli_type = f.metadata.get("cli_type")
    if cli_type is not None:
        return cli_type
    return typing.get_type_hints(cls)[f.name]


def _option(cls, f: dataclasses.Field):
    """(annotation, default) of the typer option for one setting."""
    names = [f.metadata.get("flag") or ("--" + f.name.replace("_", "-"))]
    if f.metadata.get("short"):
        names.append(f.metadata["short"])
    kind = _option_type(cls, f)
    default = f.default
    if kind is bool and default is True and "/" not in names[0]:
        names[0] = f"{names[0]}/--no-{names[0][2:]}"
    if kind in (typing.Optional[bool],) and "/" not in names[0]:
        names[0] = f"{names[0]}/--no-{names[0][2:]}"
    required = f.metadata.get("required") and default is None
    if f.metadata.get("cli_type") is not None and default is not None and not isinstance(default, (str, int, float, bool)):
        default = ",".join(str(x) for x in default) if default else None  # e.g. a tuple shown as '8,12'
    if isinstance(default, tuple):
        default = None
    metavar = f.metadata.get("metavar")
    if metavar is None and typing.get_origin(_strip_optional(kind)) is list:
        metavar = "TEXT"
    option = typer.Option(*names, help=f.metadata.get("help", ""), metavar=metavar)
    if required:
        return Annotated[_strip_optional(kind), option], ...
    return Annotated[kind, option], default


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def _strip_optional(tp):
    if _is_optional(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _config_param(annotation):
    """(Settings class, Only/Without filter or None) when a parameter takes a config object."""
    extra = None
    if typing.get_origin(annotation) is Annotated:
        annotation, *meta = typing.get_args(annotation)
        extra = next((m for m in meta if isinstance(m, (Only, Without))), None)
    if isinstance(annotation, type) and issubclass(annotation, Settings):
        return annotation, extra
    return None


def settings_command(fn):
    """Expand every config-object parameter of `fn` into one CLI option per setting (see the module doc)."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    params: list[inspect.Parameter] = []
    expanded: dict[str, tuple[type, list[tuple[str, str]]]] = {}
    seen_flags: dict[str, str] = {}
    for name, p in sig.parameters.items():
        found = _config_param(hints.get(name))
        if found is None:
            params.append(p.replace(annotation=hints.get(name, p.annotation)))
            continue
        cls, filt = found
        chosen = cls.settings(where="cli")
        if isinstance(filt, Only):
            chosen = [f for f in chosen if f.name in filt.names]
        elif isinstance(filt, Without):
            chosen = [f for f in chosen if f.name not in filt.names]
        members = []
        for f in chosen:
            flag = flag_of(f)
            internal = f"{name}__{f.name}"
            if flag in seen_flags:
                owner, owner_field = seen_flags[flag]
                # A shared setting (data, seed, dtype, ...) is one option that every config of the command gets.
                if not (f.metadata.get("shared") and owner_field.metadata.get("shared") and owner_field.name == f.name):
                    raise TypeError(f"{fn.__name__}: {flag} would be both {owner} and {internal}")
                members.append((owner, f.name))
                continue
            seen_flags[flag] = (internal, f)
            annotation, default = _option(cls, f)
            params.append(inspect.Parameter(internal, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
            members.append((internal, f.name))
        expanded[name] = (cls, members)

    # Keyword-only parameters after positional ones, as Python requires.
    positional = [p for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(fn)
    def command(*args, **kwargs):
        built = build_configs(expanded, kwargs)
        for internal in generated:
            kwargs.pop(internal, None)
        return fn(*args, **kwargs, **built)

    generated = [p.name for p in keyword if "__" in p.name]
    command.__signature__ = sig.replace(parameters=positional + keyword)
    command.__annotations__ = {p.name: p.annotation for p in positional + keyword}
    command.__wrapped_settings__ = expanded
    del command.__wrapped__  # typer must read the new signature, not the original one
    return command


def build_configs(expanded: dict, values: dict) -> dict:
    """The config objects of a command from its parsed option values (options left out keep their defaults)."""
    built = {}
    for name, (cls, members) in expanded.items():
        given = {field: values[internal] for internal, field in members}
        given = {k: _from_cli(v) for k, v in given.items()}
        given = {k: v for k, v in given.items() if v is not None or _none_is_default(cls, k)}
        built[name] = cls.make(**given)
    return built


def _none_is_default(cls, name: str) -> bool:
    """A None from the CLI means 'not given' unless the setting's default is something else."""
    default = cls.__dataclass_fields__[name].default
    return default is None


def _from_cli(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):  # a repeatable option given 0 times is "not given"
        return [str(v) if isinstance(v, Path) else v for v in value] or None
    return value
