"""Train-step and inference throughput of effnet_jax, optionally against timm.

    python scripts/benchmark.py --model b0 --resolution 64 --batch 32 --peer timm

Measures, on whatever backend JAX has: train-step img/s (the trainer's own jitted,
state-donating step, built by ``programs.build_program`` from the default config: the
paper's RMSProp recipe with EMA, label smoothing, dropout and drop path), inference
img/s, compile time of each program (trace + lower + compile, and the first step),
XLA's compiled memory estimate and, where the backend reports it (GPU/TPU), peak
device memory. ``--kernels fast,reference`` times the speed tricks against plain
flax layers and per-leaf optax (config ``model.kernels``). ``--peer timm`` times timm's
``tf_efficientnet_*`` equivalent in the same process, interleaved with ours so that
noise from other jobs on the machine hits both alike, and prints ours/peer ratios.

``--scan_blocks off,on`` times the train step with and without the scan over each stage's
repeated blocks (config ``model.scan_blocks``), interleaved. ``--compile`` measures instead the
train step's compile time, cold and warm, for several models (``--compile_models``), scanned and
unscanned, each in fresh processes (see ``compile_mode``), plus the time a grid-search trial of
``--trial_steps`` steps would take with each.

On a GPU, where compiles are long, ``scripts/gpu_suite.sh`` runs each setting in its own
process (``--peer_only`` times timm alone) and ``--report FILES`` joins their JSON lines
into one table.

Only jax, flax, optax, ml_collections (the trainer's config) and torch, timm for the peer
are imported: no tensorflow.
One JSON object per measurement goes to stdout (``--json`` also writes them to a
file), then a readable table. A bad argument (``--batch 0``, a resolution below the
network's total stride, an unknown flag) is one ``error:`` line on stderr and exit code 2,
before anything is compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Hazard (docs/efficientnet-facts): tensorflow imported before triton segfaults.
# Nothing here imports tensorflow, but import torch first anyway when a peer is asked.
_PEER_IMPORT_ERROR: ImportError | None = None
if any(a == "--peer" or a.startswith("--peer=") for a in sys.argv):
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:  # reported as one line by main()
        _PEER_IMPORT_ERROR = e

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from effnet_jax import compile_cache  # noqa: E402
from effnet_jax.configs import default as default_config  # noqa: E402
from effnet_jax.errors import ArgumentParser, UserError, exit_on_user_error  # noqa: E402
from effnet_jax.model import ops, scaling  # noqa: E402
from effnet_jax.model.arch import NETWORKS  # noqa: E402
from effnet_jax.model.efficientnet import create_model, eval_view  # noqa: E402
from effnet_jax.model.layers import KERNELS, resolve_kernels  # noqa: E402
from effnet_jax.model.scaling import OFFICIAL, ScalingSpec, build_architecture, from_constants, resolve  # noqa: E402
from effnet_jax.training import program_store, programs, recipe  # noqa: E402
from effnet_jax.training.timings import Timings  # noqa: E402

LEARNING_RATE = 0.016 * 32 / 256  # official rate per 256 images, at batch 32 (timm's optimizer)


def cpu_threads() -> int:
    """Cores this process may run on: XLA:CPU sizes its pool the same way."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class Runner:
    """One thing to time: ``run(n)`` does n steps and waits for the device."""

    impl: str  # "effnet_jax" or "timm"
    mode: str  # "train" or "inference"
    variant: str  # e.g. "xla", "shift" (fast kernels), "reference", "eager", "compile"
    run: Callable[[int], None]
    info: dict[str, Any] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # seconds per step, one per repeat
    hlo: Callable[[], str] | None = None  # ours: the compiled program's HLO text (for --profile)


# --------------------------------------------------------------------------- ours


