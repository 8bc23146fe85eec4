"""Paths the whole suite shares (a module, not conftest, so that test modules and subprocess scripts import it)."""

import os

# The one persistent compilation cache of the suite's in-process runs and of the CLI runs the tests start
CACHE = os.path.join(os.environ.get("PYTEST_CACHE_ROOT", "/tmp"), f"effnet_jax_test_xla_{os.getuid()}")
