"""Tests of `nas/separable_conv.py`: ReLU → (depthwise →) pointwise as one op."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax.nas import cpu_kernels
from dha_jax.nas import depthwise
from dha_jax.nas import network
from dha_jax.nas import search_space as ss
from dha_jax.nas import separable_conv
from tests.depthwise_test import CASES


def _reference(x, dw, pw, stride, dilation, padding):
  """XLA's grouped and dense convs of the ReLU."""
  d = jax.lax.conv_general_dilated(
      nn.relu(x), dw, (stride, stride), [(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=x.shape[-1])
  return jax.lax.conv_general_dilated(
      d, pw, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('impl', ['ffi', 'shifted'])
@pytest.mark.parametrize('k,stride,dilation,size', CASES)
def test_value_and_gradients_equal_xla_convs_of_the_relu(impl, k, stride,
                                                         dilation, size):
  """Channels 11 in, 16 out (12 when strided): the kernels' vectors of 8
  and the channels left alone, on either side of the pointwise product;
  exact zeros in x test the ReLU's derivative at 0 (zero, as JAX's)."""
  c_in, c_out = 11, 16 if stride == 1 else 12
  rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
  x = rng.normal(size=(3, size, size, c_in)).astype(np.float32)
  x[0, 0, :3, 0] = 0.0
  x = jnp.asarray(x)
  dw = jnp.asarray(rng.normal(size=(k, k, 1, c_in)), jnp.float32)
  pw = jnp.asarray(rng.normal(size=(1, 1, c_in, c_out)), jnp.float32)
  padding = dilation * (k - 1) // 2
  expected = depthwise.output_size(size, k, stride, dilation, padding)
  cotangent = jnp.asarray(
      rng.normal(size=(3, expected, expected, c_out)), jnp.float32)

  def grads(fn):
    def loss(x, dw, pw):
      y = fn(x, dw, pw)
      return jnp.vdot(y, cotangent), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                      has_aux=True))(x, dw, pw)

  (_, y), g = grads(lambda x, dw, pw: separable_conv.relu_separable_conv(
      x, dw, pw, stride=stride, dilation=dilation, padding=padding,
      impl=impl))
  (_, y_ref), g_ref = grads(lambda x, dw, pw: _reference(
      x, dw, pw, stride, dilation, padding))
  assert y.shape == (3, expected, expected, c_out)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-4)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
  assert float(jnp.abs(g[0][0, 0, :3, 0]).max()) == 0.0


@pytest.mark.parametrize('c_in,c_out,rows', [(11, 16, 7), (24, 12, 13),
                                              (32, 8, 16), (5, 3, 5)])
