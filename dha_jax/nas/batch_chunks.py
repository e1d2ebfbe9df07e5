"""Loops over the batch, a few images at a time, for XLA:CPU.

A kernel gradient sums over every image of the batch: ∂w = Σ_n f(x_n, g_n)
for the layer's input x and the output's cotangent g. Written over the whole
batch, XLA:CPU streams each operand from memory once per tap (the depthwise
conv's k² tap copies) or transposes a whole activation for its matrix
product (the 1×1 convs), and it fuses that transpose into the producer of
the cotangent, which then writes in the transposed order (the BatchNorm
backward fusions at the top of the DHA step's profile,
experiments/RESULTS.md, 'Step time against the official code'). Summed over
chunks of `CHUNK_BYTES` of cotangent in a loop, each chunk's copies and
transposes run in the core's L2 cache.

The loop reads each chunk with a dynamic slice of x and g as they are.
Reshaped to [chunks, chunk, ...] instead, x and g were a second shape of
the same values, and XLA:CPU computed the producer of each (a ReLU, a
conv, a BatchNorm backward) once more to write it in that shape. A caller
whose other readers of x or g see them in another shape (a matrix of rows,
a merged minor axis) passes them in that shape for the same reason.

XLA does not fuse into a loop, so a loop is also how a value is computed
once for many readers (`concatenate_channels`).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Cotangent bytes per chunk: a chunk's copies then fit in a core's L2 cache
# (512 KiB on the machine of experiments/RESULTS.md; for the depthwise
# kernel gradient 64-256 KiB all gave 1.6-1.7x).
CHUNK_BYTES = 128 << 10


def items_per_chunk(count: int, item_bytes: int) -> int:
  """The largest divisor of `count` whose items hold at most `CHUNK_BYTES`
  (at least 1)."""
  wanted = max(1, CHUNK_BYTES // item_bytes)
  return max(d for d in range(1, min(count, wanted) + 1) if count % d == 0)


def sum_over_chunks(fn: Callable[..., jax.Array], x: jax.Array,
                    g: jax.Array) -> jax.Array:
  """Σ over chunks of the leading axis of fn(x_chunk, g_chunk).

  Args:
    fn: (x [b, ...], g [b, ...]) -> a sum over the chunk's b items (images,
      or rows of a matrix), of any shape independent of b.
    x: the layer's input [N, ...].
    g: the cotangent of its output [N, ...]; its bytes per item size the
      chunks.

  Returns:
    Σ_chunks fn(x_chunk, g_chunk), equal to fn(x, g) up to float rounding.
  """
  n = x.shape[0]
  chunk = items_per_chunk(n, g[0].size * g.dtype.itemsize)
  out = jax.eval_shape(fn, x[:chunk], g[:chunk])

  def add_chunk(i, total):
    start = i * chunk
    return total + fn(lax.dynamic_slice_in_dim(x, start, chunk),
                      lax.dynamic_slice_in_dim(g, start, chunk))

  return lax.fori_loop(0, n // chunk, add_chunk,
                       jnp.zeros(out.shape, out.dtype))


def _split_channels(g: jax.Array, sizes: tuple[int, ...]
                    ) -> tuple[jax.Array, ...]:
  """(g[..., :sizes[0]], g[..., sizes[0]:sizes[0] + sizes[1]], ...), copied
  out a chunk of images at a time."""
  n = g.shape[0]
  chunk = items_per_chunk(n, g[0].size * g.dtype.itemsize)
  bounds = np.cumsum((0,) + sizes)

  def copy_chunk(i, parts):
    start = i * chunk
    piece = lax.dynamic_slice_in_dim(g, start, chunk)
    return tuple(
        lax.dynamic_update_slice_in_dim(part, piece[..., lo:hi], start, 0)
        for part, lo, hi in zip(parts, bounds[:-1], bounds[1:]))

  parts = tuple(jnp.zeros(g.shape[:-1] + (size,), g.dtype) for size in sizes)
  return lax.fori_loop(0, n // chunk, copy_chunk, parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _concatenate(sizes: tuple[int, ...], *xs: jax.Array) -> jax.Array:
  del sizes
  return jnp.concatenate(xs, axis=-1)


def _concatenate_forward(sizes, *xs):
  return _concatenate(sizes, *xs), None


def _concatenate_backward(sizes, _, g):
  return _split_channels(g, sizes)


_concatenate.defvjp(_concatenate_forward, _concatenate_backward)


def concatenate_channels(xs: Sequence[jax.Array]) -> jax.Array:
  """`jnp.concatenate(xs, axis=-1)` of [N, ..., C_k] arrays; on CPU its
  backward pass copies the cotangent's channel blocks out in one loop over
  chunks of images.

  The cotangent of a DARTS cell's output is a sum over the cells that read
  it (ReLU masks, a FactorizedReduce's strided pieces). Sliced per node,
  XLA:CPU computed that sum anew inside every fusion that read a slice
  (each BatchNorm backward of the cell's ops, each α-weighted edge), reading
  the whole sum's operands for a quarter of their channels each time. A
  loop is an operation XLA does not fuse into, so the sum is computed once,
  into the loop's operand.
  """
  sizes = tuple(int(x.shape[-1]) for x in xs)
  if jax.default_backend() != 'cpu':
    return jnp.concatenate(xs, axis=-1)
  return _concatenate(sizes, *xs)
