"""Scale the winning constants to phi = 1, 2, ... and (optionally) train the models.

    python -m experiments.scale_up --constants=runs/grid/best.json --phi=1,2,3
    python -m experiments.scale_up --constants=runs/grid/best.json --phi=1,2 --train --workdir=runs/scaled
    python -m experiments.scale_up --constants=runs/grid/best.json --train --config.num_epochs=30
    python -m experiments.scale_up --constants=runs/grid/best.json --phi=1,2 --latency   # measured here

The search's best.json holds its whole config: the models are built and trained with the
search's own trainer config (dataset, class count, base resolution, recipe), any field of
which ``--config.<field>=<value>`` overrides. Trained models go through the one trainer,
one workdir per phi (resumable).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from effnet_jax import cli, size_table
from effnet_jax.errors import UserError, exit_on_user_error, one_line
from effnet_jax.model import scaling
from experiments import report, trials
from experiments.trials import Candidate


def read_best(path: str) -> tuple[dict[str, float], dict[str, Any]]:
    """(constants, the whole best.json) of a grid search; best.json is read here, once."""
    return scaling.read_constants_file(path)


def search_train_config(best: dict[str, Any]) -> ml_collections.ConfigDict:
    """The trainer config the search used (best.json's config.train); refuses a best.json without one."""
    train_cfg = (best.get("config") or {}).get("train")
    if not isinstance(train_cfg, dict):
        raise UserError("this best.json holds no search config: rerun the search, or train with "
                        "python -m effnet_jax.train --config.model.constants=best.json")
    from experiments.configs import grid_search as grid_config

    cfg = grid_config.get_config().train  # every field the trainer reads, then the search's values
    _update(cfg, train_cfg)
    return cfg


def _update(cfg: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), ml_collections.ConfigDict):
            _update(cfg[k], v)
        else:
            cfg[k] = tuple(v) if isinstance(v, list) else v


def scale_up(constants_path: str, phis: Sequence[float], workdir: str | None = None,
             overrides: ml_collections.ConfigDict | None = None,
             best: tuple[dict[str, float], dict[str, Any]] | None = None, measure: bool = False
             ) -> list[dict[str, Any]]:
    """Print params/MACs of each phi model (the search's network, dataset classes, base resolution), with
    ``measure`` their train-step and inference time on this device over unscaled B0's; train them into
    ``workdir`` when given."""
    from effnet_jax.training import recipe, trainer

    constants, best = best or read_best(constants_path)
    chosen = Candidate(constants["alpha"], constants["beta"], constants["gamma"])
    train_config = overrides if overrides is not None else search_train_config(best)
    num_classes = int(best.get("num_classes") or 0)
    if not num_classes or (overrides is not None and train_config.data.name != best["config"]["train"]["data"]["name"]):
        num_classes = recipe.prepare(trials.trial_config(train_config, chosen, 0.0)).source.num_classes
    m = train_config.model
    rows, base_macs = [], None
    for phi in [0.0, *phis]:
        row = {"name": f"{m.network} phi={phi:g}", "phi": phi, **trials.figures(train_config, chosen, phi, num_classes)}
        base_macs = base_macs or row["macs"]
        row["macs_ratio"] = row["macs"] / base_macs
        row["predicted_ratio"] = chosen.product**phi
        if phi in phis:
            rows.append(row)
    print(f"scaling alpha={constants['alpha']} beta={constants['beta']} gamma={constants['gamma']} "
          f"from {m.base_resolution} px, {num_classes} classes ({train_config.data.name}):")
    print(size_table.format_table(rows))
    if measure:
        print_latency(train_config, chosen, phis, num_classes)
    if workdir is None:
        return rows
    for row in rows:
        result = trainer.train_and_evaluate(trials.trial_config(train_config, chosen, row["phi"]),
                                          os.path.join(workdir, f"phi{row['phi']:g}"))
        row.update({k: result.get(k) for k in ("status", "val_top1", "ema_val_top1", "wall_time_s", "num_classes")})
        print(trainer.summary_line(result), flush=True)
    return rows


def print_latency(train_config: ml_collections.ConfigDict, chosen: Candidate, phis: Sequence[float],
                  num_classes: int) -> dict[str, dict[str, dict[str, float]]]:
    """Each phi model's measured train-step and inference time over unscaled B0's, on the device at hand."""
    from effnet_jax.training import latency

    configs = {f"{phi:g}": trials.trial_config(train_config, chosen, phi) for phi in [0.0, *phis]}
    out = latency.measure(configs, num_classes, "0")
    print(f"measured on {latency.device_key()} (batch {train_config.batch_size}; median of interleaved rounds, "
          "relative interquartile range):")
    for phi in phis:
        costs = out[f"{phi:g}"]
        print(f"  phi={phi:g}: " + ", ".join(f"{kind} {c['ratio']:.2f}x B0 (±{c['spread']:.0%}, "
                                             f"{c['seconds'] * 1e3:.1f} ms/step)" for kind, c in costs.items()))
    return out


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    from absl import flags
    from ml_collections import config_flags

    argv = cli.last_override_wins(list(sys.argv if argv is None else argv))
    constants = next((a.split("=", 1)[1] for a in argv if a.startswith("--constants=")), None)
    fv = flags.FlagValues()
    flags.DEFINE_string("constants", None, "best.json from the grid search", flag_values=fv)
    flags.DEFINE_string("phi", "1,2,3", "comma-separated phi values", flag_values=fv)
    flags.DEFINE_bool("train", False, "train each model with the search's trainer config", flag_values=fv)
    flags.DEFINE_bool("latency", False, "measure each model's train-step and inference time on this device "
                      "against unscaled B0 (compiles each)", flag_values=fv)
    flags.DEFINE_string("workdir", "runs/scale_up", "where trained models go (one folder per phi)", flag_values=fv)
    best_cfg, best = None, None
    if constants:
        best = read_best(constants)
        best_cfg = search_train_config(best[1])
        try:
            config_flags.DEFINE_config_dict("config", best_cfg, "the search's trainer config; override any field "
                                            "with --config.<field>=<value>", flag_values=fv, sys_argv=argv)
        except (AttributeError, KeyError, ValueError, TypeError) as e:  # an override naming no field
            problems = [p for p in map(lambda path: cli.field_problem(best_cfg, path), cli.config_overrides(argv)) if p]
            raise UserError(problems[0] if problems else one_line(e)) from None
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print("usage: python -m experiments.scale_up --constants=best.json [--phi=1,2,3] [--train] "
              "[--config.<field>=<value> ...]\n")
        print(fv.get_help())
        raise SystemExit(0)
    try:
        fv(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        raise UserError(str(e).strip().split("\n")[0]) from None
    if not fv.constants:
        raise UserError("--constants=best.json is required")
    phis = report.parse_floats(fv.phi, "--phi")
    if not phis:  # "--phi=": nothing to scale to, which would print an empty table and exit 0
        raise UserError(f"--phi takes one or more comma-separated phi values (1,2,3), got {fv.phi!r}")
    overridden = any(a.startswith("--config.") for a in argv[1:])
    best = best or read_best(fv.constants)  # --constants=X was read above; --constants X only now
    if fv.train or fv.latency:  # --config.* edits the config; no --config flag exists without "=": the search's
        cli.enable_compile_cache((fv.config if constants else search_train_config(best[1])).compile_cache_dir)
    rows = scale_up(fv.constants, phis, fv.workdir if fv.train else None, fv.config if overridden else None, best,
                    measure=fv.latency)
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
