"""python -m experiments.grid_search

Result: 21 trials in 362 s cold, 230 s warm (2-core Xeon, 2026-12-07); the contender set is all four
phi = 1 finalists, within seed noise: a smoke test, not an answer (docs/results/digits-default.md).

The grid search's default: B0 on the embedded digits, sized for a laptop CPU. A variant:

    python -m experiments.grid_search --config.search.strategy=exhaustive \
        --config.train.data.name=cifar10 --config.train.model.base_resolution=64

``train`` is a full trainer config (effnet_jax/configs/digits.py); every trial is
that config with the model replaced by B0 scaled by a candidate at phi = 1. Its budget
is rung 0's; with halving, rung r trains halving_eta**r times longer.
"""

import ml_collections

from effnet_jax.configs import digits


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train = digits.get_config()
    c.train.model.resolution = 0  # each trial: base_resolution * gamma (rounded to resolution_multiple)
    c.train.model.base_resolution = 32
    c.train.model.resolution_multiple = 1  # at 32 px, multiples of 8 would merge most gamma values
    # The short-budget trial recipe (docs/trial-recipe.md has the measurements that chose it): the
    # classifier's init range shrunk 30x (the paper's +-1/sqrt(classes) is sized for 1000 classes; at 10
    # the first loss is ~10) and no random shift; unscaled B0 then passes 0.80 val top-1 by step 120.
    c.train.model.head_init = "0.03"
    c.train.data.max_shift_fraction = 0.0
    c.train.batch_size = 16
    c.train.num_train_steps = 40  # rung 0's budget; the top rung (halving_eta = 3) trains 120
    c.train.optimizer.warmup_epochs = 0.25
    c.train.log_every_steps = 10
    c.train.checkpoint_every_steps = 100  # what a killed trial can lose, against the time every save takes
    c.train.eval_every_steps = 10**9  # evaluate once, at the end of the trial
    c.train.progress_bar = False
    c.train.save_weights = False  # a trial's weights are not what a search is for (35 MB each at phi = 1)

    c.search = s = ml_collections.ConfigDict()
    s.alpha = (1.1, 1.3)  # inclusive ranges, on a grid of `step`
    s.beta = (1.0, 1.25)
    s.gamma = (1.0, 1.25)
    s.step = 0.05
    s.target = 2.0  # alpha * beta**2 * gamma**2, the FLOPs multiplier at phi = 1
    s.tolerance = 0.02  # keep |product - target| <= tolerance: 9 grid points with the ranges above
    s.phi = 1.0
    # One of experiments.constraints.CONSTRAINTS (each class's docstring says what it admits); "formula" is the
    # paper's rule above. The others constrain the *rounded* network (at small resolutions rounding makes its MACs
    # disagree with the product: 4-6x instead of 2x at 32 px), and points that round to one network train once.
    s.constraint = "formula"
    s.macs_tolerance = 0.05  # real MACs over unscaled B0's within this (relative) of target**phi
    # Measured time over unscaled B0's (train step or inference: latency_kind) within latency_tolerance (relative)
    # of target**phi; only the networks whose MACs lie within latency_window of that goal are compiled and timed
    # (median of latency_rounds interleaved rounds), once per device kind, kept in the study.
    # measure_latency: measure (and show) those costs with any constraint.
    s.latency_kind = "train"
    s.latency_tolerance = 0.1
    s.latency_window = 0.5
    s.latency_rounds = 5
    s.measure_latency = False
    s.include_paper = True  # (1.2, 1.1, 1.15), labelled "paper"; always goes on to the top rung
    s.include_baseline = True  # unscaled B0 (phi = 0), labelled "baseline"; always goes on to the top rung
    s.sampler = "grid"  # one of experiments.strategies.PROPOSERS; "grid", every admitted point, is the paper's method
    s.n_trials = 12  # proposals of a sampler that proposes on the surface (rung 0); the best 1/eta of them go on
    s.strategy = "halving"  # one of experiments.strategies.SCHEDULES; "halving": successive halving in sync rungs
    s.halving_eta = 3  # keep the best 1/eta (rounded up) of the grid points per rung, train them eta times longer
    s.halving_rungs = 2
    s.keep = 0  # grid points past each cut (0: the best 1/eta, rounded up); a time-budget plan sets it
    # How a rung below the top is scored: one of experiments.strategies.RUNG_MODES (each class's docstring says
    # how). "continued": every rung's schedule spans the top rung, and a promoted run continues the checkpoint.
    s.rung_mode = "continued"
    s.cooldown_fraction = 0.2  # the share of a rung's steps its cooldown decays over (rung_mode = "cooldown")
    s.seeds = (0,)  # seeds of every rung below the top
    s.final_seeds = (0, 1)  # seeds of the top rung (the one that decides); () = the same as `seeds`
    # Racing: at the top rung, one more seed at a time for the leader and every candidate still tied with it,
    # up to max_seeds each, until none is (0: the top rung's seeds only, no racing)
    s.max_seeds = 0
    s.metric = "val_top1"  # what picks the winner: one of experiments.trials.METRICS
    # One of experiments.stats.TESTS; "pooled": seed noise estimated once over every candidate at the deciding rung
    # (two-way candidate + seed model, comparisons paired by seed; experiments/stats.py)
    s.test = "pooled"
    # Trials whose baseline, or every candidate, is not above chance (the validation split's majority class) did
    # not learn: best.json is then marked "answer": false (scale_up refuses it) and, with require_learning, the
    # search exits 2 with one error line; False (a run that only exercises the machinery) says so and exits 0.
    s.require_learning = True
    s.alpha_level = 0.05  # the test's level for "tied with best" / "below" (the contender set) and for chance
    # A time budget ("30m", "2h"; wall clock here with these workers; "" = the fixed plan above): the search probes
    # B0 and a few spread candidates at a ladder of budgets (at most a quarter of the time), plans budgets, seeds,
    # cut and racing for the highest predicted power that fits the rest (experiments/planned.py, planner.py), and
    # stops starting trials at the deadline. A plan whose power is below min_power is refused right after the
    # probe (exit 2, best.json "answer": false) unless accept_underpowered.
    s.time_budget = ""
    s.min_power = 0.5
    s.accept_underpowered = False
    return c
