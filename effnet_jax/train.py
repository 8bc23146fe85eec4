"""The one trainer: config in, trained model and final metrics out.

    python -m effnet_jax.train --config=effnet_jax/configs/digits.py --workdir=runs/digits
    python -m effnet_jax.train --config=effnet_jax/configs/imagenet.py:b3 --workdir=runs/b3 \
        --config.batch_size=1024

The train step is one ``jax.jit`` over pure state (the model split once into flat
vectors by ``flat_state.FlatModel``, merged back inside the trace), data-parallel
over a mesh of every device of every host: the batch is sharded on its leading
axis, parameters are replicated, so BatchNorm
statistics and gradients are computed over the global batch. A workdir holding a
checkpoint resumes from it: data order and dropout keys are functions of
(seed, step), so a killed-and-resumed run ends where an uninterrupted one does.
``experiments.grid_search`` calls ``train_and_evaluate`` in-process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from effnet_jax import compile_cache, input_pipeline, scaling
from effnet_jax.arch import NETWORKS, NetworkSpec
from effnet_jax.cost import count_macs, count_params
from effnet_jax.errors import UserError, exit_on_user_error
from effnet_jax.flat_state import WEIGHT_DECAY_MASK, FlatModel
from effnet_jax.metrics import MetricsWriter
from effnet_jax.model import BN_MOMENTUM, create_model

State = dict[str, Any]


# ----------------------------------------------------------------------------- model

def model_spec(config: ml_collections.ConfigDict) -> scaling.ScalingSpec:
    """The ScalingSpec a config asks for: official name, or formula from constants and phi."""
    m = config.model
    if m.name == "formula":
        if m.constants:
            constants = scaling.load_constants(os.path.expanduser(m.constants))
        else:
            constants = scaling.check_constants({"alpha": m.alpha, "beta": m.beta, "gamma": m.gamma})
        spec = scaling.from_constants(**constants, phi=m.phi, base_resolution=m.base_resolution,
                                      resolution_multiple=m.resolution_multiple)
    else:
        spec = scaling.resolve(m.name)
    if m.resolution > 0:
        spec = dataclasses.replace(spec, resolution=int(m.resolution))
    if m.dropout >= 0:
        spec = dataclasses.replace(spec, dropout=float(m.dropout))
    return spec


def network(config: ml_collections.ConfigDict) -> NetworkSpec:
    """The block table the config names (arch.NETWORKS)."""
    if config.model.network not in NETWORKS:
        raise UserError(f"model.network must be one of {', '.join(NETWORKS)}, got {config.model.network!r}")
    return NETWORKS[config.model.network]


def compute_dtype(name: str) -> Any:
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16"):
        raise UserError(f"model.dtype must be auto, float32 or bfloat16, got {name!r}")
    return jnp.dtype(name)


# ------------------------------------------------------------------------- optimizer

def learning_rate_schedule(o: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """Linear warmup, then staircase exponential decay (the paper), cosine or constant."""
    peak = o.learning_rate * batch_size / 256
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if o.schedule == "exponential":
        return optax.warmup_exponential_decay_schedule(
            0.0, peak, warmup, max(1, int(o.decay_epochs * steps_per_epoch)), o.decay_rate, staircase=True)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1))
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    raise UserError(f"optimizer.schedule must be exponential, cosine or constant, got {o.schedule!r}")


def make_optimizer(o: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """optax chain for the configured optimizer over FlatModel's vectors; L2 decay enters as a gradient term."""
    mask = WEIGHT_DECAY_MASK
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
        raise UserError(f"optimizer.name must be rmsprop, sgd or adamw, got {o.name!r}")
    return optax.chain(*parts)


# --------------------------------------------------------------------------- steps

