"""The compiled programs a worker holds: a config's jitted train and eval steps (``build_program``), their
executables per input signature (``Steps``), and ``Programs``, the object a worker owns that keeps them
between trials and compiles the next trial's program ahead on a thread.

One key says which trials share a program: ``program_key`` (every config field but ``NOT_IN_PROGRAM``, and
what the steps bake in besides). A worker's second seed or rung of a network finds its program in its
``Programs`` and skips trace, lowering and compile; the next process finds what this one compiled in
``program_store``.

No module-level state: a search worker (``experiments.queue.Worker``) keeps one ``Programs`` for its life, and
``trainer.train_and_evaluate`` without one uses a fresh one for its single run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effnet_jax.errors import one_line
from effnet_jax.model import scaling
from effnet_jax.model.arch import Architecture
from effnet_jax.model.efficientnet import create_model
from effnet_jax.model.layers import Layers
from effnet_jax.training import program_store, recipe, rundir
from effnet_jax.training.recipe import EvalStep, TrainState, Weights, classification_eval_step
from effnet_jax.training.timings import Timings

if TYPE_CHECKING:
    from effnet_jax.training.flat_state import FlatPacking
    from effnet_jax.training.tree_state import TreePacking

# None: compile the eval step in the background on accelerators only. On the 2-core CPU, compiling it beside
# the train step made the train step's compile slower by more than the eval compile it hid
# (docs/benchmarks.md, 2026-12-03).
BACKGROUND_EVAL_COMPILE: bool | None = None
# Programs a worker keeps, the least recently used dropped first (each holds its compiled executables: some MB
# of machine code on a CPU).
PROGRAM_CACHE_SIZE = 8  # a worker of the default search trains ~6 networks at rung 0
# Config fields the jitted steps do not read. The seed is state (initial weights, the dropout key), the run's
# length reaches the program only through the schedule's span (``recipe.schedule_steps``, in the key).
NOT_IN_PROGRAM = ("seed", "num_train_steps", "num_epochs", "schedule_steps", *rundir.COSMETIC_FIELDS)


class Steps:
    """A program's jitted steps and what was compiled of them, kept by a worker's ``Programs`` for the next
    trial of the same program: a worker's second seed or rung of an architecture skips trace, lowering
    and the compile (or cache load) of both steps. What this process compiles it also stores on disk
    (``program_store``, under ``store_id``), where the next process finds it without tracing.

    ``train`` holds the train step's executable per input signature; ``eval`` the eval step's. On an
    accelerator the eval step compiles on the ``Programs``' background thread while the train step compiles
    and trains (the host CPU is otherwise idle then; it is needed only at the first evaluation); on a CPU
    backend, where XLA's compile and the steps already use every core, at the first evaluation
    (``BACKGROUND_EVAL_COMPILE``).
    """

    def __init__(self, train_step: Callable, eval_step: Callable, store_id: str | None,
                 background: Callable[[], concurrent.futures.Executor]):
        self.train_step, self.eval_step = train_step, eval_step
        self.store_id = store_id  # the program's key in ``program_store`` (None: not stored)
        self.loaded = False  # an executable came from the store (see ``forget_stored``)
        self.train: dict[Any, Any] = {}  # signature -> jax.stages.Compiled
        self.eval: dict[Any, concurrent.futures.Future] = {}  # signature -> Future[(Compiled, seconds)]
        self._background = background  # the owning Programs' compile thread
        self._lock = threading.Lock()

    def compiled_train(self, state: TrainState, batch: dict[str, jax.Array], timings: Timings) -> Callable:
        """The train step's executable for these inputs, compiled now (timed into ``timings``) unless this
        worker already holds it; starts compiling the eval step for the matching eval batch meanwhile."""
        sig = _signature(state, batch)
        hit = sig in self.train
        timings.note(program_cache="hit" if hit else "miss")
        if not hit:
            t0 = time.perf_counter()
            stored = program_store.load(self.store_id, "train", sig)
            if stored is not None:  # built by an earlier process: no trace, lowering or compile
                self.train[sig], self.loaded = stored, True
                timings.note(train_load_s=time.perf_counter() - t0, program_store="hit")
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
            timings.note(train_trace_s=t1 - t0, train_lower_s=t2 - t1, train_compile_s=t4 - t3,
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
                self.eval[sig] = self._background().submit(self._compile_eval, sig, weights, batch)

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

    def compiled_eval(self, weights: Any, batch: dict[str, jax.Array], timings: Timings) -> Callable:
        """The eval step's executable for these inputs: the background compile's (waited for, timed), this
        worker's earlier one, or compiled now (a CPU backend, or a batch of another shape) and kept."""
        sig = _signature(weights, batch)
        future = self.eval.get(sig)
        if future is None:
            executable, seconds = self._compile_eval(sig, weights, batch)
            self.eval[sig] = done = concurrent.futures.Future()
            done.set_result((executable, seconds))
            for k in ("eval_compile_s", "eval_compile_wait_s"):  # the evaluation waited for all of it
                timings.add(k, seconds)
            return executable
        if not future.done():
            t0 = time.perf_counter()
            concurrent.futures.wait([future])
            timings.add("eval_compile_wait_s", time.perf_counter() - t0)
        executable, seconds = future.result()
        timings.default("eval_compile_s", seconds if timings.get("program_cache") == "miss" else 0.0)
        return executable


