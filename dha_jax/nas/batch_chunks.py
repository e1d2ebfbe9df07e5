"""Sums over the batch, a few images at a time, for XLA:CPU's caches.

A kernel gradient sums over every image of the batch: ∂w = Σ_n f(x_n, g_n)
for the layer's input x and the output's cotangent g. Written over the whole
batch, XLA:CPU streams each operand from memory once per tap (the depthwise
conv's k² tap copies) or transposes a whole activation for its matrix
product (the 1×1 convs), and it fuses that transpose into the producer of
the cotangent, which then writes in the transposed order (the BatchNorm
backward fusions at the top of the DHA step's profile,
experiments/RESULTS.md, 'Step time against the official code'). Summed over
chunks of `CHUNK_BYTES` of cotangent in a `lax.scan`, the operands are
materialised in their own layout and each chunk's copies and transposes run
in the core's L2 cache.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Cotangent bytes per chunk: a chunk's copies then fit in a core's L2 cache
# (512 KiB on the machine of experiments/RESULTS.md; for the depthwise
# kernel gradient 64-256 KiB all gave 1.6-1.7x).
CHUNK_BYTES = 128 << 10


def images_per_chunk(batch: int, image_bytes: int) -> int:
  """The largest divisor of `batch` whose images hold at most `CHUNK_BYTES`
  (at least 1)."""
  wanted = max(1, CHUNK_BYTES // image_bytes)
  return max(d for d in range(1, min(batch, wanted) + 1) if batch % d == 0)


def sum_over_chunks(fn: Callable[..., jax.Array], x: jax.Array,
                    g: jax.Array) -> jax.Array:
  """Σ over chunks of images of fn(x_chunk, g_chunk).

  Args:
    fn: (x [b, ...], g [b, ...]) -> a sum over the chunk's b images (any
      shape, independent of b).
    x: the layer's input [N, ...].
    g: the cotangent of its output [N, ...]; its bytes per image size the
      chunks.

  Returns:
    Σ_chunks fn(x_chunk, g_chunk), equal to fn(x, g) up to float rounding.
  """
  n = x.shape[0]
  chunk = images_per_chunk(n, g[0].size * g.dtype.itemsize)
  chunks = lambda a: a.reshape(n // chunk, chunk, *a.shape[1:])
  out = jax.eval_shape(fn, x[:chunk], g[:chunk])

  def add_chunk(total, x_and_g):
    return total + fn(*x_and_g), None

  total, _ = lax.scan(add_chunk, jnp.zeros(out.shape, out.dtype),
                      (chunks(x), chunks(g)))
  return total
