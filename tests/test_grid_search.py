"""Grid search: candidates, the plan, halving with continuation, verdicts, outputs, best.json hand-off.

End to end: every test here runs a search (tiny networks, or training faked)."""

import json
import os
import sys

import numpy as np
import pytest
from search_helpers import one_of, quiet, with_search
from suite_paths import CACHE

from effnet_jax import create_model, from_constants, load_constants
from effnet_jax.errors import UserError
from effnet_jax.training import trainer
from experiments import constraints, queue, stats, strategies
from experiments import grid_search as gs
from experiments.configs import grid_search as grid_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SMALL = {"alpha": (1.2, 1.25), "beta": (1.05, 1.05), "gamma": (1.2, 1.2), "tolerance": 0.1}


def small_config(cache_dir, steps=2, **search):
    c = grid_config.get_config()
    c.train.model.network = "tiny"
    c.train.num_train_steps = steps
    c.train.compile_cache_dir = str(cache_dir)
    c.search.strategy = "exhaustive"
    c.search.final_seeds = ()
    for k, v in {**SMALL, **search}.items():
        c.search[k] = v
    return c


@pytest.fixture(scope="module")
def cache_dir():
    """The suite's compilation cache (tests/conftest.py): the tiny network's programs compile once per run."""
    return CACHE


def _folder(root, classes=7, per_class=6, val_per_class=2):
    """An image folder of random images: its labels say nothing about its pixels (nothing to learn)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for k in range(classes):
            os.makedirs(root / split / f"c{k}")
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    root / split / f"c{k}" / f"{i}.png")


def _on_folder(c, root):
    c.train.data.name, c.train.data.train_split, c.train.data.eval_split = f"folder:{root}", "train", "val"
    c.train.batch_size = 8
    return c


def _fake_training(cfg, workdir, *args, **kwargs):
    """No training: a score that grows with alpha * gamma, and the network's real figures."""
    from effnet_jax.model import cost, scaling

    spec = scaling.model_spec(cfg.model)
    arch = scaling.build_architecture(spec, scaling.network(cfg.model), cfg.model.drop_path_rate)
    m = cfg.model
    return {"status": "ok", "val_top1": m.alpha * m.gamma / 2, "wall_time_s": 0.01, "steps": cfg.num_train_steps,
            **cost.figures(spec, arch, 10)}


RACE = {(1.2, 1.05): 0.9, (1.25, 1.05): 0.9, (1.2, 1.1): 0.5}  # two candidates tied, the paper far below


def race_score(cfg):
    """A: 0.9 +- 0.001 by seed parity, B the mirror image (tied at every seed count), the paper at 0.5 (separated
    from both once each has two seeds)."""
    m = cfg.model
    sign = (-1) ** cfg.seed * (-1 if m.alpha == 1.25 else 1)
    return RACE[(m.alpha, m.beta)] + 0.001 * sign


def race_config(cache_dir, steps=2):
    return small_config(cache_dir, steps=steps, include_baseline=False, max_seeds=4)


RACE_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]  # this checkout's package, whatever is installed
from effnet_jax import compile_cache
from effnet_jax.training import trainer
from experiments import grid_search as gs
import test_grid_search as t

compile_cache.enable({cache!r})  # as the suite's own processes (tests/conftest.py): the killed run's programs load