def _background_eval_compile() -> bool:
    if BACKGROUND_EVAL_COMPILE is None:
        return jax.default_backend() != "cpu"
    return BACKGROUND_EVAL_COMPILE


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


# ------------------------------------------------------------------------ the key

def _program_fields(config: ml_collections.ConfigDict) -> str:
    """The config's fields minus ``NOT_IN_PROGRAM``, as JSON: the part of ``program_key`` a config alone gives."""
    fields = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k not in NOT_IN_PROGRAM}
    return json.dumps(fields, sort_keys=True, default=str)


def program_key(config: ml_collections.ConfigDict, spec: scaling.ScalingSpec, arch: Architecture,
                num_classes: int, steps_per_epoch: int, total_steps: int,
                make_eval_step: Callable[[Any, int], EvalStep]) -> tuple[Any, ...]:
    """Everything the jitted steps bake in as constants, so that equal keys mean one program: every config
    field but ``NOT_IN_PROGRAM``, the learning-rate schedule's inputs (steps per epoch and its span), the
    network, the classes, the evaluation and the devices. Seeds are not in it (trials that differ only in
    seed share a program); a new field is in it unless listed in ``NOT_IN_PROGRAM``."""
    derived = {"steps_per_epoch": steps_per_epoch, "schedule_span": recipe.schedule_steps(config, total_steps),
               "num_classes": num_classes, "devices": [(d.platform, d.id) for d in jax.devices()]}
    return (_program_fields(config), json.dumps(derived, sort_keys=True), repr(spec), repr(arch), make_eval_step)


# ------------------------------------------------------------------- a worker's programs

