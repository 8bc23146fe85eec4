"""What a search's candidates cost on this device: xMACs beside measured train-step and inference time.

    python -m experiments.latency_table                                   # the grid search's default grid
    python -m experiments.latency_table --config=experiments/configs/fashion_mnist.py --out=fm1.json
    python -m experiments.latency_table --compare=fm1.json,fm2.json       # two runs, per network

Takes the grid search's config and times, against unscaled B0 in the same interleaved rounds
(``effnet_jax.training.latency``), every distinct rounded network that any constraint could keep: the
formula's candidates, the real-MACs ones, and those inside ``search.latency_window`` of the goal
(the set ``search.constraint=latency`` measures). The table says which constraint admits each
network, so the formula's "2x" is seen in this machine's seconds. ``--compare`` reads two runs'
JSON and prints each network's relative difference: how far a tolerance must reach.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from effnet_jax.errors import UserError, exit_on_user_error
from experiments import report, trials
from experiments.constraints import CONSTRAINTS, Constraint, MeasuredLatency, RealMacs, grid_points
from experiments.strategies import schedule_for
from experiments.trials import BASELINE, PAPER, Candidate

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "grid_search.py")
ADMITS = {name: c.abbrev for name, c in CONSTRAINTS.items()}  # the "admitted by" letters, one per constraint


def _constraints(config: Any, num_classes: int) -> dict[str, Constraint]:
    """Every registered constraint, built for this config (``constraints.CONSTRAINTS`` is the one list)."""
    return {name: c(config.search, config.train, num_classes) for name, c in CONSTRAINTS.items()}


def networks(config: Any, num_classes: int) -> dict[str, list[Candidate]]:
    """{network key: grid points that round to it (closest to the formula first)} of every network a
    constraint could keep, with the paper's point and unscaled B0."""
    s, meter = config.search, MeasuredLatency(config.search, config.train, num_classes)
    points = grid_points(s)
    keep = set()
    for constraint in _constraints(config, num_classes).values():
        if constraint.meter() is not None:  # a measured cost: every network it would time
            keep |= {meter.network_key(c) for c in constraint.to_measure(points)}
        else:
            keep |= {meter.network_key(c) for c in points if constraint.admits(constraint.cost(c))}
    out: dict[str, list[Candidate]] = {meter.network_key(BASELINE): [BASELINE], meter.network_key(PAPER): [PAPER]}
    for c in sorted(points, key=lambda c: abs(c.product - s.target)):
        k = meter.network_key(c)
        if k in keep:
            out.setdefault(k, []).append(c)
    return out


