"""What a grid search shows and writes: its table, its printed summary, results.csv, best.json, plots.

The analysis (``experiments.analysis``) decides; this module only words and files it. The typed summary
entries become plain values here, at the file boundary (``dataclasses.asdict``), so best.json keeps the
keys and order that ``experiments.scale_up`` and ``config.model.constants`` read.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from effnet_jax import provenance
from effnet_jax.model import cost
from experiments import queue, report, stats
from experiments.analysis import CONTENDER_WORDS, CandidateSummary

CSV_FIELDS = ("trial_id", "trial_number", "state", "label", "alpha", "beta", "gamma", "product", "phi", "seed",
              "rung", *queue.RESULT_FIELDS, "latency_train", "latency_infer")
BEST_FIGURES = (*cost.FIGURES, "macs_ratio", "latency_train", "latency_infer")  # best.json's copy of the winner's


def format_table(summary: Sequence[CandidateSummary], metric: str, verdicts: dict[str, str] | None = None,
                 test: str = stats.POOLED) -> str:
    """The search's table: one row per candidate, best first, with its interval, verdict and contender mark."""
    verdicts = verdicts or {}
    columns: list[report.Column] = [
        ("", 1, lambda s: {"paper": "P", "baseline": "B"}.get(s.label, "")),
        ("C", 1, lambda s: "*" if verdicts.get(s.name) in CONTENDER_WORDS else ""),
        ("alpha", 5, lambda s: f"{s.alpha:.2f}"), ("beta", 5, lambda s: f"{s.beta:.2f}"),
        ("gamma", 5, lambda s: f"{s.gamma:.2f}"), ("a*b2*g2", 7, lambda s: f"{s.product:.3f}"),
        ("res", 4, lambda s: str(s.resolution or 0)), ("blocks", 6, lambda s: str(s.blocks or 0)),
        ("params", 10, lambda s: f"{s.params or 0:,}"), ("MMACs", 6, lambda s: f"{(s.macs or 0) / 1e6:.1f}"),
        ("xMACs", 5, lambda s: _ratio(s.macs_ratio)),
        *([("xTrain", 6, lambda s: _ratio(s.latency_train)), ("xInfer", 6, lambda s: _ratio(s.latency_infer))]
          if any(s.latency_train is not None for s in summary) else []),
        (f"{metric} ±95%", 16, lambda s: report.score_text(s.mean, s.half)),
        ("seeds", 5, lambda s: f"{s.ok}/{s.seeds}"),
        ("rung", 4, lambda s: str(s.rung)), ("time s", 7, lambda s: f"{s.wall_time_s:.1f}"),
        ("verdict", 14, lambda s: verdicts.get(s.name, s.status if s.status != "ok" else "")),
    ]
    return report.format_table(summary, columns, [
        "P = the paper's constants, B = unscaled B0 (phi = 0); xMACs = MACs / unscaled B0's; xTrain / xInfer = "
        "measured train-step / inference time / unscaled B0's on this device; C * = the contender set (the winner "
        "and every candidate not separated from it); "
        + ("±95%: t interval with the seed noise pooled over the rung's candidates (on this validation split)"
           if test == stats.POOLED else "±95%: t interval over seeds with the validation sample's binomial error")])


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def best_json(config: ml_collections.ConfigDict, best: CandidateSummary, verdict: dict[str, Any],
              extra: dict[str, Any]) -> dict[str, Any]:
    """best.json's object: the answer, the winner's constants, score and figures, the contender set and the
    verdict, ``extra`` (the analyses), provenance and the whole config."""
    metric = config.search.metric
    learning = extra.get("learning") or {}
    answer = learning.get("learned") is not False
    b = dataclasses.asdict(best)
    return {
        "answer": answer, **({} if answer else {"reason": learning.get("reason")}),
        "alpha": b["alpha"], "beta": b["beta"], "gamma": b["gamma"], "product": b["product"],
        metric: b["mean"], f"{metric}_std": b["std"], f"{metric}_ci95_half": b["half"],
        f"{metric}_values": b["values"], "seeds": b["ok"], "rung": b["rung"],
        **{k: b[k] for k in BEST_FIGURES},
        "contenders": verdict.get("contender_set", []), "test": verdict.get("test"),
        "alpha_level": config.search.alpha_level, "test_seeds": verdict.get("seeds"),
        "verdict": verdict, **extra, "provenance": provenance.provenance(), "config": config.to_dict(),
        "created": report.now()}


