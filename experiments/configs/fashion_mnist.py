"""The research preset: the grid search on real data, Fashion-MNIST from Debian's package, offline.

    apt-get install dataset-fashion-mnist                                  # IDX files, once
    python -m experiments.grid_search --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist

Sized for <= 90 minutes on a 2-core CPU by estimate, not yet by a timed run: from the default
search's measured cost (a phi = 1 step of batch 16 at 32 px is ~0.4 s per worker, a network
compiles in ~45 s) this plan is ~9,500 steps of batch 32 over two workers. The data: a
6,000-image stratified training subset (600 per class), 2,000 held-out validation images from the
rest of train (binomial error ±0.8 points at 85%, against ±2 on digits' 360), 32 px (B0's minimum
for its stride of 32; Fashion-MNIST is 28 px). Rung 0 is one epoch of the subset (187 steps of
batch 32); the best third of the grid and both references continue to 3 epochs with three
seeds, so the winner is decided at the largest budget with an interval.
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
