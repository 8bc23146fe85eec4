"""model.kernels: the fast kernels train like flax's own layers, the reference path uses none of the tricks,
and nothing imports a private flax name."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from suite_paths import CACHE

from effnet_jax.configs import digits
from effnet_jax.errors import UserError
from effnet_jax.model import efficientnet as model_lib
from effnet_jax.model import scaling
from effnet_jax.model.arch import TINY
from effnet_jax.training import programs, recipe, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TRICKS = ("effnet_jax.model.ops", "effnet_jax.model.fast_layers", "effnet_jax.training.flat_state")


def tiny_config(kernels, optimizer):
    c = digits.get_config()
    c.model.network, c.model.kernels, c.optimizer.name = "tiny", kernels, optimizer
    c.num_train_steps = c.schedule_steps = STEPS
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 1000, 1000
    c.progress_bar, c.compile_cache_dir = False, CACHE
    if optimizer == "sgd":
        # Full learning rate from step 0 (digits warms up over 33 steps, which would leave 6 steps
        # at ~1e-4) and weight decay large enough that a wrong decay mask moves parameters by
        # ~2.5e-4 per step, 100x the tolerance below.
        c.optimizer.schedule, c.optimizer.warmup_epochs, c.optimizer.weight_decay = "constant", 0.0, 0.05
    return c


def train_losses(config, workdir, resume_at=None):
    """(result, per-step losses, final weights by name); ``resume_at``: stop there first, then resume."""
    if resume_at is not None:
        first = config.copy_and_resolve_references()
        first.num_train_steps = resume_at
        trainer.train_and_evaluate(first, str(workdir))
    result = trainer.train_and_evaluate(config, str(workdir))
    with open(workdir / "metrics.jsonl") as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    return result, losses, load_file(str(workdir / "weights.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fast_and_reference_kernels_train_alike(tmp_path, optimizer):
    """Same seed, same data, 6 steps: the fast kernels (via "auto") and flax's layers agree to float rounding.

    The two compute the same function; they sum the same terms in other orders (BatchNorm's
    gradient sums, a 1x1 conv as a dot, the depthwise taps, norms over flat vectors or
    leaves), so float32 gradients differ by a few units in the last place (measured: grad norm
    1.3e-7 relative, losses 2.4e-7 apart, parameters at most 2.4e-7, one ulp, apart after 6
    SGD steps). The tolerances, 1e-6 on losses and 2e-6 on parameters, leave ~8x of room and
    are far below what a real difference makes (a wrong decay mask or BatchNorm momentum,
    another padding: 1e-4 and up). Parameters are compared under SGD only: Adam divides each
    gradient by its own RMS, so a parameter whose true gradient is zero (the offset of a
    BatchNorm followed by another BatchNorm, e.g. blocks.0.project_bn.bias) takes full
    learning-rate steps driven by rounding noise, different for any two orders of summation
    (measured 8e-4 apart). Such a parameter does not change the function, so losses stay
    comparable under Adam (the digits recipe). The reference run is also stopped at step 3 and
    resumed from its checkpoint: its per-leaf state goes through orbax.
    """
    fast = train_losses(tiny_config("auto", optimizer), tmp_path / "fast")
    ref = train_losses(tiny_config("reference", optimizer), tmp_path / "reference", resume_at=STEPS // 2)
    assert (fast[0]["kernels"], ref[0]["kernels"]) == ("fast", "reference")  # result.json: what "auto" became
    assert fast[0]["steps"] == ref[0]["steps"] == STEPS and len(fast[1]) == len(ref[1]) == STEPS
    np.testing.assert_allclose(fast[1], ref[1], rtol=1e-6)
    np.testing.assert_allclose(fast[0]["val_loss"], ref[0]["val_loss"], rtol=1e-5)
    assert fast[2].keys() == ref[2].keys()  # one parameter layout: the same weights.safetensors keys
    if optimizer != "sgd":
        return
    init = model_lib.create_model("b0", 10, 0, network=TINY, kernels="reference")
    init = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(init, nnx.Any(nnx.Param, nnx.BatchStat)))}
    moved = max(float(np.abs(fast[2][k] - init[k]).max()) for k in init)
    assert moved > 1e-2, "training did not move the parameters: agreement would prove nothing"
    for name, value in fast[2].items():
        np.testing.assert_allclose(value, ref[2][name], rtol=2e-6, atol=2e-6, err_msg=name)


def test_same_layout_and_initial_values_different_layers():
    fast = model_lib.create_model("b0", 10, 3, network=TINY, kernels="fast", bn_momentum=0.9)
    ref = model_lib.create_model("b0", 10, 3, network=TINY, kernels="reference", bn_momentum=0.9)
    a, b = (dict(nnx.to_flat_state(nnx.state(m, nnx.Any(nnx.Param, nnx.BatchStat)))) for m in (fast, ref))
    assert a.keys() == b.keys()
    for k in a:
        assert type(a[k]) is type(b[k]), k
        np.testing.assert_array_equal(a[k].get_value(), b[k].get_value(), err_msg=str(k))
    # Momentum is set at construction, in both sets.
    assert {m.momentum for _, m in nnx.iter_graph(ref) if isinstance(m, nnx.BatchNorm)} == {0.9}
    assert {m.momentum for _, m in nnx.iter_graph(fast) if isinstance(m, nnx.BatchNorm)} == {0.9}
    ours = (model_lib.EfficientNet, model_lib.MBConv, model_lib.SqueezeExcite)

    def layer_modules(m):
        return {type(x).__module__ for _, x in nnx.iter_graph(m)
                if isinstance(x, nnx.Module) and not isinstance(x, ours)}

    assert all(name.startswith("flax.") for name in layer_modules(ref)), layer_modules(ref)
    assert "effnet_jax.model.fast_layers" in layer_modules(fast)
    # The train-mode forward: the fast one calls the hand-written VJPs, the reference one does not.
    x = jax.numpy.zeros((2, 32, 32, 3))

    def primitives(m):
        graphdef, state = nnx.split(model_lib.train_view(m))
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s, copy=True)(x))(state)
        return {e.primitive.name for e in jaxpr.jaxpr.eqns}

    assert "custom_vjp_call" in primitives(fast)
    assert "custom_vjp_call" not in primitives(ref)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_reference_run_loads_none_of_the_tricks(kernels):
    """A fresh interpreter builds and traces the trainer's step: the reference one never imports ops,
    fast_layers or flat_state; the fast one (the control) imports all three."""
    script = textwrap.dedent(f"""
        import json, sys
        import jax
        from effnet_jax.model import scaling
        from effnet_jax.training import programs, recipe
        from effnet_jax.configs import digits
        c = digits.get_config()
        c.model.network, c.model.kernels, c.batch_size = "tiny", {kernels!r}, 4
        run_spec = scaling.model_spec(c.model)
        p = programs.build_program(c, run_spec, 10, layers=recipe.model_layers(c), dtype=jax.numpy.float32,
                                   steps_per_epoch=10, total_steps=10)
        batch = {{"image": jax.numpy.zeros((4, 32, 32, 3)), "label": jax.numpy.zeros((4,), "int32")}}
        p.train_step.lower(p.state, batch)
        print("LOADED", json.dumps(sorted(m for m in sys.modules if m in {TRICKS!r})))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.split("LOADED", 1)[1])
    assert loaded == ([] if kernels == "reference" else sorted(TRICKS))