def test_relu_pointwise_kernels_equal_the_xla_product_of_the_relu(
    kernels_preferred, c_in, c_out, rows):
  """Input and output channels on either side of the kernels' vectors of 8
  and their tiles (8 or 16 columns, 4 or 8 rows), N·H·W rows not a multiple
  of a tile; exact zeros in x test the ReLU's derivative at 0."""
  rng = np.random.default_rng(c_in * 100 + c_out)
  x = rng.normal(size=(2, rows, 9, c_in)).astype(np.float32)
  x[0, 0, :3, 0] = 0.0
  x = jnp.asarray(x)
  kernel = jnp.asarray(rng.normal(size=(1, 1, c_in, c_out)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, rows, 9, c_out)), jnp.float32)

  def grads(fn):
    def loss(x, kernel):
      y = fn(x, kernel)
      return jnp.vdot(y, cotangent), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                      has_aux=True))(x, kernel)

  (_, y), g = grads(separable_conv.relu_pointwise_conv)
  (_, y_ref), g_ref = grads(lambda x, kernel: jax.lax.conv_general_dilated(
      nn.relu(x), kernel, (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  assert y.shape == (2, rows, 9, c_out)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  assert float(jnp.abs(g[0][0, 0, :3, 0]).max()) == 0.0


@pytest.mark.parametrize('stride', [1, 2])
def test_relu_conv_bn_has_the_nn_conv_parameter(kernels_preferred, stride):
  """ReLUConvBN's 1×1 conv (the kernels' op) keeps nn.Conv's parameter at
  Conv_0: the same initial values and output, strided or not (odd size)."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (1, 1), strides=stride, use_bias=False)(nn.relu(x))
      return network.batch_norm(False)(x)

  ours = network.ReLUConvBN(8, stride)
  variables = ours.init(jax.random.key(1), x, train=False)
  ref = Reference().init(jax.random.key(1), x)
  np.testing.assert_array_equal(variables['params']['Conv_0']['kernel'],
                                ref['params']['Conv_0']['kernel'])
  np.testing.assert_allclose(ours.apply(variables, x, train=False),
                             Reference().apply(ref, x), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('size', [6, 7])
def test_factorized_reduce_is_two_strided_nn_convs_of_the_relu(
    kernels_preferred, size):
  """FactorizedReduce: the parameters (Conv_0, Conv_1), initial values and
  output of nn.Conv's strided 1×1 convs of the ReLU and of its shifted
  copy, even and odd sizes."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, 4))

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(x)
      shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:]
      a = nn.Conv(3, (1, 1), strides=2, use_bias=False)(x)
      b = nn.Conv(4, (1, 1), strides=2, use_bias=False)(shifted)
      return network.batch_norm(False)(jnp.concatenate([a, b], axis=-1))

  ours = network.FactorizedReduce(7)
  variables = ours.init(jax.random.key(1), x, train=False)
  ref = Reference().init(jax.random.key(1), x)
  for name in ('Conv_0', 'Conv_1'):
    np.testing.assert_array_equal(variables['params'][name]['kernel'],
                                  ref['params'][name]['kernel'])
  y = ours.apply(variables, x, train=False)
  assert y.shape == (2, (size + 1) // 2, (size + 1) // 2, 7)
  np.testing.assert_allclose(y, Reference().apply(ref, x), rtol=1e-5,
                             atol=1e-6)


def test_kernel_shapes_are_checked_by_name():
  with pytest.raises(ValueError, match=r'\[1, 1, 4, C_out\]'):
    separable_conv.relu_separable_conv(
        jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 1, 4)),
        jnp.zeros((1, 1, 3, 8)), padding=1)
  with pytest.raises(ValueError, match=r'\[1, 1, 4, C_out\]'):
    separable_conv.relu_pointwise_conv(jnp.zeros((1, 5, 5, 4)),
                                       jnp.zeros((1, 1, 3, 8)))


def test_dil_conv_has_two_nn_conv_parameters():
  """DilConv's parameters are those of nn.Conv(feature_group_count=C) and
  nn.Conv(1×1) at Conv_0 and Conv_1: the same initial values."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), padding=2, kernel_dilation=2,
                  feature_group_count=4, use_bias=False)(nn.relu(x))
      return nn.Conv(8, (1, 1), use_bias=False)(x)

  ours = network.DilConv(8, 3, dilation=2).init(jax.random.key(1), x,
                                                train=False)
  ref = Reference().init(jax.random.key(1), x)
  for name in ('Conv_0', 'Conv_1'):
    np.testing.assert_array_equal(ours['params'][name]['kernel'],
                                  ref['params'][name]['kernel'])


def test_network_with_the_kernels_is_the_network_of_xla_ops(monkeypatch):
  """Training mode, the DARTS-V2 child network with its auxiliary head: as
  a one-device process runs it (the sep/dil convs, depthwise convs and
  BatchNorm sums as CPU kernels) and in XLA's forms (what the tests' two
  devices run): the same logits, batch statistics and gradients."""
  arch = ss.genotype_architecture(ss.DARTS_V2)
  x = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3))
  model = network.DARTSNetwork(10, 4, 3, auxiliary=True)
  variables = model.init({'params': jax.random.key(0)}, x, arch, train=True)

  def run():
    def loss(params):
      (logits, aux), updates = model.apply(
          {**variables, 'params': params}, x, arch, train=True,
          mutable=['batch_stats'])
      return jnp.sum(logits ** 2) + jnp.sum(aux ** 2), (logits, updates)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params'])

  (_, (logits_ref, stats_ref)), grads_ref = run()
  monkeypatch.setattr(cpu_kernels, 'preferred', lambda: True)
  (_, (logits, stats)), grads = run()
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves((stats, grads)),
                  jax.tree.leaves((stats_ref, grads_ref))):
    # Float32 rounding, to the scale of each leaf.
    np.testing.assert_allclose(a, b, rtol=1e-3,
                               atol=1e-4 * max(1.0, float(np.abs(b).max())))
