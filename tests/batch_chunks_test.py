"""Tests of dha_jax.nas.batch_chunks: sums over chunks of images."""

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
  assert batch_chunks.images_per_chunk(batch, 40) == expected


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
