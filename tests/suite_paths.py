"""Paths the whole suite shares (a module, not conftest, so that test modules and subprocess scripts import it)."""

import importlib.util
import os
import sys

# The one persistent compilation cache of the suite's in-process runs and of the CLI runs the tests start
CACHE = os.path.join(os.environ.get("PYTEST_CACHE_ROOT", "/tmp"), f"effnet_jax_test_xla_{os.getuid()}")

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_script(name: str, module: str | None = None):
    """``scripts/<name>.py`` imported as a module (registered in sys.modules: dataclasses look theirs up)."""
    spec = importlib.util.spec_from_file_location(module or name, os.path.join(SCRIPTS, f"{name}.py"))
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    spec.loader.exec_module(loaded)
    return loaded