real = trainer.train_and_evaluate
trainer.train_and_evaluate = lambda cfg, wd, *a, **k: {{**real(cfg, wd, *a, **k), "val_top1": t.race_score(cfg)}}
c = t.race_config({cache!r}, steps=6)
c.train.checkpoint_every_steps = 1
gs.search(c, sys.argv[1], log=lambda m: print(m, flush=True), write=False)
"""


@pytest.mark.slow
def test_search_writes_outputs_and_best_json_round_trips(tmp_path, cache_dir):
    c = small_config(cache_dir)
    out = gs.search(c, str(tmp_path), log=quiet)
    rows = out["rows"]
    assert len(rows) == len(constraints.candidates(c.search))
    assert all(r["status"] == "ok" and r["state"] == "COMPLETE" for r in rows)
    for name in ("study.journal", "results.csv", "best.json", "grid.png", "accuracy_vs_macs.png"):
        assert (tmp_path / name).exists(), name
    assert os.listdir(tmp_path / "tensorboard_hparams")
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["config"]["search"]["target"] == 2.0 and best["config"]["train"]["model"]["network"] == "tiny"
    assert best["num_classes"] == 10 and best["dataset"] == "digits" and "sentence" in best["verdict"]
    # two steps of the tiny network learn nothing: every score sits at the majority class's rate, and best.json
    # says that it is no answer (what the user's constants loader refuses); the answer's round trip: below
    chance = best["learning"]["chance"]
    assert 0.09 < chance < 0.12 and all(abs(v - chance) < 0.05 for r in rows for v in [r["val_top1"]])
    assert best["answer"] is False and "did not learn" in best["reason"] and "num_train_steps" in best["reason"]
    with pytest.raises(UserError, match="is no answer: the trials did not learn"):
        load_constants(tmp_path / "best.json")
    assert best["provenance"]["jax"] and best["provenance"]["device_count"] >= 1 and "noise_ceiling" in best
    row = rows[0]
    for key in ("alpha", "beta", "gamma", "product", "resolution", "width", "depth", "blocks", "params", "macs",
                "val_top1", "train_loss", "wall_time_s", "train_img_per_s", "status", "seed"):
        assert row.get(key) is not None, key
    # finished trials keep no checkpoint
    assert not any(os.path.exists(tmp_path / "trials" / d / "checkpoints") for d in os.listdir(tmp_path / "trials"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    real = trainer.train_and_evaluate
    trainer.train_and_evaluate = no_training
    try:  # a rerun finds every trial done: same rows, nothing trained
        again = gs.search(c, str(tmp_path), log=quiet)
    finally:
        trainer.train_and_evaluate = real
    assert [r["val_top1"] for r in again["rows"]] == [r["val_top1"] for r in rows]


@pytest.mark.slow
def test_a_search_that_learned_writes_an_answer_with_its_contender_set(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "train_and_evaluate", _fake_training)  # scores far above chance
    c = small_config(tmp_path / "cache", alpha=(1.1, 1.3), tolerance=0.3)
    c.search.seeds = (0, 1)
    out = gs.search(c, str(tmp_path / "wd"), log=quiet)
    assert out["learning"]["learned"] and all(out["learning"]["above"].values())
    best = json.loads((tmp_path / "wd" / "best.json").read_text())
    assert best["answer"] is True and "reason" not in best
    assert best["test"] == stats.TEST_NAME and best["alpha_level"] == 0.05 and best["test_seeds"] == [0, 1]
    # equal seeds: no seed noise, so any difference separates; the contender set is the winner alone
    assert [(x["alpha"], x["beta"], x["gamma"]) for x in best["contenders"]] == [(best["alpha"], best["beta"],
                                                                                  best["gamma"])]
    assert best["contenders"][0]["mean"] == best["val_top1"] and "Contender set: 1 of" in best["verdict"]["sentence"]
    for key in ("jax", "jaxlib", "flax", "optax", "device_kind", "device_count", "cpu", "effnet_jax", "commit"):
        assert key in best["provenance"], key
    constants = load_constants(tmp_path / "wd" / "best.json")
    assert constants == {"alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"]}
    spec = from_constants(**constants, phi=1, base_resolution=32, resolution_multiple=1)
    model = create_model(spec, num_classes=10)
    assert model.arch.blocks and spec.resolution == best["resolution"]


@pytest.mark.slow
def test_search_on_real_macs_picks_a_winner_on_that_constraint(tmp_path, cache_dir):
    c = small_config(cache_dir, steps=1, constraint="macs", macs_tolerance=0.1, alpha=(1.3, 1.3), beta=(1.05, 1.05),
                     gamma=(1.05, 1.1), include_paper=False)
    c.train.model.base_resolution = 40
    out = gs.search(c, str(tmp_path), log=quiet)
    assert len(out["rows"]) == 3 and not out["macs_warnings"]  # two tiny networks at 2x +- 10%, the baseline
    best = json.loads((tmp_path / "best.json").read_text())
    assert abs(best["macs_ratio"] / 2.0 - 1) <= 0.1 and best["config"]["search"]["constraint"] == "macs"


@pytest.mark.slow
def test_changed_trial_config_is_refused_by_name(tmp_path, cache_dir):
    c = small_config(cache_dir, include_baseline=False, include_paper=False)
    gs.search(c, str(tmp_path), log=quiet)
    c.train.batch_size = 8
    with pytest.raises(UserError, match=r"batch_size 16 -> 8"):
        gs.search(c, str(tmp_path), log=quiet)
    c = small_config(cache_dir, steps=3, include_baseline=False, include_paper=False)
    with pytest.raises(UserError, match=r"num_train_steps 2 -> 3"):
        gs.search(c, str(tmp_path), log=quiet)


@pytest.mark.slow
def test_old_results_jsonl_workdir_is_refused_with_what_to_do(tmp_path, cache_dir):
    (tmp_path / "results.jsonl").write_text('{"alpha": 1.2}\n')
    with pytest.raises(UserError, match="new --workdir"):
        gs.search(small_config(cache_dir), str(tmp_path), log=quiet)


@pytest.mark.slow
def test_halving_continues_promoted_runs_and_decides_at_the_top_rung(tmp_path, cache_dir):
    c = small_config(cache_dir, steps=2, strategy="halving", halving_eta=2, halving_rungs=2, include_paper=False,
                     final_seeds=(0, 1), alpha=(1.2, 1.3), tolerance=0.3)
    c.train.checkpoint_every_steps = 1
    seen = []
    real = trainer.train_and_evaluate

    def spy(cfg, workdir, *a, **k):
        ckpt = os.path.join(workdir, "checkpoints")
        seen.append((os.path.basename(workdir), cfg.num_train_steps,
                     sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []))
        return real(cfg, workdir, *a, **k)

    trainer.train_and_evaluate = spy
    try:
        out = gs.search(c, str(tmp_path), log=quiet)
    finally:
        trainer.train_and_evaluate = real
    grid = [x for x in constraints.candidates(c.search) if not x.label]
    assert len(grid) == 3
    top = [r for r in out["rows"] if r["rung"] == 1]
    assert {r["seed"] for r in top} == {0, 1} and all(r["steps"] == 4 for r in top)
    assert len({(r["alpha"], r["beta"], r["gamma"]) for r in top if not r["label"]}) == 2  # 3 / 2 rounded up
    continued = [s for s in seen if s[1] == 4 and s[0].endswith("-s0")]
    assert continued and all(2 in s[2] for s in continued)  # rung 1 seed 0 starts from rung 0's step-2 checkpoint
    assert out["best"].rung == 1 and out["best"].ok == 2
    # nothing that stopped, and nothing finished, keeps its checkpoints
    assert not any(os.path.exists(tmp_path / "trials" / d / "checkpoints") for d in os.listdir(tmp_path / "trials"))


@pytest.mark.slow
def test_diverging_trials_are_recorded_and_the_search_goes_on(tmp_path, cache_dir):
    c = small_config(cache_dir, steps=3, include_baseline=False, include_paper=False)
    c.train.optimizer.name, c.train.optimizer.learning_rate, c.train.log_every_steps = "sgd", 1e12, 1
    c.train.optimizer.warmup_epochs = 0.0
    out = gs.search(c, str(tmp_path), log=quiet)
    assert len(out["rows"]) == len(constraints.candidates(c.search)) >= 2
    assert {r["status"] for r in out["rows"]} == {"diverged"} and {r["state"] for r in out["rows"]} == {"PRUNED"}
    assert all(r["reason"] == "non-finite training loss" for r in out["rows"])
    assert out["best"] is None and not (tmp_path / "best.json").exists()


@pytest.mark.slow
def test_failed_trial_is_a_row_not_a_crash_and_a_rerun_retries_it(tmp_path, cache_dir, monkeypatch):
    c = small_config(cache_dir, include_baseline=False, include_paper=False)
    real = trainer.train_and_evaluate
    calls = []

    def flaky(cfg, workdir, *a, **k):
        calls.append(workdir)
        if len(calls) == 1:
            raise RuntimeError("out of memory\nsecond line")
        return real(cfg, workdir, *a, **k)

    monkeypatch.setattr(trainer, "train_and_evaluate", flaky)
    out = gs.search(c, str(tmp_path), log=quiet)
    statuses = sorted(r["status"] for r in out["rows"])
    assert statuses.count("failed") == 1 and statuses.count("ok") == len(statuses) - 1
    failed = next(r for r in out["rows"] if r["status"] == "failed")
    assert failed["reason"] == "RuntimeError: out of memory" and failed["state"] == "FAIL"
    assert out["best"] is not None
    again = gs.search(c, str(tmp_path), log=quiet)  # the failed key is tried again; the rest is kept
    assert len(calls) == len(statuses) + 1 and {r["status"] for r in again["rows"]} == {"ok"}


@pytest.mark.slow
def test_scale_up_trains_with_the_searchs_dataset_and_classes(tmp_path, cache_dir, capsys, monkeypatch):
    pytest.importorskip("tensorflow_datasets", reason="image folders need TFDS: pip install -e '.[data]'")
    from experiments import scale_up

    _folder(tmp_path / "data")
    c = _on_folder(small_config(cache_dir, include_baseline=False, include_paper=False), tmp_path / "data")
    with monkeypatch.context() as m:  # the search's scores: an answer (random images teach nothing); its data: real
        m.setattr(trainer, "train_and_evaluate", _fake_training)
        out = gs.search(c, str(tmp_path / "grid"), log=quiet)
    assert out["best"] is not None and out["num_classes"] == 7
    assert out["learning"]["chance"] == pytest.approx(1 / 7)  # two validation images per class
    rows = scale_up.main(["prog", f"--constants={tmp_path / 'grid' / 'best.json'}", "--phi=1", "--train",
                          f"--workdir={tmp_path / 'scaled'}"])
    printed = capsys.readouterr().out
    assert "7 classes" in printed and f"folder:{tmp_path / 'data'}" in printed
    assert rows[0]["status"] == "ok" and rows[0]["num_classes"] == 7
    result = json.loads((tmp_path / "scaled" / "phi1" / "result.json").read_text())
    assert result["num_classes"] == 7 and result["provenance"]["jax"]
    assert rows[0]["params"] == result["params"]  # the table counted the real head (7 classes)
    # "--constants PATH" (no "="): the same models, already trained, so nothing trains again
    again = scale_up.main(["prog", "--constants", str(tmp_path / "grid" / "best.json"), "--phi=1", "--train",
                           f"--workdir={tmp_path / 'scaled'}"])
    assert again[0]["status"] == "ok" and again[0]["wall_time_s"] == result["wall_time_s"]  # the stored result


@pytest.mark.slow
def test_a_search_on_random_labels_says_its_trials_did_not_learn(tmp_path, cache_dir, capsys, monkeypatch):
    pytest.importorskip("tensorflow_datasets", reason="image folders need TFDS: pip install -e '.[data]'")
    from experiments import scale_up

    _folder(tmp_path / "data", val_per_class=6)
    wd = tmp_path / "grid"
    argv = ["prog", f"--workdir={wd}", "--config.train.model.network=tiny", "--config.train.num_train_steps=2",
            f"--config.train.compile_cache_dir={cache_dir}", "--config.search.strategy=exhaustive",
            "--config.search.final_seeds=()", f"--config.train.data.name=folder:{tmp_path / 'data'}",
            "--config.train.data.train_split=train", "--config.train.data.eval_split=val",
            "--config.train.batch_size=8", *(f"--config.search.{k}={v}" for k, v in SMALL.items())]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        gs.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if not ln.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: the trials did not learn at this budget"), captured.err
    assert "chance 0.1429" in err[0] and "num_train_steps" in err[0] and "learning_rate" in err[0]
    assert "no answer" in captured.out and "winner:" not in captured.out
    best = json.loads((wd / "best.json").read_text())
    assert best["answer"] is False and best["learning"]["learned"] is False
    with pytest.raises(SystemExit) as e:
        scale_up.main(["prog", f"--constants={wd / 'best.json'}", "--phi=1"])
    assert e.value.code == 2
    refusal = capsys.readouterr().err.strip()
    assert refusal.startswith("error:") and "is no answer" in refusal and "\n" not in refusal


@pytest.mark.slow
def test_bad_search_config_one_line_exit_2(tmp_path):
    import subprocess

    wd = tmp_path / "wd"
    for override in ("--config.search.alpha=(1.0,1.1)", "--config.search.halving_eta=0",
                     "--config.search.nosuch=3", "--config.search.max_seeds=1"):
        proc = subprocess.run([sys.executable, "-m", "experiments.grid_search", f"--workdir={wd}",
                               "--config.search.tolerance=0.0001", override],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert not wd.exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_flags_and_exits_0_without_running(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)  # a run would create runs/ here
    with pytest.raises(SystemExit) as e:
        gs.main(["prog", flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--local_workers" in out and "--storage" in out and "--config.<field>" in out
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_tpe_sampler_proposes_points_on_the_surface_and_promotes_the_best(tmp_path, cache_dir):
    c = small_config(cache_dir, sampler="tpe", n_trials=4, strategy="halving", halving_eta=2, halving_rungs=2,
                     alpha=(1.1, 1.3), beta=(1.0, 1.2), gamma=(1.0, 1.3), include_baseline=False)
    out = gs.search(c, str(tmp_path), log=quiet)
    sampled = [r for r in out["rows"] if r["rung"] == 0 and not r["label"]]
    assert 1 <= len(sampled) <= 4
    for r in sampled:
        assert abs(r["alpha"] * r["beta"] ** 2 * r["gamma"] ** 2 - 2.0) < 0.01
        assert 1.0 <= r["gamma"] <= 1.3 and 1.0 <= r["beta"] <= 1.2
    top = [r for r in out["rows"] if r["rung"] == 1]
    assert any(r["label"] == "paper" for r in top) and any(not r["label"] for r in top)
    assert out["best"] is not None and out["best"].rung == 1


@pytest.mark.slow
def test_a_new_constraint_and_a_new_proposer_are_one_class_and_one_registry_line_each(tmp_path, monkeypatch):
    class ShallowOnly(constraints.Constraint):
        """Toy: a candidate costs its alpha; alpha <= 1.2 is admitted."""

        name = "shallow"

        def cost(self, c):
            return c.alpha

        def admits(self, cost):
            return cost <= 1.2 + constraints.EPS

        def distance(self, cost):
            return cost - 1.2

        def refusal(self, closest, cost):
            return f"no grid point has alpha <= 1.2 (the closest has {cost})"

    class Ends(strategies.Proposer):
        """Toy: rung 0 trains the first and the last admitted grid point, and the references."""

        name = "ends"

        def first_rung(self, cands, rung):
            grid = [c for c in cands if not c.label]
            chosen = [grid[0], grid[-1], *(c for c in cands if c.label)]
            return chosen, rung.train(rung.plan(chosen))

    monkeypatch.setitem(constraints.CONSTRAINTS, ShallowOnly.name, ShallowOnly)
    monkeypatch.setitem(strategies.PROPOSERS, Ends.name, Ends)
    monkeypatch.setattr(trainer, "train_and_evaluate", _fake_training)
    c = small_config(tmp_path / "cache", constraint="shallow", sampler="ends", alpha=(1.1, 1.3), beta=(1.05, 1.05),
                     gamma=(1.0, 1.1), include_baseline=False)
    out = gs.search(c, str(tmp_path / "wd"), log=quiet, write=False)
    trained = sorted((r["alpha"], r["beta"], r["gamma"], r["label"]) for r in out["rows"])
    assert trained == [(1.1, 1.05, 1.0, ""), (1.2, 1.05, 1.1, ""), (1.2, 1.1, 1.15, "paper")]
    assert (out["best"].alpha, out["best"].gamma) == (1.2, 1.15)  # the highest toy score within alpha <= 1.2
    c.search.alpha = (1.25, 1.3)
    with pytest.raises(UserError, match="alpha <= 1.2"):
        strategies.check_search(c)
    c.search.sampler = "nosuch"
    assert "ends" in one_of(strategies.PROPOSERS)
    with pytest.raises(UserError, match=f"search.sampler must be {one_of(strategies.PROPOSERS)}, got 'nosuch'"):
        strategies.check_search(c)


@pytest.mark.slow
def test_random_proposer_stays_on_the_surface(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "train_and_evaluate", _fake_training)
    c = small_config(tmp_path / "cache", sampler="random", n_trials=3, alpha=(1.1, 1.3), beta=(1.0, 1.2),
                     gamma=(1.0, 1.3), include_baseline=False, include_paper=False)
    out = gs.search(c, str(tmp_path / "wd"), log=quiet, write=False)
    assert 1 <= len(out["rows"]) <= 3
    assert all(abs(r["alpha"] * r["beta"] ** 2 * r["gamma"] ** 2 - 2.0) < 0.01 for r in out["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cooldown", "independent"])
def test_halving_in_each_rung_mode_on_the_tiny_network(tmp_path, cache_dir, mode, monkeypatch):
    """cooldown: the promoted run starts from rung 0's stable checkpoint (step 1 of 2) and forks its own at step 3
    of 4; independent: every rung from scratch in its own directory. Nothing is kept at the end."""
    from effnet_jax.training import rundir

    c = small_config(cache_dir, steps=2, strategy="halving", halving_eta=2, halving_rungs=2, include_paper=False,
                     final_seeds=(0,), alpha=(1.2, 1.3), tolerance=0.3, rung_mode=mode, cooldown_fraction=0.3)
    c.train.optimizer.warmup_epochs = 0.0
    seen = []
    real = trainer.train_and_evaluate

    def spy(cfg, workdir, *a, **k):
        seen.append((os.path.basename(workdir), cfg.num_train_steps, cfg.optimizer.schedule,
                     rundir.stable_steps(workdir), rundir.checkpoint_steps(workdir)))
        out = real(cfg, workdir, *a, **k)
        seen[-1] += (rundir.stable_steps(workdir),)
        return out

    trainer.train_and_evaluate = spy
    lines = []
    try:
        out = gs.search(c, str(tmp_path), log=lines.append)
    finally:
        trainer.train_and_evaluate = real
    resumed = sorted(line.split(" (#")[0] + line.split(")")[-1] for line in lines if "checkpoint ..." in line)
    # the log names the step the promoted run starts from: rung 0's stable state, not its cooled-down end
    assert len(resumed) == (3 if mode == "cooldown" else 0) and all(r.endswith("from its step-1 checkpoint ...")
                                                                     for r in resumed)
    top = [r for r in out["rows"] if r["rung"] == 1]
    assert len(top) == 3 and all(r["status"] == "ok" and r["steps"] == 4 for r in top)  # 3 / 2 up = 2, the baseline
    promoted = [s for s in seen if s[1] == 4]
    assert len(promoted) == 3 and len(seen) == 4 + 3  # 3 grid points and the baseline at rung 0
    if mode == "cooldown":
        assert all(s[2] == "wsd" for s in seen)
        assert all(s[3] == [1] and s[5] == [1, 3] for s in promoted)  # rung 0 forked at 1; rung 1 continues it
        assert all(s[0].endswith("-s0-cd") for s in seen)
    else:
        assert all(s[3] == [] and s[4] == [] and s[0].endswith("-s0") for s in promoted)  # continued's directory
    assert out["best"].rung == 1
    if mode == "cooldown":  # a rerun that promotes the grid point cut at rung 0 (another rule, say): its rung-0
        # checkpoints went when the search ended, so its longer run trains from scratch
        monkeypatch.setattr(strategies.Halving, "survivors", lambda self, summary, alive, rung: list(alive))
        again = [r for r in gs.search(c, str(tmp_path), log=quiet)["rows"] if r["rung"] == 1]
        assert len(again) == 4 and all(r["status"] == "ok" and r["steps"] == 4 for r in again)
    if mode == "independent":  # these trials skipped the EMA weights: ranking on them needs new trials
        with pytest.raises(UserError, match=r"did not evaluate the EMA weights .* needs a new --workdir"):
            gs.search(with_search(c, metric="ema_val_top1"), str(tmp_path), log=quiet)
    for d in os.listdir(tmp_path / "trials"):
        assert not (tmp_path / "trials" / d / "checkpoints").exists()
        assert not (tmp_path / "trials" / d / rundir.STABLE_CHECKPOINTS).exists()


@pytest.mark.slow
def test_racing_adds_seeds_only_to_tied_candidates_and_stops_at_max_seeds(tmp_path, cache_dir, monkeypatch):
    real = trainer.train_and_evaluate

    def scored(cfg, workdir, *a, **k):  # the tiny network trains; its score is replaced by a known one
        return {**real(cfg, workdir, *a, **k), "val_top1": race_score(cfg)}

    monkeypatch.setattr(trainer, "train_and_evaluate", scored)
    out = gs.search(race_config(cache_dir), str(tmp_path), log=quiet, write=False)
    seeds = {}
    for r in out["rows"]:
        seeds.setdefault((r["alpha"], r["beta"], r["label"]), []).append(r["seed"])
    # one seed at first: nothing separated, every candidate gets seed 1; then the paper is below and stops
    assert {k: sorted(v) for k, v in seeds.items()} == {
        (1.2, 1.05, ""): [0, 1, 2, 3], (1.25, 1.05, ""): [0, 1, 2, 3], (1.2, 1.1, "paper"): [0, 1]}
    assert out["verdict"]["verdicts"]["(1.2, 1.1, 1.15) (paper)"] == "below"
    assert len({r["trial_id"] for r in out["rows"]}) == len(out["rows"]) == 10


@pytest.mark.slow
def test_racing_resumes_after_sigkill_without_a_duplicate(tmp_path, cache_dir):
    import signal
    import subprocess
    import time

    from test_runner import complete_once, trials_by_key

    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), cache=str(cache_dir)))
    wd = tmp_path / "wd"
    proc = subprocess.Popen([sys.executable, str(script), str(wd)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, caught = time.time() + 500, None
    while time.time() < deadline and caught is None and proc.poll() is None:  # a racing seed's trial mid-way
        for d in sorted((wd / "trials").iterdir()) if (wd / "trials").exists() else []:
            if "-s2" in d.name and queue.checkpoint_step(str(d)) and not (d / "result.json").exists():
                caught = d.name
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert caught is not None, "never caught a racing trial mid-way"
    rerun = subprocess.run([sys.executable, str(script), str(wd)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = complete_once(trials_by_key(None, wd, "grid_search"), expected=10)  # each key once, as uninterrupted
    assert sorted(k.split("-s")[-1] for k in done) == sorted(["0-n6", "1-n6"] * 3 + ["2-n6", "3-n6"] * 2)
    assert any(t.user_attrs.get("resumed_from_step") for t in done.values())
