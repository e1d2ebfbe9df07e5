"""Tests of dha_jax.nas.dense_conv: 1×1 convs as matrix products, kernel
gradients as chunked products of taps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dha_jax.nas import batch_chunks
from dha_jax.nas import dense_conv

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _value_and_grads(conv, x, w, stride, padding, dilation=1):
  dn = lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)

  def f(x, w):
    y = conv(x, w, (stride, stride), padding,
             rhs_dilation=(dilation, dilation), dimension_numbers=dn)
    return jnp.sum(jnp.sin(y)), y
  return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)


def _assert_equal_to_lax(x, w, stride, padding, dilation=1):
  """Value, ∂x and ∂w equal XLA's convolution's; returns the output shape."""
  (_, y), grads = _value_and_grads(dense_conv.conv_general_dilated, x, w,
                                   stride, padding, dilation)
  (_, y_ref), grads_ref = _value_and_grads(lax.conv_general_dilated, x, w,
                                           stride, padding, dilation)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads, grads_ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  return y.shape


@pytest.mark.parametrize('stride,size,padding', [
    (1, 6, 'SAME'), (2, 6, 'SAME'), (2, 7, 'SAME'), (2, 7, 'VALID'),
    (1, 5, ((0, 0), (0, 0)))])
def test_1x1_value_and_gradients_equal_the_convolution(stride, size, padding):
  rng = np.random.default_rng(stride * 10 + size)
  x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 5, 3)), jnp.float32)
  shape = _assert_equal_to_lax(x, w, stride, padding)
  assert shape == (2, -(-size // stride), -(-size // stride), 3)


@pytest.mark.parametrize('k,stride,dilation,size,padding', [
    (3, 1, 1, 8, ((1, 1), (1, 1))),    # the CIFAR stem
    (3, 2, 1, 9, ((1, 1), (1, 1))),    # the ImageNet stem
    (3, 1, 2, 7, 'SAME'), (5, 2, 1, 8, 'SAME'),
    (2, 1, 1, 2, 'VALID'),             # the auxiliary head's last conv
    (3, 1, 1, 6, ((0, 2), (1, 0)))])   # asymmetric padding
def test_kxk_value_and_gradients_equal_the_convolution(k, stride, dilation,
                                                       size, padding):
  rng = np.random.default_rng(k * 100 + stride * 10 + size)
  x = jnp.asarray(rng.normal(size=(3, size, size, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 4, 6)), jnp.float32)
  _assert_equal_to_lax(x, w, stride, padding, dilation)


@pytest.mark.parametrize('kernel', [1, 3])
def test_kernel_gradient_summed_over_chunks_of_images(monkeypatch, kernel):
  """With chunks of 1 image (a budget of one image's cotangent), ∂w still
  equals XLA's; the batch of 3 is 3 chunks."""
  size, c_out = 5, 6
  monkeypatch.setattr(batch_chunks, 'CHUNK_BYTES', size * size * c_out * 4)
  rng = np.random.default_rng(kernel)
  x = jnp.asarray(rng.normal(size=(3, size, size, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 4, c_out)), jnp.float32)
  _assert_equal_to_lax(x, w, 1, 'SAME')


def test_only_ungrouped_undilated_unpadded_nhwc_1x1_convs_are_matmuls():
  x, w1, w3 = (2, 6, 6, 4), (1, 1, 4, 4), (3, 3, 4, 4)
  dn = lax.conv_dimension_numbers(x, w1, _NHWC)
  assert dense_conv.is_matmul(x, w1, 'SAME', None, None, dn, 1)
  assert not dense_conv.is_matmul(x, w3, 'SAME', None, None, dn, 1)
  assert not dense_conv.is_matmul(x, w1, ((1, 1), (1, 1)), None, None, dn, 1)
  assert not dense_conv.is_matmul(x, w1, 'SAME', None, (2, 2), dn, 1)
  assert not dense_conv.is_matmul(x, (1, 1, 1, 4), 'SAME', None, None, dn, 4)
  assert not dense_conv.is_matmul((2, 4, 6, 6), (4, 4, 1, 1), 'SAME', None,
                                 None, None, 1)   # lax's default NCHW


def test_taps_need_an_ungrouped_nhwc_conv_with_square_windows():
  x, w3 = (2, 6, 6, 4), (3, 3, 4, 4)
  dn = lax.conv_dimension_numbers(x, w3, _NHWC)
  assert dense_conv.has_tap_kernel_grad(x, w3, (2, 2), None, (2, 2), dn, 1)
  assert not dense_conv.has_tap_kernel_grad(x, (3, 1, 4, 4), (1, 1), None,
                                            None, dn, 1)
  assert not dense_conv.has_tap_kernel_grad(x, w3, (1, 2), None, None, dn, 1)
  assert not dense_conv.has_tap_kernel_grad(x, w3, (1, 1), None, (1, 2), dn,
                                            1)
  assert not dense_conv.has_tap_kernel_grad(x, w3, (1, 1), (2, 2), None, dn,
                                            1)
  assert not dense_conv.has_tap_kernel_grad(x, (3, 3, 1, 4), (1, 1), None,
                                            None, dn, 4)


def test_conv_module_keeps_nn_conv_parameters_and_output():
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
  for kernel, stride in ((1, 1), (1, 2), (3, 1)):
    ours = dense_conv.Conv(6, (kernel, kernel), strides=stride, use_bias=False)
    ref = nn.Conv(6, (kernel, kernel), strides=stride, use_bias=False)
    variables = ours.init(jax.random.key(1), x)
    ref_vars = ref.init(jax.random.key(1), x)
    np.testing.assert_array_equal(variables['params']['kernel'],
                                  ref_vars['params']['kernel'])
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(ref_vars, x),
                               rtol=1e-5, atol=1e-5)
