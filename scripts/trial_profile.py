"""Where a grid-search trial's time goes: the default search's trials of one candidate, in one process as a
local worker runs them, each with the trainer's per-phase ``timings`` (result.json).

    python scripts/trial_profile.py --workdir /tmp/tp --compile_cache /tmp/tp-cache   # empty cache: cold

Runs rung 0 (40 steps, seed 0), then rung 1 continuing it (to 120 steps) and rung 1 with seed 1 (120 steps from
scratch): the first compiles the network, the other two reuse the program this process compiled (one
``programs.Programs`` for the three, as a worker keeps: ``program_cache`` "hit"). Prints one JSON record per
trial; numbers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from effnet_jax import compile_cache  # noqa: E402
from effnet_jax.errors import UserError, exit_on_user_error  # noqa: E402
from effnet_jax.training import programs, trainer  # noqa: E402
from experiments import trials  # noqa: E402
from experiments.configs import grid_search  # noqa: E402


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="trial directories go here (must not hold finished trials)")
    p.add_argument("--compile_cache", default="", help="persistent compilation cache ('' = none)")
    p.add_argument("--alpha", type=float, default=1.2)
    p.add_argument("--beta", type=float, default=1.1)
    p.add_argument("--gamma", type=float, default=1.15)
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.workdir, "s0", "result.json")):
        raise UserError(f"{args.workdir} already holds this profile's trials; use an empty --workdir")
    if args.compile_cache:
        compile_cache.enable(args.compile_cache)
    config = grid_search.get_config()
    cand = trials.Candidate(args.alpha, args.beta, args.gamma)
    out, worker = [], programs.Programs()
    for seed, steps in ((0, 40), (0, 120), (1, 120)):
        cfg = trials.trial_config(config.train, cand, config.search.phi, seed=seed, steps=steps, schedule_steps=120)
        t0 = time.perf_counter()
        r = trainer.train_and_evaluate(cfg, os.path.join(args.workdir, f"s{seed}"), programs=worker)
        record = {"seed": seed, "steps": steps, "wall_s": round(time.perf_counter() - t0, 2),
                  "first_step_s": round(r["compile_s"], 2), "val_top1": r["val_top1"],
                  "params_sha256": r["params_sha256"][:16], "load": os.getloadavg()[0], **r["timings"]}
        print(json.dumps(record), flush=True)
        out.append(record)
    return out


if __name__ == "__main__":
    main()
