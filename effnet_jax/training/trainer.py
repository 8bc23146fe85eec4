"""The one trainer: config in, trained model and final metrics out (``train_and_evaluate``).

A library module: no flag parsing and no process-wide setup (the entry points own those:
``effnet_jax.train`` for ``python -m effnet_jax.train``, ``effnet_jax.cli`` for all of them).

Here: the loop, its evaluations, the final weights, result.json and its one-line summary. Beside it, one job
each: ``recipe`` (what a config asks for, checked by ``recipe.prepare``: state, optimizer, schedule, steps),
``programs`` (the compiled steps a worker keeps, ``Programs``), ``checkpoints`` (claiming the workdir,
restoring its state), ``timings`` (result.json's seconds per phase).

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

import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from effnet_jax import provenance, signals
from effnet_jax.configs import to_steps
from effnet_jax.data import input_pipeline
from effnet_jax.errors import Interrupted
from effnet_jax.model import cost, scaling
from effnet_jax.training import checkpoints, metrics, recipe, rundir
from effnet_jax.training.metrics import MetricsWriter
from effnet_jax.training.programs import Program, Programs, build_program, global_batch
from effnet_jax.training.recipe import EvalStep, Prepared, TrainState
from effnet_jax.training.timings import Timings

if TYPE_CHECKING:
    from effnet_jax.training.flat_state import FlatPacking
    from effnet_jax.training.tree_state import TreePacking


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, prepared: Prepared | None = None,
                       restart: bool = False,
                       make_eval_step: Callable[[Any, int], EvalStep] = recipe.classification_eval_step,
                       programs: Programs | None = None) -> dict[str, Any]:
    """Train per ``config`` in ``workdir`` (resuming from its checkpoint) and return final metrics.

    Raises UserError for a bad config or a workdir of another config (``rundir.check_resume``)
    before anything is written; a finished workdir returns its stored result and changes nothing.
    ``prepared``: the caller's ``recipe.prepare(config)``, if it has one. ``restart``: delete the workdir's run
    files first (``rundir.clear_workdir``) and start over.
    Ctrl-C or SIGTERM saves a checkpoint and raises ``errors.Interrupted`` naming the step to resume from.
    A diverged run (non-finite loss) returns ``status`` "diverged". ``make_eval_step(packing,
    num_classes)`` swaps the evaluation (``classification_eval_step`` says the contract). ``programs``: the
    worker's compiled programs, which the run uses and adds to (None: a fresh ``Programs`` for this run).
    """
    t0 = time.perf_counter()
    workdir, prepared = os.fspath(workdir), prepared or recipe.prepare(config)
    timings = Timings(prepare_s=time.perf_counter() - t0)  # validation and opening the data (0: the caller's)
    own = programs is None
    programs = Programs() if programs is None else programs
    try:
        with contextlib.ExitStack() as held:  # the workdir's lock, until the result is written
            stored = checkpoints.claim_workdir(config, workdir, prepared, restart, held)
            return stored if stored is not None else \
                _train_prepared(config, workdir, prepared, make_eval_step, programs, timings)
    finally:
        if own:
            programs.close()


def _train_prepared(config: ml_collections.ConfigDict, workdir: str, prepared: Prepared,
                    make_eval_step: Callable[[Any, int], EvalStep], programs: Programs, timings: Timings
                    ) -> dict[str, Any]:
    """Build the program, restore the workdir's checkpoint, train, and write result.json (with ``timings``:
    seconds per phase, so that a search can say where its trials' time went)."""
    t_start, lead = time.time(), jax.process_index() == 0
    with timings.timed("build_s"):
        program = build_program(config, prepared.spec, prepared.source.num_classes, layers=prepared.layers,
                                dtype=prepared.dtype, steps_per_epoch=prepared.steps_per_epoch,
                                total_steps=prepared.total_steps, make_eval_step=make_eval_step, programs=programs)
    with timings.timed("restore_s"):
        ckpt, state, start = checkpoints.restore(config, workdir, program.state, prepared.total_steps)
    writer = MetricsWriter(workdir, enabled=lead, resume_step=start)
    try:
        state, final, rate = _train(config, prepared, program, state, start, ckpt, writer, workdir, timings)
    except jax.errors.JaxRuntimeError:
        if program.steps is not None and program.steps.loaded:
            program.steps.forget_stored()
        raise

    t_write = time.perf_counter()
    final.update(_run_info(config, prepared, program))
    final["params_sha256"] = params_digest(state.weights.params)
    if lead and final["status"] == "ok" and config.save_weights:
        final["weights"] = _save_weights(program.packing, state, prepared.spec, workdir)
    writer.close()
    timings.note(train_s=rate.seconds, write_s=time.perf_counter() - t_write)
    final.update({"epochs": final["steps"] / prepared.steps_per_epoch, "wall_time_s": time.time() - t_start,
                  "compile_s": rate.compile_s, "train_img_per_s": rate.img_per_s(config.batch_size),
                  "timings": timings.as_dict()})
    if lead:
        rundir.write_json(os.path.join(workdir, "result.json"), final)
    return final


@dataclasses.dataclass
class _StepRate:
    """Compile time (the first step) and the steady-state step rate after it."""

    compile_s: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def img_per_s(self, batch_size: int) -> float | None:
        return batch_size * self.steps / self.seconds if self.seconds > 0 else None


