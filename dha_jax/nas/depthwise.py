"""Depthwise convolution, with an implementation per backend.

Every separable and dilated conv of the DARTS space is a depthwise k×k conv
(one k×k filter per channel) followed by a pointwise 1×1 conv. XLA lowers a
depthwise conv to a convolution with `feature_group_count = C`, which is the
fastest form on GPU and TPU but slow on XLA:CPU: at the shapes of a C = 8
DARTS network (batch 96, 32 px), its forward + backward takes 2-9 times as
long as a *dense* C→C conv with C times its FLOPs
(`experiments/bench_depthwise.py`, experiments/RESULTS.md). Three
implementations compute the same function:

  'grouped'         `lax.conv_general_dilated(..., feature_group_count=C)`;
  'shifted'         Σ_{i,j} x_pad[:, s·h + d·i, s·w + d·j, :] · w[i, j, :],
                    k² strided slices of the padded input, each scaled per
                    channel: O(k²·C) work per pixel, no convolution at all;
  'block_diagonal'  a dense conv whose kernel is w on the diagonal of a
                    C×C matrix per tap: C times the FLOPs, but it runs on
                    the CPU's well-tuned dense conv kernels, which wins for
                    few channels.

'auto' picks 'grouped' on GPU/TPU and, on CPU, 'block_diagonal' up to
`BLOCK_DIAGONAL_MAX_CHANNELS` channels and 'shifted' above. (Alone, a 5×5
conv of 16-32 channels runs faster shifted; inside the network, where XLA
fuses and keeps residuals differently, block-diagonal convs throughout won:
experiments/RESULTS.md, 'Step time against the official code'.) All take the
kernel in the layout of `nn.Conv(feature_group_count=C)`, [k, k, 1, C], and
`DepthwiseConv` names its parameter as `nn.Conv` does, so parameter trees,
checkpoints and initial values do not depend on the choice; outputs agree to
float32 rounding (tests/depthwise_test.py).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ('auto', 'grouped', 'shifted', 'block_diagonal')
# On CPU the dense conv of 'block_diagonal' (C times the multiply-adds)
# beats the k² memory passes of 'shifted' up to about this width
# (bench_step and bench_depthwise on the development CPU, RESULTS.md).
BLOCK_DIAGONAL_MAX_CHANNELS = 32
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def output_size(size: int, kernel: int, stride: int, dilation: int,
                padding: int) -> int:
  """Spatial output size of a conv: ⌊(n + 2p − d(k − 1) − 1) / s⌋ + 1."""
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _grouped(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
             padding: int) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS,
      feature_group_count=x.shape[-1])


def _shifted(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
             padding: int) -> jax.Array:
  n, h, w, c = x.shape
  k = kernel.shape[0]
  h_out = output_size(h, k, stride, dilation, padding)
  w_out = output_size(w, k, stride, dilation, padding)
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      start = (0, i * dilation, j * dilation, 0)
      limit = (n, start[1] + stride * (h_out - 1) + 1,
               start[2] + stride * (w_out - 1) + 1, c)
      tap = lax.slice(x, start, limit, (1, stride, stride, 1)) * kernel[i, j, 0]
      out = tap if out is None else out + tap
  return out


def _block_diagonal(x: jax.Array, kernel: jax.Array, stride: int,
                    dilation: int, padding: int) -> jax.Array:
  c = x.shape[-1]
  dense = kernel[:, :, 0, :, None] * jnp.eye(c, dtype=kernel.dtype)
  return lax.conv_general_dilated(
      x, dense, (stride, stride), [(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS)


_IMPLS: dict[str, Callable[..., jax.Array]] = {
    'grouped': _grouped, 'shifted': _shifted,
    'block_diagonal': _block_diagonal}


def check_implementation(impl: str) -> None:
  """Raises ValueError, naming the config field, unless `impl` is known."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'depthwise implementation {impl!r}: choose from '
                     f'{IMPLEMENTATIONS} (config field model.depthwise)')


def resolve(impl: str, channels: int, backend: str | None = None) -> str:
  """The implementation that `impl` ('auto' or a name) stands for, for a
  depthwise conv of `channels` channels on `backend` (default: JAX's)."""
  check_implementation(impl)
  if impl != 'auto':
    return impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'grouped'
  return ('block_diagonal' if channels <= BLOCK_DIAGONAL_MAX_CHANNELS
          else 'shifted')


def depthwise_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1,
                   dilation: int = 1, padding: int = 0,
                   impl: str = 'auto') -> jax.Array:
  """Depthwise conv: out[n, h, w, c] = Σ_{i,j} x_pad[n, s·h + d·i,
  s·w + d·j, c] · kernel[i, j, 0, c].

  Args:
    x: [N, H, W, C].
    kernel: [k, k, 1, C] (square k).
    stride, dilation, padding: the same for both spatial axes; `padding`
      zeros on each side.
    impl: one of `IMPLEMENTATIONS` ('auto': by backend and C).

  Returns:
    [N, H', W', C] with H' = `output_size(H, k, stride, dilation, padding)`.
  """
  k, k2, one, c = kernel.shape
  if k != k2 or one != 1 or c != x.shape[-1]:
    raise ValueError(f'a depthwise kernel of {x.shape[-1]} channels is '
                     f'[k, k, 1, {x.shape[-1]}], got {kernel.shape}')
  return _IMPLS[resolve(impl, c)](x, kernel, stride, dilation, padding)


class DepthwiseConv(nn.Module):
  """`nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)` with a
  choice of implementation; the same parameter ('kernel', [k, k, 1, C]) and
  initialiser."""
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  impl: str = 'auto'
  kernel_init: Callable[..., jax.Array] = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    kernel = self.param('kernel', self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, c))
    return depthwise_conv(x, kernel, stride=self.stride,
                          dilation=self.dilation, padding=self.padding,
                          impl=self.impl)
