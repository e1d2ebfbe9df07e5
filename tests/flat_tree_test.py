"""Tests of whole-tree norms and inner products over one flat vector."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dha_jax import flat_tree


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  shapes = {'conv': (3, 3, 1, 8), 'bias': (8,), 'scalar': (),
            'layers': [(4, 5), (2, 2, 2)]}
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32), shapes,
      is_leaf=lambda s: isinstance(s, tuple))


def test_norm_and_vdot_equal_optax():
  a, b = _tree(0), _tree(1)
  np.testing.assert_allclose(flat_tree.norm(a), optax.tree.norm(a),
                             rtol=1e-6)
  np.testing.assert_allclose(flat_tree.vdot(a, b), optax.tree.vdot(a, b),
                             rtol=1e-5)
  assert flat_tree.flat(a).shape == (72 + 8 + 1 + 20 + 8,)


def test_vdot_of_different_shapes_is_an_error():
  a = _tree(0)
  with pytest.raises(AssertionError):
    flat_tree.vdot(a, {**a, 'bias': jnp.zeros((9,))})


@pytest.mark.parametrize('scale', [0.01, 10.0])
def test_clip_equals_optax_below_and_above_the_norm(scale):
  """Below the threshold the updates pass unchanged; above it they are
  scaled to norm `max_norm`, as optax's clip (state: empty, the same)."""
  updates = _tree(2, scale)
  ours, state = flat_tree.clip_by_global_norm(1.0).update(
      updates, flat_tree.clip_by_global_norm(1.0).init(updates))
  ref, ref_state = optax.clip_by_global_norm(1.0).update(
      updates, optax.clip_by_global_norm(1.0).init(updates))
  assert state == ref_state
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
               ours, ref)
  expected = min(1.0, float(optax.tree.norm(updates)))
  np.testing.assert_allclose(optax.tree.norm(ours), expected, rtol=1e-5)


def test_one_reduction_for_the_whole_tree():
  """The point of the module: one reduction, not one per leaf."""
  tree = {f'w{i}': jnp.ones((i + 1, 3)) for i in range(40)}
  count = lambda f: jax.jit(f).lower(tree).as_text().count('stablehlo.reduce')
  assert count(optax.tree.norm) >= 40
  assert count(flat_tree.norm) == 1
