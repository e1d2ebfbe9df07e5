"""Tests of the 3×3 pools: XLA's reduce-window and the shifted form are one
function, in value and gradient, ties included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax import train
from dha_jax.nas import network
from dha_jax.nas import pooling
from dha_jax.nas import search_space as ss
from tests.tiny import assert_same_network_function
from tests.tiny import tiny_config

POOLS = {'max': pooling.max_pool_3x3, 'avg': pooling.avg_pool_3x3}
# (size, stride): even and odd sizes, both strides (odd strided sizes test
# the last window).
CASES = [(8, 1), (7, 1), (8, 2), (7, 2), (1, 1), (2, 2)]


def _value_and_grad(pool, impl, stride):
  def loss(x):
    y = pool(x, stride, impl)
    return jnp.sum(jnp.sin(y)), y
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize('kind', sorted(POOLS))
@pytest.mark.parametrize('size,stride', CASES)
def test_shifted_equals_reduce_window(kind, size, stride):
  rng = np.random.default_rng(size * 10 + stride)
  # Values on a coarse grid: many windows hold their maximum twice.
  x = jnp.asarray(rng.integers(-3, 4, (2, size, size, 3)), jnp.float32)
  (_, y_ref), g_ref = _value_and_grad(POOLS[kind], 'reduce_window',
                                      stride)(x)
  (_, y), g = _value_and_grad(POOLS[kind], 'shifted', stride)(x)
  expected = -(-size // stride)
  assert y.shape == y_ref.shape == (2, expected, expected, 3)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def test_a_tied_max_sends_the_gradient_to_its_first_tap_only():
  x = jnp.ones((1, 3, 3, 1))
  for impl in ('reduce_window', 'shifted'):
    grad = jax.grad(lambda x: pooling.max_pool_3x3(x, 2, impl)[0, 0, 0, 0])(x)
    # The window of output (0, 0) is x[0:2, 0:2] (padding 1), all equal.
    expected = np.zeros((3, 3))
    expected[0, 0] = 1.0
    np.testing.assert_array_equal(grad[0, ..., 0], expected, err_msg=impl)


def test_the_average_counts_only_cells_inside_the_image():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  y = pooling.avg_pool_3x3(x, 1, 'shifted')
  np.testing.assert_allclose(y[0, 0, 0, 0], np.mean([0, 1, 4, 5]))
  np.testing.assert_allclose(y[0, 1, 1, 0], np.mean([0, 1, 2, 4, 5, 6, 8, 9,
                                                     10]))
  np.testing.assert_allclose(
      y, nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)),
                     count_include_pad=False), rtol=1e-6)


@pytest.mark.parametrize('size,window,stride', [(8, 5, 3), (7, 3, 2),
                                                (4, 4, 1), (2, 2, 3)])
def test_window_average_equals_avg_pool(size, window, stride):
  """The auxiliary head's pool: value and gradient of nn.avg_pool (no
  padding), for windows that overlap, tile and cover the whole map."""
  rng = np.random.default_rng(size * window)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, (size - window) // stride + 1,
                                         (size - window) // stride + 1, 3)),
                        jnp.float32)

  def loss(pool):
    return jax.value_and_grad(lambda x: jnp.sum(pool(x) * weights))(x)

  value, grad = loss(lambda x: pooling.window_average(x, window, stride))
  value_ref, grad_ref = loss(
      lambda x: nn.avg_pool(x, (window, window), strides=(stride, stride)))
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_resolve_by_backend():
  assert pooling.resolve('auto', 'cpu') == 'shifted'
  assert pooling.resolve('auto', 'gpu') == 'reduce_window'
  assert pooling.resolve('auto', 'tpu') == 'reduce_window'
  assert pooling.resolve('shifted', 'gpu') == 'shifted'
  with pytest.raises(ValueError, match='model.pooling'):
    pooling.resolve('median')


def test_network_with_shifted_pools_is_the_same_function():
  """A child network of every pool (normal and reduction cells, stride 1 and
  2): the same logits and gradients with either implementation."""
  pools = (('max_pool_3x3', 0), ('avg_pool_3x3', 1)) * 4
  arch = ss.genotype_architecture(ss.Genotype(
      normal=pools, normal_concat=(2, 3, 4, 5), reduce=pools,
      reduce_concat=(2, 3, 4, 5)))
  x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3))
  models = {impl: network.DARTSNetwork(5, 4, 3, depthwise='grouped',
                                       pooling=impl)
            for impl in ('reduce_window', 'shifted')}
  variables = models['shifted'].init({'params': jax.random.key(0)}, x, arch,
                                     train=False)
  assert_same_network_function(models['shifted'], models['reduce_window'],
                               variables, x, arch, rtol=1e-5, atol=1e-6)


def test_an_unknown_implementation_is_a_config_error():
  config = tiny_config('train', {'model.pooling': 'median'})
  with pytest.raises(ValueError, match='model.pooling'):
    train.create_model(config, num_classes=10)
