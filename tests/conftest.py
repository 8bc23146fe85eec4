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
