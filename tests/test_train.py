"""The trainer end to end on tiny settings: results, sharding, multi-process, resume, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from suite_paths import CACHE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "effnet_jax", "configs", "digits.py")
# A tiny network at 32 px keeps each compile to seconds on 2 cores.
# One compilation cache for the whole test session: runs of the same program reuse it.
TINY = ["--config.model.network=tiny", "--config.progress_bar=False", f"--config.compile_cache_dir={CACHE}"]
# conftest quiets TensorFlow for the test process; the trainer must quiet it itself.
TF_QUIET = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")


def cli_env(env=None):
    return {**{k: v for k, v in os.environ.items() if k not in TF_QUIET}, **(env or {})}


def run_train(workdir, *overrides, env=None, check=True):
    cmd = [sys.executable, "-m", "effnet_jax.train", f"--config={DIGITS}", f"--workdir={workdir}", *TINY, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=cli_env(env), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def own_program_store(tmp_path, monkeypatch):
    """An empty program store for this test's in-process runs (the suite's shared one may already hold their
    programs, which would turn the compiles these tests count into loads)."""
    from effnet_jax.training import program_store

    store = tmp_path / "cc" / program_store.SUBDIR
    monkeypatch.setattr(program_store, "directory", lambda: str(store))
    return store


@pytest.mark.slow
def test_train_writes_results_metrics_and_checkpoints(tmp_path):
    wd = tmp_path / "run"
    proc = run_train(wd, "--config.num_train_steps=6", "--config.log_every_steps=2", "--config.eval_every_steps=3",
                     "--config.checkpoint_every_steps=3")
    assert proc.stdout.strip().splitlines()[-1].startswith("done: ")
    result = json.loads((wd / "result.json").read_text())
    assert result["status"] == "ok" and result["steps"] == 6
    for key in ("val_top1", "val_top5", "ema_val_top1", "train_loss", "params", "macs", "train_img_per_s"):
        assert result[key] is not None, key
    assert 0.0 <= result["val_top1"] <= result["val_top5"] <= 1.0
    rows = read_rows(wd)
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "val_top1" in r] == [3, 6]
    assert {"learning_rate", "img_per_s", "grad_norm"} <= set(rows[0])
    assert sorted(os.listdir(wd / "checkpoints")) == ["3", "6"]
    assert os.listdir(wd / "tensorboard")
    # The final weights come out in our weight format and hold exactly the trained state.
    from effnet_jax import pretrained
    from effnet_jax.training import trainer
    from effnet_jax.training.flat_state import FlatPacking

    assert result["weights"] == [str(wd / "weights.safetensors"), str(wd / "ema_weights.safetensors")]
    model = pretrained.load_weights(wd / "weights.safetensors")
    assert trainer.params_digest(FlatPacking.create(model)[1]) == result["params_sha256"]
    ema = pretrained.load_weights(wd / "ema_weights.safetensors")
    assert trainer.params_digest(FlatPacking.create(ema)[1]) != result["params_sha256"]


@pytest.mark.slow
def test_sharded_step_matches_single_device(tmp_path):
    """4 fake CPU devices, same global batch: the losses of the first steps agree to 1e-5 relative."""
    losses = {}
    for n in (1, 4):
        wd = tmp_path / f"dev{n}"
        run_train(wd, "--config.num_train_steps=3", "--config.log_every_steps=1", "--config.batch_size=16",
                  "--config.model.dropout=0.0", "--config.model.drop_path_rate=0.0",
                  env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
        result = json.loads((wd / "result.json").read_text())
        assert result["devices"] == n
        losses[n] = [r["loss"] for r in read_rows(wd) if "loss" in r]
    assert len(losses[1]) == 3
    for a, b in zip(losses[1], losses[4]):
        assert abs(a - b) <= 1e-5 * abs(a)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_with_jax_distributed_agree(tmp_path):
    port = _free_port()
    wd = tmp_path / "mp"
    script = textwrap.dedent(f"""
        import json, sys, jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
        from effnet_jax.training import trainer
        from effnet_jax.configs import digits
        c = digits.get_config()
        c.model.network, c.progress_bar, c.compile_cache_dir = "tiny", False, ""
        c.num_train_steps, c.batch_size, c.checkpoint_every_steps = 4, 16, 2
        r = trainer.train_and_evaluate(c, {str(wd)!r})
        print("RESULT", json.dumps({{"pid": jax.process_index(), "n": jax.process_count(),
                                     "sha": r["params_sha256"], "val": r["val_top1"]}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(line.split(" ", 1)[1]) for out, _ in outs for line in out.splitlines()
               if line.startswith("RESULT")]
    assert sorted(r["pid"] for r in results) == [0, 1] and all(r["n"] == 2 for r in results)
    assert results[0]["sha"] == results[1]["sha"]
    assert results[0]["val"] == results[1]["val"]


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_identical_parameters(tmp_path):
    args = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
            "--config.eval_every_steps=100"]
    ref = tmp_path / "ref"
    run_train(ref, *args)
    expected = json.loads((ref / "result.json").read_text())["params_sha256"]

    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "effnet_jax.train", f"--config={DIGITS}", f"--workdir={wd}", *TINY, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once a checkpoint past step 4 exists, mid-run
        steps = [int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit()] if (wd / "checkpoints").exists() else []
        if steps and max(steps) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (wd / "result.json").exists(), "the run finished before it could be killed"
    run_train(wd, *args)
    result = json.loads((wd / "result.json").read_text())
    assert result["params_sha256"] == expected
    logged = [r["step"] for r in read_rows(wd) if "loss" in r]
    assert logged == sorted(set(logged)), "a step was logged twice after resume"


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.data.name=no_such_dataset_xyz"], "no_such_dataset_xyz"),  # imports TensorFlow: no banners
        (["--config.no_such_key=1"], "no_such_key"),
        (["--config.model.nosuch=1"], "unknown config field 'model.nosuch' (did you mean: model."),
        (["--config.learning_rate=0.1"], "did you mean: optimizer.learning_rate?"),
        (["--config.model.name=formula", "--config.model.phi=1e6"], "phi 1e+06 is too large"),
        (["--config.num_train_steps=10", "--config.schedule_steps=5"], "schedule_steps"),
        (["--config.batch_size=6"], "not divisible by the 4 devices"),
        (["--config.model.resolution=4"], "smaller than the network's total stride"),
        (["--config.model.name=formula", "--config.model.constants={constants}"], "alpha must be a finite number >= 1"),
        (["--config.optimizer.name=lamb"], "optimizer.name"),
        (["--config.model.kernels=fastest"], "model.kernels must be one of auto, fast, reference, got 'fastest'"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, overrides, message):
    constants = tmp_path / "best.json"
    constants.write_text(json.dumps({"alpha": 0.8, "beta": 1.1, "gamma": 1.1}))
    wd = tmp_path / "wd"
    overrides = [o.format(constants=constants) for o in overrides]
    proc = run_train(wd, *overrides, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not wd.exists()


def test_summary_line_names_a_network_other_than_b0_and_tolerates_nulls():
    from effnet_jax.training import trainer

    result = {"model": "b0", "network": "tiny", "resolution": 32, "dataset": "digits", "status": "ok", "steps": 4,
              "train_loss": 2.5, "val_top1": 0.25, "wall_time_s": 1.0}
    assert trainer.summary_line(result).startswith("done: tiny/b0 32px on digits, status ok, 4 steps")
    assert trainer.summary_line({**result, "network": "b0"}).startswith("done: b0 32px on digits")
    assert "train loss n/a" in trainer.summary_line({**result, "status": "diverged", "train_loss": None})


def test_json_writers_turn_non_finite_numbers_into_null(tmp_path):
    import numpy as np

    from effnet_jax.training import metrics, rundir

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    rundir.write_json(str(tmp_path / "r.json"), {"loss": float("nan"), "x": [np.float32("inf"), 1.5], "n": 3})
    assert strict((tmp_path / "r.json").read_text()) == {"loss": None, "x": [None, 1.5], "n": 3}
    writer = metrics.MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": np.float32("nan"), "lr": np.float32(0.5)})
    writer.close()
    assert [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": None, "lr": 0.5}]


@pytest.mark.slow
def test_the_evaluation_step_can_be_swapped(tmp_path):
    """``make_eval_step`` replaces the evaluation: its sums over the eval split, divided by ``count``, are reported
    as val_<name> / ema_val_<name>; the same run with the default evaluation agrees on what both measure."""
    import jax.numpy as jnp

    from effnet_jax.configs import digits
    from effnet_jax.training import trainer

    def error_rate(packing, num_classes):
        def step(weights, batch):
            logits = packing.merge(weights.params, weights.stats, train=False)(batch["image"])
            wrong = (jnp.argmax(logits, -1) != batch["label"]) * batch["mask"]
            return {"error": jnp.sum(wrong), "count": jnp.sum(batch["mask"])}
        return step

    c = digits.get_config()
    c.model.network, c.progress_bar, c.num_train_steps, c.checkpoint_every_steps = "tiny", False, 3, 3
    c.save_weights = False
    swapped = trainer.train_and_evaluate(c, str(tmp_path / "swapped"), make_eval_step=error_rate)
    default = trainer.train_and_evaluate(c, str(tmp_path / "default"))
    assert "val_top1" not in swapped and "val_top1" in default
    assert swapped["val_error"] == pytest.approx(1 - default["val_top1"])
    assert swapped["ema_val_error"] == pytest.approx(1 - default["ema_val_top1"])
    c.eval_ema = False  # what a search ranking on val_* sets: the raw weights only, scored the same
    raw = trainer.train_and_evaluate(c, str(tmp_path / "raw"))
    assert "ema_val_top1" not in raw and raw["val_top1"] == default["val_top1"]


@pytest.mark.parametrize("field, value", [("schedule", "linear"), ("name", "lamb")])
def test_unknown_optimizer_or_schedule_is_one_line_before_anything_is_built(field, value):
    from effnet_jax.configs import digits
    from effnet_jax.errors import UserError
    from effnet_jax.training import recipe

    c = digits.get_config()
    c.optimizer[field] = value
    with pytest.raises(UserError, match=rf"^optimizer.{field} must be .+ got '{value}'$"):
        recipe.prepare(c)


def _wsd_config(steps):
    from effnet_jax.configs import digits

    c = digits.get_config()
    c.model.network, c.progress_bar, c.save_weights, c.compile_cache_dir = "tiny", False, False, CACHE
    c.num_train_steps, c.log_every_steps, c.checkpoint_every_steps = steps, 1, 100
    c.optimizer.schedule, c.optimizer.cooldown_fraction, c.optimizer.warmup_epochs = "wsd", 0.25, 0.05
    return c


def test_wsd_schedule_warms_up_holds_then_decays_to_zero_at_each_step():
    import numpy as np

    from effnet_jax.training import recipe

    c = _wsd_config(20)
    o = c.optimizer
    o.warmup_epochs, spe = 0.4, 10  # 4 warmup steps; cooldown 0.25 * 20 = 5 steps, from step 15
    peak = o.learning_rate * c.batch_size / 256
    lr = recipe.learning_rate_schedule(o, c.batch_size, spe, 20)
    expected = [peak * s / 4 if s < 4 else peak if s <= 15 else peak * (20 - s) / 5 for s in range(21)]
    assert np.allclose([float(lr(s)) for s in range(21)], expected, rtol=1e-6, atol=1e-12)
    assert float(lr(20)) == 0.0 and recipe.cooldown_start(c, 20) == 15
    longer = recipe.learning_rate_schedule(o, c.batch_size, spe, 40)  # every length shares the constant phase
    assert [float(longer(s)) for s in range(16)] == [float(lr(s)) for s in range(16)]
    c.optimizer.schedule = "cosine"
    assert recipe.cooldown_start(c, 20) == 0


@pytest.mark.slow
def test_a_wsd_run_forks_at_its_cooldown_and_a_longer_run_continues_it_bit_equal(tmp_path):
    """4 steps (cooldown from step 3), then 8 in the same workdir (from the step-3 state), against 8 straight."""
    from effnet_jax.training import rundir, trainer

    fork, straight = str(tmp_path / "fork"), str(tmp_path / "straight")
    short = trainer.train_and_evaluate(_wsd_config(4), fork)
    assert short["steps"] == 4 and rundir.stable_steps(fork) == [3]  # the state before the cooldown, kept
    assert rundir.checkpoint_steps(fork) == [4]
    continued = trainer.train_and_evaluate(_wsd_config(8), fork)
    assert continued["steps"] == 8 and rundir.stable_steps(fork) == [3, 6]
    reference = trainer.train_and_evaluate(_wsd_config(8), straight)
    assert continued["params_sha256"] == reference["params_sha256"]
    assert short["params_sha256"] != reference["params_sha256"]
    assert [r["step"] for r in read_rows(fork) if "loss" in r] == list(range(1, 9))  # steps 4.. logged once


@pytest.mark.slow
def test_a_longer_wsd_run_without_the_stable_checkpoint_is_refused(tmp_path):
    import shutil

    from effnet_jax.errors import UserError
    from effnet_jax.training import rundir, trainer

    wd = str(tmp_path / "wd")
    trainer.train_and_evaluate(_wsd_config(4), wd)
    shutil.rmtree(os.path.join(wd, rundir.STABLE_CHECKPOINTS))
    with pytest.raises(UserError, match="no stable checkpoint at or before step 6"):
        trainer.train_and_evaluate(_wsd_config(8), wd)


@pytest.mark.parametrize("fraction, warmup, message", [
    (0.0, 0.05, r"cooldown_fraction must be in \(0, 1\], got 0.0"),
    (1.5, 0.05, r"cooldown_fraction must be in \(0, 1\]"),
    (0.9, 0.5, "inside the 16-step warmup"),
])
def test_a_bad_cooldown_is_one_line_before_anything_is_built(fraction, warmup, message):
    from effnet_jax.errors import UserError
    from effnet_jax.training import recipe

    c = _wsd_config(20)
    c.optimizer.cooldown_fraction, c.optimizer.warmup_epochs = fraction, warmup
    with pytest.raises(UserError, match=message):
        recipe.prepare(c)


def test_a_longer_wsd_run_is_no_difference_in_its_workdir_and_anything_else_is():
    from effnet_jax.training import rundir

    old = json.loads(_wsd_config(4).to_json_best_effort())
    assert rundir.config_differences(old, _wsd_config(8), 33) == []
    assert rundir.config_differences(old, _wsd_config(2), 33) == ["num_train_steps 4 -> 2"]
    other = _wsd_config(8)
    other.optimizer.cooldown_fraction = 0.5
    assert rundir.config_differences(old, other, 33) == ["num_train_steps 4 -> 8",
                                                          "optimizer.cooldown_fraction 0.25 -> 0.5"]
    cosine = json.loads(_wsd_config(4).to_json_best_effort())
    cosine["optimizer"]["schedule"] = "cosine"
    longer = _wsd_config(8)
    longer.optimizer.schedule = "cosine"
    assert rundir.config_differences(cosine, longer, 33) == ["num_train_steps 4 -> 8"]  # its own length: refused


@pytest.mark.slow
def test_a_second_trial_of_one_program_reuses_it_and_trains_what_a_fresh_process_trains(tmp_path, own_program_store):
    """Seeds and rungs of one network in one process share the compiled steps (no trace, lowering or
    compile: ``timings.program_cache`` "hit"), and the reused program trains bit-identically to a fresh
    process. The learning-rate schedule is baked into the step, so another span is another program."""
    from effnet_jax.configs import digits
    from effnet_jax.training import programs, trainer

    def config(seed, steps, span):
        c = digits.get_config()
        c.model.network, c.progress_bar, c.save_weights, c.checkpoint_every_steps = "tiny", False, False, 100
        c.seed, c.num_train_steps, c.schedule_steps = seed, steps, span
        c.optimizer.warmup_epochs = 0.05  # one step: the cosine decay's span shows from step 2
        return c

    worker = programs.Programs()  # one worker's programs, kept from trial to trial
    first = trainer.train_and_evaluate(config(0, 3, 6), str(tmp_path / "s0"), programs=worker)
    assert first["timings"]["program_cache"] == "miss" and first["timings"]["train_compile_s"] > 0
    second = trainer.train_and_evaluate(config(1, 3, 6), str(tmp_path / "s1"), programs=worker)  # another seed
    longer = trainer.train_and_evaluate(config(1, 6, 6), str(tmp_path / "s1-6"), programs=worker)  # a longer rung
    for r in (second, longer):
        assert r["timings"]["program_cache"] == "hit" and "train_compile_s" not in r["timings"]
        assert r["timings"]["eval_compile_s"] == 0.0
    assert second["params_sha256"] != first["params_sha256"]  # the seed still reaches the weights
    other = trainer.train_and_evaluate(config(1, 3, 12), str(tmp_path / "span12"), programs=worker)
    again = trainer.train_and_evaluate(config(2, 3, 6), str(tmp_path / "s2"))  # no programs: a fresh worker's
    assert again["timings"]["program_cache"] == "miss"
    assert other["timings"]["program_cache"] == "miss" and other["params_sha256"] != second["params_sha256"]

    run_train(tmp_path / "fresh", "--config.seed=1", "--config.num_train_steps=3", "--config.schedule_steps=6",
              "--config.save_weights=False", "--config.checkpoint_every_steps=100",
              "--config.optimizer.warmup_epochs=0.05")
    fresh = json.loads((tmp_path / "fresh" / "result.json").read_text())
    assert fresh["timings"]["program_cache"] == "miss"
    for key in ("params_sha256", "train_loss", "val_top1", "val_loss", "ema_val_top1", "ema_val_loss"):
        assert second[key] == fresh[key], key


@pytest.mark.slow
def test_a_program_compiled_ahead_is_the_next_trials_and_trains_the_same(tmp_path, own_program_store):
    """``programs.compile_ahead`` (what a search worker on an accelerator runs on a thread while the device
    trains the trial before) leaves both steps compiled: the trial then compiles nothing, and trains and
    evaluates exactly what a trial that compiled for itself does."""
    from effnet_jax.configs import digits
    from effnet_jax.training import programs, trainer

    c = digits.get_config()
    c.model.network, c.progress_bar, c.save_weights, c.num_train_steps, c.checkpoint_every_steps = \
        "tiny", False, False, 3, 100
    itself = trainer.train_and_evaluate(c, str(tmp_path / "itself"))
    assert itself["timings"]["program_cache"] == "miss"
    worker = programs.Programs()
    times = programs.compile_ahead(c, programs=worker)
    assert times["program_cache"] == "miss" and times["eval_compile_s"] > 0
    ahead = trainer.train_and_evaluate(c, str(tmp_path / "ahead"), programs=worker)
    assert ahead["timings"]["program_cache"] == "hit" and "train_compile_s" not in ahead["timings"]
    assert ahead["timings"]["eval_compile_s"] == 0.0
    for key in ("params_sha256", "train_loss", "val_top1", "val_loss", "ema_val_top1", "ema_val_loss"):
        assert ahead[key] == itself[key], key


def test_a_workers_programs_group_trials_and_a_failed_ahead_build_is_one_line():
    """``Programs``' bookkeeping for a search worker: seeds and lengths share a group, other fields do not; an
    ahead build that fails is logged once by ``wait_ahead`` and the trial goes on (it compiles for itself)."""
    from effnet_jax.configs import digits
    from effnet_jax.training import programs

    c = digits.get_config()
    c.model.network = "tiny"
    other_seed, other_len, other_lr = c.copy_and_resolve_references(), c.copy_and_resolve_references(), \
        c.copy_and_resolve_references()
    other_seed.seed, other_len.num_train_steps, other_lr.optimizer.learning_rate = 9, 77, 0.5
    group = programs.Programs.group
    assert group(c) == group(other_seed) == group(other_len) != group(other_lr)

    worker = programs.Programs()
    assert not worker.holds(c) and not worker.ahead_busy()
    worker.trained(c)
    assert worker.holds(other_seed) and not worker.holds(other_lr)
    broken = other_lr.copy_and_resolve_references()
    broken.optimizer.name = "lamb"  # prepare refuses it on the build thread
    log = []
    worker.start_ahead(broken, log.append, label="trial lr0.5")
    assert worker.holds(broken) and log == ["compiling ahead: trial lr0.5"]
    worker.wait_ahead(broken, log.append)
    assert not worker.ahead_busy() and len(log) == 2
    assert log[1].startswith("  compile ahead failed (UserError: optimizer.name must be ")
    assert log[1].endswith("): the trial compiles for itself")
    worker.wait_ahead(c, log.append)  # no ahead build of its group: returns at once
    worker.clear()
    assert not worker.holds(c) and not worker.holds(broken)


@pytest.mark.slow
def test_the_eval_step_compiled_in_the_background_evaluates_the_same(tmp_path, monkeypatch, own_program_store):
    """The accelerator path (the eval step compiled on a thread while the train step compiles) on this CPU:
    the same numbers as compiling it at the first evaluation, and the evaluation waits for it if it must."""
    from effnet_jax.configs import digits
    from effnet_jax.training import programs, trainer

    c = digits.get_config()
    c.model.network, c.progress_bar, c.save_weights, c.num_train_steps, c.checkpoint_every_steps = \
        "tiny", False, False, 3, 100
    results = {}
    for background in (False, True):
        monkeypatch.setattr(programs, "BACKGROUND_EVAL_COMPILE", background)
        results[background] = trainer.train_and_evaluate(c, str(tmp_path / str(background)))
        assert results[background]["timings"]["eval_compile_s"] > 0
    inline, threaded = results[False], results[True]
    assert inline["timings"]["eval_compile_wait_s"] == inline["timings"]["eval_compile_s"]
    for key in ("params_sha256", "val_top1", "val_loss", "ema_val_top1", "ema_val_loss"):
        assert inline[key] == threaded[key], key


@pytest.mark.slow
def test_a_program_stored_by_one_process_is_loaded_by_the_next_and_trains_the_same(tmp_path):
    """A process stores the steps it compiled (``program_store``, beside a fresh compilation cache); the next
    process loads them without trace, lowering or compile and trains and evaluates bit-identically."""
    cache = tmp_path / "cc"
    flags = ["--config.num_train_steps=3", "--config.save_weights=False", "--config.checkpoint_every_steps=100",
             f"--config.compile_cache_dir={cache}"]

    def train(name):
        run_train(tmp_path / name, *flags)
        return json.loads((tmp_path / name / "result.json").read_text())

    stored = train("stored")
    assert stored["timings"]["program_store"] == "miss" and stored["timings"]["train_compile_s"] > 0
    files = sorted((cache / "programs").iterdir())
    assert [p.name.split("-")[0] for p in files] == ["eval", "train"], files
    loaded = train("loaded")
    assert loaded["timings"]["program_store"] == "hit" and loaded["timings"]["train_load_s"] > 0
    assert not {"train_trace_s", "train_lower_s", "train_compile_s"} & set(loaded["timings"])
    for key in ("params_sha256", "train_loss", "val_top1", "val_loss", "ema_val_top1", "ema_val_loss"):
        assert loaded[key] == stored[key], key


def test_a_program_is_stored_under_what_it_bakes_in_and_not_the_seed():
    """The store's key: a field the steps read (label smoothing) makes another program, the seed does not; an
    evaluation defined inside a function (its captured values in no key) is never stored."""
    import jax.numpy as jnp

    from effnet_jax.configs import digits
    from effnet_jax.model import scaling
    from effnet_jax.training import programs, recipe

    def store_id(c, make_eval_step=recipe.classification_eval_step):
        spec = scaling.resolve(c.model.name)
        return programs.build_program(c, spec, 10, layers=recipe.model_layers(c), dtype=jnp.float32,
                                      steps_per_epoch=10, total_steps=20,
                                      make_eval_step=make_eval_step).steps.store_id

    c = digits.get_config()
    c.model.network = "tiny"
    base = store_id(c)
    c.seed = 7
    assert store_id(c) == base and base is not None
    c.optimizer.label_smoothing = 0.3
    assert store_id(c) != base
    assert store_id(c, make_eval_step=lambda packing, n: recipe.classification_eval_step(packing, n)) is None


@pytest.mark.slow
def test_a_stored_program_that_does_not_run_is_forgotten_and_the_next_try_compiles(tmp_path, own_program_store,
                                                                                    monkeypatch):
    """An executable from the store that loads but fails to run (what re-serializing one JAX loaded from its
    cache gives on XLA:CPU) fails that trial once: its program's stored files are deleted and its in-memory
    executables dropped, so the retry compiles and trains."""
    import jax

    from effnet_jax.configs import digits
    from effnet_jax.training import program_store, programs, recipe, trainer

    c = digits.get_config()
    c.model.network, c.progress_bar, c.save_weights, c.num_train_steps, c.checkpoint_every_steps = \
        "tiny", False, False, 3, 100
    worker = programs.Programs()
    p = recipe.prepare(c)
    steps = programs.build_program(c, p.spec, p.source.num_classes, layers=p.layers, dtype=p.dtype,
                                   steps_per_epoch=p.steps_per_epoch, total_steps=p.total_steps,
                                   programs=worker).steps
    own_program_store.mkdir(parents=True)
    stored = own_program_store / f"train-{steps.store_id[:40]}-0.pkl.z"
    stored.write_bytes(b"a program that loads")

    def broken(*args):
        raise jax.errors.JaxRuntimeError("NOT_FOUND: Function xor_xor_fusion.3 not found (type id: 1)")

    load = program_store.load
    monkeypatch.setattr(program_store, "load", lambda pid, kind, sig: broken if kind == "train" else None)
    with pytest.raises(jax.errors.JaxRuntimeError, match="not found"):
        trainer.train_and_evaluate(c, str(tmp_path / "broken"), programs=worker)
    assert not stored.exists() and not steps.train and not steps.loaded
    monkeypatch.setattr(program_store, "load", load)  # the store itself stays this test's (empty) one
    retry = trainer.train_and_evaluate(c, str(tmp_path / "retry"), programs=worker)
    assert retry["status"] == "ok" and retry["timings"]["train_compile_s"] > 0
