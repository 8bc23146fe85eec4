"""python -m experiments.scaling_study --config=experiments/configs/scaling_study.py:fashion_mnist

Result (2-core AMD EPYC, 2026-12-03, before the dropout fix: to be remeasured): on Fashion-MNIST no family is
separated from another at 2x MACs; on digits compound is below resolution-only at 2x (p = 0.016)
(docs/results/scaling-study.md).

The scaling study: compound vs single-axis scaling at matched MACs, from B0.

    python -m experiments.scaling_study                                   # digits at 32 px, 2-core CPU
    python -m experiments.scaling_study --config.study.constants=runs/grid/best.json \
        --config.study.budgets='(1, 2, 4, 8)' --config.train.num_train_steps=1000

``train`` is a grid-search trial config (experiments/configs/grid_search.py, or the research
preset experiments/configs/fashion_mnist.py after the colon), so every model here is trained
exactly as a grid-search trial. The digits default trains each model as long as the grid
search's deciding rung (120 steps of batch 16): (1 + 4 families x 2 budgets) x 2 seeds = 18 trials.

``fashion_mnist`` trains long enough for unscaled B0 to pass 0.85 val top-1 (900 steps of batch
32 on a 12,000-image subset, 2.4 epochs) at one budget, 2x MACs: 5 models x 2 seeds. Its base
resolution is the preset's 40 px, where compound at the paper's constants lands on 2.00x the
baseline's MACs (at 32 px rounding puts it at 1.50x); resolution-only lands on 1.52x there (62-64 px;
65 px jumps to 2.50x): the table shows what each model really costs.
"""

import ml_collections

from experiments.configs import fashion_mnist, grid_search


def get_config(data: str = "digits") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    if data == "fashion_mnist":
        c.train = fashion_mnist.get_config().train
        c.train.data.train_subset = 12000
        c.train.num_train_steps = 900
        budgets = (2.0,)
    elif data == "digits":
        c.train = grid_search.get_config().train
        c.train.num_train_steps = 120  # the grid search's top rung (40 x halving_eta 3)
        budgets = (2.0, 4.0)
    else:
        raise ValueError(f"unknown scaling-study preset {data!r}: digits or fashion_mnist")

    c.study = s = ml_collections.ConfigDict()
    s.budgets = (1.0, *budgets)  # target MACs as multiples of unscaled B0 at the base resolution
    s.seeds = (0, 1)  # every model is trained once per seed; mean +- std over seeds
    s.families = ("width", "depth", "resolution", "compound")
    s.constants = ""  # compound family's alpha/beta/gamma: a best.json path, "" = the paper's 1.2/1.1/1.15
    # |achieved MACs / target - 1| allowed. 0.3, not 0.15, because of rounding at 32 px: any
    # larger input turns B0's last 1x1 feature map into 2x2 (resolution-only jumps from 1x to
    # 2.41x), and any phi > 0 adds a block to every stage (ceil), so compound jumps from 1x to
    # 1.50x and then, once the input grows to 33 px, to 3.71x. Achieved ratios are reported.
    s.tolerance = 0.3
    # "macs": every family matched to the budgets in MACs; "latency": in measured time on this device (the train
    # step, or inference: latency_kind; median of latency_rounds rounds interleaved with B0, a few networks
    # compiled per family and budget, kept in the study: workers and reruns plan the same models)
    s.match = "macs"
    s.latency_kind = "train"
    s.latency_rounds = 5
    s.metric = "val_top1"  # what is compared ("ema_val_top1" also works)
    return c
