"""model.scan_blocks: each stage's repeated blocks run as one scan, with the unscanned model's numbers,
weights, layout and parameter count."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_kernels import train_losses

from effnet_jax import count_params
from effnet_jax.configs import digits
from effnet_jax.model import efficientnet as model_lib
from effnet_jax.model import scaling
from effnet_jax.model.arch import TINY
from effnet_jax.model.efficientnet import block_groups, create_model, eval_view, train_view
from effnet_jax.model.scaling import ScalingSpec, build_architecture, from_constants
from effnet_jax.training import programs, recipe

# TINY at depth 2: stages of 2, 4 and 2 blocks, so one stage has a run of three same-shaped blocks.
DEEP_TINY = ScalingSpec("tiny-d2", 1.0, 2.0, 32, 0.2)
STEPS = 4


def test_block_groups_runs_of_same_shaped_blocks():
    # B0 (repeats 1, 2, 2, 3, 3, 4, 1): a stage of r blocks scans its last r - 1 when r - 1 >= 2.
    groups = block_groups(build_architecture("b0"))
    assert [len(g) for g in groups] == [1, 1, 1, 1, 1, 1, 2, 1, 2, 1, 3, 1]
    assert sum(groups, ()) == tuple(range(16))
    # A phi = 1 candidate of the grid search: 23 blocks, 14 distinct shapes.
    arch = build_architecture(from_constants(1.2, 1.1, 1.15, 1.0, base_resolution=32))
    groups = block_groups(arch)
    assert len(arch.blocks) == 23 and len(groups) == 14
    for g in groups:
        shapes = {(arch.blocks[i].in_channels, arch.blocks[i].out_channels, arch.blocks[i].stride) for i in g}
        assert len(shapes) == 1 and len({arch.blocks[i].stage for i in g}) == 1
        assert len(g) == 1 or arch.blocks[g[0]].index >= 1  # a stage's first block is never scanned
    assert [len(g) for g in block_groups(build_architecture(DEEP_TINY, TINY))] == [1, 1, 1, 3, 1, 1]


def forward(model, x, key=None):
    """Logits and BatchNorm statistics after one forward, as one jitted program."""
    graphdef, state = nnx.split(model)

    def f(state, x):
        m = nnx.merge(graphdef, state)
        if key is not None:  # create_model's streams are nnx.Rngs(seed)'s, tagged "default"
            nnx.reseed(m, default=key)
        return m(x), nnx.state(m, nnx.BatchStat)

    return jax.jit(f)(state, x)


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_scanned_forward_matches_unscanned(kernels):
    """Same weights, same keys: eval logits, and train logits with drop path and dropout on (the drop-path
    rates ride along as scanned inputs, the masks come from each block's own stream), and the updated
    running statistics, agree to float rounding (on this CPU they come out bit-identical)."""
    model = model_lib.EfficientNet(build_architecture(DEEP_TINY, TINY, drop_path_rate=0.5), 5, dropout=0.3,
                                   layers=model_lib.layers_for(kernels), rngs=nnx.Rngs(0))
    assert model.scan_blocks is False
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    scanned = nnx.view(model, scan_blocks=True)
    assert scanned.scan_blocks and not model.scan_blocks  # a view: the same variables
    for view in (eval_view, train_view):
        key = None if view is eval_view else jax.random.key(7)
        (a, stats_a), (b, stats_b) = forward(view(model), x, key), forward(view(scanned), x, key)
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
        for u, v in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_b), strict=True):
            np.testing.assert_allclose(v, u, rtol=1e-6, atol=1e-6)
    # Drop path is live: another key changes the train logits, so the agreement above is not vacuous.
    other, _ = forward(train_view(scanned), x, jax.random.key(8))
    assert not np.allclose(other, a, atol=1e-3)


def test_scanned_forward_is_a_scan():
    """The scanned model's forward holds one scan per run of same-shaped blocks and fewer equations."""
    model = eval_view(model_lib.EfficientNet(build_architecture(DEEP_TINY, TINY), 5, rngs=nnx.Rngs(0)))
    x = jnp.zeros((2, 32, 32, 3))

    def eqns(m):
        graphdef, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state).jaxpr
        return [e.primitive.name for e in jaxpr.eqns]

    plain, scanned = eqns(model), eqns(nnx.view(model, scan_blocks=True))
    assert plain.count("scan") == 0 and scanned.count("scan") == 1


