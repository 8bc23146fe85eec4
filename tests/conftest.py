"""Test setup shared by the whole suite.

Importing TensorFlow and *then* triton (pulled in by torch._dynamo when timm is
imported) segfaults. Whatever order pytest collects in, torch must come first:
import it here, before any test module can import TensorFlow.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

try:  # noqa: SIM105
    import timm  # noqa: F401
    import torch  # noqa: F401
except ImportError:
    pass


def pytest_configure(config):
    """The in-process runs share one persistent compilation cache, as a CLI run sets it up
    (effnet_jax.cli.enable_compile_cache): the library itself sets no process-wide state.

    A suite started in the background by a non-interactive shell (``cmd &``, nohup) inherits SIGINT
    ignored, and so would every process it starts (effnet_jax.signals leaves an ignored signal ignored,
    as a background job should): the Ctrl-C tests need it deliverable, so Python's default comes back."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from suite_paths import CACHE

    from effnet_jax import cli

    cli.enable_compile_cache(CACHE)


class UnmarkedSlowTest(AssertionError):
    """A test outside the ``slow`` tier trained a network or started a Python process."""


@pytest.fixture(autouse=True)
def _fast_tier_stays_fast(request, monkeypatch):
    """Keep ``pytest -m "not slow"`` the edit loop: a test without ``@pytest.mark.slow`` that trains (the
    trainer's ``train_and_evaluate``) or starts a Python process fails here, naming what it did. A test that
    swaps training for a fake (monkeypatch) is not training and stays in the fast tier."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import subprocess
    import sys

    from effnet_jax.training import trainer

    def refuse(what: str):
        raise UnmarkedSlowTest(f"{request.node.nodeid} {what}: mark it @pytest.mark.slow (tests/conftest.py)")

    real_popen = subprocess.Popen.__init__

    def popen(self, args, *a, **k):
        first = args[0] if isinstance(args, (list, tuple)) and args else args
        if isinstance(first, str) and os.path.realpath(first) == os.path.realpath(sys.executable):
            refuse("started a Python process")
        return real_popen(self, args, *a, **k)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(trainer, "train_and_evaluate", lambda *a, **k: refuse("trained a network"))
    yield
