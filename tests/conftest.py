"""Test setup shared by the whole suite.

Importing TensorFlow and *then* triton (pulled in by torch._dynamo when timm is
imported) segfaults. Whatever order pytest collects in, torch must come first:
import it here, before any test module can import TensorFlow.
"""

import os

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
