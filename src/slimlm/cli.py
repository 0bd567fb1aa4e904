"""The `slimlm` command line: a thin layer over the Python API with the same names.

Every command validates its arguments before any work starts.  A user mistake
(`SlimlmError`) prints one line on stderr and exits with code 2; `--json` prints one
JSON object as the last line of stdout.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from .errors import SlimlmError

app = typer.Typer(
    name="slimlm",
    help="Make Hugging Face causal LMs smaller with the Minitron recipe: importance, pruning, distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def emit_json(obj: dict) -> None:
    """Print one JSON object as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(obj, default=str), flush=True)


def _register_commands() -> None:
    from . import commands  # noqa: F401  (core commands register on import)

    for module in ("slimlm.distill.cli", "slimlm.evaluate.cli", "slimlm.align.cli", "slimlm.hub"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
        mod.register(app)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the console script."""
    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except SlimlmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
