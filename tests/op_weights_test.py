"""Tests of `nas/op_weights.py`: α·h and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax.nas import op_weights


@pytest.mark.parametrize('kernels', [True, False])
def test_value_and_gradients_equal_the_product(request, kernels):
  """With the CPU kernels (∂α one pass of channel sums, 11 channels: a
  vector of 8 and 3 alone) and without."""
  if kernels:
    request.getfixturevalue('kernels_preferred')
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(3, 5, 5, 11)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 5, 5, 11)), jnp.float32)
  alpha = jnp.float32(0.7)

  def grads(fn):
    return jax.jit(jax.value_and_grad(lambda a, h: jnp.vdot(fn(a, h), g),
                                      argnums=(0, 1)))(alpha, h)

  value, (grad_alpha, grad_h) = grads(op_weights.weight_output)
  value_ref, (grad_alpha_ref, grad_h_ref) = grads(lambda a, h: a * h)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(grad_alpha, grad_alpha_ref, rtol=1e-5)
  np.testing.assert_allclose(grad_alpha, jnp.sum(g * h), rtol=1e-5)
  np.testing.assert_allclose(grad_h, grad_h_ref, rtol=1e-6)
  assert grad_alpha.shape == () and grad_alpha.dtype == jnp.float32
