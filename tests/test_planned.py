"""A search with a time budget: the budget's parsing and checks, the probe's candidates, and the whole
probe -> plan (or refusal) -> run flow on fake training whose truth and timings are known (no network trains).
"""

import json

import pytest
from search_helpers import quiet

from effnet_jax.errors import UserError
from effnet_jax.training import trainer
from experiments import grid_search as gs
from experiments import planned, queue, strategies, trials
from experiments.configs import grid_search as grid_config


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("2h", 7200), ("90s", 90), (" 1.5h ", 5400)])
def test_a_time_budget_is_a_duration(text, seconds):
    assert planned.parse_budget(text) == seconds
    assert planned.seconds_of("") is None


@pytest.mark.parametrize("text", ["30", "0m", "-5m", "half an hour", "5 d"])
def test_a_bad_time_budget_is_one_line_before_anything_runs(text):
    c = grid_config.get_config()
    c.search.time_budget = text
    with pytest.raises(UserError, match="search.time_budget must be a positive duration"):
        strategies.check_search(c)


@pytest.mark.parametrize("field, value", [("min_power", 1.5), ("min_power", 0.0),
                                          ("keep", -1)])
def test_the_plan_fields_are_checked(field, value):
    c = grid_config.get_config()
    c.search[field] = value
    with pytest.raises(UserError, match=f"search.{field}"):
        strategies.check_search(c)


def test_the_probe_takes_the_references_and_the_star_directions():
    c = grid_config.get_config()
    from experiments.constraints import candidates

    cands = candidates(c.search)
    picked = planned.probe_candidates(cands)
    grid = [x for x in cands if not x.label]
    assert [x.label for x in picked if x.label] == [x.label for x in cands if x.label]
    assert 2 <= len(picked) - sum(bool(x.label) for x in picked) <= 4
    got = [x for x in picked if not x.label]
    assert max(x.alpha for x in grid) in {x.alpha for x in got}
    assert max(x.beta for x in grid) in {x.beta for x in got}
    assert max(x.gamma for x in grid) in {x.gamma for x in got}


def test_a_plan_runs_in_cooldown_mode_with_its_fields():
    c = planned.apply(grid_config.get_config(), {"train.num_train_steps": 30, "search.final_seeds": [0, 1, 2],
                                                 "search.keep": 2})
    assert c.search.rung_mode == "cooldown" and c.train.num_train_steps == 30
    assert tuple(c.search.final_seeds) == (0, 1, 2) and c.search.keep == 2
    strategies.check_search(c)


def _config(tmp_path, budget, steps=4):
    c = grid_config.get_config()
    c.train.model.network = "tiny"
    c.train.num_train_steps = steps
    c.search.time_budget = budget
    c.train.compile_cache_dir = ""
    return c


def _fake(truth):
    """Training faked: ``truth(cfg)`` is the candidate's mean score at the run's budget, each seed adds its own
    small offset; the timings say a trial costs a second and a compile two more, as the cost model reads them."""

    def train(cfg, workdir, *a, **k):
        from effnet_jax.model import cost, scaling

        spec = scaling.model_spec(cfg.model)
        arch = scaling.build_architecture(spec, scaling.network(cfg.model), cfg.model.drop_path_rate)
        noise = ((cfg.seed * 7919 + int(cfg.model.alpha * 1000) * 31) % 13 - 6) / 6000
        return {"status": "ok", "val_top1": truth(cfg) + noise, "wall_time_s": 3.0, "compile_s": 2.0,
                "train_img_per_s": 1000.0, "batch_size": cfg.batch_size, "steps": cfg.num_train_steps,
                "timings": {"program_cache": "miss"}, **cost.figures(spec, arch, 10)}

    return train


def test_a_budget_probes_plans_and_runs_the_plan_it_printed(tmp_path, monkeypatch):
    """Candidates far apart (the score grows with gamma, seeds barely matter): the probe's plan has power and
    the search runs it; best.json keeps the plan and the probe's figures."""
    monkeypatch.setattr(trainer, "train_and_evaluate", _fake(lambda cfg: 0.4 + (cfg.model.gamma - 1) * 1.5
                                                             if cfg.model.phi else 0.5))
    lines = []
    out = gs.search(_config(tmp_path, "2h"), str(tmp_path / "s"), log=lines.append, worker=queue.Worker(), workers=2)
    text = "\n".join(str(x) for x in lines)
    assert "probe: " in text and "plan (predicted)" in text and "predicted power" in text
    best = json.load(open(tmp_path / "s" / "best.json"))
    assert best["answer"] is True and best["planner"]["answer"] is True
    assert best["planner"]["plan"]["power"] >= 0.5 and best["planner"]["probe"]["ladder"]
    assert best["gamma"] == max(x.gamma for x in out["summary"] if not x.label)
    from experiments import search_report

    line = search_report.plan_line(out["planner"], out["wall_s"], len(out["verdict"]["contender_set"]))
    assert line.startswith("plan against actual: ") and "nan" not in line and "refused" not in line
    # the plan is the study's: a rerun plans nothing again and trains nothing new
    n = len(out["rows"])
    again = gs.search(_config(tmp_path, "2h"), str(tmp_path / "s"), log=quiet, worker=queue.Worker(), workers=2)
    assert len(again["rows"]) == n and again["planner"] == out["planner"]


def test_a_search_whose_b0_stays_at_chance_is_refused_after_the_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "train_and_evaluate", _fake(lambda cfg: 0.1))
    with pytest.raises(planned.Refused, match="not above chance"):
        gs.search(_config(tmp_path, "2h"), str(tmp_path / "s"), log=quiet, worker=queue.Worker(), workers=2)
    rows = [t for t in gs.setup(_config(tmp_path, "2h"), str(tmp_path / "s"), log=quiet).study.get_trials()]
    probed = {trials.candidate_name(t.user_attrs["attrs"]) for t in rows}
    assert 3 <= len(probed) <= 6  # the probe only, nothing of a plan


def test_the_deadline_stops_claiming_and_answers_from_what_finished(tmp_path):
    """Past the deadline a worker claims nothing new: the rows are the finished plans', and it says how many
    were left out."""
    import time

    import ml_collections

    from experiments.study import open_study, storage_for

    study = open_study(storage_for(None, str(tmp_path)), "s", {"identity": 1}, str(tmp_path))
    plans = [queue.TrialPlan(k, ml_collections.ConfigDict({"net": k, "optimizer": {"schedule": "cosine"}}),
                             {"seed": 0}) for k in ("a", "b", "c")]
    trained, lines = [], []

    def train(config, directory):
        trained.append(config.net)
        return {"status": "ok", "val_top1": 0.5, "wall_time_s": 0.1}

    first = queue.work(study, plans[:1], str(tmp_path), train, "val_top1", lines.append)
    rows = queue.work(study, plans, str(tmp_path), train, "val_top1", lines.append, deadline=time.time() - 1)
    assert trained == ["a"] and list(rows) == ["a"] and rows["a"] == first["a"]
    assert "time budget reached: 2 of 3 planned trials" in lines[-1]
