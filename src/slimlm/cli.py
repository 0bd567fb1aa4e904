"""The `slimlm` command line: a thin layer over the Python API with the same names.

Each command module (`commands.py`, `distill/cli.py`, `evaluate/cli.py`, `align/cli.py`,
`hub.py`) adds its commands to the app with `register(app)`; their options come from the config
classes in `slimlm.config` (see `slimlm._cli`).  Every command validates its arguments before
any work starts.  A user mistake (`SlimlmError`, or a usage error) prints one line on stderr
and exits with code 2; `--json` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import errno
import importlib
import sys
from typing import Optional

import typer

from .errors import SlimlmError

COMMAND_MODULES = ("slimlm.commands", "slimlm.distill.cli", "slimlm.evaluate.cli", "slimlm.align.cli", "slimlm.hub")


def build_app() -> typer.Typer:
    """The typer app with every command registered."""
    app = typer.Typer(
        name="slimlm",
        help="Make Hugging Face causal LMs smaller with the Minitron recipe: importance, pruning, distillation.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # help texts are plain: hf:NAME[:CONFIG][@SPLIT] must show as written
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)
    return app


def _click_types(name: str) -> tuple[type, ...]:
    """Click's exception class `name` from both clicks: typer >= 0.2x vendors its own (`typer._click`),
    older releases use the `click` package, and both may be installed."""
    types = [getattr(typer, name, None)]
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(getattr(importlib.import_module(module), name, None))
        except ImportError:
            continue
    return tuple({t for t in types if isinstance(t, type)})


def one_line(text: str) -> str:
    """`text` with its lines joined: every error the CLI prints is one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _usage_message(exc) -> str:
    message = one_line(exc.format_message() if hasattr(exc, "format_message") else exc)
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None)
    return f"{message} (see '{command} --help')" if command else message


# Failures of the machine rather than of slimlm, met while writing after the up-front checks
# (disk full, a folder made read-only meanwhile): one line, not a traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the console script.

    Exit codes: 0 done; 2 a usage error or a user mistake, refused before any work and
    with nothing written (one line on stderr); 1 the machine failed us during the work
    (disk full, permission lost: one line); 130 interrupted.  Anything else is a bug and
    keeps its traceback.
    """
    app = build_app()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="slimlm")
        # Non-standalone typer returns (not raises) an interruption's exit code: Ctrl-C must not exit 0.
        if code == 130:
            raise KeyboardInterrupt
    except SlimlmError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except _click_types("Exit") as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _click_types("Abort"):
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except _click_types("ClickException") as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # `slimlm` alone: the help, as click shows it
            exc.show()
            sys.exit(2)
        print(f"error: {_usage_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        sys.exit(1)
