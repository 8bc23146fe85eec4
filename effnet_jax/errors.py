"""User-facing errors: one line on stderr and a conventional exit code, never a traceback.

* ``UserError``: a mistake in the user's input (flag, config, file) or an environment fault
  the user must fix (full disk, unwritable workdir): ``error: ...``, exit code 2.
* ``KeyboardInterrupt`` (Ctrl-C, SIGINT): ``error: interrupted ...``, exit code 130 (128 +
  SIGINT's number 2, what shells report for a process stopped by Ctrl-C). ``Interrupted`` is
  the trainer's, carrying where it stopped and how to resume; it *is* a KeyboardInterrupt so
  that in-process callers (the grid search) that catch KeyboardInterrupt still do.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class UserError(ValueError):
    """A mistake in the user's input (flag, config, file). Printed as one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with a one-line message saying where it stopped and how to resume."""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(message).split())


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI entry point: UserError -> one line, exit 2; Ctrl-C -> one line, exit 130."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as e:
            print(f"error: {one_line(e) or 'interrupted'}", file=sys.stderr, flush=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
