"""Shared CLI plumbing: bad input becomes one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class Stopped(RuntimeError):
    """A run stopped for a reason the user can act on (the message says how); finished work is kept."""


EXPECTED = (ValueError, FileNotFoundError, PermissionError, KeyError, Stopped)


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; finished work is saved (rerun the same command to resume)", file=sys.stderr)
        sys.exit(130)
    except EXPECTED as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
