"""The `slimlm` command line: a thin layer over the Python API with the same names.

Each command module (`commands.py`, `distill/cli.py`, `evaluate/cli.py`, `align/cli.py`,
`hub.py`) adds its commands to the app with `register(app)`; their options come from the config
classes in `slimlm.config` (see `slimlm._cli`).  Every command validates its arguments before
any work starts.  A user mistake (`SlimlmError`, or a usage error) prints one line on stderr
and exits with code 2; `--json` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from .errors import SlimlmError

COMMAND_MODULES = ("slimlm.commands", "slimlm.distill.cli", "slimlm.evaluate.cli", "slimlm.align.cli", "slimlm.hub")


def build_app() -> typer.Typer:
    """The typer app with every command registered."""
    import importlib

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


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the console script."""
    app = build_app()
    try:
        code = app(args=argv, standalone_mode=False)
        # Non-standalone typer returns (not raises) an interruption's exit code: Ctrl-C must not exit 0.
        if code == 130:
            raise KeyboardInterrupt
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
