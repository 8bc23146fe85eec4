"""User-facing errors: one line on stderr and a conventional exit code, never a traceback.

* ``UserError``: a mistake in the user's input (flag, config, file) or an environment fault
  the user must fix (full or read-only disk, a JAX backend that is not installed): ``error: ...``,
  exit code 2.
* ``Interrupted`` (Ctrl-C or SIGTERM, see ``effnet_jax.signals``): ``error: interrupted ...`` /
  ``error: terminated (SIGTERM) ...``, exit code 128 + the signal's number (130, 143: what shells
  report for a process stopped by it), saying where it stopped and how to resume. It *is* a
  KeyboardInterrupt, so in-process callers that catch KeyboardInterrupt still do.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class UserError(ValueError):
    """A mistake in the user's input (flag, config, file). Printed as one line."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT by default), with a one-line message saying where it stopped and how to resume."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


def _backend_failed(e: BaseException) -> bool:
    """Whether ``e`` came from JAX choosing its backend (``JAX_PLATFORMS`` naming one that is not here)."""
    frames = traceback.extract_tb(e.__traceback__)
    return any(f.filename.endswith("xla_bridge.py") and f.name in ("backends", "_init_backend") for f in frames[-3:])


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(message).split())


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI entry point: UserError -> one line, exit 2; Ctrl-C / SIGTERM -> one line, exit 130 / 143.

    Installs ``effnet_jax.signals``' handlers first, so no stop signal can be lost from here on.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from effnet_jax import rundir, signals

        logging.getLogger("absl").addFilter(rundir.StorageLogFilter())
        try:
            signals.started()
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except Exception as e:  # a full or read-only disk, or a JAX backend that is not here; else a bug
            from effnet_jax.rundir import storage_error, storage_message

            err = storage_error(e)
            if err is not None:
                print(f"error: {storage_message(err)}", file=sys.stderr, flush=True)
                sys.exit(EXIT_USER_ERROR)
            if not _backend_failed(e):
                raise
            platforms = os.environ.get("JAX_PLATFORMS", "")
            print(f"error: JAX could not start {'the ' + platforms + ' backend' if platforms else 'a backend'}: "
                  f"{one_line(e) or 'it is not on this machine'}; install jax for it (pip install -e '.[gpu]' or "
                  "'.[tpu]') or unset JAX_PLATFORMS to use what this machine has", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt as e:
            print(f"error: {one_line(e) or 'interrupted'}", file=sys.stderr, flush=True)
            sys.exit(128 + e.signum if isinstance(e, Interrupted) else EXIT_INTERRUPTED)

    return wrapper
