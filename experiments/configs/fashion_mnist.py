"""The research preset: the grid search on real data, Fashion-MNIST from Debian's package, offline.

    apt-get install dataset-fashion-mnist                                  # IDX files, once
    python -m experiments.grid_search --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist

Sized for <= 90 minutes on a 2-core CPU (estimated from the per-step cost of the default search;
the full run has not been timed yet): a 6,000-image stratified training subset (600 per class),
2,000 held-out validation images from the rest of train (binomial error ±0.8 points at 85%, a
quarter of digits' 360), 32 px (B0's minimum for its stride of 32, and Fashion-MNIST's native 28
px upsampled a little), rung 0 at one epoch (375 steps of batch 16 would be 2x the cost; batch
32: 187 steps), the best third of the grid plus the two references continued to 3 epochs with
three seeds, so the winner is decided at the largest budget with an interval.
"""

import ml_collections

from experiments.configs import grid_search


def get_config() -> ml_collections.ConfigDict:
    c = grid_search.get_config()
    t = c.train
    t.data.name = "fashion_mnist"  # idx:/usr/share/datasets/fashion-mnist
    t.data.train_split, t.data.eval_split = "train", "validation"
    t.data.holdout_fraction = 2000 / 60000
    t.data.train_subset = 6000
    t.data.max_shift_fraction = 0.0
    t.batch_size = 32
    t.num_train_steps = 187  # rung 0: one epoch of the subset; the top rung trains 3x
    t.optimizer.learning_rate = 0.04  # per 256 images (0.005 at batch 32), as the digits recipe
    c.search.final_seeds = (0, 1, 2)
    return c
