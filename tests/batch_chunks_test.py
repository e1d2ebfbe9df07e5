"""Tests of dha_jax.nas.batch_chunks: loops over chunks of images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax.nas import batch_chunks


@pytest.mark.parametrize('batch,budget_images,expected', [
    (96, 4, 4), (96, 5, 4), (7, 3, 1), (6, 100, 6), (5, 0, 1)])
def test_chunk_is_the_largest_divisor_within_the_budget(monkeypatch, batch,
                                                        budget_images,
                                                        expected):
  monkeypatch.setattr(batch_chunks, 'CHUNK_BYTES', budget_images * 40)
  assert batch_chunks.items_per_chunk(batch, 40) == expected


@pytest.mark.parametrize('budget_images', [1, 2, 6])
def test_sum_over_chunks_equals_the_sum_over_the_batch(monkeypatch,
                                                       budget_images):
  rng = np.random.default_rng(budget_images)
  x = jnp.asarray(rng.normal(size=(6, 3, 2)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(6, 3, 5)), jnp.float32)
  monkeypatch.setattr(batch_chunks, 'CHUNK_BYTES',
                      budget_images * g[0].size * 4)
  outer = lambda a, b: jnp.einsum('nhi,nho->io', a, b)
  total = batch_chunks.sum_over_chunks(outer, x, g)
  assert total.shape == (2, 5)
  np.testing.assert_allclose(total, outer(x, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('budget_images', [1, 4])
def test_concatenate_channels_is_concatenate_in_value_and_gradient(
    monkeypatch, budget_images):
  """The backward pass's channel blocks, copied out over chunks of 1 and 4
  of the 4 images, are the cotangent's slices."""
  rng = np.random.default_rng(budget_images)
  xs = [jnp.asarray(rng.normal(size=(4, 3, 2, c)), jnp.float32)
        for c in (1, 3, 2)]
  weights = jnp.asarray(rng.normal(size=(4, 3, 2, 6)), jnp.float32)
  monkeypatch.setattr(batch_chunks, 'CHUNK_BYTES',
                      budget_images * 3 * 2 * 6 * 4)

  def loss(concatenate):
    return jax.value_and_grad(
        lambda xs: jnp.sum(jnp.sin(concatenate(xs)) * weights))(xs)

  value, grads = loss(batch_chunks.concatenate_channels)
  value_ref, grads_ref = loss(lambda xs: jnp.concatenate(xs, axis=-1))
  np.testing.assert_allclose(value, value_ref, rtol=1e-6)
  for grad, grad_ref in zip(grads, grads_ref):
    assert grad.shape == grad_ref.shape
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-6)
