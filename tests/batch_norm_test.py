"""Tests of `nas/batch_norm.py`: `nn.BatchNorm`'s function and variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax.nas import batch_norm

MOMENTUM, EPSILON = 0.9, 1e-5


def _pair(train):
  ours = batch_norm.BatchNorm(use_running_average=not train,
                              momentum=MOMENTUM, epsilon=EPSILON)
  flax_bn = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM,
                         epsilon=EPSILON)
  return ours, flax_bn


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  # An offset mean: the fast variance E[x²] − E[x]² loses digits to it.
  x = jnp.asarray(rng.normal(2.0, 3.0, size=shape), jnp.float32)
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return x, g


@pytest.mark.parametrize('kernels', [True, False])
@pytest.mark.parametrize('shape', [(3, 5, 5, 11), (4, 8), (2, 6, 6, 32)])
def test_training_forward_backward_and_statistics_equal_flax(request, kernels,
                                                             shape):
  """With the CPU kernels (channels 11: a vector of 8 and 3 alone) and
  without (jnp); 2-D and 4-D."""
  if kernels:
    request.getfixturevalue('kernels_preferred')
  x, g = _inputs(shape)
  ours, flax_bn = _pair(train=True)
  variables = flax_bn.init(jax.random.key(0), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))
  params = {'scale': jnp.linspace(0.5, 1.5, shape[-1]),
            'bias': jnp.linspace(-1.0, 1.0, shape[-1])}
  variables = {**variables, 'params': params}

  def run(module):
    def loss(x, params):
      y, updates = module.apply({**variables, 'params': params}, x,
                                mutable=['batch_stats'])
      return jnp.vdot(y, g), (y, updates['batch_stats'])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        x, params)

  (_, (y, stats)), grads = run(ours)
  (_, (y_ref, stats_ref)), grads_ref = run(flax_bn)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves((stats, grads)),
                  jax.tree.leaves((stats_ref, grads_ref))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Normalised: zero mean and unit variance per channel before γ, β.
  z = (y - params['bias']) / params['scale']
  axes = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(z.mean(axes), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.var(axes), 1.0, atol=1e-3)


def test_evaluation_uses_the_running_statistics_as_flax():
  x, _ = _inputs((2, 4, 4, 9), seed=1)
  ours, flax_bn = _pair(train=False)
  variables = flax_bn.init(jax.random.key(0), x)
  variables = {**variables, 'batch_stats': {
      'mean': jnp.full((9,), 0.5), 'var': jnp.full((9,), 2.0)}}
  np.testing.assert_allclose(ours.apply(variables, x),
                             flax_bn.apply(variables, x), rtol=1e-6)


def test_the_statistics_cotangents_reach_x(kernels_preferred):
  """The custom backward pass also carries cotangents of μ and σ² (zero in
  the network, where only y is differentiated): ∂μ/∂x = 1/M,
  ∂σ²/∂x = 2(x − μ)/M, as autodiff of the jnp form gives."""
  x, _ = _inputs((2, 3, 3, 8), seed=2)
  scale, bias = jnp.ones(8), jnp.zeros(8)

  def loss(fn):
    def f(x):
      y, mean, var = fn(x)
      return jnp.sum(y[..., :2]) + jnp.sum(mean * 3.0) + jnp.sum(var)
    return jax.grad(f)(x)

  def reference(x):
    axes = (0, 1, 2)
    mean = x.mean(axes)
    var = jnp.maximum(jnp.square(x).mean(axes) - jnp.square(mean), 0.0)
    y = (x - mean) * (scale * jax.lax.rsqrt(var + EPSILON)) + bias
    return y, mean, var

  ours = loss(lambda x: batch_norm.normalize_with_batch_statistics(
      x, scale, bias, EPSILON))
  np.testing.assert_allclose(ours, loss(reference), rtol=1e-4, atol=1e-5)
