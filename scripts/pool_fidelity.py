"""Analyse several fidelity studies of the same candidates and budgets as one: their ``fidelity.csv`` rows pooled.

    python scripts/pool_fidelity.py docs/data/cpu-2026-12-07-fidelity-fmnist-cooldown.csv \
        runs/fidelity_fm_cd2/fidelity.csv

For a seed added after the first study's workdir was lost (its CSV kept), or studies run on several machines of
one kind: ``experiments.fidelity.analyse`` over every file's rows, printed as the study prints it. Files must agree
on the steps per budget; a trial (same candidate, seed and budget) in two files is refused, not counted twice.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from effnet_jax.errors import ArgumentParser, UserError, exit_on_user_error  # noqa: E402
from experiments import fidelity, report, trials  # noqa: E402

_INTS = ("seed", "budget", "budget_steps")
_FLOATS = ("alpha", "beta", "gamma")


def read_rows(path: str) -> list[dict[str, Any]]:
    """One ``fidelity.csv``'s rows, typed as ``analyse`` reads them (metrics as floats, empty as None)."""
    try:
        with open(path, newline="") as f:
            raw = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not raw or not {"trial_id", "status", "budget", "budget_steps", *_INTS, *_FLOATS} <= set(raw[0]):
        raise UserError(f"{path} is not a fidelity.csv (experiments.fidelity writes one into its workdir)")
    rows = []
    for line, r in enumerate(raw, start=2):
        row: dict[str, Any] = {k: (None if v == "" else v) for k, v in r.items()}
        try:
            for k, v in row.items():
                if k in _INTS:
                    row[k] = int(v)
                elif k not in ("trial_id", "label", "status", "reason", "dataset") and v is not None:
                    row[k] = float(v)
        except (TypeError, ValueError):
            raise UserError(f"{path}, line {line}: {k} is {v!r}, not a number") from None
        row["label"] = row["label"] or ""
        rows.append(row)
    return rows


def pool(paths: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """Every file's rows and the steps of budget 1; a UserError where files disagree or repeat a trial."""
    rows, seen, base = [], {}, {}
    for path in paths:
        for r in read_rows(path):
            key = (r["label"], r["alpha"], r["beta"], r["gamma"], r["seed"], r["budget"])
            if key in seen:
                raise UserError(f"{path} repeats {trials.candidate_name(r)}, seed {r['seed']}, at {r['budget']}x "
                                f"(already from {seen[key]}): pool studies of one mode with different seeds")
            seen[key] = path
            base[path] = r["budget_steps"] / r["budget"]
            rows.append(r)
    tags = {(r["budget"], r["trial_id"].partition(f"-n{r['budget_steps']}")[2]) for r in rows}  # the mode's tag
    if len(tags) > len({b for b, _ in tags}):
        raise UserError("the files' trials are of different rung modes (trial ids end in "
                        + ", ".join(sorted({repr(t) for _, t in tags})) + "): pool studies of one mode")
    if len(set(base.values())) > 1:
        raise UserError("the files' budgets are not the same steps: "
                        + ", ".join(f"{p}: {s:g} steps per budget" for p, s in base.items()))
    return rows, round(next(iter(base.values())))


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="fidelity.csv files of studies on the same candidates and budgets")
    p.add_argument("--metric", default="val_top1")
    p.add_argument("--out", default=None, help="also write the pooled analysis as JSON here")
    args = p.parse_args(argv)
    rows, base_steps = pool(args.csv)
    dataset = next((r["dataset"] for r in rows if r.get("dataset")), "digits")
    out = {**fidelity.analyse(rows, args.metric, dataset), "base_steps": base_steps}
    print(f"{len(rows)} trials from {len(args.csv)} files, seeds {sorted({r['seed'] for r in rows})}")
    print(fidelity.format_agreement(out))
    if args.out:
        report.write_json(args.out, {**fidelity.analysis_json(out, args.metric), "sources": list(args.csv),
                                     "created": report.now()})
    return json.loads(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
