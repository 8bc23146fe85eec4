"""Print width, depth, resolution, parameters and MACs of scaled EfficientNets.

    python -m effnet_jax.size_table b0 b3 b7
    python -m effnet_jax.size_table --alpha 1.2 --beta 1.1 --gamma 1.15 --phi 0,1,2,3
    python -m effnet_jax.size_table --constants runs/grid/best.json --phi 1,2 --json

For formula-scaled models it also prints how MACs grew against phi = 0 next to
the paper's prediction (alpha * beta**2 * gamma**2) ** phi.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.model.cost import figures
from effnet_jax.model.scaling import (
    OFFICIAL,
    ScalingSpec,
    build_architecture,
    check_constants,
    from_constants,
    load_constants,
    resolve,
)


def describe(spec: str | ScalingSpec, num_classes: int = 1000) -> dict[str, Any]:
    """Scaling coefficients, rounded depth/width and cost of one model."""
    spec = resolve(spec)
    arch = build_architecture(spec)
    return {"name": spec.name, **figures(spec, arch, num_classes), "head_channels": arch.head_channels}


def formula_rows(constants: dict[str, float], phis: Sequence[float], base_resolution: int,
                 resolution_multiple: int, num_classes: int) -> list[dict[str, Any]]:
    """describe() for each phi, plus measured and predicted MAC growth over phi = 0."""
    c = check_constants(constants)
    base = describe(from_constants(**c, phi=0, base_resolution=base_resolution,
                                   resolution_multiple=resolution_multiple), num_classes)
    product = c["alpha"] * c["beta"] ** 2 * c["gamma"] ** 2
    rows = []
    for phi in phis:
        spec = from_constants(**c, phi=phi, base_resolution=base_resolution,
                              resolution_multiple=resolution_multiple)
        row = describe(spec, num_classes)
        row["phi"] = phi
        row["macs_ratio"] = row["macs"] / base["macs"]
        row["predicted_ratio"] = product**phi
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of describe() rows."""
    growth = any("macs_ratio" in r for r in rows)
    header = f"{'name':<26} {'width':>6} {'depth':>6} {'res':>5} {'blocks':>6} {'params':>13} {'GMACs':>8}"
    if growth:
        header += f" {'MACs/phi0':>10} {'(ab2g2)^phi':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r['name']:<26} {r['width']:>6.3f} {r['depth']:>6.3f} {r['resolution']:>5d} "
                f"{r['blocks']:>6d} {r['params']:>13,d} {r['macs'] / 1e9:>8.3f}")
        if growth:
            line += f" {r['macs_ratio']:>10.3f} {r['predicted_ratio']:>12.3f}"
        lines.append(line)
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(message)


def _phis(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--phi takes comma-separated numbers, got {text!r}") from None


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    p = _Parser(prog="python -m effnet_jax.size_table", description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", help=f"official names: {', '.join(OFFICIAL)}")
    p.add_argument("--alpha", type=float)
    p.add_argument("--beta", type=float)
    p.add_argument("--gamma", type=float)
    p.add_argument("--constants", help="JSON file with alpha, beta, gamma (e.g. best.json)")
    p.add_argument("--phi", default="0,1,2,3,4,5,6,7", help="comma-separated phi values")
    p.add_argument("--base_resolution", type=int, default=224)
    p.add_argument("--resolution_multiple", type=int, default=8)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    args = p.parse_args(argv)

    rows = [describe(m, args.num_classes) for m in args.models]
    given = {k: getattr(args, k) for k in ("alpha", "beta", "gamma") if getattr(args, k) is not None}
    if args.constants:
        rows += formula_rows(load_constants(args.constants), _phis(args.phi), args.base_resolution,
                             args.resolution_multiple, args.num_classes)
    elif given:
        if len(given) != 3:
            raise UserError("--alpha, --beta and --gamma go together")
        rows += formula_rows(given, _phis(args.phi), args.base_resolution,
                             args.resolution_multiple, args.num_classes)
    if not rows:
        rows = [describe(m, args.num_classes) for m in OFFICIAL]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
