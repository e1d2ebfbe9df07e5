"""Sliding windows as shifted slices, for XLA:CPU.

A k×k window op (a depthwise conv, a 3×3 pool) is a sum or max over its k²
taps, each a shifted view of the padded input. With W and C merged into one
minor axis ([N, H, W·C]) every tap is one contiguous slice, so XLA:CPU fuses
all k² taps into one loop vectorised over W·C; with C minor alone a vector
is at most C lanes wide (8 in the DARTS network of the speed comparison).
`nas/depthwise.py` and `nas/pooling.py` build their 'shifted' forms and
their written-out backward passes from these helpers.
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax


def output_size(size: int, kernel: int, stride: int, dilation: int,
                padding: int) -> int:
  """Spatial output size of a window op: ⌊(n + 2p − d(k − 1) − 1) / s⌋ + 1."""
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def merge_minor(x: jax.Array) -> jax.Array:
  """[N, H, W, C] → [N, H, W·C]."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w * c)


def taps(x_pad: jax.Array, k: int, dilation: int, stride: int,
         h_out: int, w_out: int) -> Iterator[tuple[int, int, jax.Array]]:
  """(i, j, x_pad[:, s·y + d·i, s·x + d·j] for y < h_out, x < w_out) for the
  k² taps of a window over the padded [N, H, W, C] input, each merged to
  [N, h_out, w_out·C] and one contiguous slice of the minor axis.

  A strided window reads its taps from the s² phases of the input,
  x_pad[:, a::s, b::s] (one copy each; stride 1: the input itself): tap
  (i, j) is phase (d·i mod s, d·j mod s) shifted by (⌊d·i/s⌋, ⌊d·j/s⌋), so
  only the outputs kept are computed.
  """
  n, _, _, c = x_pad.shape
  phases = {}
  for i in range(k):
    for j in range(k):
      a, di = (dilation * i) % stride, (dilation * i) // stride
      b, dj = (dilation * j) % stride, (dilation * j) // stride
      if (a, b) not in phases:
        phases[a, b] = merge_minor(x_pad[:, a::stride, b::stride])
      yield i, j, lax.slice(phases[a, b], (0, di, dj * c),
                            (n, di + h_out, (dj + w_out) * c))


def pad_spatial(x: jax.Array, low: int, high: int | None = None,
                value: float | int = 0) -> jax.Array:
  """`value` around H and W of [N, H, W, C]: `low` before, `high` (default
  `low`) after; a negative width crops."""
  high = low if high is None else high
  return lax.pad(x, jnp.asarray(value, x.dtype),
                 ((0, 0, 0), (low, high, 0), (low, high, 0), (0, 0, 0)))


def to_dense_grid(g: jax.Array, stride: int, h_dense: int, w_dense: int,
                  value: float | int = 0) -> jax.Array:
  """A strided output (or its cotangent) put back on the stride-1 output
  grid of [h_dense, w_dense], `value` between its points."""
  h_high = h_dense - (g.shape[1] - 1) * stride - 1
  w_high = w_dense - (g.shape[2] - 1) * stride - 1
  return lax.pad(g, jnp.asarray(value, g.dtype),
                 ((0, 0, 0), (0, h_high, stride - 1),
                  (0, w_high, stride - 1), (0, 0, 0)))
