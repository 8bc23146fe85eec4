import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnet_jax import EfficientNet, build_architecture, count_params, create_model, eval_view, train_view
from effnet_jax.model.arch import TINY
from effnet_jax.model.efficientnet import MBConv, layers_for
from effnet_jax.model.scaling import OFFICIAL, ScalingSpec

TINY_SPEC = ScalingSpec("tiny", 1.0, 1.0, 32, 0.2)


@nnx.jit
def run(model, x):
    """Forward pass as one compiled program (eager dispatch compiles op by op: slow)."""
    return model(x)


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", [n for n in OFFICIAL if n != "l2"])
def test_official_output_shapes_and_param_count(name):
    model = create_model(name, num_classes=1000)
    assert n_params(model) == count_params(model.arch, 1000)
    graphdef, state = nnx.split(eval_view(model))
    res = OFFICIAL[name].resolution
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, res, res, 3), jnp.float32))
    assert out.shape == (2, 1000) and out.dtype == jnp.float32


def test_l2_architecture_counts_without_building():
    # 480M parameters are too many to materialise in a unit test; the builder and
    # counter are the same code paths the other sizes exercise.
    arch = build_architecture("l2")
    assert arch.head_channels == 5504 and len(arch.blocks) == 88


def test_custom_class_count_and_odd_resolution():
    model = eval_view(create_model("b0", num_classes=10, seed=1))
    assert run(model, jnp.zeros((1, 97, 97, 3))).shape == (1, 10)


def tiny_model(**kw):
    return EfficientNet(build_architecture(TINY_SPEC, TINY, drop_path_rate=0.5), 5, rngs=nnx.Rngs(0), **kw)


def test_eval_is_deterministic_and_per_example():
    model = eval_view(tiny_model(dropout=0.5))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    a, b = run(model, x), run(model, x)
    np.testing.assert_array_equal(a, b)
    # Running statistics: an example's output does not depend on the rest of the batch.
    np.testing.assert_allclose(run(model, x[:1]), a[:1], rtol=1e-5, atol=1e-5)


def test_train_mode_uses_batch_stats_and_dropout():
    model = tiny_model(dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    mean_before = np.asarray(model.stem_bn.mean[...])
    t = train_view(model)
    a, b = run(t, x), run(t, x)
    assert not np.allclose(a, b)  # fresh dropout / drop-path masks each call
    assert not np.allclose(mean_before, model.stem_bn.mean[...])  # running stats moved
    # with dropout and drop path off, train mode still differs from eval (batch statistics)
    quiet = EfficientNet(build_architecture(TINY_SPEC, TINY, drop_path_rate=0.0), 5, dropout=0.0, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(run(train_view(quiet), x), run(train_view(quiet), x), rtol=1e-6)
    assert not np.allclose(run(train_view(quiet), x), run(eval_view(quiet), x), atol=1e-3)


def test_drop_path_drops_whole_examples():
    spec = build_architecture(TINY_SPEC, TINY).blocks[2]  # stride 1, in == out: has a skip
    assert spec.has_skip
    block = MBConv(spec.__class__(**{**spec.__dict__, "drop_path": 0.5}), layers=layers_for("auto"),
                   dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (64, 8, 8, spec.in_channels))
    residual = run(eval_view(block), x) - x  # eval: no drop, residual branch at full scale
    y = run(nnx.view(block, deterministic=False, use_running_average=True), x) - x
    kept = np.array([not np.allclose(y[i], 0.0) for i in range(64)])
    assert 10 < kept.sum() < 54  # about half the examples keep their residual branch
    np.testing.assert_allclose(y[kept], residual[kept] / 0.5, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(y[~kept], 0.0)


def test_bfloat16_forward_close_to_float32():
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    f32 = eval_view(create_model("b0", num_classes=10, seed=0))
    bf16 = eval_view(create_model("b0", num_classes=10, seed=0, dtype=jnp.bfloat16))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    a, b = run(f32, x), run(bf16, x)
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(a))) + 1e-2


def test_same_seed_same_weights_different_seed_different():
    a, b, c = (nnx.state(create_model("b0", num_classes=10, seed=s), nnx.Param) for s in (0, 0, 1))
    np.testing.assert_array_equal(a["stem_conv"]["kernel"][...], b["stem_conv"]["kernel"][...])
    assert not np.allclose(a["stem_conv"]["kernel"][...], c["stem_conv"]["kernel"][...])


def test_unknown_depthwise_impl_fails_early():
    with pytest.raises(ValueError, match="depthwise impl"):
        create_model("b0", depthwise_impl="fastest")


def _params(model):
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("head_init", ["zero", 0.1, "0.03"])
def test_head_init_changes_only_the_classifier_kernel(head_init):
    default, paper, other = (_params(tiny_model(**kw)) for kw in ({}, {"head_init": "paper"}, {"head_init": head_init}))
    num_classes = 5
    assert default.keys() == other.keys()
    for k in default:
        np.testing.assert_array_equal(default[k], paper[k])  # the default is the paper's init
        if k != "classifier/kernel":
            np.testing.assert_array_equal(default[k], other[k])
    limit = 1.0 / np.sqrt(num_classes)
    assert 0.5 * limit < np.abs(default["classifier/kernel"]).max() <= limit
    kernel = other["classifier/kernel"]
    if head_init == "zero":
        assert not kernel.any()
    else:
        s = float(head_init)
        assert 0.5 * s * limit < np.abs(kernel).max() <= s * limit
        # The same draw, scaled: a scale changes the range, not the sample.
        np.testing.assert_allclose(kernel, s * default["classifier/kernel"], rtol=1e-5, atol=1e-7)


def test_create_model_head_init_default_and_bad_value():
    a = nnx.state(create_model("b0", num_classes=10), nnx.Param)
    b = nnx.state(create_model("b0", num_classes=10, head_init="paper"), nnx.Param)
    np.testing.assert_array_equal(a["classifier"]["kernel"][...], b["classifier"]["kernel"][...])
    with pytest.raises(ValueError, match="head_init"):
        create_model("b0", num_classes=10, head_init="tiny")
    with pytest.raises(ValueError, match="head_init"):
        create_model("b0", num_classes=10, head_init=-1.0)
