"""1×1 convolutions as matrix products on XLA:CPU.

A 1×1 conv (DARTS' preprocessing ReLU-Conv-BN, the pointwise half of every
sep/dil conv, FactorizedReduce, MobileNet's expansions and projections) is a
matrix product over the channel axis. XLA:CPU runs it as a convolution whose
kernel gradient transposes the activations first; as a `dot_general` its
forward + backward is 2-3x faster at the DARTS network's shapes
(experiments/RESULTS.md, 'Step time against the official code'). GPU and
TPU keep XLA's convolution.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so it is
passed to `nn.Conv(conv_general_dilated=...)`: the parameter ('kernel',
[1, 1, C_in, C_out]), its initialiser and the function computed are those of
`nn.Conv`; only the float32 rounding differs (tests/pointwise_test.py).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _zero_padding(padding: str | Sequence[tuple[int, int]]) -> bool:
  # For a 1×1 window, 'SAME' and 'VALID' both pad nothing.
  return isinstance(padding, str) or all(p == (0, 0) for p in map(tuple,
                                                                   padding))


def is_matmul(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
              padding: Any, lhs_dilation: Any, rhs_dilation: Any,
              dimension_numbers: Any, feature_group_count: int) -> bool:
  """Whether the conv is a 1×1, ungrouped, undilated, unpadded NHWC conv
  (any stride): a matrix product over the channel axis."""
  nhwc = lax.conv_dimension_numbers(lhs_shape, rhs_shape, _NHWC)
  return (tuple(rhs_shape[:2]) == (1, 1) and feature_group_count == 1
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and _zero_padding(padding)
          and lax.conv_dimension_numbers(lhs_shape, rhs_shape,
                                         dimension_numbers) == nhwc)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         precision: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, with a 1×1 conv on CPU computed as
  out[n, h, w, :] = lhs[n, s·h, s·w, :] @ rhs[0, 0] (stride s)."""
  if jax.default_backend() == 'cpu' and is_matmul(
      lhs.shape, rhs.shape, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count):
    stride_h, stride_w = window_strides
    x = lhs[:, ::stride_h, ::stride_w] if (stride_h, stride_w) != (1, 1) else (
        lhs)
    return lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())),
                           precision=precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision)


# `nn.Conv` (same name, parameters and function) with 1×1 convs as above.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
