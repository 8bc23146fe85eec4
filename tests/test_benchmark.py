"""Smoke test of scripts/benchmark.py at a tiny setting: fields, not timings."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from suite_paths import SCRIPTS, load_script

SCRIPT = os.path.join(SCRIPTS, "benchmark.py")
FIELDS = {"model", "resolution", "batch", "dtype", "impl", "mode", "variant", "kernels", "img_per_s", "step_s",
          "compile_s", "first_step_s", "peak_device_bytes", "backend", "jax", "loadavg_1min", "started"}


def load_benchmark():
    return load_script("benchmark", "benchmark_script")


@pytest.mark.slow
def test_benchmark_json_fields(capsys, tmp_path):
    bench = load_benchmark()
    argv = ["--phi", "0", "--batch", "2", "--resolution", "32", "--num_classes", "10",
            "--warmup", "0", "--steps", "1", "--repeats", "1", "--json", str(tmp_path / "out.jsonl")]
    peer = importlib.util.find_spec("timm") is not None
    records = bench.main(argv + (["--peer", "timm", "--modes", "inference"] if peer else []))
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines == records == [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert {(r["impl"], r["mode"]) for r in records} >= {("effnet_jax", "inference")}
    for r in records:
        assert FIELDS <= r.keys() and r["img_per_s"] > 0
    ours = next(r for r in records if r["impl"] == "effnet_jax")
    assert ours["compile_s"] > 0 and ours["resolution"] == 32
    if peer:
        assert {r["variant"] for r in records if r["impl"] == "timm"} >= {"eager", "eager-cl"}  # both layouts
        assert "vs timm" in out
    # --report rebuilds the table from the JSON lines alone (parts of a GPU run are separate processes).
    assert bench.main(["--report", str(tmp_path / "out.jsonl")]) == records
    table = capsys.readouterr().out
    ours_rows = [r for r in records if r["impl"] == "effnet_jax"]
    assert "32px batch 2" in table and table.count("effnet_jax") == len(ours_rows)


@pytest.mark.slow
def test_benchmark_train_step_runs_and_profiles(capsys, tmp_path):
    bench = load_benchmark()
    records = bench.main(["--network", "tiny", "--batch", "2", "--resolution", "32", "--num_classes", "10",
                          "--modes", "train", "--kernels", "fast,reference", "--depthwise_impl", "shift",
                          "--warmup", "0", "--steps", "1", "--repeats", "1", "--profile", str(tmp_path / "prof")])
    fast, ref = records
    assert [(r["mode"], r["variant"], r["kernels"]) for r in records] == [("train", "shift", "fast"),
                                                                          ("train", "reference", "reference")]
    for r in records:
        assert r["first_step_s"] >= r["compile_s"] > 0
    assert "x reference" in capsys.readouterr().out  # the fast/reference ratio column
    # The profile maps kernel time back to the JAX ops of the forward and backward pass.
    summary = load_script("profile_summary")
    result = summary.main([str(tmp_path / "prof")])
    train = result["train"]
    assert set(result) == {"train"} and train["total_ms"] > 0  # the first kernels' program only
    assert sum(ms for _, ms in train["by_op"]) == pytest.approx(train["total_ms"])
    assert {cat.split()[0] for cat, _ in train["by_op"]} == {"fwd", "bwd"}
    assert "ms of kernels per step" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        summary.main([str(tmp_path)])  # not a profile folder: one-line usage error


@pytest.mark.parametrize("argv", [["--depthwise_impl", "fastest"], ["--timm_variants", "eager,jit"], ["--peer_only"],
                                  ["--kernels", "fast,flax"], ["--kernels", ","], ["--flax_layers"],
                                  ["--scan_blocks", "maybe"], ["--scan_blocks", ","], ["--compile_models", "b0,b9"],
                                  ["--trial_steps", "40,many"], ["--compile", "--peer", "timm"],
                                  ["--compile_steps", "0"]])
def test_benchmark_rejects_bad_arguments(argv):
    from effnet_jax.errors import UserError

    bench = load_benchmark()
    with pytest.raises(UserError):
        bench.parse_args(argv)


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--batch=0"], "--batch must be at least 1, got 0"),
    (["--resolution=1"], "--resolution 1 is smaller than the network's total stride 32"),
    (["--model", "b3", "--resolution", "16"], "smaller than the network's total stride 32"),
    (["--steps=0"], "--steps must be at least 1"),
    (["--repeats=0"], "--repeats must be at least 1"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--batch=two"], "argument --batch: invalid int value: 'two'"),
    (["--model", "b9"], "unknown model 'b9'"),
    (["--phi", "1e5"], "phi 100000 is too large"),
    (["--report", "/nonexistent/x.jsonl"], "--report: no such file"),
])
def test_benchmark_mistakes_are_one_line_exit_2(tmp_path, argv, message):
    """Before anything is compiled: the whole stderr is one ``error:`` line (argparse's usage text too)."""
    json_out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, SCRIPT, *argv, "--json", str(json_out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not json_out.exists() and proc.stdout == ""


@pytest.mark.slow
def test_no_tensorflow_in_import_chain():
    # A fresh interpreter: other tests in this process may have imported tensorflow. (ml_collections is
    # allowed: the benchmark builds the trainer's own step from the trainer's config.)
    code = (f"import runpy, sys; runpy.run_path({SCRIPT!r}, run_name='smoke'); "
            "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'clu') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_kernels_flag_builds_the_trainers_step_for_each_kernel_set():
    # --kernels goes through the trainer's config switch: "auto" and "fast" are one set, and the
    # reference set is flax's own layers (no monkey-patching: the two models differ in their classes).
    from flax import nnx

    bench = load_benchmark()
    assert bench.parse_args(["--kernels", "auto,fast,reference"]).kernel_sets == ["fast", "reference"]
    args = bench.parse_args([])
    assert args.kernel_sets == ["fast"]
    for kernels, bn_type in (("fast", "effnet_jax.model.fast_layers"), ("reference", "flax.")):
        config = bench.bench_config(args, kernels, "auto")
        assert config.model.kernels == kernels and config.batch_size == args.batch
        assert bench.recipe.model_layers(config).kernels == kernels
        model = bench.create_model("b0", 10, kernels=bench.recipe.model_layers(config))
        assert type(model.stem_bn).__module__.startswith(bn_type) and isinstance(model.stem_bn, nnx.BatchNorm)
    assert bench.variant_name("reference", "auto") == "reference"
    assert bench.variant_name("fast", "xla") == "xla"


# TINY at depth 2 (alpha 2 at phi 1): 8 blocks, one run of three same-shaped blocks that a scan runs.
DEEP_TINY = ["--network", "tiny", "--alpha", "2", "--beta", "1", "--gamma", "1", "--batch", "2", "--num_classes", "10"]


@pytest.mark.slow
def test_scan_blocks_times_both_train_steps_interleaved():
    bench = load_benchmark()
    records = bench.main([*DEEP_TINY, "--phi", "1", "--modes", "train", "--scan_blocks", "off,on", "--warmup", "0",
                          "--steps", "1", "--repeats", "1"])
    assert [(r["variant"], r["scan_blocks"]) for r in records] == [("shift", False), ("shift+scan", True)]
    assert all(r["img_per_s"] > 0 and r["compile_s"] > 0 for r in records)


@pytest.mark.slow
def test_compile_mode_cold_warm_and_stored_in_fresh_processes(capsys, tmp_path):
    """Each setting compiles into empty caches (cold: the train step adds a JAX cache entry and a stored
    program), then a second process loads it from JAX's cache (warm: traced and lowered, nothing added) and
    a third from the program store (stored: no trace or lowering); the table gives all three and the
    scanned / unscanned ratios."""
    bench = load_benchmark()
    records = bench.main(["--compile", *DEEP_TINY, "--compile_models", "phi1", "--scan_blocks", "off,on",
                          "--compile_steps", "1", "--trial_steps", "40", "--json", str(tmp_path / "c.jsonl")])
    assert [(r["scan_blocks"], r["phase"]) for r in records] == [
        (scan, phase) for scan in (False, True) for phase in ("cold", "warm", "stored")]
    for r in records:
        assert r["mode"] == "compile" and r["blocks"] == 8 and r["resolution"] == 32
        assert r["total_s"] >= r["compile_s"] > 0 and r["step_s"] > 0 and r["compiled_fusions"] > 0
        added = r["cache_entries_after"] - r["cache_entries_before"]
        stored = r["stored_programs_after"] - r["stored_programs_before"]
        assert (added, stored) == ((1, 1) if r["phase"] == "cold" else (0, 0)), r
        assert r["program_store"] == {"cold": "miss", "warm": None, "stored": "hit"}[r["phase"]], r
        assert (r["trace_s"] == 0) == (r["phase"] == "stored"), r
    out = capsys.readouterr().out
    assert "scanned / unscanned: cold" in out and "trial 40" in out
    assert bench.main(["--report", str(tmp_path / "c.jsonl")]) == records  # --report prints the compile table
    assert "scanned / unscanned" in capsys.readouterr().out
