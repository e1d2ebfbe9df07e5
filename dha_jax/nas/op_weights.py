"""α · h, an op's output weighted by its architecture weight, for XLA:CPU.

A node of the search network sums its ops' outputs weighted by α
(`network.Cell`, `mobilenet_network`): node = Σ_k α_k · h_k. The gradient of
α_k is Σ g·h_k over the whole [N, H, W, C] output, one full reduction per op
and step, which XLA:CPU runs several times slower than memory allows (as it
does BatchNorm's, `nas/batch_norm.py`). `weight_output` computes α·h with a
written-out backward pass whose reduction is one pass of
`cpu_kernels.channel_sums` where the kernels are preferred
(`cpu_kernels.preferred`); elsewhere it is `alpha * h`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dha_jax.nas import cpu_kernels


@jax.custom_vjp
def _weight_kernels(alpha: jax.Array, h: jax.Array) -> jax.Array:
  return alpha * h


def _weight_kernels_forward(alpha, h):
  return alpha * h, (alpha, h)


def _weight_kernels_backward(residuals, g):
  alpha, h = residuals
  grad_alpha = jnp.sum(cpu_kernels.channel_sums(h, g)[1])   # Σ g·h
  return grad_alpha.astype(alpha.dtype).reshape(alpha.shape), alpha * g


_weight_kernels.defvjp(_weight_kernels_forward, _weight_kernels_backward)


def weight_output(alpha: jax.Array, h: jax.Array) -> jax.Array:
  """α·h for a scalar α and an op's output h [..., C]; ∂α = Σ g·h."""
  if (jnp.ndim(alpha) == 0 and h.dtype == jnp.float32
      and jnp.result_type(alpha) == jnp.float32 and cpu_kernels.preferred()):
    return _weight_kernels(alpha, h)
  return alpha * h
