"""Proxy fidelity end to end on the tiny network: budgets, rank agreement, outputs, bad input."""

import json
import os
import sys

import numpy as np
import pytest
from suite_paths import CACHE, load_script

from effnet_jax.training import trainer
from experiments import fidelity

GRID = ["--config.search.alpha=(1.1,1.3)", "--config.search.beta=(1.05,1.05)", "--config.search.gamma=(1.2,1.2)",
        "--config.search.tolerance=0.3", "--config.search.include_baseline=False",
        "--config.train.model.network=tiny", "--config.train.num_train_steps=2"]


@pytest.mark.slow
def test_fidelity_end_to_end_on_the_tiny_network(tmp_path, monkeypatch):
    wd = tmp_path / "fid"
    argv = ["prog", f"--workdir={wd}", *GRID, f"--config.train.compile_cache_dir={CACHE}",
            "--config.fidelity.budgets=(1,2,3)"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections' config overrides are read from sys.argv
    out = fidelity.main(argv)
    cands = 6  # alpha 1.1, 1.15, ..., 1.3 at beta 1.05, gamma 1.2 (all within tolerance 0.3), plus the paper
    assert len(out["rows"]) == 3 * cands
    assert sorted({r["budget_steps"] for r in out["rows"]}) == [2, 4, 6]
    assert all(r["status"] == "ok" and r["steps"] == r["budget_steps"] for r in out["rows"])
    assert [a["budget"] for a in out["agreement"]] == [1, 2]
    for a in out["agreement"]:
        assert a["n"] == cands
        if a["kendall_tau"] is None:  # a few steps of the tiny network can leave every candidate at one score
            assert len(set(out["means"][a["budget"]].values())) == 1 or len(set(out["means"][3].values())) == 1
        else:
            assert -1.0 <= a["kendall_tau"] <= 1.0 and -1.0 <= a["spearman_rho"] <= 1.0
    for name in ("fidelity.json", "fidelity.csv", "fidelity.png", "study.journal"):
        assert os.path.getsize(wd / name) > 0, name
    saved = json.loads((wd / "fidelity.json").read_text())
    assert saved["mode"] == "continued" and len(saved["agreement"]) == 2
    assert all("kendall_ci" in a for a in saved["agreement"]) and saved["provenance"]["jax"]
    # one seed per budget: no ceiling anywhere, and the line says that proxy taus cannot be told from seed noise
    assert all(c["tau"] is None for c in saved["ceilings"].values()) and "unknown" in saved["ceiling_line"]
    assert not any((wd / "trials" / d / "checkpoints").exists() for d in os.listdir(wd / "trials"))


def test_analyse_reports_tau_intervals_and_the_ceiling_at_every_budget_with_seeds():
    rng = np.random.default_rng(0)
    rows = [{"status": "ok", "label": "", "alpha": 1 + i / 20, "beta": 1.1, "gamma": 1.15, "budget": b, "seed": seed,
             "val_top1": 0.5 + 0.05 * i + float(rng.normal(0, noise))}
            for b, noise in ((1, 1.0), (3, 0.002)) for i in range(20) for seed in (0, 1, 2)]
    out = fidelity.analyse(rows, "val_top1")
    (a,) = out["agreement"]
    assert a["kendall_ci"][0] <= a["kendall_tau"] <= a["kendall_ci"][1] and a["kendall_ci"][1] - a["kendall_ci"][0] > 0
    top, cheap = out["ceilings"][3], out["ceilings"][1]
    assert top["tau"] == pytest.approx(1.0) and top["pairs"] == 3 and cheap["tau"] < top["tau"]
    assert "1x (tau" in out["ceiling_line"] and "limited by the proxy" in out["ceiling_line"]  # noisy 1x, exact 3x
    out["base_steps"] = 40
    text = fidelity.format_agreement(out)
    assert "noise ceiling at 3x (120 steps, seeds [0, 1, 2])" in text and out["ceiling_line"] in text
    again = fidelity.analyse(rows, "val_top1")
    assert again["ceilings"] == out["ceilings"] and again["agreement"] == out["agreement"]  # seeded bootstrap


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("--config.fidelity.budgets=(3,1)", "fidelity.budgets"),
    ("--config.fidelity.budgets=(1,)", "fidelity.budgets"),
    ("--config.fidelity.mode=fast", "fidelity.mode"),
    # the 2-step budget's cooldown would start inside digits' 16-step warmup: refused before any trial trains
    ("--config.fidelity.mode=cooldown --config.train.num_train_steps=2", "inside the 16-step warmup"),
])
def test_bad_fidelity_config_one_line_exit_2(tmp_path, capsys, monkeypatch, override, message):
    argv = ["prog", f"--workdir={tmp_path / 'wd'}", *override.split()]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        fidelity.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("error:")
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cooldown", "independent"])
def test_fidelity_in_each_rung_mode_on_the_tiny_network(tmp_path, monkeypatch, mode):
    """cooldown: each budget is a wsd run scored after its cooldown, the next budget starting from the previous
    one's stable checkpoint in the same directory; independent: every budget from scratch in its own."""
    from effnet_jax.training import rundir

    started = []
    real = trainer.train_and_evaluate

    def spy(cfg, workdir, *a, **k):
        started.append((os.path.basename(workdir), cfg.num_train_steps, cfg.optimizer.schedule,
                        rundir.stable_steps(workdir)))
        return real(cfg, workdir, *a, **k)

    monkeypatch.setattr(trainer, "train_and_evaluate", spy)
    argv = ["prog", f"--workdir={tmp_path / 'fid'}", *GRID, f"--config.train.compile_cache_dir={CACHE}",
            "--config.search.alpha=(1.2,1.25)", "--config.fidelity.budgets=(1,2)", f"--config.fidelity.mode={mode}",
            "--config.search.cooldown_fraction=0.5", "--config.train.optimizer.warmup_epochs=0.0", "--local_workers=1"]
    monkeypatch.setattr(sys, "argv", argv)
    out = fidelity.main(argv)
    assert len(out["rows"]) == 2 * 3 and all(r["status"] == "ok" and r["steps"] == r["budget_steps"]
                                             for r in out["rows"])
    assert [a["budget"] for a in out["agreement"]] == [1]
    by_dir = {}
    for name, steps, _, stable in started:
        by_dir.setdefault(name, []).append((steps, stable))
    if mode == "cooldown":
        assert {s[2] for s in started} == {"wsd"} and len(by_dir) == 3
        # 2 steps fork at 1, 4 at 2: the longer budget starts where the shorter one forked
        assert all(v == [(2, []), (4, [1])] for v in by_dir.values())
    else:
        assert all(len(v) == 1 and v[0][1] == [] for v in by_dir.values()) and len(by_dir) == 6
    assert json.loads((tmp_path / "fid" / "fidelity.json").read_text())["mode"] == mode
    for d in os.listdir(tmp_path / "fid" / "trials"):
        assert not os.path.exists(tmp_path / "fid" / "trials" / d / rundir.STABLE_CHECKPOINTS)