def table_rows(config: Any, num_classes: int, nets: dict[str, list[Candidate]],
               measured: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per network: its representative point, figures, costs and the constraints that admit it."""
    s = config.search
    macs = RealMacs(s, config.train, num_classes)  # the xMACs column
    everyone = _constraints(config, num_classes)
    rows = []
    for key, points in nets.items():
        c = points[0]
        phi = 0.0 if c.label == "baseline" else s.phi
        fig = trials.figures(config.train, c, phi, num_classes)
        cost = measured[key]
        row = {"network": key, "label": c.label, "alpha": c.alpha, "beta": c.beta, "gamma": c.gamma,
               "points": len(points), "resolution": fig["resolution"], "blocks": fig["blocks"],
               "params": fig["params"], "macs": fig["macs"], "xmacs": macs.cost(c) if c.label != "baseline" else 1.0,
               **{f"x{kind}": cost[kind]["ratio"] for kind in cost},
               **{f"x{kind}_spread": cost[kind]["spread"] for kind in cost},
               **{f"{kind}_s": cost[kind]["seconds"] for kind in cost}}
        if c.label != "baseline":
            admitted: dict[str, bool] = {}
            for name, constraint in everyone.items():
                if constraint.meter() is not None:  # its admits() on this run's measured ratio of each kind
                    admitted.update({f"{name}_{kind}": constraint.admits(row[f"x{kind}"]) for kind in cost})
                else:
                    admitted[name] = any(constraint.admits(constraint.cost(p)) for p in points)
            row["admitted_by"] = [name for name, ok in admitted.items() if ok]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["label"] != "baseline", r["xmacs"]))


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    def ratio(kind: str) -> Any:
        return lambda r: f"{r[f'x{kind}']:.2f}±{r[f'x{kind}_spread'] * r[f'x{kind}'] / 2:.2f}"

    columns: list[report.Column] = [
        ("", 1, lambda r: {"paper": "P", "baseline": "B"}.get(r["label"], "")),
        ("alpha", 5, lambda r: f"{r['alpha']:.2f}"), ("beta", 5, lambda r: f"{r['beta']:.2f}"),
        ("gamma", 5, lambda r: f"{r['gamma']:.2f}"), ("pts", 3, lambda r: str(r["points"])),
        ("res", 3, lambda r: str(r["resolution"])), ("blocks", 6, lambda r: str(r["blocks"])),
        ("xMACs", 5, lambda r: f"{r['xmacs']:.2f}"), ("xTrain", 10, ratio("train")), ("xInfer", 10, ratio("infer")),
        ("admitted by", 11, lambda r: " ".join(map(_letters, r.get("admitted_by", [])))),
    ]
    return report.format_table(rows, columns, [
        "one row per rounded network (pts: grid points that round to it); xTrain / xInfer: median ratio of its "
        "train-step / inference time to unscaled B0's over interleaved rounds, ± half the interquartile range; "
        "admitted by: " + ", ".join(f"{c.abbrev} {c.title or name}" for name, c in CONSTRAINTS.items())])


def _letters(admitted: str) -> str:
    """'F' for a constraint's name, 'Lt' for a measured one's kind ('latency_train')."""
    if admitted in ADMITS:
        return ADMITS[admitted]
    name, kind = admitted.rsplit("_", 1)
    return ADMITS[name] + kind[:1]


def compare(paths: Sequence[str]) -> str:
    """Each network's relative difference between two runs' ratios, and the largest."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                runs.append({r["network"]: r for r in json.load(f)["rows"]})
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--compare: cannot read {path}: {e}") from None
    a, b = runs
    common = [k for k in a if k in b and a[k]["label"] != "baseline"]
    if not common:
        raise UserError("--compare: the two runs share no network")
    lines, worst = [], {}
    for kind in ("train", "infer"):
        diffs = {k: b[k][f"x{kind}"] / a[k][f"x{kind}"] - 1 for k in common}
        worst[kind] = max(diffs.items(), key=lambda kv: abs(kv[1]))
        within = sum(abs(d) <= 0.05 for d in diffs.values())
        med = sorted(abs(d) for d in diffs.values())[len(diffs) // 2]
        lines.append(f"x{kind}: {within}/{len(diffs)} networks within 5% between the runs, median |difference| "
                     f"{med:.1%}, largest {worst[kind][1]:+.1%} ({trials.candidate_name(a[worst[kind][0]])})")
    return "\n".join(lines)


def _define_flags(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_string("out", "", "write the rows as JSON here", flag_values=fv)
    flags.DEFINE_string("compare", "", "two JSON files of earlier runs, comma-separated: compare them",
                        flag_values=fv)


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | None:
    from effnet_jax import cli
    from effnet_jax.training import latency, recipe

    config, fv = cli.parse_config_flags(list(sys.argv if argv is None else argv), DEFAULT_CONFIG, _define_flags)
    if fv.compare:
        paths = [p for p in fv.compare.split(",") if p]
        if len(paths) != 2:
            raise UserError(f"--compare takes two JSON files, comma-separated, got {fv.compare!r}")
        print(compare(paths))
        return None
    cli.enable_compile_cache(config.train.compile_cache_dir)
    MeasuredLatency(config.search).check()
    base = trials.trial_config(config.train, BASELINE, seed=int(config.search.seeds[0]), schedule_steps=0)
    prepared = recipe.prepare(base)
    num_classes = prepared.source.num_classes
    nets = networks(config, num_classes)
    s = config.search
    print(f"timing {len(nets)} networks' train and inference steps against unscaled B0 on {latency.device_key()} "
          f"({s.latency_rounds} interleaved rounds)", flush=True)
    steps = schedule_for(s).rung_steps(trials.budget_steps(config.train, prepared.steps_per_epoch))
    configs = {k: trials.trial_config(config.train, c[0], s.phi, seed=int(s.seeds[0]), steps=steps[0],
                                      schedule_steps=steps[-1] if len(steps) > 1 else 0) for k, c in nets.items()}
    measured = latency.measure(configs, num_classes, next(iter(nets)), rounds=s.latency_rounds,
                               log=lambda m: print(m, flush=True), steps_per_epoch=prepared.steps_per_epoch)
    rows = table_rows(config, num_classes, nets, measured)
    print(format_rows(rows))
    if fv.out:
        report.write_json(fv.out, {"device": latency.device_key(), "rounds": s.latency_rounds,
                                   "base_resolution": config.train.model.base_resolution, "rows": rows,
                                   "created": report.now()})
    return rows


if __name__ == "__main__":
    main()