def write_outputs(workdir: str, config: ml_collections.ConfigDict, rows: Sequence[dict[str, Any]],
                  summary: Sequence[CandidateSummary], best: CandidateSummary | None, verdict: dict[str, Any],
                  extra: dict[str, Any]) -> None:
    """results.csv, best.json, plots and TensorBoard hparams (each file replaced whole)."""
    report.write_csv(os.path.join(workdir, "results.csv"), rows, CSV_FIELDS)
    if best is not None:
        report.write_json(os.path.join(workdir, "best.json"), best_json(config, best, verdict, extra))
    from experiments import plots

    top = max((s.rung for s in summary), default=0)
    plots.grid_plots([s for s in summary if s.rung == top], config.search.metric, workdir)
    report.write_hparams(workdir, rows, ("alpha", "beta", "gamma", "product", "seed", "rung", "label"),
                         (config.search.metric, "params", "macs", "wall_time_s"))


def print_summary(out: dict[str, Any], config: ml_collections.ConfigDict, workdir: str, took: float) -> None:
    """What a finished search prints: the table, warnings (stderr), rank agreement, the noise ceiling, the
    winner or why there is none, the verdict, and where the time went."""
    metric = config.search.metric
    print(format_table(out["summary"], metric, out["verdict"].get("verdicts", {}),
                       config.search.get("test", stats.POOLED)))
    for w in out["macs_warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    for a in out["rung_agreement"]:
        ci = a.get("kendall_ci")
        print(f"rung {a['rung']} vs rung {a['top_rung']} ranking over {a['n']} candidates: Kendall tau "
              f"{_num(a['kendall_tau'])}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
              + f", Spearman {_num(a['spearman_rho'])}" + ("" if a["same_winner"] else " (the winner changed)"))
    print(out["ceiling_line"])
    best = out["best"]
    if best is None:
        print("no constraint-satisfying candidate finished; nothing written to best.json")
    elif out["learning"].get("learned") is False:
        print(f"no answer ({os.path.join(workdir, 'best.json')} is marked as none): {out['learning']['reason']}")
    else:
        print(f"winner: alpha={best.alpha} beta={best.beta} gamma={best.gamma} "
              f"({metric} {report.score_text(best.mean, best.half)}, {best.ok} seeds) -> "
              f"{os.path.join(workdir, 'best.json')}")
    if out["learning"].get("learned") is not False:
        print(out["verdict"]["sentence"])
    if out.get("planner"):
        print(plan_line(out["planner"], out.get("wall_s"), len(out["verdict"].get("contender_set") or [])))
    share = out["training_share"]
    print(f"grid search took {took:.0f} s" + (f" ({share:.0%} of trial time in training steps)" if share else "")
          + f"; results in {workdir}")
    phases = queue.phase_line(out["rows"])
    if phases:
        print(phases)


def plan_line(plan: dict[str, Any], wall_s: float | None, contenders: int) -> str:
    """A time budget's plan against what happened: minutes and the contender set's size, and whether the plan
    was one the planner had refused (``search.accept_underpowered``)."""
    p, probe = plan.get("plan") or {}, plan.get("probe") or {}
    predicted = (probe.get("probe_s") or 0) + (p.get("seconds") or 0)
    text = (f"plan against actual: probe and plan {predicted / 60:.1f} min predicted, "
            f"{(wall_s or 0) / 60:.1f} min taken; contender set {contenders} of {p.get('judged', '?')} "
            f"(predicted {p.get('mean_contenders', float('nan')):.1f} on average; at most half with probability "
            f"{p.get('power', float('nan')):.2f})")
    if not plan.get("answer"):
        text += ("; this plan was run although the planner refused it (search.accept_underpowered): "
                 f"{plan.get('line', '').removeprefix('error: ')}")
    return text


def _num(x: float | None) -> str:
    return "n/a (constant scores)" if x is None else f"{x:.2f}"
