"""effnet_jax.provenance: what makes numbers differ between machines, recorded without failing anywhere."""

import importlib.metadata
import re
import shutil

import jax
import pytest

from effnet_jax import __version__, provenance
from effnet_jax.training import latency


def test_provenance_names_versions_device_cpu_and_code():
    p = provenance.provenance()
    for name in provenance.PACKAGES:
        assert p[name] == importlib.metadata.version(name), name
    assert p["device_kind"] == jax.devices()[0].device_kind and p["device_count"] == jax.device_count()
    assert p["cpu"] == latency.cpu_model() and p["cpu"] and p["effnet_jax"] == __version__
    assert set(p) >= {"commit", "dirty", "platform"}


def test_git_commit_in_a_checkout_and_outside_one(tmp_path):
    assert provenance.git_commit(str(tmp_path)) == {"commit": None, "dirty": None}  # not a checkout: no failure
    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    here = provenance.git_commit(provenance.ROOT)
    if here["commit"] is not None:  # a source checkout (an installed wheel has none)
        assert re.fullmatch(r"[0-9a-f]{40}", here["commit"]) and isinstance(here["dirty"], bool)
