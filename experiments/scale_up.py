"""Scale the winning constants to phi = 1, 2, ... and (optionally) train the models.

    python -m experiments.scale_up --constants=runs/grid/best.json --phi=1,2,3
    python -m experiments.scale_up --constants=runs/grid/best.json --phi=1,2 --train --workdir=runs/scaled

Resolutions grow from the training config's ``model.base_resolution``. Trained
models go through the one trainer, one workdir per phi (resumable).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from effnet_jax import summary as summary_mod
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.scaling import load_constants


def scale_up(constants_path: str, phis: Sequence[float], train_config: ml_collections.ConfigDict,
             workdir: str | None = None) -> list[dict[str, Any]]:
    """Print params/MACs of each phi model; train them into ``workdir`` when given."""
    constants = load_constants(constants_path)
    m = train_config.model
    rows = summary_mod.formula_rows(constants, phis, m.base_resolution, m.resolution_multiple,
                                    _num_classes(train_config))
    print(f"scaling alpha={constants['alpha']} beta={constants['beta']} gamma={constants['gamma']} "
          f"from {m.base_resolution} px:")
    print(summary_mod.format_table(rows))
    if workdir is None:
        return rows
    from effnet_jax import train

    for row in rows:
        cfg = ml_collections.ConfigDict(train_config.to_dict())
        cfg.model.name, cfg.model.constants, cfg.model.phi, cfg.model.resolution = (
            "formula", os.path.abspath(constants_path), float(row["phi"]), 0)
        result = train.train_and_evaluate(cfg, os.path.join(workdir, f"phi{row['phi']:g}"))
        row.update({k: result.get(k) for k in ("status", "val_top1", "ema_val_top1", "wall_time_s")})
        print(train.summary_line(result), flush=True)
    return rows


def _num_classes(cfg: ml_collections.ConfigDict) -> int:
    return 10 if cfg.data.name == "digits" else 1000


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    from experiments.configs import grid_search as grid_config

    p = argparse.ArgumentParser(prog="python -m experiments.scale_up", description=__doc__.split("\n")[0])
    p.error = lambda message: (_ for _ in ()).throw(UserError(message))  # one line, exit 2
    p.add_argument("--constants", required=True, help="best.json from the grid search")
    p.add_argument("--phi", default="1,2,3")
    p.add_argument("--train", action="store_true", help="train each model with the grid search's trial config")
    p.add_argument("--workdir", default="runs/scale_up")
    args = p.parse_args(argv)
    try:
        phis = [float(x) for x in args.phi.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--phi takes comma-separated numbers, got {args.phi!r}") from None
    scale_up(args.constants, phis, grid_config.get_config().train, args.workdir if args.train else None)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
