"""BatchNorm whose reductions, on CPU, are one pass of a kernel of our own.

`nn.BatchNorm` in training mode reduces over N, H and W with C minor: the
mean and mean square forward, and Σ g and Σ g·x̂ in the backward pass. XLA:CPU
runs such a reduction several times slower than the memory it reads allows
(experiments/RESULTS.md, 'Step time against the official code'). `BatchNorm`
here is the same module (the same variables, initialisers, momentum update
and names, so parameter trees and checkpoints do not change) whose training
forward and backward compute those sums with `cpu_kernels.channel_sums`;
everything elementwise stays in XLA, where it fuses with its neighbours:

  forward   μ = Σx / M,  σ² = max(Σx² / M − μ², 0)        (flax's fast variance)
            y = (x − μ)·a + β,  a = γ / √(σ² + ε)
  backward  x̂ = (x − μ) / √(σ² + ε),  Σg, Σg·x̂ (one pass over x and g)
            ∂β = Σg,  ∂γ = Σg·x̂,  ∂x = a·(g − Σg / M − x̂·Σg·x̂ / M)

with M = N·H·W and g the cotangent of y. Where the kernels are not preferred
(`cpu_kernels.preferred`: not the CPU, several devices, or no kernels built),
and for dtypes other than float32, it computes what `nn.BatchNorm` computes,
in jnp; either way the statistics are over the whole batch the step sees
(under the data-parallel step, the global batch).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dha_jax.nas import cpu_kernels


def _uses_kernels(x: jax.Array) -> bool:
  return x.dtype == jnp.float32 and cpu_kernels.preferred()


def _moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σx / M, Σx² / M) over every axis but the last."""
  rows = x.size // x.shape[-1]
  if _uses_kernels(x):
    sums = cpu_kernels.channel_sums(x, x)
    return sums[0] / rows, sums[1] / rows
  axes = tuple(range(x.ndim - 1))
  return jnp.mean(x, axes), jnp.mean(jnp.square(x), axes)


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean, variance) per channel, flax's fast variance E[x²] − E[x]²
  clipped at 0."""
  mean, mean_square = _moments(x)
  return mean, jnp.maximum(mean_square - jnp.square(mean), 0.0)


def _normalize(x, scale, bias, mean, var, epsilon):
  """(x − μ)·γ / √(σ² + ε) + β, in `nn.BatchNorm`'s order of operations."""
  return (x - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _train_kernels(x: jax.Array, scale: jax.Array, bias: jax.Array,
                   epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  mean, var = _statistics(x)
  return _normalize(x, scale, bias, mean, var, epsilon), mean, var


def _train_kernels_forward(x, scale, bias, epsilon):
  y, mean, var = _train_kernels(x, scale, bias, epsilon)
  return (y, mean, var), (x, scale, mean, var)


def _train_kernels_backward(epsilon, residuals, cotangents):
  x, scale, mean, var = residuals
  g, g_mean, g_var = cotangents
  rows = x.size // x.shape[-1]
  inv_std = jax.lax.rsqrt(var + epsilon)
  sums = cpu_kernels.channel_sums(x, g)
  sum_g = sums[0]
  sum_g_xhat = (sums[1] - mean * sum_g) * inv_std      # Σ g·x̂
  centred = x - mean
  grad_x = (scale * inv_std) * (
      g - sum_g / rows - centred * (inv_std * sum_g_xhat / rows))
  # The statistics' own cotangents (zero when only y is differentiated):
  # ∂μ/∂x = 1/M, ∂σ²/∂x = 2(x − μ)/M.
  grad_x = grad_x + g_mean / rows + centred * (2.0 * g_var / rows)
  return grad_x, sum_g_xhat, sum_g


_train_kernels.defvjp(_train_kernels_forward, _train_kernels_backward)


def normalize_with_batch_statistics(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(y, μ, σ²): x [..., C] normalised with its own statistics over every
  axis but the last, y = (x − μ)·γ / √(σ² + ε) + β, for scale γ and bias β
  [C]. On CPU (float32, kernels available) the reductions forward and
  backward are `cpu_kernels.channel_sums`; the values and gradients are
  `nn.BatchNorm`'s up to float32 rounding."""
  if _uses_kernels(x):
    return _train_kernels(x, scale, bias, epsilon)
  mean, var = _statistics(x)
  return _normalize(x, scale, bias, mean, var, epsilon), mean, var


class BatchNorm(nn.Module):
  """`nn.BatchNorm(use_running_average, momentum, epsilon)` over the last
  axis, with its variables ('params': scale, bias; 'batch_stats': mean,
  var), initialisers and running-average update; see the module docstring.
  """
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean',
                            lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var',
                           lambda: jnp.ones(features, jnp.float32))
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      return _normalize(x, scale, bias, ra_mean.value, ra_var.value,
                        self.epsilon)
    y, mean, var = normalize_with_batch_statistics(x, scale, bias,
                                                   self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y
