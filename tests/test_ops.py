import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effnet_jax.model import ops
from effnet_jax.model.fast_layers import BatchNorm, PointwiseConv


@pytest.mark.parametrize("impl", ["shift", "hybrid"])
@pytest.mark.parametrize("size, kernel, stride", [(9, 3, 2), (8, 5, 2), (7, 5, 1), (1, 3, 1)])
def test_depthwise_impls_match_grouped_conv(size, kernel, stride, impl):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, size, size + 1, 6))
    w = jax.random.normal(kw, (kernel, kernel, 1, 6))
    ref = jax.jit(ops.depthwise_conv_xla, static_argnums=2)(x, w, stride)
    fn = {"shift": ops.depthwise_conv_shift, "hybrid": ops.depthwise_conv_hybrid}[impl]
    got = jax.jit(fn, static_argnums=2)(x, w, stride)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride)))

    gx_ref, gw_ref = jax.jit(jax.grad(loss(ops.depthwise_conv_xla), argnums=(0, 1)))(x, w)
    gx, gw = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-4)


def test_same_padding_is_tensorflow_style():
    assert ops.same_padding(224, 3, 2) == (0, 1)  # odd total: extra at the end
    assert ops.same_padding(199, 3, 2) == (1, 1)
    assert ops.same_padding(8, 5, 1) == (2, 2)


def test_impl_selection():
    assert ops.resolve_depthwise_impl("auto") == ("shift" if jax.default_backend() == "cpu" else "xla")
    assert ops.resolve_depthwise_impl("xla") == "xla"
    assert ops.resolve_depthwise_impl("hybrid") == "hybrid"
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
    # fast_layers.BatchNorm and fast_layers.PointwiseConv only change how the step traces and
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batchnorm_gradients_match_flax(dtype):
    # ops.batch_norm_train's hand-written backward against autodiff of nnx.BatchNorm, in the
    # module (which stops gradients at the running statistics; the next test differentiates
    # the function's statistics outputs).
    x = (jax.random.normal(jax.random.key(5), (3, 4, 5, 6)) * 2 + 0.5).astype(dtype)
    probe = jax.random.normal(jax.random.key(6), x.shape)

    def loss(bn, x):
        y = nnx.silu(bn(x)).astype(jnp.float32)
        return jnp.sum(y * probe) + jnp.sum(jnp.sin(bn.mean[...])) + jnp.sum(bn.var[...] ** 2)

    grads = []
    for cls in (BatchNorm, nnx.BatchNorm):
        bn = cls(6, momentum=0.9, epsilon=1e-3, dtype=dtype, rngs=nnx.Rngs(0))
        bn.scale.set_value(jnp.linspace(0.5, 1.5, 6))
        bn.bias.set_value(jnp.linspace(-1.0, 1.0, 6))
        graphdef, params, stats = nnx.split(bn, nnx.Param, nnx.BatchStat)

        def f(params, x, graphdef=graphdef, stats=stats):
            return loss(nnx.merge(graphdef, params, stats, copy=True), x)

        grads.append(jax.grad(f, argnums=(0, 1))(params, x))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, ref in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        assert got.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)


def test_batch_norm_train_gradients_through_its_statistics():
    # The module stops gradients at the running statistics; the function itself must still be
    # exact when its mean and variance outputs are differentiated.
    def reference(x, scale, bias):  # flax's formulas (fast variance, clipped at 0), differentiated by autodiff
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.maximum(jnp.mean(jnp.square(x), (0, 1, 2)) - jnp.square(mean), 0.0)
        return (x - mean) * (jax.lax.rsqrt(var + 1e-3) * scale) + bias, mean, var

    def loss(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(mean) * 3) + jnp.sum(var ** 2)
        return f

    x = jax.random.normal(jax.random.key(7), (2, 3, 4, 5)) * 1.5 + 0.3
    args = (x, jnp.linspace(0.5, 1.5, 5), jnp.linspace(-1.0, 1.0, 5))
    got = jax.grad(loss(lambda *a: ops.batch_norm_train(*a, 1e-3)), argnums=(0, 1, 2))(*args)
    ref = jax.grad(loss(reference), argnums=(0, 1, 2))(*args)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