def make_steps(layout: FlatModel, tx: optax.GradientTransformation, schedule: optax.Schedule,
               config: ml_collections.ConfigDict, num_classes: int) -> tuple[Callable, Callable]:
    """Pure train and eval steps over (state, batch); the caller jits them."""
    o = config.optimizer

    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        step = state["step"]

        def loss_fn(params: dict[str, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            model = layout.merge(params, state["stats"])
            nnx.reseed(model, dropout=jax.random.fold_in(jax.random.wrap_key_data(state["dropout_key"]), step))
            logits = model(batch["image"])
            targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), o.label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, layout.stats_of(model))

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"step": step + 1, "params": params, "stats": stats, "opt": opt, "dropout_key": state["dropout_key"]}
        if "ema_params" in state:  # TF's ExponentialMovingAverage(num_updates=step)
            decay = jnp.minimum(o.ema_decay, (1.0 + step) / (10.0 + step))
            new["ema_params"] = optax.incremental_update(params, state["ema_params"], 1.0 - decay)
            new["ema_stats"] = optax.incremental_update(stats, state["ema_stats"], 1.0 - decay)
        metrics = {
            "loss": loss,
            "train_top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "learning_rate": schedule(step),
            "grad_norm": optax.tree.norm(grads),
        }
        return new, metrics

    def eval_step(params: dict[str, jax.Array], stats: jax.Array, batch: dict[str, jax.Array]
                  ) -> dict[str, jax.Array]:
        logits = layout.merge(params, stats, train=False)(batch["image"])
        mask, label = batch["mask"], batch["label"]
        top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
        return {
            "correct1": jnp.sum((top5[:, 0] == label) * mask),
            "correct5": jnp.sum(jnp.any(top5 == label[:, None], axis=-1) * mask),
            "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask),
        }

    return train_step, eval_step


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


