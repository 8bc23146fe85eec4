"""The one trainer: config in, trained model and final metrics out (``train_and_evaluate``).

A library module: no flag parsing and no process-wide setup (the entry points own those:
``effnet_jax.train`` for ``python -m effnet_jax.train``, ``effnet_jax.cli`` for all of them).

The train step is one ``jax.jit`` over pure state (the model split once into flat
vectors by ``flat_state.FlatPacking``, or with ``model.kernels = "reference"`` into one array
per variable by ``tree_state.TreePacking``, merged back inside the trace), data-parallel
over a mesh of every device of every host: the batch is sharded on its leading
axis, parameters are replicated, so BatchNorm
statistics and gradients are computed over the global batch. A workdir holding a
checkpoint resumes from it: data order and dropout keys are functions of
(seed, step), so a killed-and-resumed run ends where an uninterrupted one does.
``experiments.grid_search`` calls ``train_and_evaluate`` in-process.

A workdir belongs to one config (``rundir.check_resume``: a changed config is refused,
``--restart`` starts over); a finished workdir is not trained again: its stored result is
returned and no file changes.

Mistakes in the config, data or workdir raise ``UserError`` before anything is written; Ctrl-C
or SIGTERM saves the state reached and raises ``errors.Interrupted`` naming the step to resume
from; a diverged run returns status "diverged".
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effnet_jax import provenance, signals
from effnet_jax.configs import to_steps
from effnet_jax.data import input_pipeline, sources
from effnet_jax.errors import Interrupted, UserError
from effnet_jax.model import cost, scaling
from effnet_jax.model.arch import Architecture
from effnet_jax.model.efficientnet import DROPOUT_STREAM, create_model, layers_for
from effnet_jax.model.layers import KERNELS, Layers, head_init_fn
from effnet_jax.training import metrics, program_store, rundir
from effnet_jax.training.metrics import MetricsWriter

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


class Steps:
    """A program's jitted steps and what was compiled of them, kept in this process (``_PROGRAMS``) for the
    next trial of the same program: a worker's second seed or rung of an architecture skips trace, lowering
    and the compile (or cache load) of both steps. What this process compiles it also stores on disk
    (``program_store``, under ``store_id``), where the next process finds it without tracing.

    ``train`` holds the train step's executable per input signature; ``eval`` the eval step's. On an
    accelerator the eval step compiles on a background thread while the train step compiles and trains (the
    host CPU is otherwise idle then; it is needed only at the first evaluation); on a CPU backend, where
    XLA's compile and the steps already use every core, at the first evaluation (``BACKGROUND_EVAL_COMPILE``).
    """

    def __init__(self, train_step: Callable, eval_step: Callable, store_id: str | None = None):
        self.train_step, self.eval_step = train_step, eval_step
        self.store_id = store_id  # the program's key in ``program_store`` (None: not stored)
        self.loaded = False  # an executable came from the store (see ``forget_stored``)
        self.train: dict[Any, Any] = {}  # signature -> jax.stages.Compiled
        self.eval: dict[Any, concurrent.futures.Future] = {}  # signature -> Future[(Compiled, seconds)]
        self._lock = threading.Lock()

    def compiled_train(self, state: TrainState, batch: dict[str, jax.Array], times: dict[str, Any]) -> Callable:
        """The train step's executable for these inputs, compiled now (timed into ``times``) unless this
        process already holds it; starts compiling the eval step for the matching eval batch meanwhile."""
        sig = _signature(state, batch)
        hit = sig in self.train
        times["program_cache"] = "hit" if hit else "miss"
        if not hit:
            t0 = time.perf_counter()
            stored = program_store.load(self.store_id, "train", sig)
            if stored is not None:  # built by an earlier process: no trace, lowering or compile
                self.train[sig], self.loaded = stored, True
                times.update(train_load_s=time.perf_counter() - t0, program_store="hit")
                if _background_eval_compile():
                    self.start_eval(state.weights, _eval_batch_like(batch))
                return stored
            traced = self.train_step.trace(state, batch)
            t1 = time.perf_counter()
            lowered = traced.lower()
            t2 = time.perf_counter()
            if _background_eval_compile():
                self.start_eval(state.weights, _eval_batch_like(batch))  # overlaps the train compile
            t3 = time.perf_counter()
            self.train[sig], fresh = program_store.compile_fresh(lowered)
            t4 = time.perf_counter()
            if fresh:
                program_store.save(self.store_id, "train", sig, self.train[sig])
            times.update(train_trace_s=t1 - t0, train_lower_s=t2 - t1, train_compile_s=t4 - t3,
                         program_save_s=time.perf_counter() - t4,
                         program_store="miss" if self.store_id and program_store.directory() else "off")
        return self.train[sig]

    def forget_stored(self) -> None:
        """Drop this program's executables here and in the store, after one loaded from the store failed to
        run: the next trial of the program (a retry, a rerun) compiles it."""
        with self._lock:
            self.train.clear()
            self.eval.clear()
            self.loaded = False
        program_store.forget(self.store_id)

    def start_eval(self, weights: Any, batch: dict[str, Any]) -> None:
        """Trace, lower and compile the eval step for ``batch``'s signature on the background thread."""
        sig = _signature(weights, batch)
        with self._lock:
            if sig not in self.eval:
                self.eval[sig] = _background().submit(self._compile_eval, sig, weights, batch)

    def _compile_eval(self, sig: Any, weights: Any, batch: dict[str, Any]) -> tuple[Any, float]:
        """The eval step's executable (from ``program_store``, else compiled and stored) and its seconds."""
        t0 = time.perf_counter()
        executable = program_store.load(self.store_id, "eval", sig)
        self.loaded |= executable is not None
        if executable is None:
            executable, fresh = program_store.compile_fresh(self.eval_step.trace(weights, batch).lower())
            if fresh:
                program_store.save(self.store_id, "eval", sig, executable)
        return executable, time.perf_counter() - t0

    def compiled_eval(self, weights: Any, batch: dict[str, jax.Array], times: dict[str, Any]) -> Callable:
        """The eval step's executable for these inputs: the background compile's (waited for, timed), this
        process's earlier one, or compiled now (a CPU backend, or a batch of another shape) and kept."""
        sig = _signature(weights, batch)
        future = self.eval.get(sig)
        if future is None:
            executable, seconds = self._compile_eval(sig, weights, batch)
            self.eval[sig] = done = concurrent.futures.Future()
            done.set_result((executable, seconds))
            for k in ("eval_compile_s", "eval_compile_wait_s"):  # the evaluation waited for all of it
                times[k] = times.get(k, 0.0) + seconds
            return executable
        if not future.done():
            t0 = time.perf_counter()
            concurrent.futures.wait([future])
            times["eval_compile_wait_s"] = times.get("eval_compile_wait_s", 0.0) + time.perf_counter() - t0
        executable, seconds = future.result()
        times.setdefault("eval_compile_s", seconds if times.get("program_cache") == "miss" else 0.0)
        return executable


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
# None: compile the eval step in the background on accelerators only. On the 2-core CPU, compiling it beside
# the train step made the train step's compile slower by more than the eval compile it hid
# (docs/benchmarks.md, 2026-12-03).
BACKGROUND_EVAL_COMPILE: bool | None = None


