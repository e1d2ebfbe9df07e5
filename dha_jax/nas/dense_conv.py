"""Dense (ungrouped) convolutions, in the forms that are fast on XLA:CPU.

Every dense conv of the networks (the stem, DARTS' preprocessing
ReLU-Conv-BN, the pointwise half of every sep/dil conv, FactorizedReduce,
the auxiliary head, MobileNet's expansions and projections) is an `nn.Conv`
with this module's `conv_general_dilated` (`Conv`). On CPU it differs from
XLA's convolution in two ways:

* a 1×1 conv (ungrouped, undilated, unpadded, any stride) is a matrix
  product over the channel axis, out[n, h, w] = x[n, s·h, s·w] @ w[0, 0]:
  XLA:CPU's convolution transposes the activations for its kernel gradient,
  and forward + backward of the product is 2-3x faster;
* the kernel gradient of every conv is a matrix product of its k² input
  taps, stacked on the channel axis, with the output's cotangent, summed
  over chunks of images (of the [N·H·W, C] rows for a 1×1 conv,
  `batch_chunks`). Over the whole batch XLA:CPU
  transposed the cotangent for that product and fused the transpose into
  the cotangent's producer (a BatchNorm backward, often with a depthwise
  conv's ∂x), which then ran 5-10x slower, and it computed the stem's 3×3
  kernel gradient 4x slower than its forward (experiments/RESULTS.md, 'Step
  time against the official code').

GPU and TPU keep XLA's convolution. `conv_general_dilated` has
`lax.conv_general_dilated`'s signature; the parameter ('kernel',
[k, k, C_in, C_out]), its initialiser and the function computed are those of
`nn.Conv`, only the float32 rounding differs (tests/dense_conv_test.py).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dha_jax.nas import batch_chunks
from dha_jax.nas import windows

# The layouts of every conv here: NHWC activations, HWIO kernels.
NHWC = ('NHWC', 'HWIO', 'NHWC')
# Contract the channel axis of x [P, C_in] with w [C_in, C_out].
_CHANNELS = (((1,), (0,)), ((), ()))
# Contract images and positions of two [N, H, W, ·] arrays: [·, ·].
_POSITIONS = (((0, 1, 2), (0, 1, 2)), ((), ()))
# Contract the rows of two [P, ·] matrices: [·, ·].
_ROWS = (((0,), (0,)), ((), ()))
Padding = tuple[tuple[int, int], tuple[int, int]]


def _zero_padding(padding: str | Sequence[tuple[int, int]]) -> bool:
  # For a 1×1 window, 'SAME' and 'VALID' both pad nothing.
  return isinstance(padding, str) or all(p == (0, 0) for p in map(tuple,
                                                                   padding))


def _is_nhwc(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
             dimension_numbers: Any) -> bool:
  return (lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs_shape, rhs_shape, NHWC))


def _ones(dilation: Sequence[int] | None) -> bool:
  return all(d == 1 for d in (dilation or (1, 1)))


def is_matmul(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
              padding: Any, lhs_dilation: Any, rhs_dilation: Any,
              dimension_numbers: Any, feature_group_count: int) -> bool:
  """Whether the conv is a 1×1, ungrouped, undilated, unpadded NHWC conv
  (any stride): a matrix product over the channel axis."""
  return (tuple(rhs_shape[:2]) == (1, 1) and feature_group_count == 1
          and _ones(lhs_dilation) and _ones(rhs_dilation)
          and _zero_padding(padding)
          and _is_nhwc(lhs_shape, rhs_shape, dimension_numbers))


def has_tap_kernel_grad(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
                        window_strides: Sequence[int], lhs_dilation: Any,
                        rhs_dilation: Any, dimension_numbers: Any,
                        feature_group_count: int) -> bool:
  """Whether the conv's kernel gradient can be the chunked product of taps:
  an ungrouped NHWC conv with a square kernel, equal strides and equal
  kernel dilations, and no input dilation."""
  rhs_dilation = tuple(rhs_dilation or (1, 1))
  return (feature_group_count == 1 and _ones(lhs_dilation)
          and rhs_shape[0] == rhs_shape[1]
          and window_strides[0] == window_strides[1]
          and rhs_dilation[0] == rhs_dilation[1]
          and _is_nhwc(lhs_shape, rhs_shape, dimension_numbers))


def _row_sum(a: jax.Array, g: jax.Array, precision: Any) -> jax.Array:
  """Σ_p a[p, :] ⊗ g[p, :] over the rows p of a [P, C_in] and g [P, C_out],
  over chunks of rows."""
  return batch_chunks.sum_over_chunks(
      lambda a_chunk, g_chunk: lax.dot_general(a_chunk, g_chunk, _ROWS,
                                               precision=precision), a, g)


def _rows(a: jax.Array) -> jax.Array:
  """[N, H, W, C] → [N·H·W, C]."""
  return a.reshape(-1, a.shape[-1])


def _product_of_rows(x: jax.Array, w: jax.Array, precision: Any
                     ) -> tuple[jax.Array, jax.Array]:
  """(x @ w [N, H, W, C_out], the [N·H·W, C_in] matrix it read).

  The matrix is the backward pass's residual, and the backward pass reads
  the cotangent as a matrix too: XLA:CPU computed an operand (a ReLU, a
  conv, a BatchNorm backward) once more for every shape it was read in.
  """
  rows = _rows(lax.optimization_barrier(x))
  out = lax.dot_general(rows, w, _CHANNELS, precision=precision)
  return out.reshape(*x.shape[:-1], w.shape[1]), rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
  """x [N, H, W, C_in] @ w [C_in, C_out] -> [N, H, W, C_out]."""
  return _product_of_rows(x, w, precision)[0]


def _matmul_forward(x, w, precision):
  out, rows = _product_of_rows(x, w, precision)
  return out, (rows, w)


def _matmul_backward(precision, residuals, g):
  """∂x = g @ wᵀ; ∂w = Σ_{n,h,w} x ⊗ g, over chunks of rows."""
  rows, w = residuals
  g_rows = _rows(g)
  grad_x = lax.dot_general(g_rows, w, (((1,), (1,)), ((), ())),
                           precision=precision)
  return (grad_x.reshape(*g.shape[:-1], w.shape[0]),
          _row_sum(rows, g_rows, precision))


_matmul.defvjp(_matmul_forward, _matmul_backward)


def _convolve(x: jax.Array, w: jax.Array, stride: int, dilation: int,
              padding: Padding, precision: Any) -> jax.Array:
  return lax.conv_general_dilated(
      x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation),
      dimension_numbers=NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _tap_conv(x: jax.Array, w: jax.Array, stride: int, dilation: int,
              padding: Padding, precision: Any) -> jax.Array:
  """XLA's conv of x [N, H, W, C_in] with w [k, k, C_in, C_out]."""
  return _convolve(x, w, stride, dilation, padding, precision)


