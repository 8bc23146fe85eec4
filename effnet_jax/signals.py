"""Stop requests: SIGINT (Ctrl-C) and SIGTERM (Slurm, Kubernetes, preemptible VMs) recorded as a flag.

Python's own SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be,
and that includes callbacks (JAX's garbage-collection hook among them) whose exceptions are
printed and dropped: the run then goes on to the end. Here every signal is recorded *before*
anything is raised, so a dropped exception never loses the stop:

* inside ``deferred()`` (the training loop, the trial runner) the handler only records; the
  loop calls ``requested()`` between steps, saves a checkpoint and raises ``Interrupted``;
* elsewhere it records and raises ``Interrupted`` at once, as Ctrl-C always did; if that
  exception is swallowed, the next ``deferred()`` loop still sees the flag.

A second Ctrl-C stops at once even inside ``deferred()`` (a person who means it); a repeated
SIGTERM does not (schedulers resend it, and the checkpoint being saved is the point).
The handlers can only be installed from the main thread; elsewhere nothing changes.

When a process is started as one of the project's command lines (``ENTRY_POINTS``: ``python -m
effnet_jax.train``, ``python -m experiments.grid_search``, ...), importing this module (the package's
first import) installs the handlers at once, recording only: a Ctrl-C during the seconds of
importing JAX is then reported by ``started()`` as one line, not lost or printed as a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT by default), with a one-line message saying where it stopped and how to resume.
    A KeyboardInterrupt, so that in-process callers that catch KeyboardInterrupt still do."""

    def __init__(self, message: str = "interrupted", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


_received: list[int] = []
_depth = 0  # nesting of deferred() regions
_previous: dict[int, Any] = {}  # handlers to restore, while ours are installed
_starting = False  # a command line between its first import and ``started()``: signals are recorded only


def name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """What a shell reports for a process stopped by ``signum``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def requested() -> int | None:
    """The first stop signal received since ``install`` (or the last ``reset``), or None."""
    return _received[0] if _received else None


def reset() -> None:
    _received.clear()


def check() -> None:
    """Raise ``Interrupted`` if a stop signal was received (a place where stopping loses nothing)."""
    signum = requested()
    if signum is not None:
        raise Interrupted(describe(signum), signum)


def describe(signum: int) -> str:
    """'interrupted' for Ctrl-C, 'terminated (SIGTERM)' for a scheduler's stop."""
    return "interrupted" if signum == signal.SIGINT else f"terminated ({name(signum)})"


def _handle(signum: int, frame: Any) -> None:
    _received.append(signum)
    if _depth == 0 or (signum == signal.SIGINT and _received.count(signal.SIGINT) > 1):
        raise Interrupted(describe(signum), signum)


def install() -> bool:
    """Record SIGINT / SIGTERM from now on (main thread only; a signal the process ignores stays ignored).

    Returns whether the handlers are in place. Entry points call this first; ``deferred`` calls it too.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    for s in SIGNALS:
        current = signal.getsignal(s)
        if current is _handle or current is signal.SIG_IGN:
            continue
        _previous.setdefault(s, current)
        signal.signal(s, _handle)
    return True


def uninstall() -> None:
    """Put back the handlers ``install`` replaced."""
    if threading.current_thread() is threading.main_thread():
        for s, previous in list(_previous.items()):
            signal.signal(s, previous)
            del _previous[s]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A region whose loop checks ``requested()`` itself: signals are recorded, not raised.

    Installs the handlers for the region if no entry point did (and removes them after).
    """
    global _depth
    ours = not _previous and install()
    if ours:
        reset()  # a signal left from an earlier region in this process is not this region's
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if ours:
            uninstall()


def started() -> None:
    """Called by every entry point's ``main`` first: from now on a signal outside ``deferred()`` raises.
    Raises ``Interrupted`` for a signal received while the program was still importing."""
    global _depth, _starting
    install()
    if _starting:
        _starting = False
        _depth -= 1
        check()
    else:
        reset()  # an in-process caller's earlier run


# The command lines whose ``main`` calls ``started()`` (through ``errors.exit_on_user_error``).
ENTRY_POINTS = ("effnet_jax.train", "effnet_jax.size_table", "experiments.grid_search", "experiments.fidelity",
                "experiments.latency_table", "experiments.scaling_study", "experiments.scale_up")


def _launched_as_command_line() -> bool:
    """Whether this process is ``python -m <an entry point>`` (read from the interpreter's own arguments:
    while ``-m`` imports the package, ``__main__`` is not that module yet)."""
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b in ENTRY_POINTS for a, b in zip(argv, argv[1:]))


if _launched_as_command_line() and install():
    _starting, _depth = True, _depth + 1
