import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnet_jax import ops
from effnet_jax.model import BatchNorm, PointwiseConv


@pytest.mark.parametrize("size, kernel, stride", [(9, 3, 2), (8, 5, 2), (7, 5, 1), (1, 3, 1)])
def test_shift_depthwise_matches_grouped_conv(size, kernel, stride):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, size, size + 1, 6))
    w = jax.random.normal(kw, (kernel, kernel, 1, 6))
    ref = jax.jit(ops.depthwise_conv_xla, static_argnums=2)(x, w, stride)
    got = jax.jit(ops.depthwise_conv_shift, static_argnums=2)(x, w, stride)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride)))

    gx_ref, gw_ref = jax.jit(jax.grad(loss(ops.depthwise_conv_xla), argnums=(0, 1)))(x, w)
    gx, gw = jax.jit(jax.grad(loss(ops.depthwise_conv_shift), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-4)


def test_same_padding_is_tensorflow_style():
    assert ops.same_padding(224, 3, 2) == (0, 1)  # odd total: extra at the end
    assert ops.same_padding(199, 3, 2) == (1, 1)
    assert ops.same_padding(8, 5, 1) == (2, 2)


def test_impl_selection():
    assert ops.resolve_depthwise_impl("auto") == ("shift" if jax.default_backend() == "cpu" else "xla")
    assert ops.resolve_depthwise_impl("xla") == "xla"
    with pytest.raises(ValueError, match="depthwise impl"):
        ops.resolve_depthwise_impl("fast")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shift_depthwise_dtype_and_jit_free_grad(dtype):
    # The custom VJP keeps the input's dtype for dx and the kernel's dtype for dw.
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4)).astype(dtype)
    w = jax.random.normal(jax.random.key(2), (3, 3, 1, 4))
    gx, gw = jax.grad(lambda x, w: jnp.sum(ops.depthwise_conv_shift(x, w.astype(dtype), 2)), argnums=(0, 1))(x, w)
    assert gx.dtype == dtype and gw.dtype == jnp.float32
    assert gx.shape == x.shape and gw.shape == w.shape


def test_pointwise_conv_matches_conv():
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (2, 5, 7, 6))
    w = jax.random.normal(kw, (1, 1, 6, 10))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    np.testing.assert_allclose(ops.pointwise_conv(x, w), conv(x, w), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))

    ref = jax.grad(loss(conv), argnums=(0, 1))(x, w)
    got = jax.grad(loss(ops.pointwise_conv), argnums=(0, 1))(x, w)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fast_layers_match_flax_layers():
    # model.BatchNorm and model.PointwiseConv only change how the step traces and
    # runs: same variables, same numbers as nnx.BatchNorm / nnx.Conv.
    x = jax.random.normal(jax.random.key(4), (4, 5, 5, 8)) * 3 + 1
    ours = BatchNorm(8, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-3, rngs=nnx.Rngs(0))
    for train in (True, False):
        np.testing.assert_allclose(ours(x, use_running_average=not train), ref(x, use_running_average=not train),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-6)
        np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-6)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(ref))
    conv = PointwiseConv(8, 16, (1, 1), use_bias=True, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.arange(16.0)
    np.testing.assert_allclose(conv(x), nnx.Conv.__call__(conv, x), rtol=1e-5, atol=1e-5)
