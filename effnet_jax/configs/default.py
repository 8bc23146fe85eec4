"""Every field the trainer reads, with the paper's ImageNet recipe as defaults.

Other configs start from this one and change what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = m = ml_collections.ConfigDict()
    m.network = "b0"  # the block table (effnet_jax.model.arch.NETWORKS) the scaling applies to
    m.name = "b0"  # "b0".."b8", "l2", or "formula" (alpha/beta/gamma or constants + phi)
    m.constants = ""  # path to a JSON file with alpha, beta, gamma (e.g. a grid search's best.json)
    m.alpha = 1.2  # used when name == "formula" and no constants file is given
    m.beta = 1.1
    m.gamma = 1.15
    m.phi = 1.0
    m.base_resolution = 224  # resolution at phi = 0 (formula mode)
    m.resolution_multiple = 8
    m.resolution = 0  # > 0 overrides the spec's resolution
    m.dropout = -1.0  # < 0: the spec's
    m.drop_path_rate = 0.2  # stochastic depth at the last block, linear in block index
    m.bn_momentum = 0.99  # running-statistics decay; short runs (a few hundred steps) need ~0.9
    # "auto" (= "fast"): the speed tricks (fast_layers.py, ops.py: hand-written BatchNorm backward, 1x1 convs
    # as matrix products, shifted depthwise taps, the optimizer over flat vectors); "reference": plain
    # nnx.BatchNorm / nnx.Conv and per-leaf optax. Same parameters, numbers equal up to float rounding.
    m.kernels = "auto"
    # Each stage's repeated blocks (same shapes) as one scan, compiled once instead of once per block;
    # the train state, weight files and checkpoints are the same either way (model.py).
    m.scan_blocks = False
    m.depthwise_impl = "auto"  # fast kernels only: "auto" (per backend), "xla", "shift" or "hybrid" (ops.py)
    # Classifier kernel: "paper" (uniform +-1/sqrt(num_classes)), "zero", or a scale s as a string
    # ("0.1": uniform +-s/sqrt(num_classes)). The paper's range is sized for 1000 classes.
    m.head_init = "paper"
    m.dtype = "auto"  # "auto": bfloat16 on GPU/TPU, float32 on CPU
    m.init_from = ""  # our safetensors checkpoint (scripts/convert_timm.py) to start from

    c.data = d = ml_collections.ConfigDict()
    # "digits" (embedded), "fashion_mnist" (Debian's dataset-fashion-mnist), "idx:/dir" (MNIST-format IDX
    # files), any tfds image dataset, or "folder:/path/root"
    d.name = "imagenet2012"
    d.data_dir = ""  # tfds data_dir ("" = tfds default)
    d.train_split = "train"
    d.eval_split = "validation"
    d.holdout_fraction = 0.0  # > 0: carve the eval split from the end of train (datasets without validation)
    d.augment = True  # inception crop + flip (image datasets), random shift (digits)
    d.randaugment_layers = 0  # 2 in the paper's RandAugment setting
    d.randaugment_magnitude = 10
    d.max_shift_fraction = 0.0  # digits: random translation as a fraction of the resolution
    d.shuffle_buffer = 16_384
    d.train_subset = 0  # > 0: train on the first N examples of the (fixed, stratified) training part (idx sources)
    d.num_classes = 0  # idx sources: 0 = infer (10 for fashion_mnist, else the largest train label + 1)

    c.batch_size = 256  # global, over all devices and hosts
    c.num_epochs = 350.0
    c.num_train_steps = 0  # > 0 overrides num_epochs
    # > 0: the learning-rate schedule spans this many steps, whatever num_train_steps is, so a
    # longer run continues a shorter one exactly (and may resume its workdir); 0: the run's own length.
    c.schedule_steps = 0

    c.optimizer = o = ml_collections.ConfigDict()
    o.name = "rmsprop"  # TF-style RMSProp (official), "sgd" (momentum) or "adamw"
    o.learning_rate = 0.016  # per 256 images, scaled linearly with batch_size
    o.schedule = "exponential"  # "exponential" (staircase), "cosine", "constant" or "wsd" (warmup-stable-decay)
    # wsd: constant after the warmup, then linear to zero over this fraction of the run; the state where the
    # decay starts is kept (stable_checkpoints/), and a longer wsd run in the same workdir continues from it
    o.cooldown_fraction = 0.2
    o.warmup_epochs = 5.0
    o.decay_rate = 0.97
    o.decay_epochs = 2.4
    o.momentum = 0.9
    o.rms_decay = 0.9
    o.epsilon = 1e-3
    o.weight_decay = 1e-5  # L2 on conv/dense weights, not BatchNorm
    o.label_smoothing = 0.1
    o.ema_decay = 0.9999  # 0 disables the EMA of weights
    o.grad_clip_norm = 0.0  # 0: no clipping

    c.log_every_steps = 100
    c.eval_every_steps = 0  # 0: once per epoch
    c.eval_ema = True  # also evaluate the EMA weights (ema_val_*); a search ranking on val_* skips them
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 2
    # At the end: weights.safetensors (and ema_weights.safetensors) in our weight format, for
    # pretrained.load_weights, --config.model.init_from, or scripts/convert_timm.py's reverse.
    c.save_weights = True
    c.progress_bar = True
    c.compile_cache_dir = "~/.cache/effnet_jax/xla"  # jax persistent compilation cache; "" disables
    return c
