"""Val top-1 against training steps for grid-search trial recipes (docs/trial-recipe.md).

    python scripts/recipe_sweep.py --name head0.1 --set model.head_init=0.1 --steps 200 --seeds 0,1
    python scripts/recipe_sweep.py --table /tmp/recipe_sweep.jsonl --at 67,134,200

Each run is experiments/configs/grid_search.py's ``train`` section (the trial recipe)
with the ``--set`` overrides, trained through ``trainer.train_and_evaluate`` on the
grid search's two fixed points: unscaled B0 (``baseline``, phi = 0) and the paper's
constants at phi = 1 (``paper``: 1.2, 1.1, 1.15). It evaluates every ``--eval_every``
steps, so a run of N steps also gives the curve of a halving rung that stops early on
the same (stretched) schedule. One JSON line per run is appended to ``--out``:
overrides, the val / EMA val top-1 curve, the final numbers, wall and compile time.
``--table`` prints those lines as a markdown table (mean over seeds, ``val/ema``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

POINTS = {"baseline": (1.0, 1.0, 1.0, 0.0), "paper": (1.2, 1.1, 1.15, 1.0)}
# Recorded with every run: the trial config these come from may change between runs.
RECIPE_FIELDS = ("model.head_init", "model.bn_momentum", "model.dropout", "model.drop_path_rate",
                 "data.max_shift_fraction", "optimizer.learning_rate", "optimizer.warmup_epochs",
                 "optimizer.label_smoothing", "optimizer.ema_decay", "optimizer.weight_decay")


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part) if cfg is not None else None
    return cfg


def parse_set(cfg: Any, item: str) -> tuple[str, Any]:
    """``a.b=value`` into the config, typed like the field it replaces."""
    key, _, raw = item.partition("=")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
        value: Any = raw.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float, str)):
        value = type(old)(raw)
    else:
        value = json.loads(raw)
    node[leaf] = value
    return key, value


def trial_config(point: str, steps: int, seed: int, eval_every: int, sets: list[str]) -> tuple[Any, dict]:
    from experiments import trials
    from experiments.configs import grid_search

    alpha, beta, gamma, phi = POINTS[point]
    cfg = trials.trial_config(grid_search.get_config().train, trials.Candidate(alpha, beta, gamma), phi, seed=seed,
                              steps=steps)
    cfg.eval_every_steps = eval_every
    cfg.checkpoint_every_steps = 10**9
    cfg.compile_cache_dir = "/tmp/recipe_xla"
    overrides = dict(parse_set(cfg, s) for s in sets)
    return cfg, overrides


def run_one(point: str, steps: int, seed: int, eval_every: int, sets: list[str]) -> dict[str, Any]:
    from effnet_jax.training import trainer

    cfg, overrides = trial_config(point, steps, seed, eval_every, sets)
    workdir = tempfile.mkdtemp(prefix="recipe_")
    try:
        t0 = time.time()
        result = trainer.train_and_evaluate(cfg, workdir)
        took = time.time() - t0
        curve = []
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                if "val_top1" in row:
                    curve.append([row["step"], row["val_top1"], row.get("ema_val_top1")])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "point": point, "seed": seed, "steps": steps, "batch_size": cfg.batch_size, "overrides": overrides,
        "recipe": {k: _get(cfg, k) for k in RECIPE_FIELDS},
        "status": result["status"], "val_top1": result.get("val_top1"), "ema_val_top1": result.get("ema_val_top1"),
        "train_loss": result["train_loss"], "curve": curve, "wall_s": round(took, 1),
        "compile_s": round(result["compile_s"], 1), "resolution": result["resolution"],
    }


def table(path: str, at: list[int]) -> str:
    """Markdown: one row per (name, point, batch, steps); mean val/ema top-1 over seeds at each step in ``at``."""
    groups: dict[tuple, list[dict]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            groups.setdefault((r["name"], r["point"], r["batch_size"], r["steps"]), []).append(r)
    head = "| recipe | point | batch | steps | seeds | " + " | ".join(f"@{n}" for n in at) + " | wall s (compile) |"
    lines = [head, "|" + "---|" * (6 + len(at))]
    for (name, point, batch, steps), rows in groups.items():
        cells = []
        for n in at:
            vals = [(c[1], c[2]) for r in rows for c in r["curve"] if c[0] == n]
            if len(vals) < len(rows):
                cells.append("")
                continue
            v = sum(x for x, _ in vals) / len(vals)
            e = [y for _, y in vals if y is not None]
            cells.append(f"{v:.2f}" + (f"/{sum(e) / len(e):.2f}" if e else ""))
        wall = sum(r["wall_s"] for r in rows) / len(rows)
        comp = sum(r["compile_s"] for r in rows) / len(rows)
        seeds = ",".join(str(r["seed"]) for r in rows)
        lines.append(f"| {name} | {point} | {batch} | {steps} | {seeds} | " + " | ".join(cells)
                     + f" | {wall:.0f} ({comp:.0f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="trial", help="label of this recipe in the output")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override in the trial's train config, e.g. optimizer.learning_rate=0.08")
    ap.add_argument("--points", default="baseline,paper", help=f"comma-separated, of {', '.join(POINTS)}")
    ap.add_argument("--steps", default="200", help="comma-separated training budgets")
    ap.add_argument("--seeds", default="0", help="comma-separated")
    ap.add_argument("--eval_every", type=int, default=25)
    ap.add_argument("--out", default="/tmp/recipe_sweep.jsonl")
    ap.add_argument("--table", default="", help="print the markdown table of this JSONL file and exit")
    ap.add_argument("--at", default="50,100,150,200", help="steps of the table's columns")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table, [int(x) for x in a.at.split(",")]))
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments.configs
    for steps in (int(x) for x in a.steps.split(",")):
        for point in a.points.split(","):
            for seed in (int(x) for x in a.seeds.split(",")):
                row = {"name": a.name, **run_one(point, steps, seed, a.eval_every, a.set),
                       "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                curve = " ".join(f"{s}:{v:.2f}/{e:.2f}" if e is not None else f"{s}:{v:.2f}"
                                 for s, v, e in row["curve"])
                print(f"{a.name} {point} seed {seed} {steps} steps: {curve}  "
                      f"wall {row['wall_s']} s (compile {row['compile_s']} s)", flush=True)


if __name__ == "__main__":
    main()
