"""ReLU → (depthwise k×k →) pointwise 1×1: DARTS' ReLU-led convs as one op.

Every sep and dil conv of the DARTS space is ReLU → depthwise conv →
pointwise conv → BatchNorm (`network.DilConv`; a sep conv is two). Composed
of XLA ops, each of the three writes its [N, H, W, C] output to memory and
the next reads it back, forward and backward; at the speed comparison's
shapes those activations do not fit in the cache and the CPU step is bound
by that memory traffic, not by arithmetic.

`relu_separable_conv` computes the three as one function. With the
depthwise implementation 'ffi' (what 'auto' picks on CPU when the kernels
build, `nas/depthwise.py`) it is two CPU kernels, forward and backward,
that work one image at a time in cache (`cpu_kernels.separable_forward`,
`separable_backward`):

  forward   y = depthwise(max(x, 0), k_dw) · k_pw          reads x, writes y
  backward  d = depthwise(max(x, 0), k_dw)   (recomputed, not stored)
            ∂k_pw = Σ dᵀ·g,  ∂d = g·k_pwᵀ,  ∂x, ∂k_dw from ∂d,
            ∂x zero where x ≤ 0               reads x and g, writes ∂x

With any other implementation it is the composition of `nn.relu`,
`depthwise.depthwise_conv` and `dense_conv.conv_general_dilated`, the same
function up to float32 rounding (tests/separable_conv_test.py).

`relu_pointwise_conv` is the same for ReLU → 1×1 conv (the ReLU-Conv-BN
that preprocesses each cell's inputs): where the kernels are preferred
(`cpu_kernels.preferred`) two kernels that work a block of rows at a time,
so that the ReLU's output is neither written for the product nor kept for
the backward pass; elsewhere `nn.relu` and `dense_conv`'s 1×1 conv.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dha_jax.nas import cpu_kernels
from dha_jax.nas import dense_conv
from dha_jax.nas import depthwise


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernels(x: jax.Array, depthwise_kernel: jax.Array,
             pointwise_kernel: jax.Array, stride: int, dilation: int,
             padding: int) -> jax.Array:
  _, h, w, c = x.shape
  k = depthwise_kernel.shape[0]
  return cpu_kernels.separable_forward(
      x, depthwise_kernel.reshape(k, k, c), pointwise_kernel[0, 0], stride,
      dilation, padding,
      depthwise.output_size(h, k, stride, dilation, padding),
      depthwise.output_size(w, k, stride, dilation, padding))


def _kernels_forward(x, depthwise_kernel, pointwise_kernel, stride, dilation,
                     padding):
  y = _kernels(x, depthwise_kernel, pointwise_kernel, stride, dilation,
               padding)
  return y, (x, depthwise_kernel, pointwise_kernel)


def _kernels_backward(stride, dilation, padding, residuals, g):
  x, depthwise_kernel, pointwise_kernel = residuals
  k, _, _, c = depthwise_kernel.shape
  grad_x, grad_dw, grad_pw = cpu_kernels.separable_backward(
      x, depthwise_kernel.reshape(k, k, c), pointwise_kernel[0, 0], g,
      stride, dilation, padding)
  return (grad_x, grad_dw.reshape(depthwise_kernel.shape),
          grad_pw.reshape(pointwise_kernel.shape))


_kernels.defvjp(_kernels_forward, _kernels_backward)


def relu_separable_conv(x: jax.Array, depthwise_kernel: jax.Array,
                        pointwise_kernel: jax.Array, *, stride: int = 1,
                        dilation: int = 1, padding: int = 0,
                        impl: str = 'auto') -> jax.Array:
  """pointwise(depthwise(max(x, 0))).

  Args:
    x: [N, H, W, C].
    depthwise_kernel: [k, k, 1, C] (`nn.Conv(feature_group_count=C)`'s).
    pointwise_kernel: [1, 1, C, C_out] (`nn.Conv`'s).
    stride, dilation, padding: the depthwise conv's, the same for both
      spatial axes.
    impl: the depthwise conv's implementation (`depthwise.IMPLEMENTATIONS`);
      'ffi' runs the whole op as CPU kernels.

  Returns:
    [N, H', W', C_out], H' = `depthwise.output_size(H, k, stride, dilation,
    padding)`.
  """
  c = x.shape[-1]
  if (depthwise_kernel.shape[2:] != (1, c)
      or pointwise_kernel.shape[:3] != (1, 1, c)):
    raise ValueError(f'for {c} input channels the kernels are [k, k, 1, {c}] '
                     f'and [1, 1, {c}, C_out], got {depthwise_kernel.shape} '
                     f'and {pointwise_kernel.shape}')
  if (depthwise.resolve(impl) == 'ffi'
      and x.dtype == depthwise_kernel.dtype == pointwise_kernel.dtype
      == jnp.float32):
    return _kernels(x, depthwise_kernel, pointwise_kernel, stride, dilation,
                    padding)
  d = depthwise.depthwise_conv(nn.relu(x), depthwise_kernel, stride=stride,
                               dilation=dilation, padding=padding, impl=impl)
  return dense_conv.conv_general_dilated(d, pointwise_kernel, (1, 1), 'VALID',
                                         dimension_numbers=dense_conv.NHWC)


@jax.custom_vjp
def _relu_pointwise_kernels(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return cpu_kernels.relu_pointwise_forward(x, kernel[0, 0])


def _relu_pointwise_kernels_forward(x, kernel):
  return _relu_pointwise_kernels(x, kernel), (x, kernel)


def _relu_pointwise_kernels_backward(residuals, g):
  x, kernel = residuals
  grad_x, grad_kernel = cpu_kernels.relu_pointwise_backward(x, kernel[0, 0],
                                                            g)
  return grad_x, grad_kernel.reshape(kernel.shape)


_relu_pointwise_kernels.defvjp(_relu_pointwise_kernels_forward,
                               _relu_pointwise_kernels_backward)


def relu_pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """max(x, 0) · kernel over channels: x [N, H, W, C], kernel
  [1, 1, C, C_out] (`nn.Conv`'s) → [N, H, W, C_out]."""
  c = x.shape[-1]
  if kernel.shape[:3] != (1, 1, c):
    raise ValueError(f'for {c} input channels the kernel is '
                     f'[1, 1, {c}, C_out], got {kernel.shape}')
  if x.dtype == kernel.dtype == jnp.float32 and cpu_kernels.preferred():
    return _relu_pointwise_kernels(x, kernel)
  return dense_conv.conv_general_dilated(nn.relu(x), kernel, (1, 1), 'VALID',
                                         dimension_numbers=dense_conv.NHWC)


class ConvKernel(nn.Module):
  """The 'kernel' parameter of an `nn.Conv` without bias, alone: a module
  named as the conv has its parameter at the conv's path, with its
  initialiser."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', nn.linear.default_kernel_init, self.shape)