def test_scanned_model_keeps_the_unscanned_layout_and_count():
    a = create_model("b0", 10, 3)
    b = create_model("b0", 10, 3, scan_blocks=True)
    fa, fb = (dict(nnx.to_flat_state(nnx.state(m, nnx.Any(nnx.Param, nnx.BatchStat)))) for m in (a, b))
    assert fa.keys() == fb.keys()  # blocks.<i>.<layer>.<variable>: no stacked axis outside the forward
    for k in fa:
        np.testing.assert_array_equal(fa[k].get_value(), fb[k].get_value(), err_msg=str(k))  # same init
    assert sum(x.size for x in jax.tree.leaves(nnx.state(b, nnx.Param))) == count_params(b.arch, 10)


def tiny_config(scan, kernels, optimizer="sgd"):
    c = digits.get_config()
    c.model.network, c.model.kernels, c.optimizer.name = "tiny", kernels, optimizer
    c.model.name, c.model.alpha, c.model.beta, c.model.gamma, c.model.phi = "formula", 2.0, 1.0, 1.0, 1.0
    c.model.base_resolution, c.model.drop_path_rate, c.model.scan_blocks = 32, 0.3, scan
    c.num_train_steps = c.schedule_steps = STEPS
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 1, 1000, 1000
    c.progress_bar = False
    # Full learning rate from step 0 (digits warms up over 33 steps) so that the steps move the weights.
    c.optimizer.schedule, c.optimizer.warmup_epochs = "constant", 0.0
    return c


@pytest.mark.slow
def test_scanned_training_matches_unscanned(tmp_path):
    """A few train steps through the trainer (drop path on): the same losses, weights and weight-file keys,
    and result.json says which way the blocks ran. (The reference kernels' scanned forward is matched above;
    their gradients come from the same autodiff, so one kernel set trains here.)"""
    kernels = "fast"
    plain = train_losses(tiny_config(False, kernels), tmp_path / "plain")
    scanned = train_losses(tiny_config(True, kernels), tmp_path / "scanned")
    assert (plain[0]["scan_blocks"], scanned[0]["scan_blocks"]) == (False, True)
    assert plain[0]["blocks"] == scanned[0]["blocks"] == 8
    assert plain[0]["params"] == scanned[0]["params"]
    assert len(plain[1]) == len(scanned[1]) == STEPS
    np.testing.assert_allclose(scanned[1], plain[1], rtol=1e-6)
    np.testing.assert_allclose(scanned[0]["val_loss"], plain[0]["val_loss"], rtol=1e-5)
    assert plain[2].keys() == scanned[2].keys()
    init = create_model(scaling.model_spec(tiny_config(False, kernels).model), 10, 0, network=TINY)
    init = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(init, nnx.Param))}
    assert max(float(np.abs(plain[2][k] - init[k]).max()) for k in init) > 1e-3, "the steps moved nothing"
    for name, value in plain[2].items():
        np.testing.assert_allclose(scanned[2][name], value, rtol=2e-6, atol=2e-6, err_msg=name)


def test_scanned_train_step_does_not_depend_on_the_seed():
    # Trials that differ only in seed share one compiled step, scanned too.
    texts = []
    for seed in (0, 1):
        c = tiny_config(True, "fast")
        c.batch_size, c.seed = 4, seed
        p = programs.build_program(c, scaling.model_spec(c.model), 10, layers=recipe.model_layers(c),
                                   dtype=jnp.float32, steps_per_epoch=10, total_steps=100)
        batch = {"image": jnp.zeros((4, 32, 32, 3)), "label": jnp.zeros((4,), "int32")}
        texts.append(p.train_step.lower(p.state, batch).as_text())
    assert texts[0] == texts[1] and "stablehlo.while" in texts[0]