def _background_eval_compile() -> bool:
    if BACKGROUND_EVAL_COMPILE is None:
        return jax.default_backend() != "cpu"
    return BACKGROUND_EVAL_COMPILE


def _background() -> concurrent.futures.ThreadPoolExecutor:
    """One thread for background compiles: XLA releases the GIL while it compiles."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="effnet-compile")
    return _EXECUTOR


def _signature(*trees: Any) -> tuple[Any, ...]:
    """What an executable is specialised to: the trees' structure and each leaf's shape, dtype and sharding."""
    leaves, treedef = jax.tree.flatten(trees)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def _eval_batch_like(batch: dict[str, jax.Array]) -> dict[str, jax.ShapeDtypeStruct]:
    """The eval batch a train batch implies (every source: the same image and label, plus a float mask)."""
    like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in batch.items()}
    label = batch["label"]
    like["mask"] = jax.ShapeDtypeStruct(label.shape, jnp.float32, sharding=label.sharding)
    return like


# Programs this process built, by ``program_key``, the least recently used dropped first (each holds its
# compiled executables: some MB of machine code on a CPU).
PROGRAM_CACHE_SIZE = 8  # a worker of the default search trains ~6 networks at rung 0
_PROGRAMS: collections.OrderedDict[tuple[Any, ...], Steps] = collections.OrderedDict()
_PROGRAMS_LOCK = threading.Lock()
# Config fields the jitted steps do not read. The seed is state (initial weights, the dropout key), the run's
# length reaches the program only through the schedule's span (``schedule_steps`` below, in the key).
NOT_IN_PROGRAM = ("seed", "num_train_steps", "num_epochs", "schedule_steps", *rundir.COSMETIC_FIELDS)


def program_key(config: ml_collections.ConfigDict, spec: scaling.ScalingSpec, arch: Architecture,
                num_classes: int, steps_per_epoch: int, total_steps: int,
                make_eval_step: Callable[[Any, int], EvalStep]) -> tuple[Any, ...]:
    """Everything the jitted steps bake in as constants, so that equal keys mean one program: every config
    field but ``NOT_IN_PROGRAM``, the learning-rate schedule's inputs (steps per epoch and its span), the
    network, the classes, the evaluation and the devices. Seeds are not in it (trials that differ only in
    seed share a program); a new field is in it unless listed in ``NOT_IN_PROGRAM``."""
    fields = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k not in NOT_IN_PROGRAM}
    derived = {"steps_per_epoch": steps_per_epoch, "schedule_span": schedule_steps(config, total_steps),
               "num_classes": num_classes, "devices": [(d.platform, d.id) for d in jax.devices()]}
    return (json.dumps(fields, sort_keys=True, default=str), json.dumps(derived, sort_keys=True), repr(spec),
            repr(arch), make_eval_step)


def clear_program_cache() -> None:
    """Forget the programs this process built (a test's fresh start)."""
    with _PROGRAMS_LOCK:
        _PROGRAMS.clear()


def compile_ahead(config: ml_collections.ConfigDict,
                  make_eval_step: Callable[[Any, int], EvalStep] = classification_eval_step) -> dict[str, Any]:
    """Build ``config``'s program and compile its train and eval steps into this process's program cache, so
    that a later ``train_and_evaluate`` of a config with the same ``program_key`` starts training at once.

    For a search on an accelerator: while the device trains one trial, the host CPU is idle, and the next
    trial's compile can happen then (``experiments.runner``'s compile-ahead). Writes nothing; the batch
    signatures are those of the source's first train and eval batches. Returns the phases' seconds.
    """
    times: dict[str, Any] = {}
    with _timed(times, "prepare_s"):
        run = prepare(config)
    with _timed(times, "build_s"):
        program = build_program(config, run.spec, run.source.num_classes, layers=run.layers, dtype=run.dtype,
                                steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps,
                                make_eval_step=make_eval_step)
    assert program.steps is not None
    program.steps.compiled_train(program.state, _global_batch(next(run.source.train_batches(0)),
                                                              program.data_sharding), times)
    program.steps.compiled_eval(program.state.weights, _global_batch(next(run.source.eval_batches()),
                                                                     program.data_sharding), times)
    return times


@dataclasses.dataclass
class Program:
    """A model's train state and the jitted steps over it: what the training loop runs
    (and ``scripts/benchmark.py`` times)."""

    packing: FlatPacking | TreePacking
    state: TrainState
    train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
    eval_step: Callable  # jitted (weights, batch) -> sums, and their count (see classification_eval_step)
    data_sharding: NamedSharding  # how a global batch is laid out over the devices
    arch: Architecture
    steps: Steps | None = None  # the steps and their executables, shared with every trial of this program


def build_program(config: ml_collections.ConfigDict, spec: scaling.ScalingSpec, num_classes: int, *,
                  layers: Layers, dtype: Any, steps_per_epoch: int, total_steps: int,
                  make_eval_step: Callable[[Any, int], EvalStep] = classification_eval_step) -> Program:
    """The model per ``config`` (``config.model.init_from`` loaded), its initial train state,
    replicated over a mesh of every device, and the jitted train and eval steps (those of an earlier
    program of the same ``program_key`` in this process, with what they compiled)."""
    model = create_model(spec, num_classes, config.seed, dtype=dtype, network=scaling.network(config.model),
                         drop_path_rate=config.model.drop_path_rate, dropout=spec.dropout, kernels=layers,
                         head_init=config.model.get("head_init", "paper"),
                         scan_blocks=config.model.get("scan_blocks", False))
    if config.model.init_from:
        from effnet_jax.weights import weight_files

        weight_files.load_weights_into(model, os.path.expanduser(config.model.init_from))
    packing, params, stats = state_packing(layers.kernels).create(model)
    schedule = learning_rate_schedule(config.optimizer, config.batch_size, steps_per_epoch,
                                      schedule_steps(config, total_steps))
    tx = make_optimizer(config.optimizer, schedule, packing.weight_decay_mask)
    weights = Weights(params, stats)
    state = TrainState(step=jnp.zeros((), jnp.int32), weights=weights, opt=tx.init(params),
                       dropout_key=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)),
                       ema=weights if config.optimizer.ema_decay > 0 else None)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    repl, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    key = program_key(config, spec, model.arch, num_classes, steps_per_epoch, total_steps, make_eval_step)
    with _PROGRAMS_LOCK:  # a compile-ahead thread (compile_ahead) builds programs beside the training loop
        steps = _PROGRAMS.get(key)
        if steps is None:
            train_step = make_train_step(packing, tx, schedule, config, num_classes)
            steps = Steps(jax.jit(train_step, in_shardings=(repl, data_sharding), out_shardings=(repl, repl),
                                  donate_argnums=0),
                          jax.jit(make_eval_step(packing, num_classes), in_shardings=(repl, data_sharding),
                                  out_shardings=repl),
                          program_store.program_id(key, make_eval_step))
            _PROGRAMS[key] = steps
            while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
                _PROGRAMS.popitem(last=False)
        _PROGRAMS.move_to_end(key)
    return Program(packing, _replicate(state, repl), steps.train_step, steps.eval_step, data_sharding, model.arch,
                   steps)