def test_reference_train_step_program_does_not_depend_on_the_seed():
    # As FlatPacking's (tests/test_flat_state.py): trials that differ only in seed share one compiled step.
    texts = []
    for seed in (0, 1):
        c = digits.get_config()
        c.model.network, c.model.kernels, c.model.drop_path_rate = "tiny", "reference", 0.2
        c.batch_size, c.seed = 4, seed
        p = programs.build_program(c, scaling.model_spec(c.model), 10, layers=recipe.model_layers(c),
                                   dtype=jax.numpy.float32, steps_per_epoch=10, total_steps=100)
        batch = {"image": jax.numpy.zeros((4, 32, 32, 3)), "label": jax.numpy.zeros((4,), "int32")}
        texts.append(p.train_step.lower(p.state, batch).as_text())
    assert texts[0] == texts[1]


def test_bad_kernels_value_is_one_user_error():
    c = digits.get_config()
    c.model.kernels = "fastest"
    with pytest.raises(UserError, match="model.kernels must be one of auto, fast, reference, got 'fastest'"):
        recipe.model_layers(c)
    c.model.kernels, c.model.depthwise_impl = "reference", "shift"
    with pytest.raises(UserError, match="applies to the fast kernels only"):
        recipe.model_layers(c)
    with pytest.raises(ValueError, match="kernels must be one of"):
        model_lib.create_model("b0", kernels="flax")


def private_flax_uses(source):
    """Private flax names a piece of Python imports or reads: ``from flax.x import _y``, ``import
    flax._x``, and ``_y`` read off a name bound by a flax import (``normalization._normalize``)."""
    tree = ast.parse(source)
    bound, found = set(), []

    def private(parts):
        return any(p.startswith("_") and not p.endswith("__") for p in parts)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "flax":
                    found += [alias.name] if private(alias.name.split(".")) else []
                    bound.add(alias.asname or "flax")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flax" and not node.level:
            found += [node.module] if private(node.module.split(".")) else []
            for alias in node.names:
                found += [f"{node.module}.{alias.name}"] if private([alias.name]) else []
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private([node.attr]):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                found.append(ast.unparse(node))
    return found


def _without_magics(cell):
    """A notebook cell as Python: shell (``!pip``) and magic (``%time``) lines become ``pass``."""
    lines = cell.splitlines()
    return "\n".join(line[:len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("!", "%"))
                     else line for line in lines)


def test_no_private_flax_name_anywhere():
    # The checker finds what model.py and tests/test_ops.py used to do...
    old = ("from flax.nnx.nn import normalization as _bn_lib\n"
           "axes = _bn_lib._canonicalize_axes(4, -1)\n"
           "from flax.nnx.nn.normalization import _compute_stats\n"
           "import flax.nnx.nn._private as p\n")
    assert private_flax_uses(old) == ["flax.nnx.nn.normalization._compute_stats", "flax.nnx.nn._private",
                                      "_bn_lib._canonicalize_axes"]
    assert private_flax_uses("from flax import nnx\nx = nnx.Conv.__call__\ny = nnx.BatchNorm.momentum\n") == []
    # ...and no file of the project does it.
    offenders = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("runs", "build", "__pycache__")]
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and os.path.exists(path[:-3] + ".ipynb"):
                continue  # a jupytext notebook: its .ipynb twin (the same cells, tests/test_notebooks.py) is read
            if name.endswith(".py"):
                sources = [open(path).read()]
            elif name.endswith(".ipynb"):
                cells = json.load(open(path))["cells"]
                sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
            else:
                continue
            uses = [u for s in sources for u in private_flax_uses(_without_magics(s))]
            if uses:
                offenders[os.path.relpath(path, ROOT)] = uses
    assert not offenders