def _tap_conv_forward(x, w, stride, dilation, padding, precision):
  return _tap_conv(x, w, stride, dilation, padding, precision), (x, w)


def _tap_conv_backward(stride, dilation, padding, precision, residuals, g):
  """∂x: XLA's transposed conv; ∂w[i, j] = Σ_{n,y,x} x_pad[n, s·y + d·i,
  s·x + d·j] ⊗ g[n, y, x], the k² taps stacked on the channel axis
  (im2col) and multiplied with g over chunks of images."""
  x, w = residuals
  k, _, c_in, c_out = w.shape
  _, grad_x_fn = jax.vjp(
      lambda x: _convolve(x, w, stride, dilation, padding, precision), x)
  (lo_h, hi_h), (lo_w, hi_w) = padding

  def chunk_grad(x_chunk, g_chunk):
    x_pad = lax.pad(x_chunk, jnp.zeros((), x.dtype),
                    ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0), (0, 0, 0)))
    b, h_out, w_out, _ = g_chunk.shape
    patches = jnp.concatenate(
        [tap.reshape(b, h_out, w_out, c_in) for _, _, tap in windows.taps(
            x_pad, k, dilation, stride, h_out, w_out)], axis=-1)
    return lax.dot_general(patches, g_chunk, _POSITIONS, precision=precision)

  grad_w = batch_chunks.sum_over_chunks(chunk_grad, x, g)
  return grad_x_fn(g)[0], grad_w.reshape(k, k, c_in, c_out)


_tap_conv.defvjp(_tap_conv_forward, _tap_conv_backward)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         precision: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`; on CPU a 1×1 conv is a matrix product and
  a dense conv's kernel gradient a chunked product of taps (module
  docstring)."""
  if jax.default_backend() == 'cpu':
    if is_matmul(lhs.shape, rhs.shape, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count):
      stride_h, stride_w = window_strides
      x = (lhs[:, ::stride_h, ::stride_w] if (stride_h, stride_w) != (1, 1)
           else lhs)
      return _matmul(x, rhs[0, 0], precision)
    if has_tap_kernel_grad(lhs.shape, rhs.shape, window_strides, lhs_dilation,
                           rhs_dilation, dimension_numbers,
                           feature_group_count):
      stride, dilation = window_strides[0], (rhs_dilation or (1, 1))[0]
      k = dilation * (rhs.shape[0] - 1) + 1
      pads = (lax.padtype_to_pads(lhs.shape[1:3], (k, k), window_strides,
                                  padding) if isinstance(padding, str)
              else padding)
      return _tap_conv(lhs, rhs, stride, dilation,
                       tuple(tuple(map(int, p)) for p in pads), precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)


# `nn.Conv` (same name, parameters and function) in the forms above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