def _train(config: ml_collections.ConfigDict, prepared: Prepared, program: Program, state: TrainState, start: int,
           ckpt: Any, writer: MetricsWriter, workdir: str, timings: Timings
           ) -> tuple[TrainState, dict[str, Any], _StepRate]:
    """The loop: steps, logs, evaluations and checkpoints from ``start``, then the final evaluation.

    A stop signal (Ctrl-C, SIGTERM: ``effnet_jax.signals``) is seen between two steps: the state is
    saved at the step reached and ``Interrupted`` says where the rerun resumes.
    """
    import orbax.checkpoint as ocp

    total, lead, rate = prepared.total_steps, jax.process_index() == 0, _StepRate()
    eval_every = to_steps(config.eval_every_steps, 1, prepared.steps_per_epoch)
    ema = bool(config.get("eval_ema", True))
    status, last_loss, t_mark, done = "ok", _logged_loss(workdir, start) if lead else float("nan"), 0.0, start
    bar = _progress(config, total, start, lead)
    saved, stop, cool, step_fn = start, None, recipe.cooldown_start(config, total), None
    try:
        with signals.deferred():
            batches = prepared.source.train_batches(start)
            for step in range(start, total):
                if _stop_requested(step, config.log_every_steps):
                    break
                batch = global_batch(next(batches), program.data_sharding)
                t0 = time.time()
                if step_fn is None:  # compiled here (timed per phase), or this process's earlier trial's
                    step_fn = program.steps.compiled_train(state, batch, timings) if program.steps else \
                        program.train_step
                state, metrics_ = step_fn(state, batch)
                if step == start:
                    jax.block_until_ready(metrics_)
                    rate.compile_s, t_mark = time.time() - t0, time.time()
                done = step + 1
                if done % config.log_every_steps == 0 or done == total:
                    metrics_ = jax.device_get(metrics_)
                    last_loss = float(metrics_["loss"])
                    if done - start - 1 > rate.steps:
                        rate.seconds, rate.steps = time.time() - t_mark, done - start - 1
                    img_s = rate.img_per_s(config.batch_size) or float("nan")
                    writer.write(done, {**metrics_, "img_per_s": img_s, "epoch": done / prepared.steps_per_epoch})
                    bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{img_s:.0f}")
                    if not math.isfinite(last_loss):
                        status = "diverged"
                        break
                if done % eval_every == 0 or done == total:
                    with timings.timed("eval_s"):
                        writer.write(done, _evaluate(program, state, prepared.source, timings, ema))
                if done == cool and cool not in rundir.stable_steps(workdir):  # kept, and complete before any
                    # later checkpoint is written: a longer run continues from it (a resumed run wrote it already)
                    stable = checkpoints.stable_manager(workdir)
                    stable.save(done, args=ocp.args.StandardSave(state))
                    stable.wait_until_finished()
                    stable.close()
                if done % config.checkpoint_every_steps == 0 or done == total:
                    with timings.timed("checkpoint_s"):
                        ckpt.save(done, args=ocp.args.StandardSave(state))
                    saved = done
                bar.update(1)
            bar.close()
            if status == "ok" and done < total:  # stopped by a signal: the state reached is where to resume
                stop = signals.requested()
                if saved != done:
                    ckpt.save(done, args=ocp.args.StandardSave(state), force=True)
            with timings.timed("checkpoint_s"):
                ckpt.wait_until_finished()
            if stop is None:
                final = {"status": status, "steps": int(jax.device_get(state.step)), "train_loss": last_loss}
                if status == "ok":
                    with timings.timed("eval_s"):
                        final.update(_evaluate(program, state, prepared.source, timings, ema))
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
    with timings.timed("checkpoint_s"):
        ckpt.close()
    return state, final, rate


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


def _run_info(config: ml_collections.ConfigDict, prepared: Prepared, program: Program) -> dict[str, Any]:
    """What was trained, for result.json: the network's size and cost, the data, the hardware and software
    (``provenance``: what makes the same config score differently on another machine)."""
    spec, source, arch = prepared.spec, prepared.source, program.arch
    return {
        "model": spec.name, "network": config.model.network, **cost.figures(spec, arch, source.num_classes),
        "dataset": source.name,
        "num_classes": source.num_classes, "batch_size": config.batch_size, "total_steps": prepared.total_steps,
        "devices": jax.device_count(), "processes": jax.process_count(), "dtype": jnp.dtype(prepared.dtype).name,
        "kernels": prepared.layers.kernels, "scan_blocks": bool(config.model.get("scan_blocks", False)),
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
              timings: Timings, ema: bool = True) -> dict[str, float]:
    """The eval step's sums over the eval split, each divided by the example count, for the raw weights
    (``val_<name>``) and, when kept and ``ema``, the EMA weights (``ema_val_<name>``)."""
    variants = [("val", state.weights)] + ([("ema_val", state.ema)] if ema and state.ema is not None else [])
    sums: dict[str, dict[str, float]] = {prefix: {} for prefix, _ in variants}
    eval_fn = None
    for batch in source.eval_batches():
        batch = global_batch(batch, program.data_sharding)
        if eval_fn is None:  # the background compile's executable (see Steps), or the jitted step
            eval_fn = program.steps.compiled_eval(state.weights, batch, timings) \
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
