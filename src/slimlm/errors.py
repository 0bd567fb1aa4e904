"""The one error type for user mistakes.

The CLI prints a `SlimlmError` as a single line and exits with code 2; anything
else is a bug and keeps its traceback.
"""


class SlimlmError(Exception):
    """A problem with what the user asked for (bad argument, missing file, ...)."""
