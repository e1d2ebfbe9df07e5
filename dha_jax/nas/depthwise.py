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
                    k² slices of the padded input, each scaled per channel,
                    with W and C merged into one minor axis so that XLA
                    fuses all taps into one vectorised loop
                    (`nas/windows.py`); a strided conv reads its taps from
                    the input's s² phases, so it computes only the outputs
                    it keeps. Its backward pass is written out (a custom
                    VJP): ∂x is the same loop over the cotangent with the
                    flipped kernel, per phase, ∂w one multiply-reduce per
                    tap over a few images at a time (in cache), and only
                    the padded input, which the forward wrote anyway, is
                    kept;
  'block_diagonal'  a dense conv whose kernel is w on the diagonal of a
                    C×C matrix per tap: C times the FLOPs, on the CPU's
                    dense conv kernels;
  'ffi'             CPU only: C++ loops called through XLA's FFI
                    (`nas/cpu_kernels.py`), compiled on first use with the
                    machine's C++ compiler. Forward, ∂x and ∂kernel each
                    read an image once, padded in cache, with every output
                    accumulated in registers; ∂kernel needs no k² passes.
                    Only the unpadded input is kept for the backward pass.

'auto' picks 'grouped' on GPU/TPU; on CPU 'ffi' when its kernels build and
the process has one device (`cpu_kernels.preferred`), else 'shifted'. At
the shapes of the speed comparison 'ffi''s forward + backward is several
times as fast as 'shifted''s, which was 1.6x as fast as
'block_diagonal''s in the step (experiments/RESULTS.md, 'Step time against
the official code').
All take the kernel in the layout of
`nn.Conv(feature_group_count=C)`, [k, k, 1, C], and `DepthwiseConv` names
its parameter as `nn.Conv` does, so parameter trees, checkpoints and initial
values do not depend on the choice; outputs and gradients agree to float32
rounding (tests/depthwise_test.py).
"""

from __future__ import annotations

import functools
from typing import Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dha_jax.nas import batch_chunks
from dha_jax.nas import cpu_kernels
from dha_jax.nas import windows

IMPLEMENTATIONS = ('auto', 'grouped', 'shifted', 'block_diagonal', 'ffi')
_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def output_size(size: int, kernel: int, stride: int, dilation: int,
                padding: int) -> int:
  """Spatial output size of a conv: ⌊(n + 2p − d(k − 1) − 1) / s⌋ + 1."""
  return windows.output_size(size, kernel, stride, dilation, padding)


def _grouped(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
             padding: int) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS,
      feature_group_count=x.shape[-1])


def _correlate(x_pad: jax.Array, kernel: jax.Array, stride: int,
               dilation: int, h_out: int, w_out: int) -> jax.Array:
  """Depthwise correlation of an already padded input:
  out[n, y, x, c] = Σ_{i,j} x_pad[n, s·y + d·i, s·x + d·j, c] · kernel[i, j, 0, c].

  Each tap is one contiguous slice of the merged [N, H, W·C] input (or of
  one of its s² phases, `windows.taps`), scaled by its kernel row tiled W
  times: XLA fuses the k² taps into one vectorised loop over the output.
  """
  n, _, _, c = x_pad.shape
  out = None
  for i, j, tap in windows.taps(x_pad, kernel.shape[0], dilation, stride,
                                h_out, w_out):
    tap = tap * jnp.tile(kernel[i, j, 0], w_out)
    out = tap if out is None else out + tap
  return out.reshape(n, h_out, w_out, c)


def _correlate_transposed(g: jax.Array, kernel: jax.Array, stride: int,
                          dilation: int, padding: int, h: int, w: int
                          ) -> jax.Array:
  """∂x of `_correlate` for the cotangent g, merged to [N, h_out, w_out·C]:
  ∂x_pad[s·y + d·i, s·x + d·j] += g[y, x] · kernel[i, j], cropped to the
  unpadded [N, h, w, C].

  Computed per phase (a, b) of x_pad (rows a::s, columns b::s): the taps
  with d·i ≡ a, d·j ≡ b (mod s) write phase (a, b) at an offset of
  (⌊d·i/s⌋, ⌊d·j/s⌋), so each phase is a stride-1 correlation of the padded
  cotangent with its part of the flipped kernel; the phases are then
  interleaved. Stride 1 is one phase, the transposed conv itself.
  """
  k, _, _, c = kernel.shape
  n, h_out, w_out = g.shape[0], g.shape[1], g.shape[2] // c
  h_phase = -(-(h + 2 * padding) // stride)
  w_phase = -(-(w + 2 * padding) // stride)
  reach = dilation * (k - 1) // stride
  zero = jnp.zeros((), g.dtype)
  g_pad = lax.pad(g, zero, ((0, 0, 0), (reach, h_phase - h_out, 0),
                            (reach * c, (w_phase - w_out) * c, 0)))
  phases = {}
  for i in range(k):
    for j in range(k):
      a, di = (dilation * i) % stride, (dilation * i) // stride
      b, dj = (dilation * j) % stride, (dilation * j) // stride
      tap = lax.slice(g_pad, (0, reach - di, (reach - dj) * c),
                      (n, reach - di + h_phase, (reach - dj + w_phase) * c))
      tap = tap * jnp.tile(kernel[i, j, 0], w_phase)
      phases[a, b] = tap + phases[a, b] if (a, b) in phases else tap
  empty = jnp.zeros((n, h_phase, w_phase * c), g.dtype)
  # [N, h_phase, s (a), w_phase, s (b), C] → rows and columns interleaved.
  grid = jnp.stack([
      jnp.stack([phases.get((a, b), empty).reshape(n, h_phase, w_phase, c)
                 for b in range(stride)], axis=3)
      for a in range(stride)], axis=2)
  grid = grid.reshape(n, h_phase * stride, w_phase * stride, c)
  return grid[:, padding:padding + h, padding:padding + w]


def _pad_and_correlate(x: jax.Array, kernel: jax.Array, stride: int,
                       dilation: int, padding: int
                       ) -> tuple[jax.Array, jax.Array]:
  """(the conv of x, the padded x). The correlation and the kernel
  gradient's loop read the padded input as this one array: XLA:CPU computed
  an operand (the pad of a ReLU) once more for every shape it was read in.
  The barrier keeps it from recomputing the input inside the loop."""
  _, h, w, _ = x.shape
  k = kernel.shape[0]
  x_pad = lax.optimization_barrier(windows.pad_spatial(x, padding))
  out = _correlate(x_pad, kernel, stride, dilation,
                   output_size(h, k, stride, dilation, padding),
                   output_size(w, k, stride, dilation, padding))
  return out, x_pad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shifted(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
             padding: int) -> jax.Array:
  return _pad_and_correlate(x, kernel, stride, dilation, padding)[0]


def _shifted_forward(x, kernel, stride, dilation, padding):
  # Only the padded input is kept for the backward pass (JAX's own VJP of
  # the k² slices keeps each slice, k² copies of the input).
  out, x_pad = _pad_and_correlate(x, kernel, stride, dilation, padding)
  return out, (x_pad, kernel)


def _kernel_grad(x_pad: jax.Array, g: jax.Array, k: int, stride: int,
                 dilation: int) -> jax.Array:
  """∂kernel[i, j] = Σ_{n,y,x} x_pad[n, s·y + d·i, s·x + d·j] · g[n, y, x]
  for the padded input x_pad [N, H + 2p, W + 2p, C] and the cotangent g,
  merged to [N, h_out, w_out·C]: [k, k, 1, C].

  One multiply-reduce per tap, over a few images at a time
  (`batch_chunks`): XLA:CPU copies each tap's slice before its reduction,
  and over the whole batch the k² copies and reductions each stream the
  activations from memory (the kernel gradients at the speed comparison's
  shapes are 1.7x faster in chunks, experiments/RESULTS.md).
  """
  c = x_pad.shape[-1]
  _, h_out, w_out_c = g.shape
  w_out = w_out_c // c

  def chunk_grad(x_chunk, g_chunk):
    taps = windows.taps(x_chunk, k, dilation, stride, h_out, w_out)
    grad = jnp.stack([jnp.sum(tap * g_chunk, axis=(0, 1))
                      for _, _, tap in taps])
    return grad.reshape(k * k, w_out, c).sum(1)

  return batch_chunks.sum_over_chunks(chunk_grad, x_pad, g).reshape(
      k, k, 1, c)


def _shifted_backward(stride, dilation, padding, residuals, g):
  """∂x: the transposed correlation (`_correlate_transposed`); ∂kernel:
  `_kernel_grad`, both reading the cotangent merged, in one shape."""
  x_pad, kernel = residuals
  _, h_pad, w_pad, _ = x_pad.shape
  h, w = h_pad - 2 * padding, w_pad - 2 * padding
  k = kernel.shape[0]
  g = windows.merge_minor(g)
  grad_x = _correlate_transposed(g, kernel, stride, dilation, padding, h, w)
  return grad_x, _kernel_grad(x_pad, g, k, stride, dilation)


_shifted.defvjp(_shifted_forward, _shifted_backward)


def _block_diagonal(x: jax.Array, kernel: jax.Array, stride: int,
                    dilation: int, padding: int) -> jax.Array:
  c = x.shape[-1]
  dense = kernel[:, :, 0, :, None] * jnp.eye(c, dtype=kernel.dtype)
  return lax.conv_general_dilated(
      x, dense, (stride, stride), [(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _ffi(x: jax.Array, kernel: jax.Array, stride: int, dilation: int,
         padding: int) -> jax.Array:
  _, h, w, c = x.shape
  k = kernel.shape[0]
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    raise ValueError(f"the 'ffi' depthwise conv computes float32, got "
                     f"{x.dtype} and {kernel.dtype}: choose 'shifted' "
                     f"(config field model.depthwise)")
  return cpu_kernels.depthwise_forward(
      x, kernel.reshape(k, k, c), stride, dilation, padding,
      output_size(h, k, stride, dilation, padding),
      output_size(w, k, stride, dilation, padding))


def _ffi_forward(x, kernel, stride, dilation, padding):
  return _ffi(x, kernel, stride, dilation, padding), (x, kernel)


def _ffi_backward(stride, dilation, padding, residuals, g):
  x, kernel = residuals
  k, _, _, c = kernel.shape
  grad_x, grad_kernel = cpu_kernels.depthwise_backward(
      x, kernel.reshape(k, k, c), g, stride, dilation, padding)
  return grad_x, grad_kernel.reshape(kernel.shape)


_ffi.defvjp(_ffi_forward, _ffi_backward)


_IMPLS: dict[str, Callable[..., jax.Array]] = {
    'grouped': _grouped, 'shifted': _shifted,
    'block_diagonal': _block_diagonal, 'ffi': _ffi}


def check_implementation(impl: str, backend: str | None = None) -> None:
  """Raises ValueError, naming the config field, unless `impl` is known and
  runs on `backend` (default: JAX's): 'ffi' needs the CPU and its kernels
  built."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'depthwise implementation {impl!r}: choose from '
                     f'{IMPLEMENTATIONS} (config field model.depthwise)')
  if impl != 'ffi':
    return
  if (backend or jax.default_backend()) != 'cpu':
    raise ValueError("the 'ffi' depthwise conv runs on the CPU only: choose "
                     "'auto' or 'grouped' (config field model.depthwise)")
  if not cpu_kernels.available():
    raise ValueError(f"the 'ffi' depthwise conv's CPU kernels are not "
                     f"available ({cpu_kernels.unavailable_reason()}): fix "
                     f"that, or choose 'auto' or 'shifted' (config field "
                     f"model.depthwise)")


