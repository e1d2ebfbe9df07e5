"""Tests of dha_jax.nas.pointwise: 1×1 convs as matrix products."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dha_jax.nas import pointwise

_NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('stride,size,padding', [
    (1, 6, 'SAME'), (2, 6, 'SAME'), (2, 7, 'SAME'), (2, 7, 'VALID'),
    (1, 5, ((0, 0), (0, 0)))])
def test_value_and_gradients_equal_the_convolution(stride, size, padding):
  rng = np.random.default_rng(stride * 10 + size)
  x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 5, 3)), jnp.float32)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)

  def loss(conv):
    def f(x, w):
      y = conv(x, w, (stride, stride), padding, dimension_numbers=dn)
      return jnp.sum(jnp.sin(y)), y
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)

  (_, y), grads = loss(pointwise.conv_general_dilated)
  (_, y_ref), grads_ref = loss(lax.conv_general_dilated)
  assert y.shape == y_ref.shape == (2, -(-size // stride), -(-size // stride),
                                    3)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_only_ungrouped_undilated_unpadded_nhwc_1x1_convs_are_matmuls():
  x, w1, w3 = (2, 6, 6, 4), (1, 1, 4, 4), (3, 3, 4, 4)
  dn = lax.conv_dimension_numbers(x, w1, _NHWC)
  assert pointwise.is_matmul(x, w1, 'SAME', None, None, dn, 1)
  assert not pointwise.is_matmul(x, w3, 'SAME', None, None, dn, 1)
  assert not pointwise.is_matmul(x, w1, ((1, 1), (1, 1)), None, None, dn, 1)
  assert not pointwise.is_matmul(x, w1, 'SAME', None, (2, 2), dn, 1)
  assert not pointwise.is_matmul(x, (1, 1, 1, 4), 'SAME', None, None, dn, 4)
  assert not pointwise.is_matmul((2, 4, 6, 6), (4, 4, 1, 1), 'SAME', None,
                                 None, None, 1)   # lax's default NCHW


def test_conv_module_keeps_nn_conv_parameters_and_output():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
  for kernel, stride in ((1, 1), (1, 2), (3, 1)):
    ours = pointwise.Conv(6, (kernel, kernel), strides=stride, use_bias=False)
    ref = nn.Conv(6, (kernel, kernel), strides=stride, use_bias=False)
    variables = ours.init(jax.random.key(1), x)
    ref_vars = ref.init(jax.random.key(1), x)
    np.testing.assert_array_equal(variables['params']['kernel'],
                                  ref_vars['params']['kernel'])
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(ref_vars, x),
                               rtol=1e-5, atol=1e-5)