def prepare(config: ml_collections.ConfigDict) -> Run:
    """Validate a config (UserError on any mistake) and open its data source."""
    spec = model_spec(config)
    arch = scaling.build_architecture(spec, network(config), config.model.drop_path_rate)
    if spec.resolution < arch.total_stride:
        raise UserError(f"resolution {spec.resolution} is smaller than the network's total stride "
                        f"{arch.total_stride}")
    dtype = compute_dtype(config.model.dtype)
    ndev = jax.device_count()
    if config.batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {config.batch_size}")
    if config.batch_size % ndev:
        raise UserError(f"batch_size {config.batch_size} is not divisible by the {ndev} devices")
    source = input_pipeline.create_source(config.data, spec.resolution, config.batch_size, config.seed,
                                          jax.process_index(), jax.process_count())
    steps_per_epoch = max(1, source.num_train // config.batch_size)
    total = config.num_train_steps or math.ceil(config.num_epochs * steps_per_epoch)
    if total <= 0:
        raise UserError("num_train_steps / num_epochs give no training steps")
    sched = learning_rate_schedule(config.optimizer, config.batch_size, steps_per_epoch, total)
    del sched  # validated here, built again with the state
    if config.optimizer.name not in ("rmsprop", "sgd", "adamw"):
        raise UserError(f"optimizer.name must be rmsprop, sgd or adamw, got {config.optimizer.name!r}")
    return Run(config, spec, source, total, steps_per_epoch, dtype)


def _replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Host values (identical on every process) as global, replicated arrays."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                        tree)


def _global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run: Run | None = None) -> dict[str, Any]:
    """Train per ``config`` in ``workdir`` (resuming from its checkpoint) and return final metrics.

    Raises UserError for a bad config before anything is written.
    """
    import orbax.checkpoint as ocp

    run = run or prepare(config)
    spec, source, total = run.spec, run.source, run.total_steps
    lead = jax.process_index() == 0
    if config.compile_cache_dir:  # a rerun, a resumed trial or a same-shaped trial skips XLA compiles
        compile_cache.enable(config.compile_cache_dir, min_compile_time_s=0.5)
    os.makedirs(workdir, exist_ok=True)
    if lead:
        _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))

    t_start = time.time()
    model = create_model(spec, source.num_classes, config.seed, dtype=run.dtype, network=network(config),
                         drop_path_rate=config.model.drop_path_rate, dropout=spec.dropout,
                         depthwise_impl=config.model.depthwise_impl)
    if config.model.bn_momentum != BN_MOMENTUM:
        for _, module in nnx.iter_graph(model):
            if isinstance(module, nnx.BatchNorm):
                module.momentum = config.model.bn_momentum
    if config.model.init_from:
        from effnet_jax import pretrained

        pretrained.load_weights_into(model, os.path.expanduser(config.model.init_from))
    layout, params, stats = FlatModel.create(model)
    schedule = learning_rate_schedule(config.optimizer, config.batch_size, run.steps_per_epoch, total)
    tx = make_optimizer(config.optimizer, schedule)
    # The dropout key is state, not a constant baked into the program: trials that differ
    # only in seed then share one compiled step (persistent compilation cache).
    dropout_key = jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 1))
    state: State = {"step": jnp.zeros((), jnp.int32), "params": params, "stats": stats, "opt": tx.init(params),
                    "dropout_key": dropout_key}
    if config.optimizer.ema_decay > 0:
        state["ema_params"], state["ema_stats"] = params, stats

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    repl, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = _replicate(state, repl)
    train_step, eval_step = make_steps(layout, tx, schedule, config, source.num_classes)
    p_train = jax.jit(train_step, in_shardings=(repl, data_sharding), out_shardings=(repl, repl), donate_argnums=0)
    p_eval = jax.jit(eval_step, in_shardings=(repl, repl, data_sharding), out_shardings=repl)

    ckpt = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    start = ckpt.latest_step() or 0
    if start:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = ckpt.restore(start, args=ocp.args.StandardRestore(abstract))
    writer = MetricsWriter(workdir, enabled=lead, resume_step=start)

    info = {
        "model": spec.name, "width": spec.width, "depth": spec.depth, "resolution": spec.resolution,
        "blocks": len(model.arch.blocks), "params": count_params(model.arch, source.num_classes),
        "macs": count_macs(model.arch, spec.resolution, source.num_classes), "dataset": source.name,
        "num_classes": source.num_classes, "batch_size": config.batch_size, "total_steps": total,
        "devices": jax.device_count(), "processes": jax.process_count(), "dtype": jnp.dtype(run.dtype).name,
    }
    del model

    eval_every = config.eval_every_steps or run.steps_per_epoch
    status, last_loss, compile_s = "ok", float("nan"), 0.0
    timed_steps, timed_s, t_mark = 0, 0.0, None
    bar = _progress(config, total, start, lead)
    batches = source.train_batches(start)
    for step in range(start, total):
        batch = _global_batch(next(batches), data_sharding)
        t0 = time.time()
        state, metrics = p_train(state, batch)
        if step == start:
            jax.block_until_ready(metrics)
            compile_s = time.time() - t0
            t_mark = time.time()
        done = step + 1
        if done % config.log_every_steps == 0 or done == total:
            metrics = jax.device_get(metrics)
            last_loss = float(metrics["loss"])
            now = time.time()
            n = done - start - 1
            if n > timed_steps:
                timed_s, timed_steps = now - t_mark, n
            img_s = config.batch_size * timed_steps / timed_s if timed_s > 0 else float("nan")
            writer.write(done, {**metrics, "img_per_s": img_s, "epoch": done / run.steps_per_epoch})
            bar.set_postfix(loss=f"{last_loss:.3f}", img_s=f"{img_s:.0f}")
            if not math.isfinite(last_loss):
                status = "diverged"
                break
        if done % eval_every == 0 or done == total:
            writer.write(done, _evaluate(p_eval, state, source, data_sharding))
        if done % config.checkpoint_every_steps == 0 or done == total:
            ckpt.save(done, args=ocp.args.StandardSave(state))
        bar.update(1)
    bar.close()
    ckpt.wait_until_finished()
    ckpt.close()

    final = {"status": status, "steps": int(jax.device_get(state["step"])), "train_loss": last_loss}
    if status == "ok":
        final.update(_evaluate(p_eval, state, source, data_sharding))
    final.update(info)
    final["params_sha256"] = params_digest(state["params"])
    if lead and status == "ok" and config.save_weights:
        final["weights"] = _save_weights(layout, state, spec, workdir)
    final.update({
        "epochs": final["steps"] / run.steps_per_epoch,
        "wall_time_s": time.time() - t_start,
        "compile_s": compile_s,
        "train_img_per_s": config.batch_size * timed_steps / timed_s if timed_s > 0 else None,
    })
    writer.close()
    if lead:
        _write_json(os.path.join(workdir, "result.json"), final)
    return final


def _save_weights(layout: FlatModel, state: State, spec: scaling.ScalingSpec, workdir: str) -> list[str]:
    """The final (and EMA) weights as ``pretrained.save_weights`` files; returns their paths."""
    from effnet_jax import pretrained

    paths = []
    for name, p, s in (("weights", "params", "stats"), ("ema_weights", "ema_params", "ema_stats")):
        if p in state:
            params, stats = jax.device_get((state[p], state[s]))
            path = os.path.join(workdir, f"{name}.safetensors")
            pretrained.save_weights(layout.merge(params, stats), path, spec)
            paths.append(path)
    return paths


