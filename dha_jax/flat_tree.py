"""Norms and inner products of whole PyTrees, as one flat vector.

`optax.tree.norm` and `optax.tree.vdot` reduce every leaf on its own, and
XLA:CPU compiles each of those reductions into a kernel of its own. The
super-network of the offline default (configs/default.py) has 1,096
parameter arrays: the global norm of its gradient compiled for 11.0 s, its
clipping for 12.4 s, and the online hypergradient's two inner products for
29.1 s. Over the leaves concatenated into one vector
(`jax.flatten_util.ravel_pytree`, a copy of 0.9 MB there) each is a single
reduction: 1.6 s for the norm, 4.5 s for the clipping, 4.7 s for both
inner products (experiments/RESULTS.md, 'Step time against the official
code', 2026-12-07). Values equal optax's up to the order of the float32
summation.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

PyTree = Any


def flat(tree: PyTree) -> jax.Array:
  """The leaves of `tree` raveled and concatenated, in `jax.tree.leaves`
  order, in their common dtype: [Σ sizes]."""
  return ravel_pytree(tree)[0]


def norm(tree: PyTree) -> jax.Array:
  """‖tree‖₂ = sqrt(Σ_leaves Σ x²), a scalar (`optax.tree.norm`)."""
  return jnp.sqrt(jnp.sum(jnp.square(flat(tree))))


def vdot(a: PyTree, b: PyTree) -> jax.Array:
  """⟨a, b⟩ = Σ_leaves Σ a·b for two trees of one structure and shapes, a
  scalar (`optax.tree.vdot`)."""
  chex.assert_trees_all_equal_shapes(a, b)
  return jnp.vdot(flat(a), flat(b))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm(max_norm)` with the norm taken by `norm`:
  updates whose global norm is at least `max_norm` are scaled to it."""

  def update(updates, state, params=None):
    del params
    g_norm = norm(updates)
    trigger = g_norm < max_norm

    def clip(t):
      scaled = (t / g_norm.astype(t.dtype)) * max_norm
      return jax.lax.select(trigger, t, scaled)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)
