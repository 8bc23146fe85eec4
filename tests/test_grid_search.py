"""Grid search: candidates, halving, divergence, resume after SIGKILL, best.json hand-off."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from effnet_jax import create_model, from_constants, load_constants
from effnet_jax.errors import UserError
from experiments import grid_search as gs
from experiments.configs import grid_search as grid_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two grid points that round to the same tiny network (one compile), plus the references.
SMALL = {"alpha": (1.2, 1.25), "beta": (1.05, 1.05), "gamma": (1.2, 1.2), "tolerance": 0.1}


def small_config(cache_dir, steps=2, **search):
    c = grid_config.get_config()
    c.train.model.network = "tiny"
    c.train.num_train_steps = steps
    c.train.compile_cache_dir = str(cache_dir)
    for k, v in {**SMALL, **search}.items():
        c.search[k] = v
    return c


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def test_default_candidates_satisfy_constraint_and_include_references():
    s = grid_config.get_config().search
    cands = gs.candidates(s)
    grid = [c for c in cands if not c.label]
    assert len(grid) >= 9
    for c in grid:
        assert abs(c.product - s.target) <= s.tolerance
        assert s.alpha[0] <= c.alpha <= s.alpha[1] and s.beta[0] <= c.beta <= s.beta[1]
        assert s.gamma[0] <= c.gamma <= s.gamma[1]
        assert min(c.alpha, c.beta, c.gamma) >= 1.0
    labels = {c.label: c for c in cands if c.label}
    assert (labels["paper"].alpha, labels["paper"].beta, labels["paper"].gamma) == (1.2, 1.1, 1.15)
    assert (labels["baseline"].alpha, labels["baseline"].beta, labels["baseline"].gamma) == (1.0, 1.0, 1.0)
    assert len({c.key for c in cands}) == len(cands)


def test_grid_values_and_step():
    assert gs.grid_values((1.0, 1.2), 0.05) == [1.0, 1.05, 1.1, 1.15, 1.2]
    with pytest.raises(UserError):
        gs.grid_values((0.9, 1.2), 0.05)


def test_no_candidate_names_the_closest_point():
    s = grid_config.get_config().search
    s.alpha, s.beta, s.gamma, s.tolerance = (1.0, 1.1), (1.0, 1.05), (1.0, 1.05), 0.01
    with pytest.raises(UserError, match=r"closest is alpha=1.1, beta=1.05, gamma=1.05"):
        gs.candidates(s)


def test_schedule_runs_every_trial_once_balanced_and_repeats_after_their_first():
    c = grid_config.get_config()
    c.search.seeds = (0, 1)
    trials = [(cand, seed) for cand in gs.candidates(c.search) for seed in c.search.seeds]
    plan = gs.schedule(c, trials, 0, 2)
    assert plan == gs.schedule(c, trials, 0, 2)  # every worker computes the same plan
    assert sorted(i for i, _ in plan) == list(range(len(trials))) and {w for _, w in plan} == {0, 1}
    counts = [sum(w == k for _, w in plan) for k in (0, 1)]
    assert abs(counts[0] - counts[1]) <= 2
    # A second seed reuses its network's compiled program: it is cheap and runs after the first seed.
    position = {i: n for n, (i, _) in enumerate(plan)}
    for k in range(0, len(trials), 2):
        assert position[k] < position[k + 1]
    # Longest first: every network's first (compiling) trial of phi = 1 before any cheap repeat.
    firsts = [position[k] for k in range(0, len(trials), 2) if trials[k][0].label == ""]
    assert max(firsts) < min(position[k] for k in range(1, len(trials), 2))
    # The paper's point rounds to the same network as (1.25, 1.1, 1.15) at 32 px: it runs after it.
    paper = next(i for i, (cand, seed) in enumerate(trials) if cand.label == "paper" and seed == 0)
    twin = next(i for i, (cand, seed) in enumerate(trials) if (cand.alpha, cand.beta, cand.gamma) == (1.25, 1.1, 1.15)
                and seed == 0)
    assert position[twin] < position[paper]


def test_successive_halving_keeps_the_best_third():
    cands = [gs.Candidate(1.0 + i / 10, 1.0, 1.0) for i in range(6)] + [gs.Candidate(1.0, 1.0, 1.0, "baseline")]
    scores = [0.5, 0.9, 0.1, 0.8, 0.3, 0.7, 0.99]
    rows = [{"trial_id": gs.trial_id(c, 0, 0), "label": c.label, "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma,
             "product": c.product, "rung": 0, "status": "ok", "val_top1": v, "macs": 1}
            for c, v in zip(cands, scores)]
    kept = gs.halving_survivors(cands, rows, "val_top1", 3)
    assert [c.alpha for c in kept] == [1.1, 1.3]  # 6 scaled candidates // 3 = 2 best; baseline never goes on


def test_pick_best_skips_baseline_and_off_constraint(tmp_path):
    s = grid_config.get_config().search
    summary = [
        {"label": "baseline", "alpha": 1.0, "beta": 1.0, "gamma": 1.0, "product": 1.0, "mean": 0.99, "rung": 0,
         "macs": 1},
        {"label": "paper", "alpha": 1.2, "beta": 1.1, "gamma": 1.15, "product": 1.92, "mean": 0.95, "rung": 0,
         "macs": 2},
        {"label": "", "alpha": 1.25, "beta": 1.1, "gamma": 1.15, "product": 2.0, "mean": 0.9, "rung": 0, "macs": 2},
    ]
    best = gs.pick_best(summary, s)  # tolerance 0.02: the paper point (1.92) is off the constraint
    assert (best["alpha"], best["beta"], best["gamma"]) == (1.25, 1.1, 1.15)


def test_search_writes_outputs_and_best_json_round_trips(tmp_path, cache_dir):
    c = small_config(cache_dir)
    out = gs.search(c, str(tmp_path), log=lambda *_: None)
    rows = out["rows"]
    assert len(rows) == len(gs.candidates(c.search))
    assert all(r["status"] == "ok" for r in rows)
    for name in ("results.jsonl", "results.csv", "best.json", "grid.png", "accuracy_vs_macs.png"):
        assert (tmp_path / name).exists(), name
    assert os.listdir(tmp_path / "tensorboard_hparams")
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["config"]["search"]["target"] == 2.0
    constants = load_constants(tmp_path / "best.json")
    assert constants == {"alpha": best["alpha"], "beta": best["beta"], "gamma": best["gamma"]}
    spec = from_constants(**constants, phi=1, base_resolution=32, resolution_multiple=1)
    model = create_model(spec, num_classes=10)
    assert model.arch.blocks and spec.resolution == best["resolution"]
    row = rows[0]
    for key in ("alpha", "beta", "gamma", "product", "resolution", "width", "depth", "blocks", "params", "macs",
                "val_top1", "train_loss", "wall_time_s", "train_img_per_s", "status", "seed"):
        assert row.get(key) is not None, key
    # A rerun finds every trial done: same rows, nothing trained.
    again = gs.search(c, str(tmp_path), log=lambda *_: None)
    assert len(again["rows"]) == len(rows)
    assert len(gs.ResultsLog(str(tmp_path)).rows()) == len(rows)


def test_diverging_trials_are_recorded_and_the_search_goes_on(tmp_path, cache_dir):
    c = small_config(cache_dir, steps=3, include_baseline=False, include_paper=False)
    c.train.optimizer.name, c.train.optimizer.learning_rate, c.train.log_every_steps = "sgd", 1e12, 1
    c.train.optimizer.warmup_epochs = 0.0
    out = gs.search(c, str(tmp_path), log=lambda *_: None)
    assert len(out["rows"]) == len(gs.candidates(c.search)) >= 2
    assert {r["status"] for r in out["rows"]} == {"diverged"}
    assert all(r["reason"] == "non-finite training loss" for r in out["rows"])
    assert out["best"] is None and not (tmp_path / "best.json").exists()


def test_failed_trial_is_a_row_not_a_crash(tmp_path, cache_dir, monkeypatch):
    c = small_config(cache_dir, include_baseline=False, include_paper=False)
    real = gs.train.train_and_evaluate
    calls = []

    def flaky(cfg, workdir, run=None):
        calls.append(workdir)
        if len(calls) == 1:
            raise RuntimeError("out of memory\nsecond line")
        return real(cfg, workdir)

    monkeypatch.setattr(gs.train, "train_and_evaluate", flaky)
    out = gs.search(c, str(tmp_path), log=lambda *_: None)
    statuses = sorted(r["status"] for r in out["rows"])
    assert statuses.count("failed") == 1 and statuses.count("ok") == len(statuses) - 1
    failed = next(r for r in out["rows"] if r["status"] == "failed")
    assert failed["reason"] == "RuntimeError: out of memory"
    assert out["best"] is not None


def test_sigkill_mid_trial_then_resume_has_no_lost_or_duplicate_rows(tmp_path, cache_dir):
    wd = tmp_path / "grid"
    args = [sys.executable, "-m", "experiments.grid_search", f"--workdir={wd}",
            "--config.train.model.network=tiny", "--config.train.num_train_steps=8",
            "--config.train.checkpoint_every_steps=2", f"--config.train.compile_cache_dir={cache_dir}",
            *[f"--config.search.{k}={v}".replace(" ", "") for k, v in SMALL.items()],
            "--config.search.include_baseline=False", "--local_workers=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    killed_in = None
    while time.time() < deadline and killed_in is None:  # kill once the 2nd trial has a checkpoint
        done = len(gs.ResultsLog(str(wd)).rows()) if wd.exists() else 0
        trials = sorted((wd / "trials").iterdir()) if (wd / "trials").exists() else []
        for t in trials:
            ck = t / "checkpoints"
            started = ck.exists() and any(d.isdigit() for d in os.listdir(ck))
            if done >= 1 and started and not (t / "result.json").exists():
                killed_in = t.name
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_in is not None, "never caught a trial mid-way"
    before = gs.ResultsLog(str(wd)).rows()
    assert killed_in not in {tid for tid in before}
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, timeout=600)
    with open(wd / "results.jsonl") as f:
        ids = [json.loads(line)["trial_id"] for line in f]
    c = small_config(cache_dir, include_baseline=False)
    expected = {gs.trial_id(cand, 0, 0) for cand in gs.candidates(c.search)}
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert killed_in in ids


def test_bad_search_config_one_line_exit_2(tmp_path):
    wd = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-m", "experiments.grid_search", f"--workdir={wd}",
                           "--config.search.tolerance=0.0001", "--config.search.alpha=(1.0,1.1)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "closest is" in lines[0]
    assert not wd.exists()



def test_two_local_workers_share_one_grid(tmp_path, cache_dir):
    wd = tmp_path / "grid2"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.grid_search", f"--workdir={wd}", "--local_workers=2",
         "--config.train.model.network=tiny", "--config.train.num_train_steps=2",
         f"--config.train.compile_cache_dir={cache_dir}",
         *[f"--config.search.{k}={v}".replace(" ", "") for k, v in SMALL.items()]],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[worker 1]" in proc.stdout and "[worker 0]" in proc.stdout and "winner:" in proc.stdout
    with open(wd / "results.jsonl") as f:
        ids = [json.loads(line)["trial_id"] for line in f]
    expected = {gs.trial_id(c, 0, 0) for c in gs.candidates(small_config(cache_dir).search)}
    assert sorted(ids) == sorted(expected)
    assert (wd / "best.json").exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_flags_and_exits_0_without_running(tmp_path, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)  # a run would create runs/ here
    with pytest.raises(SystemExit) as e:
        gs.main(["prog", flag])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--local_workers" in out and "--workdir" in out and "--config.<field>" in out
    assert not os.listdir(tmp_path)