# ----------------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
    """Everything resolved and validated from a config, before anything is written."""

    config: ml_collections.ConfigDict
    spec: scaling.ScalingSpec
    source: input_pipeline.Source
    total_steps: int
    steps_per_epoch: int
    dtype: Any
    layers: Layers


def prepare(config: ml_collections.ConfigDict) -> Run:
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
    return Run(config, spec, source, total, steps_per_epoch, dtype, layers)


def check_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The run's length, optimizer and learning-rate schedule are valid for an epoch of ``steps_per_epoch``
    (UserError otherwise); returns the run's length in steps. Needs no data: an experiment checks every trial
    it plans with it before training any."""
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
    same config in the same workdir starts from it (``_restore``), so it trains no step twice.
    """
    if config.optimizer.schedule != "wsd":
        return 0
    span = schedule_steps(config, total_steps)
    return span - cooldown_steps(config.optimizer, span)


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Host values (identical on every process) as global, replicated arrays."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                        tree)


def _global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ------------------------------------------------------------------------ training

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run: Run | None = None,
                       restart: bool = False,
                       make_eval_step: Callable[[Any, int], EvalStep] = classification_eval_step) -> dict[str, Any]:
    """Train per ``config`` in ``workdir`` (resuming from its checkpoint) and return final metrics.

    Raises UserError for a bad config or a workdir of another config (``rundir.check_resume``)
    before anything is written; a finished workdir returns its stored result and changes nothing.
    ``restart``: delete the workdir's run files first (``rundir.clear_workdir``) and start over.
    Ctrl-C or SIGTERM saves a checkpoint and raises ``errors.Interrupted`` naming the step to resume from.
    A diverged run (non-finite loss) returns ``status`` "diverged". ``make_eval_step(packing,
    num_classes)`` swaps the evaluation (``classification_eval_step`` says the contract).
    """
    t0 = time.perf_counter()
    workdir, run = os.fspath(workdir), run or prepare(config)
    times = {"prepare_s": time.perf_counter() - t0}  # validation and opening the data (0: the caller's run)
    with contextlib.ExitStack() as held:  # the workdir's lock, until the result is written
        stored = _claim_workdir(config, workdir, run, restart, held)
        return stored if stored is not None else _run(config, workdir, run, make_eval_step, times)