def memory_info(compiled: Any) -> dict[str, Any]:
    """XLA's static memory estimate of a compiled program (reported on every backend)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    return {
        "compiled_temp_bytes": int(m.temp_size_in_bytes),
        "compiled_argument_bytes": int(m.argument_size_in_bytes),
        "compiled_output_bytes": int(m.output_size_in_bytes),
    }


def peak_device_bytes() -> int | None:
    """Peak device memory in use so far, where the backend reports it (not on CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def variant_name(kernels: str, impl: str) -> str:
    """The depthwise implementation for the fast kernels ("shift", "xla", "hybrid"); "reference" for flax's layers."""
    return "reference" if kernels == "reference" else ops.resolve_depthwise_impl(impl)


def bench_config(args: argparse.Namespace, kernels: str, impl: str, scan: bool = False) -> Any:
    """The trainer's default config (the paper's ImageNet recipe) at this benchmark's batch, dtype, kernels
    and ``model.scan_blocks``."""
    c = default_config.get_config()
    c.batch_size = args.batch
    c.model.dtype = args.dtype
    c.model.kernels = kernels
    c.model.depthwise_impl = impl
    c.model.scan_blocks = scan
    c.model.network = args.network
    c.compile_cache_dir = ""
    return c


def ours_train(spec: ScalingSpec, args: argparse.Namespace, kernels: str, impl: str, x: np.ndarray,
               y: np.ndarray, scan: bool = False) -> Runner:
    """The trainer's jitted train step (``programs.build_program``) on one fixed batch, its state donated, rebound."""
    config = bench_config(args, kernels, impl, scan)
    program = programs.build_program(config, spec, args.num_classes, layers=recipe.model_layers(config),
                                     dtype=scaling.compute_dtype(args.dtype), steps_per_epoch=1000, total_steps=100_000)
    batch = jax.device_put({"image": jnp.asarray(x), "label": jnp.asarray(y)}, program.data_sharding)
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = program.train_step.lower(program.state, batch).compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    state = [program.state]

    def run(n: int) -> None:
        metrics = None
        for _ in range(n):
            state[0], metrics = compiled(state[0], batch)
        jax.block_until_ready((state, metrics))

    t0 = time.perf_counter()
    run(1)
    first_run_s = time.perf_counter() - t0
    info = {"compile_s": compile_s, "compile_cpu_s": compile_cpu_s, "first_step_s": compile_s + first_run_s,
            "kernels": kernels, "scan_blocks": scan, **memory_info(compiled)}
    variant = variant_name(kernels, impl) + ("+scan" if scan else "")
    print(f"compiled train ({variant}) in {compile_s:.1f} s; first step done", file=sys.stderr, flush=True)
    return Runner("effnet_jax", "train", variant, run, info, hlo=compiled.as_text)


def ours_inference(spec: ScalingSpec, args: argparse.Namespace, kernels: str, impl: str, x: np.ndarray,
                   scan: bool = False) -> Runner:
    """The model's forward on running statistics, one jitted function over its split state."""
    config = bench_config(args, kernels, impl, scan)
    model = eval_view(create_model(spec, args.num_classes, dtype=scaling.compute_dtype(args.dtype),
                                   kernels=recipe.model_layers(config), scan_blocks=scan,
                                   network=NETWORKS[args.network]))
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    xd = jnp.asarray(x, scaling.compute_dtype(args.dtype))
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = fwd.lower(state, xd).compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    def run(n: int) -> None:
        out = None
        for _ in range(n):
            out = compiled(state, xd)
        jax.block_until_ready(out)

    t0 = time.perf_counter()
    run(1)
    info = {"compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
            "first_step_s": compile_s + time.perf_counter() - t0, "kernels": kernels, "scan_blocks": scan,
            **memory_info(compiled)}
    variant = variant_name(kernels, impl) + ("+scan" if scan else "")
    print(f"compiled inference ({variant}) in {compile_s:.1f} s; first step done", file=sys.stderr, flush=True)
    return Runner("effnet_jax", "inference", variant, run, info, hlo=compiled.as_text)


# --------------------------------------------------------------------------- compile time


COMPILE_MODELS = ("b0", "phi1", "b3")


def compile_spec(name: str, args: argparse.Namespace) -> tuple[ScalingSpec, int]:
    """``"phi1"``: the formula at phi = 1 from --alpha/--beta/--gamma on a base of --resolution (a grid-search
    candidate at its own resolution, rounded to 1 px as the grid search does); otherwise an official name,
    at --resolution (default 32)."""
    res = args.resolution or 32
    if name == "phi1":
        spec = from_constants(args.alpha, args.beta, args.gamma, 1.0, base_resolution=res, resolution_multiple=1)
        return spec, spec.resolution
    return resolve(name), res


def _cache_entries(path: str | None) -> int:
    """JAX's persistent-cache files in ``path`` (not the program store's subdirectory)."""
    return sum(1 for e in os.scandir(path) if e.is_file()) if path and os.path.isdir(path) else 0


def _stored_programs() -> int:
    root = program_store.directory()
    return len(os.listdir(root)) if root and os.path.isdir(root) else 0


def compile_probe(args: argparse.Namespace) -> dict[str, Any]:
    """In this process: build one train step (``programs.build_program``, the default config), time its trace,
    lowering and compile with the persistent cache in --compile_cache, then --compile_steps steps.

    Run by ``compile_mode`` in a fresh process per measurement, so that no in-memory cache of jax's
    or XLA's helps: with an empty cache directory that is the cold compile, with the directory an
    earlier process filled, the warm one (the program loaded from disk, still traced and lowered).
    """
    spec, res = compile_spec(args.compile_probe, args)
    kernels = args.kernel_sets[0]
    impl = args.impls[0] if kernels == "fast" else "auto"
    scan = args.scan_sets[0]
    config = bench_config(args, kernels, impl, scan)
    program = programs.build_program(config, spec, args.num_classes, layers=recipe.model_layers(config),
                                     dtype=scaling.compute_dtype(args.dtype), steps_per_epoch=1000, total_steps=100_000)
    rng = np.random.default_rng(0)
    batch = jax.device_put({"image": jnp.asarray(rng.standard_normal((args.batch, res, res, 3), dtype=np.float32)),
                            "label": jnp.asarray(rng.integers(0, args.num_classes, args.batch).astype(np.int32))},
                           program.data_sharding)
    entries, stored = _cache_entries(args.compile_cache), _stored_programs()
    times = Timings()  # the trainer's phases, when it builds the step
    c0, t0 = time.process_time(), time.perf_counter()
    if args.probe_phase == "warm":  # JAX's persistent cache: traced and lowered, then loaded by its HLO's key
        traced = program.train_step.trace(program.state, batch)
        t1 = time.perf_counter()
        lowered = traced.lower()
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3, c3 = time.perf_counter(), time.process_time()
    else:  # what a trial runs: the program store's file, else trace, lower, compile and store it
        programs.BACKGROUND_EVAL_COMPILE = False  # time the train step alone
        compiled = program.steps.compiled_train(program.state, batch, times)
        t3, c3 = time.perf_counter(), time.process_time()
        t1 = t0 + times.get("train_trace_s", 0.0)
        t2 = t1 + times.get("train_lower_s", 0.0)
    state, metrics = compiled(program.state, batch)  # the first step: buffers, thread pools
    jax.block_until_ready(metrics)
    t4 = time.perf_counter()
    for _ in range(args.compile_steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t4) / args.compile_steps
    return {"mode": "compile", "model": spec.name, "network": args.compile_probe, "resolution": res,
            "batch": args.batch, "dtype": args.dtype, "kernels": kernels, "variant": variant_name(kernels, impl),
            "scan_blocks": scan, "blocks": len(program.arch.blocks), "trace_s": t1 - t0, "lower_s": t2 - t1,
            "compile_s": times.get("train_compile_s", times.get("train_load_s", t3 - t2)),
            "store_save_s": times.get("program_save_s", 0.0), "program_store": times.get("program_store"),
            "total_s": t3 - t0, "cpu_s": c3 - c0, "first_step_s": t4 - t0, "step_s": step_s,
            "cache_entries_before": entries, "cache_entries_after": _cache_entries(args.compile_cache),
            "stored_programs_before": stored, "stored_programs_after": _stored_programs(),
            "compiled_fusions": compiled.as_text().count(" fusion("), **environment()}


def compile_mode(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Cold, warm and stored train-step compile for each of --compile_models and each --scan_blocks setting.

    Each (model, setting) gets a new, empty persistent-cache directory. Cold: a fresh process compiles
    into it as a trial does (trace, lower, compile, and the program store's save). Warm: a second fresh
    process builds the same program and loads it from JAX's cache (trace and lowering included: its key
    is the lowered program). Stored: a third loads it from the program store, as a trial now does. A
    model's settings run back to back, so that a slow change of load on the machine hits them alike;
    ``loadavg_1min`` records it.
    """
    import shutil
    import subprocess
    import tempfile

    passthrough = ["--network", args.network, "--batch", str(args.batch), "--num_classes", str(args.num_classes),
                   "--dtype", args.dtype, "--kernels", args.kernel_sets[0], "--depthwise_impl", args.impls[0],
                   "--alpha", str(args.alpha), "--beta", str(args.beta), "--gamma", str(args.gamma),
                   "--compile_steps", str(args.compile_steps)]
    if args.resolution:
        passthrough += ["--resolution", str(args.resolution)]
    records = []
    for name in args.compile_models:
        for scan in args.scan_sets:
            cache = tempfile.mkdtemp(prefix="effnet_compile_cache_")
            try:
                for phase in ("cold", "warm", "stored"):
                    cmd = [sys.executable, os.path.abspath(__file__), "--compile_probe", name, "--scan_blocks",
                           "on" if scan else "off", "--compile_cache", cache, "--probe_phase", phase, *passthrough]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                    if proc.returncode or not lines:
                        raise UserError(f"compile probe {name} ({phase}) failed: "
                                        f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
                    rec = {**json.loads(lines[-1]), "phase": phase, "loadavg_1min": os.getloadavg()[0]}
                    records.append(rec)
                    print(f"{name} scan_blocks={scan} {phase}: {rec['total_s']:.1f} s "
                          f"(compile {rec['compile_s']:.1f} s), step {1e3 * rec['step_s']:.0f} ms",
                          file=sys.stderr, flush=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    return records


def compile_table(records: list[dict[str, Any]], trial_steps: tuple[int, ...]) -> str:
    """Cold / warm / stored train-step compile per model and setting, the step time, and a trial's estimated time
    (cold compile + steps x step time); then scanned / unscanned ratios per model."""
    by = {(r["network"], r["resolution"], r["scan_blocks"], r["phase"]): r for r in records}
    trials = "".join(f" {f'trial {n}':>10}" for n in trial_steps)
    lines = [f"{'model':<6} {'res':>4} {'blocks':>6} {'scan':>5} {'fusions':>8} {'cold s':>7} {'(compile)':>9} "
             f"{'warm s':>7} {'stored s':>8} {'step ms':>8}{trials}"]
    for (name, res, scan, phase), r in by.items():
        if phase != "cold":
            continue
        warm = by.get((name, res, scan, "warm"), {}).get("total_s", float("nan"))
        stored = by.get((name, res, scan, "stored"), {})  # a miss (the code changed in between) is no number
        stored = stored["total_s"] if stored.get("program_store") == "hit" else float("nan")
        est = "".join(f" {r['total_s'] + n * r['step_s']:>10.1f}" for n in trial_steps)
        lines.append(f"{name:<6} {res:>4} {r['blocks']:>6} {'on' if scan else 'off':>5} "
                     f"{r['compiled_fusions']:>8} {r['total_s']:>7.1f} {r['compile_s']:>9.1f} "
                     f"{warm:>7.1f} {stored:>8.1f} {1e3 * r['step_s']:>8.1f}{est}")
    for name, res in dict.fromkeys((n, res) for n, res, _, _ in by):
        on, off = by.get((name, res, True, "cold")), by.get((name, res, False, "cold"))
        if on and off:
            ratios = [f"cold {on['total_s'] / off['total_s']:.2f}x", f"step {on['step_s'] / off['step_s']:.2f}x"]
            ratios += [f"trial {n} {(on['total_s'] + n * on['step_s']) / (off['total_s'] + n * off['step_s']):.2f}x"
                       for n in trial_steps]
            lines.append(f"{name} {res}px: scanned / unscanned: {', '.join(ratios)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- timm


def timm_model(spec: ScalingSpec, num_classes: int) -> Any:
    """timm's TF-compatible EfficientNet (TF 'SAME' padding, BN eps 1e-3) at ``spec``'s width/depth."""
    import timm
    from timm.models import efficientnet as tef

    if spec.name in {f"b{i}" for i in range(9)} | {"l2"}:
        return timm.create_model(f"tf_efficientnet_{spec.name}", num_classes=num_classes)
    return tef._gen_efficientnet(  # formula specs have no registered name
        "tf_efficientnet_b0", channel_multiplier=spec.width, depth_multiplier=spec.depth,
        num_classes=num_classes, bn_eps=tef.BN_EPS_TF_DEFAULT, pad_type="same",
    )


def timm_runners(spec: ScalingSpec, args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> list[Runner]:
    import torch

    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # what a tuned PyTorch run uses: fastest conv algorithm per shape
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    xt_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    yt = torch.from_numpy(y.astype(np.int64)).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Each variant in both memory layouts by default: channels-last is PyTorch's faster layout for
    # depthwise convs (measured 2.4x faster B0 inference at 32 px on a 2-core CPU), so the ratios
    # are against timm's best layout, not a default that flatters us.
    if args.timm_variants:
        variants = args.timm_variants
    else:
        variants = ["eager"] + (["compile"] if cuda and not args.no_torch_compile else [])
        variants = [v + layout for v in variants for layout in ("", "-cl")]
    runners = []
    for variant in variants:
        fmt = torch.channels_last if variant.endswith("-cl") else torch.contiguous_format
        xt = xt_nchw.contiguous(memory_format=fmt)
        if "train" in args.modes:
            model = timm_model(spec, args.num_classes).to(device, memory_format=fmt).train()
            opt = torch.optim.RMSprop(model.parameters(), lr=LEARNING_RATE, alpha=0.9, eps=1e-3, momentum=0.9)
            fwd = torch.compile(model) if variant.startswith("compile") else model

            def train(n: int, fwd: Any = fwd, opt: Any = opt, xt: Any = xt) -> None:
                for _ in range(n):
                    opt.zero_grad(set_to_none=True)
                    with amp:
                        loss = torch.nn.functional.cross_entropy(fwd(xt).float(), yt)
                    loss.backward()
                    opt.step()
                sync()

            first = _first_step(train, variant)
            if first is not None:
                runners.append(Runner("timm", "train", variant, train, {"first_step_s": first}))
        if "inference" in args.modes:
            model = timm_model(spec, args.num_classes).to(device, memory_format=fmt).eval()
            fwd = torch.compile(model) if variant.startswith("compile") else model

            def infer(n: int, fwd: Any = fwd, xt: Any = xt) -> None:
                with torch.inference_mode(), amp:
                    for _ in range(n):
                        fwd(xt)
                sync()

            first = _first_step(infer, variant)
            if first is not None:
                runners.append(Runner("timm", "inference", variant, infer, {"first_step_s": first}))
    return runners


def _first_line(e: BaseException) -> str:
    """An exception as one short line for a warning (its message may be empty or span pages)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _first_step(run: Callable[[int], None], variant: str) -> float | None:
    """Seconds of the first step (torch.compile compiles here); None, with a warning, if it fails."""
    t0 = time.perf_counter()
    try:
        run(1)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        if not variant.startswith("compile"):
            raise
        print(f"warning: timm {variant} failed, skipped: {_first_line(e)}", file=sys.stderr)
        return None
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, checked: UserError on a bad value (the network's stride is checked in ``spec_and_resolution``)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="b0", help="b0..b8 (ignored when --phi is given)")
    p.add_argument("--network", choices=tuple(NETWORKS), default="b0", help="the block table the scaling applies to")
    p.add_argument("--alpha", type=float, default=1.2)
    p.add_argument("--beta", type=float, default=1.1)
    p.add_argument("--gamma", type=float, default=1.15)
    p.add_argument("--phi", type=float, default=None, help="use the formula spec alpha/beta/gamma^phi")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=None, help="default: the spec's resolution")
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--kernels", default="auto",
                   help=f"one of {KERNELS} (config model.kernels), or a comma list to compare: fast,reference")
    p.add_argument("--depthwise_impl", default="auto",
                   help=f"fast kernels: one of {ops.DEPTHWISE_IMPLS}, or a comma list to compare several")
    p.add_argument("--modes", default="train,inference", help="comma list of train, inference")
    p.add_argument("--scan_blocks", default="off",
                   help="config model.scan_blocks: off, on, or off,on to compare (interleaved; --compile: each)")
    p.add_argument("--compile", action="store_true",
                   help="time the train step's cold and warm compile of --compile_models in fresh processes")
    p.add_argument("--compile_models", default=",".join(COMPILE_MODELS),
                   help="with --compile: comma list of b0..b8 (at --resolution, default 32) and phi1 (the formula "
                        "at phi 1 from --alpha/--beta/--gamma, base --resolution)")
    p.add_argument("--compile_steps", type=int, default=10, help="with --compile: timed steps after compiling")
    p.add_argument("--trial_steps", default="40,120",
                   help="with --compile: trial lengths (steps) to estimate compile + steps for")
    p.add_argument("--compile_probe", default=None, help=argparse.SUPPRESS)  # one --compile measurement
    p.add_argument("--probe_phase", default="cold", choices=("cold", "warm", "stored"), help=argparse.SUPPRESS)
    p.add_argument("--peer", choices=("timm",), default=None)
    p.add_argument("--peer_only", action="store_true", help="time only the peer (compare with --report)")
    p.add_argument("--no_torch_compile", action="store_true", help="GPU only: skip the torch.compile peer")
    p.add_argument("--timm_variants", default=None,
                   help="comma list of eager, eager-cl, compile, compile-cl (default: eager and eager-cl, "
                        "plus compile and compile-cl on GPU)")
    p.add_argument("--profile", default=None,
                   help="after timing, trace a few of our steps into this folder (see scripts/profile_summary.py)")
    p.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                   help="only print the table of earlier --json files (e.g. runs split over processes)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    p.add_argument("--threads", type=int, default=cpu_threads(), help="torch threads (JAX uses all cores)")
    p.add_argument("--compile_cache", default=None, help="persistent XLA compilation cache directory")
    p.add_argument("--json", default=None, help="also write the JSON lines here")
    args = p.parse_args(argv)
    if args.peer_only and not args.peer:
        p.error("--peer_only needs --peer")
    for name, least in (("batch", 1), ("steps", 1), ("repeats", 1), ("warmup", 0), ("num_classes", 1),
                        ("threads", 1), ("compile_steps", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if args.resolution is not None and args.resolution < 1:
        p.error(f"--resolution must be positive, got {args.resolution}")
    for path in args.report or []:
        if not os.path.isfile(path):
            p.error(f"--report: no such file: {path}")
    for flag, path in (("--json", args.json), ("--profile", args.profile)):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent and not os.path.isdir(parent):
            p.error(f"{flag}: directory {parent} does not exist")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= {"train", "inference"} or not args.modes:
        p.error("--modes takes train and/or inference")
    args.timm_variants = [v.strip() for v in args.timm_variants.split(",") if v.strip()] if args.timm_variants else None
    for v in args.timm_variants or []:
        if v not in ("eager", "eager-cl", "compile", "compile-cl"):
            p.error(f"--timm_variants: {v!r} is not one of eager, eager-cl, compile, compile-cl")
    args.impls = [i.strip() for i in args.depthwise_impl.split(",") if i.strip()]
    for impl in args.impls:
        if impl not in ops.DEPTHWISE_IMPLS:
            p.error(f"--depthwise_impl: {impl!r} is not one of {ops.DEPTHWISE_IMPLS}")
    args.kernel_sets = []
    for k in (k.strip() for k in args.kernels.split(",") if k.strip()):
        if k not in KERNELS:
            p.error(f"--kernels: {k!r} is not one of {KERNELS}")
        if resolve_kernels(k) not in args.kernel_sets:
            args.kernel_sets.append(resolve_kernels(k))
    if not args.kernel_sets:
        p.error(f"--kernels takes one or more of {KERNELS}")
    switch = {"off": False, "on": True}
    args.scan_sets = []
    for v in (v.strip() for v in args.scan_blocks.split(",") if v.strip()):
        if v not in switch:
            p.error(f"--scan_blocks: {v!r} is not off or on")
        if switch[v] not in args.scan_sets:
            args.scan_sets.append(switch[v])
    if not args.scan_sets:
        p.error("--scan_blocks takes off, on or off,on")
    args.compile_models = [m.strip() for m in args.compile_models.split(",") if m.strip()]
    for m in args.compile_models:
        if m != "phi1" and m not in OFFICIAL:
            p.error(f"--compile_models: {m!r} is not phi1 or one of {', '.join(OFFICIAL)}")
    try:
        args.trial_steps = tuple(int(n) for n in args.trial_steps.split(",") if n.strip())
    except ValueError:
        p.error(f"--trial_steps takes a comma list of step counts, got {args.trial_steps!r}")
    if args.compile and args.peer:
        p.error("--compile times our train step only; drop --peer")
    return args


def environment() -> dict[str, Any]:
    env = {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu_threads": cpu_threads(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "optax": optax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS") or None,
    }
    if "torch" in sys.modules:
        env["torch"] = sys.modules["torch"].__version__
        env["timm"] = sys.modules["timm"].__version__
    return env


def table(records: list[dict[str, Any]]) -> str:
    """One row per runner: img/s, ms/step, first step (compile included), ours/timm ratios and, where the
    reference kernels were timed too, ours/reference (the speed-up of the fast kernels)."""
    peer = {(r["mode"], r["variant"]): r for r in records if r["impl"] == "timm"}
    refs = [r for r in records if r["impl"] == "effnet_jax" and r["variant"] == "reference"]

    def reference_for(r: dict[str, Any]) -> dict[str, Any] | None:
        """The reference record of the same mode, from the same process if there is one (--report joins runs)."""
        same_mode = [x for x in refs if x["mode"] == r["mode"]]
        same_run = [x for x in same_mode if x.get("started") == r.get("started")]
        return (same_run or same_mode or [None])[-1]

    lines = [f"{'mode':<10} {'impl':<11} {'variant':<10} {'img/s':>9} {'ms/step':>9} {'first s':>8}"
             "  vs timm / reference"]
    for r in records:
        ratios = []
        if r["impl"] == "effnet_jax":
            ref = reference_for(r)
            if ref is not None and r["variant"] != "reference":
                ratios.append(f"{r['img_per_s'] / ref['img_per_s']:.2f}x reference")
            for (mode, variant), p in peer.items():
                if mode == r["mode"]:
                    ratios.append(f"{r['img_per_s'] / p['img_per_s']:.2f}x {variant}")
        first = r.get("first_step_s")
        lines.append(
            f"{r['mode']:<10} {r['impl']:<11} {r['variant']:<10} {r['img_per_s']:>9.1f} {1e3 * r['step_s']:>9.2f} "
            f"{'' if first is None else f'{first:.1f}':>8}  {', '.join(ratios)}"
        )
    return "\n".join(lines)


PROFILE_STEPS = 3


def profile(runners: list[Runner], args: argparse.Namespace) -> None:
    """Trace PROFILE_STEPS steps of each of ours (the first --kernels / --depthwise_impl) into ``args.profile``.

    Writes a Perfetto trace (``*.trace.json.gz``, also readable by xprof / TensorBoard) and
    each program's optimized HLO (``<mode>.hlo.txt``); ``scripts/profile_summary.py``
    turns the two into milliseconds per step by op.
    """
    first = next((r.variant for r in runners if r.impl == "effnet_jax"), None)
    ours = [r for r in runners if r.impl == "effnet_jax" and r.variant == first]
    os.makedirs(args.profile, exist_ok=True)
    with open(os.path.join(args.profile, "profile.json"), "w") as f:
        json.dump({"steps": PROFILE_STEPS, "modes": [r.mode for r in ours]}, f)
    for r in ours:
        with open(os.path.join(args.profile, f"{r.mode}.hlo.txt"), "w") as f:
            f.write(r.hlo())
    for r in ours:  # one trace per program, so that kernels are not mixed up between them
        with jax.profiler.trace(os.path.join(args.profile, r.mode), create_perfetto_trace=True):
            r.run(PROFILE_STEPS)


def report(paths: list[str]) -> list[dict[str, Any]]:
    """The table of JSON lines written by earlier runs, one table per (model, resolution, batch, dtype)."""
    records = []
    for path in paths:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"--report {path} line {i} is not JSON ({e.msg}): not a --json file?") from None
    missing = [r for r in records if not {"model", "resolution", "batch", "dtype", "backend"} <= r.keys()]
    if missing:
        raise UserError(f"--report: {len(missing)} records lack the benchmark's fields: not --json files?")
    compiles = [r for r in records if r.get("mode") == "compile"]
    if compiles:
        print("\ntrain-step compile (--compile records)")
        print(compile_table(compiles, (40, 120)))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("mode") == "compile":
            continue
        groups.setdefault((r["model"], r["resolution"], r["batch"], r["dtype"]), []).append(r)
    for (model, res, batch, dtype), rs in groups.items():
        print(f"\n{model} {res}px batch {batch} {dtype} on {rs[0]['backend']} ({rs[0]['device']})")
        print(table(rs))
    return records


def spec_and_resolution(args: argparse.Namespace) -> tuple[ScalingSpec, int]:
    """The spec to time and its input resolution; UserError below the network's total stride.

    Under the stride the last feature map would be smaller than one pixel: it still runs (SAME
    padding) but times a network nobody trains.
    """
    spec = from_constants(args.alpha, args.beta, args.gamma, args.phi) if args.phi is not None else resolve(args.model)
    res = args.resolution or spec.resolution
    stride = build_architecture(spec, NETWORKS[args.network]).total_stride
    if res < stride:
        raise UserError(f"--resolution {res} is smaller than the network's total stride {stride}")
    return spec, res


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    if args.compile_probe:
        if args.compile_cache:
            compile_cache.enable(args.compile_cache)
        record = compile_probe(args)
        print(json.dumps(record))
        return [record]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # names this process's records
    if args.compile:
        records = [{**r, "started": started} for r in compile_mode(args)]
        for rec in records:
            print(json.dumps(rec))
        if args.json:
            with open(args.json, "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in records)
        env = records[0] if records else environment()
        print(f"\ntrain-step compile, batch {args.batch} {args.dtype} on {env['backend']} ({env['device']}, "
              f"{env['cpu_threads']} threads), each in a fresh process; cold: empty caches (compiled and stored), "
              "warm: from JAX's persistent cache (traced and lowered first), stored: from the program store")
        print(compile_table(records, args.trial_steps))
        return records
    if args.peer and _PEER_IMPORT_ERROR is not None:
        raise UserError(f"--peer timm needs torch and timm: pip install torch timm ({_PEER_IMPORT_ERROR})")
    spec, res = spec_and_resolution(args)
    if args.compile_cache:
        compile_cache.enable(args.compile_cache)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, res, res, 3), dtype=np.float32)
    y = rng.integers(0, args.num_classes, args.batch).astype(np.int32)

    if not args.peer_only and args.batch % jax.device_count():
        raise UserError(f"--batch {args.batch} is not divisible by the {jax.device_count()} devices")
    runners: list[Runner] = []
    for kernels in [] if args.peer_only else args.kernel_sets:
        for impl in args.impls if kernels == "fast" else ["auto"]:  # depthwise_impl: the fast kernels' option
            for scan in args.scan_sets:
                if "train" in args.modes:
                    runners.append(ours_train(spec, args, kernels, impl, x, y, scan))
                if "inference" in args.modes:
                    runners.append(ours_inference(spec, args, kernels, impl, x, scan))
    if args.peer == "timm":
        runners += timm_runners(spec, args, x, y)

    for r in runners:
        r.run(args.warmup)
    for _ in range(args.repeats):  # interleaved, so background load hits every runner alike
        for r in runners:
            t0 = time.perf_counter()
            r.run(args.steps)
            r.times.append((time.perf_counter() - t0) / args.steps)

    env = environment()
    env["loadavg_1min"] = os.getloadavg()[0]  # other jobs on the machine: read timings in its light
    env["started"] = started
    peak = peak_device_bytes()
    records = []
    for r in runners:
        step_s = statistics.median(r.times)
        rec = {
            "model": spec.name, "resolution": res, "batch": args.batch, "dtype": args.dtype,
            "impl": r.impl, "mode": r.mode, "variant": r.variant, "kernels": r.info.get("kernels"),
            "scan_blocks": r.info.get("scan_blocks"),
            "img_per_s": args.batch / step_s, "step_s": step_s,
            "step_s_all": r.times, "steps": args.steps, "repeats": args.repeats,
            "compile_s": r.info.get("compile_s"), "compile_cpu_s": r.info.get("compile_cpu_s"),
            "first_step_s": r.info.get("first_step_s"),
            "compiled_temp_bytes": r.info.get("compiled_temp_bytes"),
            "peak_device_bytes": peak if r.impl == "effnet_jax" else None,
            "compile_cache": args.compile_cache, **env,
        }
        records.append(rec)
    for rec in records:
        print(json.dumps(rec))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
    print(f"\n{spec.name} {res}px batch {args.batch} {args.dtype} on {env['backend']} "
          f"({env['device']}, {env['cpu_threads']} threads, load average {env['loadavg_1min']:.1f})")
    print(table(records))
    if args.profile:  # after the records are out: a profiler failure must not lose the timings
        try:
            profile(runners, args)
        except Exception as e:  # noqa: BLE001 - reported, the timings above stand
            print(f"warning: profiling failed: {_first_line(e)}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
