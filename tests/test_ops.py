import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effnet_jax import ops


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