def _run(config: ml_collections.ConfigDict, workdir: str, run: Run,
         make_eval_step: Callable[[Any, int], EvalStep], times: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the program, restore the workdir's checkpoint, train, and write result.json (with ``timings``:
    seconds per phase, so that a search can say where its trials' time went)."""
    t_start, lead = time.time(), jax.process_index() == 0
    times = times if times is not None else {}
    with _timed(times, "build_s"):
        program = build_program(config, run.spec, run.source.num_classes, layers=run.layers, dtype=run.dtype,
                                steps_per_epoch=run.steps_per_epoch, total_steps=run.total_steps,
                                make_eval_step=make_eval_step)
    with _timed(times, "restore_s"):
        ckpt, state, start = _restore(config, workdir, program.state, run.total_steps)
    writer = MetricsWriter(workdir, enabled=lead, resume_step=start)
    try:
        state, final, timing = _train(config, run, program, state, start, ckpt, writer, workdir, times)
    except jax.errors.JaxRuntimeError:
        if program.steps is not None and program.steps.loaded:
            program.steps.forget_stored()
        raise

    t_write = time.perf_counter()
    final.update(_run_info(config, run, program))
    final["params_sha256"] = params_digest(state.weights.params)
    if lead and final["status"] == "ok" and config.save_weights:
        final["weights"] = _save_weights(program.packing, state, run.spec, workdir)
    writer.close()
    times["train_s"], times["write_s"] = timing.seconds, time.perf_counter() - t_write
    final.update({"epochs": final["steps"] / run.steps_per_epoch, "wall_time_s": time.time() - t_start,
                  "compile_s": timing.compile_s, "train_img_per_s": timing.img_per_s(config.batch_size),
                  "timings": {k: round(v, 3) if isinstance(v, float) else v for k, v in times.items()}})
    if lead:
        rundir.write_json(os.path.join(workdir, "result.json"), final)
    return final


@contextlib.contextmanager
def _timed(times: dict[str, Any], name: str) -> Any:
    """Add the block's wall time to ``times[name]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def _claim_workdir(config: ml_collections.ConfigDict, workdir: str, run: Run, restart: bool,
                   held: contextlib.ExitStack) -> dict[str, Any] | None:
    """Make ``workdir`` this run's (its lock taken into ``held``, cleared with ``restart``) and write its
    config.json; or, when it already holds this run finished, return the stored result and write nothing."""
    lead = jax.process_index() == 0
    if restart:
        rundir.check_workdir(workdir)
    elif (stored := rundir.check_resume(config, workdir, run.total_steps, run.steps_per_epoch)) is not None:
        return stored
    if "://" in workdir:
        os.makedirs(workdir, exist_ok=True)
    else:
        rundir.make_workdir(workdir)
    if lead:
        held.enter_context(rundir.locked(workdir))
    if restart:
        if lead:
            rundir.clear_workdir(workdir)
        if jax.process_count() > 1:  # nobody reads the old checkpoints while process 0 deletes them
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("effnet_jax restart")
    elif (stored := rundir.check_resume(config, workdir, run.total_steps, run.steps_per_epoch)) is not None:
        return stored  # finished by another run while this one waited for the lock
    elif rundir.forks(config, workdir):
        _fork(config, workdir, run.total_steps)
    if lead:
        rundir.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    return None


def _fork(config: ml_collections.ConfigDict, workdir: str, total_steps: int) -> None:
    """Start a longer wsd run where a shorter one of the same config finished: from the shorter run's stable
    checkpoint (``_restore``); its checkpoints past that point hold a cooled-down state, not this run's, and go."""
    start = cooldown_start(config, total_steps)
    if not any(s <= start for s in rundir.stable_steps(workdir)):
        raise UserError(f"workdir {workdir} holds a shorter wsd run of this config but no stable checkpoint at or "
                        f"before step {start} to continue from; use a new --workdir or pass --restart to start over")
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    if jax.process_count() > 1:  # nobody restores a checkpoint while process 0 deletes it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("effnet_jax fork")


def _restore(config: ml_collections.ConfigDict, workdir: str, state: TrainState, total_steps: int
             ) -> tuple[Any, TrainState, int]:
    """The workdir's checkpoint manager, the state (its latest checkpoint, if any) and the step to start at.

    Without a checkpoint of its own, a wsd run starts from the latest stable checkpoint at or before
    its cooldown's start: a shorter wsd run's constant phase, which is this run's too."""
    import orbax.checkpoint as ocp

    ckpt = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    start, source = ckpt.latest_step() or 0, ckpt
    cool = cooldown_start(config, total_steps)
    if not start and cool:
        start = max((s for s in rundir.stable_steps(workdir) if s <= cool), default=0)
        source = _stable_manager(workdir) if start else ckpt
    if start:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = source.restore(start, args=ocp.args.StandardRestore(abstract))
        if source is not ckpt:
            source.close()
    return ckpt, state, start


def _stable_manager(workdir: str) -> Any:
    """The checkpoint manager of ``rundir.STABLE_CHECKPOINTS``: every step kept (one per run length)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, rundir.STABLE_CHECKPOINTS)),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))


@dataclasses.dataclass
class _Timing:
    """Compile time (the first step) and the steady-state step rate after it."""

    compile_s: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def img_per_s(self, batch_size: int) -> float | None:
        return batch_size * self.steps / self.seconds if self.seconds > 0 else None


def _train(config: ml_collections.ConfigDict, run: Run, program: Program, state: TrainState, start: int,
           ckpt: Any, writer: MetricsWriter, workdir: str, times: dict[str, Any] | None = None
           ) -> tuple[TrainState, dict[str, Any], _Timing]:
    """The loop: steps, logs, evaluations and checkpoints from ``start``, then the final evaluation.

    A stop signal (Ctrl-C, SIGTERM: ``effnet_jax.signals``) is seen between two steps: the state is
    saved at the step reached and ``Interrupted`` says where the rerun resumes.
    """
    import orbax.checkpoint as ocp

    total, lead, timing = run.total_steps, jax.process_index() == 0, _Timing()
    eval_every = to_steps(config.eval_every_steps, 1, run.steps_per_epoch)
    ema = bool(config.get("eval_ema", True))
    status, last_loss, t_mark, done = "ok", _logged_loss(workdir, start) if lead else float("nan"), 0.0, start
    bar = _progress(config, total, start, lead)
    saved, stop, cool, step_fn = start, None, cooldown_start(config, total), None
    times = times if times is not None else {}
    try:
        with signals.deferred():
            batches = run.source.train_batches(start)
            for step in range(start, total):
                if _stop_requested(step, config.log_every_steps):
                    break
                batch = _global_batch(next(batches), program.data_sharding)
                t0 = time.time()
                if step_fn is None:  # compiled here (timed per phase), or this process's earlier trial's
                    step_fn = program.steps.compiled_train(state, batch, times) if program.steps else \
                        program.train_step
                state, metrics_ = step_fn(state, batch)
                if step == start:
                    jax.block_until_ready(metrics_)
                    timing.compile_s, t_mark = time.time() - t0, time.time()
                done = step + 1
                if done % config.log_every_steps == 0 or done == total:
                    metrics_ = jax.device_get(metrics_)
                    last_loss = float(metrics_["loss"])
                    if done - start - 1 > timing.steps:
                        timing.seconds, timing.steps = time.time() - t_mark, done - start - 1
                    img_s = timing.img_per_s(config.batch_size) or float("nan")
                    writer.write(done, {**metrics_, "img_per_s": img_s, "epoch": done / run.steps_per_epoch})
                    bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{img_s:.0f}")
                    if not math.isfinite(last_loss):
                        status = "diverged"
                        break
                if done % eval_every == 0 or done == total:
                    with _timed(times, "eval_s"):
                        writer.write(done, _evaluate(program, state, run.source, times, ema))
                if done == cool and cool not in rundir.stable_steps(workdir):  # kept, and complete before any
                    # later checkpoint is written: a longer run continues from it (a resumed run wrote it already)
                    stable = _stable_manager(workdir)
                    stable.save(done, args=ocp.args.StandardSave(state))
                    stable.wait_until_finished()
                    stable.close()
                if done % config.checkpoint_every_steps == 0 or done == total:
                    with _timed(times, "checkpoint_s"):
                        ckpt.save(done, args=ocp.args.StandardSave(state))
                    saved = done
                bar.update(1)
            bar.close()
            if status == "ok" and done < total:  # stopped by a signal: the state reached is where to resume
                stop = signals.requested()
                if saved != done:
                    ckpt.save(done, args=ocp.args.StandardSave(state), force=True)
            with _timed(times, "checkpoint_s"):
                ckpt.wait_until_finished()
            if stop is None:
                final = {"status": status, "steps": int(jax.device_get(state.step)), "train_loss": last_loss}
                if status == "ok":
                    with _timed(times, "eval_s"):
                        final.update(_evaluate(program, state, run.source, times, ema))
    except KeyboardInterrupt as e:  # a second Ctrl-C (it does not wait for the loop)
        stop = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        ckpt.wait_until_finished()  # a save in flight completes: it is where the rerun resumes
    except Exception:  # a full disk, say: orbax's writer threads are stopped before the error goes up
        with contextlib.suppress(Exception):
            ckpt.close()
        raise
    if stop is not None:
        bar.close()
        last = ckpt.latest_step()
        ckpt.close()
        writer.close()
        how = (f"resume from the last checkpoint (step {last})" if last else
               "start over (no checkpoint was saved yet)")
        raise Interrupted(f"{signals.describe(stop)} at step {done} of {total}; rerun the same command to {how}",
                          stop)
    with _timed(times, "checkpoint_s"):
        ckpt.close()
    return state, final, timing


def _stop_requested(step: int, every: int) -> bool:
    """Whether a stop signal was received; with several processes, agreed by all of them every ``every``
    steps (a checkpoint save is collective, so they must stop at the same step)."""
    if jax.process_count() == 1:
        return signals.requested() is not None
    if step % every:
        return False
    from jax.experimental import multihost_utils

    flag = np.int32(signals.requested() is not None)
    return bool(np.max(multihost_utils.process_allgather(flag)))


def _run_info(config: ml_collections.ConfigDict, run: Run, program: Program) -> dict[str, Any]:
    """What was trained, for result.json: the network's size and cost, the data, the hardware and software
    (``provenance``: what makes the same config score differently on another machine)."""
    spec, source, arch = run.spec, run.source, program.arch
    return {
        "model": spec.name, "network": config.model.network, **cost.figures(spec, arch, source.num_classes),
        "dataset": source.name,
        "num_classes": source.num_classes, "batch_size": config.batch_size, "total_steps": run.total_steps,
        "devices": jax.device_count(), "processes": jax.process_count(), "dtype": jnp.dtype(run.dtype).name,
        "kernels": run.layers.kernels, "scan_blocks": bool(config.model.get("scan_blocks", False)),
        "provenance": provenance.provenance(),
    }


def _logged_loss(workdir: str, step: int) -> float:
    """The last training loss logged at or before ``step`` (a resumed run that has no step left to take)."""
    if not step:
        return float("nan")
    rows = [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r.get("step", 0) <= step and isinstance(r.get("loss"), (int, float))]
    return float(rows[-1]["loss"]) if rows else float("nan")


def _save_weights(packing: FlatPacking | TreePacking, state: TrainState, spec: scaling.ScalingSpec,
                  workdir: str) -> list[str]:
    """The final (and EMA) weights as ``weight_files.save_weights`` files; returns their paths."""
    from effnet_jax.weights import weight_files

    paths = []
    for name, weights in (("weights", state.weights), ("ema_weights", state.ema)):
        if weights is not None:
            w = jax.device_get(weights)
            path = os.path.join(workdir, f"{name}.safetensors")
            weight_files.save_weights(packing.merge(w.params, w.stats), path, spec)
            paths.append(path)
    return paths


def params_digest(params: nnx.State) -> str:
    """SHA-256 of every parameter's bytes: equal digests mean bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def _evaluate(program: Program, state: TrainState, source: input_pipeline.Source,
              times: dict[str, Any] | None = None, ema: bool = True) -> dict[str, float]:
    """The eval step's sums over the eval split, each divided by the example count, for the raw weights
    (``val_<name>``) and, when kept and ``ema``, the EMA weights (``ema_val_<name>``)."""
    variants = [("val", state.weights)] + ([("ema_val", state.ema)] if ema and state.ema is not None else [])
    sums: dict[str, dict[str, float]] = {prefix: {} for prefix, _ in variants}
    eval_fn = None
    for batch in source.eval_batches():
        batch = _global_batch(batch, program.data_sharding)
        if eval_fn is None:  # the background compile's executable (see Steps), or the jitted step
            eval_fn = program.steps.compiled_eval(state.weights, batch, {} if times is None else times) \
                if program.steps else program.eval_step
        for prefix, weights in variants:
            for k, v in jax.device_get(eval_fn(weights, batch)).items():
                sums[prefix][k] = sums[prefix].get(k, 0.0) + float(v)
    out = {}
    for prefix, s in sums.items():
        count = max(s.pop("count"), 1.0)
        out.update({f"{prefix}_{k}": v / count for k, v in s.items()})
    return out


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(config: ml_collections.ConfigDict, total: int, start: int, lead: bool) -> Any:
    if not (config.progress_bar and lead):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


def _num(x: Any, fmt: str) -> str:
    """``x`` formatted, or 'n/a' for a value a stored result holds as null (non-finite)."""
    return "n/a" if x is None else format(x, fmt)


def summary_line(result: dict[str, Any]) -> str:
    """The final one-line summary printed by the CLI; names the block table when it is not B0's."""
    model = result["model"]
    if result.get("network", "b0") != "b0":
        model = f"{result['network']}/{model}"
    parts = [f"{model} {result['resolution']}px on {result['dataset']}", f"status {result['status']}",
             f"{result['steps']} steps", f"train loss {_num(result.get('train_loss'), '.4f')}"]
    if "val_top1" in result:
        parts.append(f"val top-1 {_num(result['val_top1'], '.4f')}")
    if "ema_val_top1" in result:
        parts.append(f"EMA val top-1 {_num(result['ema_val_top1'], '.4f')}")
    if result.get("train_img_per_s"):
        parts.append(f"{result['train_img_per_s']:.0f} img/s")
    parts.append(f"{_num(result.get('wall_time_s'), '.1f')} s")
    return "done: " + ", ".join(parts)
