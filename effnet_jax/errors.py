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

import argparse
import errno
import functools
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from effnet_jax import signals
from effnet_jax.signals import Interrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class UserError(ValueError):
    """A mistake in the user's input (flag, config, file). Printed as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a UserError (one ``error:`` line, exit 2), not usage text."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


# An OSError with one of these during a run is the machine's state, not a bug: one line, exit 2.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def storage_error(e: BaseException) -> OSError | None:
    """The OSError of a full, read-only or forbidden disk behind ``e``, or None. Orbax wraps them, and
    tensorstore reports them as a ValueError whose text carries the errno (``os_error_code='28'``)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in STORAGE_ERRNOS:
            return x
        code = _errno_in_text(str(x))
        if code is not None:
            path = re.search(r'local file "([^"]+)"', str(x))
            return OSError(code, os.strerror(code), path[1] if path else None)
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None


def _errno_in_text(text: str) -> int | None:
    m = _OS_ERROR_CODE.search(text)
    code = int(m[1] or m[2]) if m else None
    return code if code in STORAGE_ERRNOS else None


def storage_message(err: OSError) -> str:
    """One line for a full, read-only or forbidden disk: what could not be written and what to do."""
    name = errno.errorcode.get(err.errno, str(err.errno))
    where = f"cannot write {err.filename}" if err.filename else "cannot write to disk"
    return (f"{where}: {os.strerror(err.errno)} ({name}); free space or fix the permissions, then rerun the same "
            "command to resume from the last checkpoint")


class StorageLogFilter(logging.Filter):
    """Drops log records that report a full / read-only disk (orbax's writer threads log each failure with
    a traceback); the main thread reports it once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and storage_error(exc) is not None:
            return False
        return _errno_in_text(record.getMessage()) is None


def _quiet_unraisable(previous: Callable[..., Any]) -> Callable[..., Any]:
    """``sys.unraisablehook`` without two reports that are not the user's business:

    * ``Interrupted`` raised inside a callback (JAX's garbage-collection hook, a ``__del__``): Python drops
      it, but ``signals`` recorded the stop first, so the next check reports it as one line;
    * 'Event loop is closed': tensorstore's writer threads report that when a checkpoint save failed and
      orbax's event loop was shut; the failure itself is reported, once.
    """

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Interrupted) and signals.requested() is not None:
            return
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_effnet = True  # type: ignore[attr-defined]
    return hook


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
        for name in ("absl", "asyncio"):  # orbax's writer threads; its tasks' unretrieved exceptions
            logging.getLogger(name).addFilter(StorageLogFilter())
        if not getattr(sys.unraisablehook, "quiets_effnet", False):
            sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
        try:
            signals.started()
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        except Exception as e:  # a full or read-only disk, or a JAX backend that is not here; else a bug
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
            sys.exit(signals.exit_code(e.signum) if isinstance(e, Interrupted) else EXIT_INTERRUPTED)

    return wrapper
