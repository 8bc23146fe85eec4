import json
import subprocess
import sys

import pytest

from effnet_jax.model.cost import count_macs, count_params
from effnet_jax.model.scaling import OFFICIAL, build_architecture

# timm 1.0.31 tf_efficientnet_b0..b7, 1000 classes (shared/reference/efficientnet-facts.md)
TIMM_PARAMS = {
    "b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232,
    "b4": 19_341_616, "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960,
}
PAPER_GMACS = {"b0": 0.39, "b1": 0.70, "b2": 1.0, "b3": 1.8, "b4": 4.2, "b5": 9.9, "b6": 19, "b7": 37}


@pytest.mark.slow
def test_summary_json_params_match_timm_exactly():
    out = subprocess.run(
        [sys.executable, "-m", "effnet_jax.size_table", *TIMM_PARAMS, "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["name"]: r["params"] for r in rows} == TIMM_PARAMS
    for r in rows:
        assert set(r) >= {"name", "params", "macs", "resolution"}
        assert r["resolution"] == OFFICIAL[r["name"]].resolution


@pytest.mark.parametrize("name", list(PAPER_GMACS))
def test_macs_within_five_percent_of_paper(name):
    macs = count_macs(build_architecture(name), OFFICIAL[name].resolution)
    assert abs(macs / 1e9 - PAPER_GMACS[name]) / PAPER_GMACS[name] < 0.05


def test_b0_macs_by_hand():
    # The stem alone: 112*112 outputs * 3*3*3 * 32 channels.
    arch = build_architecture("b0")
    assert count_macs(arch, 224) > 112 * 112 * 27 * 32
    # Classifier MACs scale with classes, nothing else does.
    assert count_macs(arch, 224, 1000) - count_macs(arch, 224, 10) == 1280 * 990
    assert count_params(arch, 1000) - count_params(arch, 10) == 1281 * 990


@pytest.mark.slow
def test_summary_growth_columns():
    out = subprocess.run(
        [sys.executable, "-m", "effnet_jax.size_table", "--alpha", "1.2", "--beta", "1.1", "--gamma", "1.15",
         "--phi", "0,1,2", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["phi"] for r in rows] == [0, 1, 2]
    assert rows[0]["macs_ratio"] == 1.0
    assert rows[1]["predicted_ratio"] == pytest.approx(1.2 * 1.1**2 * 1.15**2)
    assert rows[2]["macs"] > rows[1]["macs"] > rows[0]["macs"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [(["b9"], "unknown model"), (["--alpha", "0.5", "--beta", "1", "--gamma", "1"], "alpha must be"),
     (["--alpha", "1.2"], "go together"), (["--bogus"], "unrecognized")],
)
def test_summary_bad_input_one_line_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "effnet_jax.size_table", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("error:")