def params_digest(params: nnx.State) -> str:
    """SHA-256 of every parameter's bytes: equal digests mean bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def _evaluate(p_eval: Callable, state: State, source: input_pipeline.Source,
              sharding: NamedSharding) -> dict[str, float]:
    """Top-1 / top-5 / loss on the eval split, for the raw and (if kept) EMA weights."""
    out = {}
    variants = [("val", "params", "stats")]
    if "ema_params" in state:
        variants.append(("ema_val", "ema_params", "ema_stats"))
    sums: dict[str, dict[str, float]] = {v[0]: {} for v in variants}
    for batch in source.eval_batches():
        batch = _global_batch(batch, sharding)
        for prefix, p, s in variants:
            for k, v in jax.device_get(p_eval(state[p], state[s], batch)).items():
                sums[prefix][k] = sums[prefix].get(k, 0.0) + float(v)
    for prefix, s in sums.items():
        count = max(s["count"], 1.0)
        out[f"{prefix}_top1"] = s["correct1"] / count
        out[f"{prefix}_top5"] = s["correct5"] / count
        out[f"{prefix}_loss"] = s["loss"] / count
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


def _write_json(path: str, obj: Any) -> None:
    """Write atomically: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def summary_line(result: dict[str, Any]) -> str:
    """The final one-line summary printed by the CLI."""
    parts = [f"{result['model']} {result['resolution']}px on {result['dataset']}", f"status {result['status']}",
             f"{result['steps']} steps", f"train loss {result['train_loss']:.4f}"]
    if "val_top1" in result:
        parts.append(f"val top-1 {result['val_top1']:.4f}")
    if "ema_val_top1" in result:
        parts.append(f"EMA val top-1 {result['ema_val_top1']:.4f}")
    if result.get("train_img_per_s"):
        parts.append(f"{result['train_img_per_s']:.0f} img/s")
    parts.append(f"{result['wall_time_s']:.1f} s")
    return "done: " + ", ".join(parts)


# --------------------------------------------------------------------------- CLI

def _module_name(path: str) -> str:
    """'.../experiments/grid_search.py' -> 'experiments.grid_search' (for the usage line)."""
    parts = os.path.normpath(os.path.splitext(path)[0]).split(os.sep)
    return ".".join(parts[-2:]) if len(parts) >= 2 else parts[-1]


def parse_config_flags(argv: list[str], default_config: str | None = None,
                       define_extra: Callable[[Any], None] | None = None) -> tuple[ml_collections.ConfigDict, Any]:
    """Parse --config / --config.x=y / --workdir (+ extra flags); mistakes become one-line UserErrors.

    Also takes the multi-host flags and calls jax.distributed.initialize() when
    --distributed is given (TPU pods and multi-node GPU; see the README).
    """
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default_config, "config file (path[:arg])", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and results go", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods, multi-node GPU)",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (when not auto-detected)",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes (when not auto-detected)", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index (when not auto-detected)", flag_values=fv)
    if define_extra is not None:
        define_extra(fv)
    if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(f"usage: python -m {_module_name(argv[0])} [--flag=value ...]\n"
              "Any field of the --config file's get_config() can be overridden: --config.<field>=<value>.\n")
        print(fv.get_help())
        raise SystemExit(0)
    try:
        fv(argv)
        config = fv.config
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise UserError(str(e).strip().split("\n")[0]) from None
    if config is None:
        raise UserError("--config is required, e.g. --config=effnet_jax/configs/digits.py")
    if fv.distributed:
        kwargs = {k: fv[k].value for k in ("coordinator_address", "num_processes", "process_id")
                  if fv[k].value is not None}
        jax.distributed.initialize(**kwargs)
    return config, fv


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    config, fv = parse_config_flags(sys.argv if argv is None else argv)
    if not fv.workdir:
        raise UserError("--workdir is required")
    result = train_and_evaluate(config, fv.workdir)
    if jax.process_index() == 0:
        print(summary_line(result), flush=True)
    return result


if __name__ == "__main__":
    main()