@pytest.mark.slow
def test_pooling_fidelity_csvs_split_by_seed_gives_the_whole_studys_analysis(tmp_path, capsys):
    """The README's three-seed figures pooled from two files, and the refusals: a repeated trial, mixed modes."""
    pool = load_script("pool_fidelity")
    data = os.path.join(os.path.dirname(__file__), "..", "docs", "data")
    whole = os.path.join(data, "cpu-2026-12-07-fidelity-fmnist-continued.csv")
    with open(whole) as f:
        header, *lines = f.read().splitlines()
    parts = {}
    for name, keep in (("s01", lambda s: s != "2"), ("s2", lambda s: s == "2")):
        parts[name] = str(tmp_path / f"{name}.csv")
        with open(parts[name], "w") as f:
            f.write("\n".join([header, *(x for x in lines if keep(x.split(",")[5]))]) + "\n")
    rows = pool.read_rows(whole)
    expected = fidelity.analyse(rows, "val_top1", "fashion_mnist", resamples=200)
    pooled, base = pool.pool([parts["s01"], parts["s2"]])
    got = fidelity.analyse(pooled, "val_top1", "fashion_mnist", resamples=200)
    assert base == 31 and len(pooled) == len(rows) == 60
    assert got["means"] == expected["means"] and got["ceilings"] == expected["ceilings"]
    assert got["agreement"] == expected["agreement"]
    assert got["agreement"][0]["kendall_tau"] == pytest.approx(0.511, abs=1e-3)
    out = pool.main([parts["s01"], parts["s2"], "--out", str(tmp_path / "pooled.json")])
    assert "seeds [0, 1, 2]" in capsys.readouterr().out and out["ceilings"]
    assert json.load(open(tmp_path / "pooled.json"))["sources"] == [parts["s01"], parts["s2"]]
    own = str(tmp_path / "own.csv")  # seed 2's cheap rung as the independent mode's trials: another proxy
    with open(own, "w") as f:
        f.write("\n".join([header, *(x.replace("-n93,", "-n93-own,") for x in lines if x.split(",")[5] == "2")]))
    bad = str(tmp_path / "bad.csv")
    with open(bad, "w") as f:
        f.write("\n".join([header, lines[0].replace(",0,3,93,", ",zero,3,93,")]))
    for files, message in (([whole, parts["s2"]], "repeats (1"), ([parts["s01"], own], "different rung modes"),
                           ([bad], "line 2: seed is 'zero', not a number")):
        with pytest.raises(SystemExit) as e:
            pool.main(files)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