class Programs:
    """The compiled programs one worker holds (LRU by program_key), its background compile thread(s), and
    the groups of trials it has trained or is compiling ahead.

    A search worker keeps one for its life: its next trial of a network it trained finds the program
    compiled, and while the device trains one trial a thread compiles the next one's (``start_ahead``; one at
    a time). Threads: the eval-step compiles (one background thread, made on first use) and the ahead
    builds (one thread each); the program table is locked, since an ahead build adds to it beside the loop.
    """

    def __init__(self, size: int = PROGRAM_CACHE_SIZE):
        self.size = size
        self._steps: collections.OrderedDict[tuple[Any, ...], Steps] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._trained: set[str] = set()
        self._ahead: dict[str, concurrent.futures.Future] = {}

    @staticmethod
    def group(config: ml_collections.ConfigDict) -> str:
        """Trials that may share one compiled program: the config's fields minus NOT_IN_PROGRAM, as JSON (the
        trainer's program_key then decides)."""
        return _program_fields(config)

    def holds(self, config: ml_collections.ConfigDict) -> bool:
        """this worker trained config's group, or is compiling it ahead"""
        group = self.group(config)
        return group in self._trained or group in self._ahead

    def trained(self, config: ml_collections.ConfigDict) -> None:
        """record that this worker trained (is training) config's group"""
        self._trained.add(self.group(config))

    def ahead_busy(self, except_config: ml_collections.ConfigDict | None = None) -> bool:
        """an ahead-build of another group is still running"""
        mine = None if except_config is None else self.group(except_config)
        return any(not f.done() for g, f in list(self._ahead.items()) if g != mine)

    def start_ahead(self, config: ml_collections.ConfigDict, log: Callable[[str], None],
                    label: str | None = None) -> None:
        """build and compile config's program on a thread (compile_ahead), recorded under its group

        ``log`` gets one line, "compiling ahead: <label>" (``label``: the trial's name; the model's without).
        A failure is kept for ``wait_ahead``: the trial then compiles for itself and meets the error there."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def build() -> None:
            try:
                future.set_result(compile_ahead(config, programs=self))
            except BaseException as e:  # noqa: BLE001 - the trial then compiles for itself and meets the error
                future.set_exception(e)

        self._ahead[self.group(config)] = future
        threading.Thread(target=build, name="effnet-compile-ahead", daemon=True).start()
        log(f"compiling ahead: {label or config.model.name}")

    def wait_ahead(self, config: ml_collections.ConfigDict, log: Callable[[str], None]) -> None:
        """wait for config's group's ahead-build if one exists; on failure log one line and return (the trial
        compiles for itself)"""
        future = self._ahead.get(self.group(config))
        if future is None:
            return
        try:
            future.result()
        except Exception as e:  # noqa: BLE001
            lines = str(e).strip().splitlines()
            first = f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")
            log(f"  compile ahead failed ({one_line(first)}): the trial compiles for itself")

    def clear(self) -> None:
        """forget every program (a test's fresh start)"""
        with self._lock:
            self._steps.clear()
        self._trained.clear()
        self._ahead.clear()

    def close(self) -> None:
        """Let the background compile thread end once its work is done (a ``Programs`` made for one run)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    def steps(self, key: tuple[Any, ...], make: Callable[[], Steps]) -> Steps:
        """The steps of ``key``'s program: this worker's (now the most recently used), else ``make()``'s, kept."""
        with self._lock:  # an ahead build (compile_ahead) builds programs beside the training loop
            steps = self._steps.get(key)
            if steps is None:
                steps = self._steps[key] = make()
                while len(self._steps) > self.size:
                    self._steps.popitem(last=False)
            self._steps.move_to_end(key)
        return steps

    def background(self) -> concurrent.futures.Executor:
        """One thread for background compiles: XLA releases the GIL while it compiles."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="effnet-compile")
            return self._executor


def compile_ahead(config: ml_collections.ConfigDict,
                  make_eval_step: Callable[[Any, int], EvalStep] = classification_eval_step,
                  programs: Programs | None = None) -> dict[str, Any]:
    """Build ``config``'s program and compile its train and eval steps into ``programs``, so that a later
    ``train_and_evaluate`` with those ``programs`` of a config with the same ``program_key`` starts training at
    once.

    For a search on an accelerator: while the device trains one trial, the host CPU is idle, and the next
    trial's compile can happen then (``Programs.start_ahead``). Writes nothing; the batch signatures are those
    of the source's first train and eval batches. Returns the phases' seconds (result.json's ``timings`` form).
    """
    timings = Timings()
    with timings.timed("prepare_s"):
        prepared = recipe.prepare(config)
    with timings.timed("build_s"):
        program = build_program(config, prepared.spec, prepared.source.num_classes, layers=prepared.layers,
                                dtype=prepared.dtype, steps_per_epoch=prepared.steps_per_epoch,
                                total_steps=prepared.total_steps, make_eval_step=make_eval_step,
                                programs=programs)
    assert program.steps is not None
    program.steps.compiled_train(program.state, global_batch(next(prepared.source.train_batches(0)),
                                                             program.data_sharding), timings)
    program.steps.compiled_eval(program.state.weights, global_batch(next(prepared.source.eval_batches()),
                                                                    program.data_sharding), timings)
    return timings.as_dict()


# ---------------------------------------------------------------------- a program

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
                  make_eval_step: Callable[[Any, int], EvalStep] = classification_eval_step,
                  programs: Programs | None = None) -> Program:
    """The model per ``config`` (``config.model.init_from`` loaded), its initial train state,
    replicated over a mesh of every device, and the jitted train and eval steps (those of an earlier
    program of the same ``program_key`` in ``programs``, with what they compiled; None: a fresh ``Programs``,
    nothing shared)."""
    programs = programs if programs is not None else Programs()
    model = create_model(spec, num_classes, config.seed, dtype=dtype, network=scaling.network(config.model),
                         drop_path_rate=config.model.drop_path_rate, dropout=spec.dropout, kernels=layers,
                         head_init=config.model.get("head_init", "paper"),
                         scan_blocks=config.model.get("scan_blocks", False))
    if config.model.init_from:
        from effnet_jax.weights import weight_files

        weight_files.load_weights_into(model, os.path.expanduser(config.model.init_from))
    packing, params, stats = recipe.state_packing(layers.kernels).create(model)
    schedule = recipe.learning_rate_schedule(config.optimizer, config.batch_size, steps_per_epoch,
                                             recipe.schedule_steps(config, total_steps))
    tx = recipe.make_optimizer(config.optimizer, schedule, packing.weight_decay_mask)
    weights = Weights(params, stats)
    state = TrainState(step=jnp.zeros((), jnp.int32), weights=weights, opt=tx.init(params),
                       dropout_key=jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1)),
                       ema=weights if config.optimizer.ema_decay > 0 else None)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    repl, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    key = program_key(config, spec, model.arch, num_classes, steps_per_epoch, total_steps, make_eval_step)

    def make() -> Steps:
        train_step = recipe.make_train_step(packing, tx, schedule, config, num_classes)
        return Steps(jax.jit(train_step, in_shardings=(repl, data_sharding), out_shardings=(repl, repl),
                             donate_argnums=0),
                     jax.jit(make_eval_step(packing, num_classes), in_shardings=(repl, data_sharding),
                             out_shardings=repl),
                     program_store.program_id(key, make_eval_step), programs.background)

    steps = programs.steps(key, make)
    return Program(packing, _replicate(state, repl), steps.train_step, steps.eval_step, data_sharding, model.arch,
                   steps)


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Host values (identical on every process) as global, replicated arrays."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                        tree)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """A process's part of a batch as the global array the steps take (sharded on its leading axis)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