@functools.cache
def _warn_without_kernels() -> None:
  logging.warning("depthwise convs use 'shifted', the slower pure-XLA form: "
                  'the CPU kernels are not available (%s)',
                  cpu_kernels.unavailable_reason())


def resolve(impl: str, backend: str | None = None) -> str:
  """The implementation that `impl` ('auto' or a name) stands for on
  `backend` (default: JAX's). 'auto' on CPU is 'ffi' in a process with one
  device (`cpu_kernels.preferred`; it builds the kernels on its first call
  and says once, a logged warning, when it cannot), else 'shifted'."""
  check_implementation(impl, backend)
  if impl != 'auto':
    return impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'grouped'
  if cpu_kernels.preferred():
    return 'ffi'
  # Not where `cpu_kernels.preference(False)` declines kernels it has.
  if jax.device_count() == 1 and not cpu_kernels.available():
    _warn_without_kernels()
  return 'shifted'


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
    impl: one of `IMPLEMENTATIONS` ('auto': by backend).

  Returns:
    [N, H', W', C] with H' = `output_size(H, k, stride, dilation, padding)`.
  """
  k, k2, one, c = kernel.shape
  if k != k2 or one != 1 or c != x.shape[-1]:
    raise ValueError(f'a depthwise kernel of {x.shape[-1]} channels is '
                     f'[k, k, 1, {x.shape[-1]}], got {kernel.shape}')
  return _IMPLS[resolve(impl)](x, kernel, stride, dilation, padding)


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
