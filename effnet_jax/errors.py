"""User-facing errors: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class UserError(ValueError):
    """A mistake in the user's input (flag, config, file). Printed as one line."""


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI entry point so a UserError ends the program with code 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            msg = " ".join(str(e).split())
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper
