"""What a config asks the trainer to do, validated: the train state, the optimizer and its learning-rate
schedule, the pure train and eval steps, and ``prepare`` (every check of a config, before anything is built).

Pure functions of the config: no compiled programs (``programs``), no workdir (``checkpoints``), no loop
(``trainer``). Both ``programs.compile_ahead`` and ``trainer.train_and_evaluate`` start from ``prepare``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from effnet_jax.configs import to_steps
from effnet_jax.data import input_pipeline, sources
from effnet_jax.errors import UserError
from effnet_jax.model import scaling
from effnet_jax.model.efficientnet import DROPOUT_STREAM, layers_for
from effnet_jax.model.layers import KERNELS, Layers, head_init_fn

if TYPE_CHECKING:
    from effnet_jax.training.flat_state import FlatPacking
    from effnet_jax.training.tree_state import TreePacking

@flax.struct.dataclass
class Weights:
    """A model at one moment, in its packing's form: parameters and BatchNorm statistics."""

    params: Any
    stats: Any


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a checkpoint saves exactly this."""

    step: jax.Array
    weights: Weights
    opt: Any  # the optimizer's state
    dropout_key: jax.Array  # state, not a compiled constant: trials differing only in seed share one program
    ema: Weights | None = None  # exponential moving average of ``weights`` (optimizer.ema_decay > 0)


EvalStep = Callable[[Weights, dict[str, jax.Array]], dict[str, jax.Array]]

def model_layers(config: ml_collections.ConfigDict) -> Layers:
    """The layer set ``model.kernels`` (and ``model.depthwise_impl``, ``model.bn_momentum``) asks for."""
    m = config.model
    kernels = m.get("kernels", "auto")
    if kernels not in KERNELS:
        raise UserError(f"model.kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    try:
        return layers_for(kernels, depthwise_impl=m.depthwise_impl, bn_momentum=m.bn_momentum)
    except ValueError as e:
        raise UserError(f"model.{e}") from None


def state_packing(kernels: str) -> type[FlatPacking] | type[TreePacking]:
    """How the train state holds the model: flat vectors for the fast kernels, one array per variable
    for the reference ones (imported here, so that a reference run never loads flat_state)."""
    if kernels == "reference":
        from effnet_jax.training.tree_state import TreePacking

        return TreePacking
    from effnet_jax.training.flat_state import FlatPacking

    return FlatPacking



# ------------------------------------------------------------------------- optimizer

SCHEDULES = ("exponential", "cosine", "constant", "wsd")
OPTIMIZERS = ("rmsprop", "sgd", "adamw")


def cooldown_steps(o: ml_collections.ConfigDict, span: int) -> int:
    """Steps of a ``wsd`` schedule's final decay: ``optimizer.cooldown_fraction`` of the span, at least one."""
    return max(1, round(float(o.get("cooldown_fraction", 0.2)) * span))


def learning_rate_schedule(o: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """Linear warmup, then staircase exponential decay (the paper), cosine, constant, or ``wsd``
    (warmup-stable-decay: constant, then linear to zero over the last ``cooldown_fraction`` of the
    span; every wsd run of one config shares its constant phase, whatever its length). ``prepare``
    has checked the name."""
    peak = o.learning_rate * batch_size / 256
    warmup = to_steps(0, o.warmup_epochs, steps_per_epoch, math.floor)
    if o.schedule == "wsd":
        cool = cooldown_steps(o, total_steps)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
                                     optax.linear_schedule(peak, 0.0, cool)], [warmup, total_steps - cool])
    if o.schedule == "exponential":
        return optax.warmup_exponential_decay_schedule(
            0.0, peak, warmup, max(1, to_steps(0, o.decay_epochs, steps_per_epoch, math.floor)), o.decay_rate,
            staircase=True)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    raise ValueError(f"unknown optimizer.schedule {o.schedule!r}")


def make_optimizer(o: ml_collections.ConfigDict, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
    """optax chain for the configured optimizer (``prepare`` has checked the name); L2 decay enters as
    a gradient term where ``mask`` (the state packing's ``weight_decay_mask``) says."""
    parts = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
    if o.name == "rmsprop":  # TensorFlow's: eps inside the sqrt, accumulator starts at 1
        parts += [optax.add_decayed_weights(o.weight_decay, mask),
                  optax.rmsprop(schedule, decay=o.rms_decay, eps=o.epsilon, initial_scale=1.0,
                                eps_in_sqrt=True, momentum=o.momentum)]
    elif o.name == "sgd":
        parts += [optax.add_decayed_weights(o.weight_decay, mask),
                  optax.sgd(schedule, momentum=o.momentum, nesterov=True)]
    elif o.name == "adamw":
        parts += [optax.adamw(schedule, weight_decay=o.weight_decay, mask=mask)]
    else:
        raise ValueError(f"unknown optimizer.name {o.name!r}")
    return optax.chain(*parts)



# --------------------------------------------------------------------------- steps

def make_train_step(packing: FlatPacking | TreePacking, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict, num_classes: int) -> Callable:
    """The pure train step over (TrainState, batch); the caller jits it."""
    o = config.optimizer

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        step = state.step

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            model = packing.merge(params, state.weights.stats)
            key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), step)
            nnx.reseed(model, **{DROPOUT_STREAM: key})  # fresh masks at every step, per seed
            logits = model(batch["image"])
            targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), o.label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, packing.stats_of(model))

        params = state.weights.params
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, state.opt, params)
        weights = Weights(optax.apply_updates(params, updates), stats)
        ema = state.ema
        if ema is not None:  # TF's ExponentialMovingAverage(num_updates=step)
            decay = jnp.minimum(o.ema_decay, (1.0 + step) / (10.0 + step))
            ema = optax.incremental_update(weights, ema, 1.0 - decay)
        metrics = {
            "loss": loss,
            "train_top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "learning_rate": schedule(step),
            "grad_norm": optax.tree.norm(grads),
        }
        return state.replace(step=step + 1, weights=weights, opt=opt, ema=ema), metrics

    return train_step


def classification_eval_step(packing: FlatPacking | TreePacking, num_classes: int) -> EvalStep:
    """The default evaluation: per-batch *sums* of top-1, top-5 and loss over real examples, and their
    ``count``; the trainer reports each sum / count as ``val_<name>`` (and ``ema_val_<name>``). Another
    evaluation passes its own ``make_eval_step`` to ``train_and_evaluate`` with the same contract."""

    def eval_step(weights: Weights, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = packing.merge(weights.params, weights.stats, train=False)(batch["image"])
        mask, label = batch["mask"], batch["label"]
        top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        return {
            "top1": jnp.sum((top5[:, 0] == label) * mask),
            "top5": jnp.sum(jnp.any(top5 == label[:, None], axis=-1) * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    return eval_step



# ------------------------------------------------------------------ a config, checked

@dataclasses.dataclass
class Prepared:
    """Everything resolved and validated from a config, before anything is written: what ``prepare`` gives
    the trainer (and an experiment, which checks its base config once and reads the data's size from it)."""

    config: ml_collections.ConfigDict
    spec: scaling.ScalingSpec
    source: input_pipeline.Source
    total_steps: int
    steps_per_epoch: int
    dtype: Any
    layers: Layers


def prepare(config: ml_collections.ConfigDict) -> Prepared:
    """Validate a config (UserError on any mistake) and open its data source."""
    spec = scaling.model_spec(config.model)
    arch = scaling.build_architecture(spec, scaling.network(config.model), config.model.drop_path_rate)
    if spec.resolution < arch.total_stride:
        raise UserError(f"resolution {spec.resolution} is smaller than the network's total stride "
                        f"{arch.total_stride}")
    dtype = scaling.compute_dtype(config.model.dtype)
    layers = model_layers(config)
    ndev = jax.device_count()
    if config.batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {config.batch_size}")
    if config.batch_size % ndev:
        raise UserError(f"batch_size {config.batch_size} is not divisible by the {ndev} devices")
    source = sources.create_source(config.data, spec.resolution, config.batch_size, config.seed,
                                          jax.process_index(), jax.process_count())
    steps_per_epoch = max(1, source.num_train // config.batch_size)
    total = check_schedule(config, steps_per_epoch)
    try:
        head_init_fn(config.model.get("head_init", "paper"))
    except ValueError as e:
        raise UserError(f"model.{e}") from None
    return Prepared(config, spec, source, total, steps_per_epoch, dtype, layers)


def check_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The run's length, optimizer and learning-rate schedule are valid for an epoch of ``steps_per_epoch``
    (UserError otherwise); returns the run's length in steps. Needs no data: an experiment checks every trial
    it plans with it before training any."""
    for field, zero in (("num_train_steps", " (0: train for num_epochs)"), ("num_epochs", "")):
        if config[field] < 0:  # to_steps reads num_train_steps <= 0 as 0: the run would silently train by epochs
            raise UserError(f"{field} must not be negative{zero}, got {config[field]:g}")
    total = to_steps(config.num_train_steps, config.num_epochs, steps_per_epoch)
    if total <= 0:
        raise UserError("num_train_steps / num_epochs give no training steps")
    span = config.get("schedule_steps", 0)
    if span < 0 or 0 < span < total:
        raise UserError(f"schedule_steps must be 0 (the run's length) or at least the run's {total} steps, "
                        f"got {span}")
    for field, allowed in (("schedule", SCHEDULES), ("name", OPTIMIZERS)):
        if config.optimizer[field] not in allowed:
            raise UserError(f"optimizer.{field} must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                            f"got {config.optimizer[field]!r}")
    if config.optimizer.schedule == "wsd":
        _check_cooldown(config, total, steps_per_epoch)
    return total


def _check_cooldown(config: ml_collections.ConfigDict, total: int, steps_per_epoch: int) -> None:
    """A ``wsd`` cooldown is a fraction in (0, 1] that begins after the warmup."""
    o = config.optimizer
    f = o.get("cooldown_fraction", 0.2)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise UserError(f"optimizer.cooldown_fraction must be in (0, 1], got {f!r}")
    start, warmup = cooldown_start(config, total), to_steps(0, o.warmup_epochs, steps_per_epoch, math.floor)
    if start < warmup:
        raise UserError(f"optimizer.cooldown_fraction {f} starts the cooldown at step {start}, inside the "
                        f"{warmup}-step warmup: lower it, or optimizer.warmup_epochs, or train longer")


def schedule_steps(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """Steps the learning-rate schedule spans: ``config.schedule_steps`` if > 0, else the run's own length."""
    return int(config.get("schedule_steps", 0)) or total_steps


def cooldown_start(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """The step where a ``wsd`` schedule's cooldown begins (0: no cooldown, another schedule).

    The state there is saved in ``rundir.STABLE_CHECKPOINTS`` and kept: a longer wsd run of the
    same config in the same workdir starts from it (``checkpoints.restore``), so it trains no step twice.
    """
    if config.optimizer.schedule != "wsd":
        return 0
    span = schedule_steps(config, total_steps)
    return span - cooldown_steps(config.optimizer, span)


