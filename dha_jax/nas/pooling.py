"""The DARTS space's 3×3 pools, with an implementation per backend.

`max_pool_3x3` and `avg_pool_3x3` (padding 1, stride 1 or 2; the average
over the window's cells inside the image, `count_include_pad=False`) compute
what `nn.max_pool` / `nn.avg_pool` compute. Two implementations:

  'reduce_window'  XLA's reduce-window (`nn.max_pool`, `nn.avg_pool`), the
                   form GPU and TPU compile best;
  'shifted'        the max or sum of the 9 shifted slices of the padded
                   input, merged to [N, H, W·C] so that XLA:CPU fuses them
                   into one vectorised loop (`nas/windows.py`), with the
                   backward pass written out: the max pool keeps the index
                   of each output's first maximal tap (int8) and sends the
                   cotangent there, as XLA's select-and-scatter and
                   PyTorch's max pool do on ties; the average pool spreads
                   g / count over the window.

'auto' picks 'shifted' on CPU, where XLA lowers the max pool's gradient to a
variadic reduce-window over index tensors: at batch 96 and 32 px, 8 channels,
forward + backward of a stride-1 max pool is about 7x faster shifted
(experiments/RESULTS.md, 'Step time against the official code').
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dha_jax.nas import windows

IMPLEMENTATIONS = ('auto', 'reduce_window', 'shifted')
WINDOW = 3
PADDING = 1
# The input's taps lie this far from an output on either side, so the
# backward pass pads the cotangent by it (k − 1 − p).
_REACH = WINDOW - 1 - PADDING


def check_implementation(impl: str) -> None:
  """Raises ValueError, naming the config field, unless `impl` is known."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'pooling implementation {impl!r}: choose from '
                     f'{IMPLEMENTATIONS} (config field model.pooling)')


def resolve(impl: str, backend: str | None = None) -> str:
  """The implementation that `impl` ('auto' or a name) stands for on
  `backend` (default: JAX's)."""
  check_implementation(impl)
  if impl != 'auto':
    return impl
  return ('shifted' if (backend or jax.default_backend()) == 'cpu'
          else 'reduce_window')


def _padding() -> tuple[tuple[int, int], tuple[int, int]]:
  return ((PADDING, PADDING),) * 2


def _output_shape(x: jax.Array, stride: int) -> tuple[int, int, int]:
  """(N, H', W') of the pool of x."""
  n, h, w, _ = x.shape
  return (n, windows.output_size(h, WINDOW, stride, 1, PADDING),
          windows.output_size(w, WINDOW, stride, 1, PADDING))


def _window_sum_back(g_dense: jax.Array, h: int, w: int, keep=None
                     ) -> jax.Array:
  """Σ over the taps of the cotangent sent back to the input, [N, h, w·C]:
  dx[y, x] = Σ_{i,j} keep_{i,j}(g[y + p − i, x + p − j]), the correlation of
  the padded cotangent with the flipped window; `keep(a, b, tap)` gets the
  offsets (a, b) = (k − 1 − i, k − 1 − j) of the tap in the padded
  cotangent (None: keep every tap whole)."""
  g_pad = windows.pad_spatial(g_dense, _REACH)
  total = None
  for a, b, tap in windows.taps(g_pad, WINDOW, 1, 1, h, w):
    term = tap if keep is None else keep(a, b, tap)
    total = term if total is None else total + term
  return total


def _max_with_argmax(x: jax.Array, stride: int
                     ) -> tuple[jax.Array, jax.Array]:
  """The max pool and, per output, the index k·i + j of its first maximal
  tap (int8)."""
  n, h_out, w_out = _output_shape(x, stride)
  c = x.shape[-1]
  taps = [tap for _, _, tap in windows.taps(
      windows.pad_spatial(x, PADDING, value=-jnp.inf), WINDOW, 1, stride,
      h_out, w_out)]
  out = functools.reduce(jnp.maximum, taps)
  first = jnp.full(out.shape, len(taps) - 1, jnp.int8)
  for t in range(len(taps) - 2, -1, -1):   # the lowest index wins ties
    first = jnp.where(taps[t] == out, jnp.int8(t), first)
  return (out.reshape(n, h_out, w_out, c), first.reshape(n, h_out, w_out, c))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_shifted(x: jax.Array, stride: int) -> jax.Array:
  return _max_with_argmax(x, stride)[0]


def _max_shifted_forward(x, stride):
  out, first = _max_with_argmax(x, stride)
  return out, (first, x.shape)


def _max_shifted_backward(stride, residuals, g):
  first, (n, h, w, c) = residuals
  # Between a strided output's points, g is 0: the index there is unread.
  first_pad = windows.pad_spatial(windows.to_dense_grid(first, stride, h, w),
                                  _REACH, value=-1)
  first_taps = {(a, b): tap for a, b, tap in windows.taps(
      first_pad, WINDOW, 1, 1, h, w)}

  def keep(a, b, g_tap):
    # The forward tap (i, j) = (k − 1 − a, k − 1 − b), index k·i + j.
    t = (WINDOW - 1 - a) * WINDOW + (WINDOW - 1 - b)
    return jnp.where(first_taps[a, b] == t, g_tap, jnp.zeros((), g.dtype))

  grad = _window_sum_back(windows.to_dense_grid(g, stride, h, w), h, w, keep)
  return (grad.reshape(n, h, w, c),)


_max_shifted.defvjp(_max_shifted_forward, _max_shifted_backward)


def _inverse_counts(h: int, w: int, stride: int, channels: int, dtype
                    ) -> jax.Array:
  """1 / (the number of the window's cells inside the image), per output of
  an h×w input, tiled over C: [h_out, w_out·C] (a constant)."""
  inside = np.pad(np.ones((h, w)), PADDING)
  counts = sum(inside[i:i + h, j:j + w] for i in range(WINDOW)
               for j in range(WINDOW))[::stride, ::stride]
  return jnp.asarray(np.repeat(1.0 / counts, channels, axis=1), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_shifted(x: jax.Array, stride: int) -> jax.Array:
  _, h, w, c = x.shape
  n, h_out, w_out = _output_shape(x, stride)
  total = functools.reduce(jnp.add, [tap for _, _, tap in windows.taps(
      windows.pad_spatial(x, PADDING), WINDOW, 1, stride, h_out, w_out)])
  out = total * _inverse_counts(h, w, stride, c, x.dtype)
  return out.reshape(n, h_out, w_out, c)


def _avg_shifted_forward(x, stride):
  return _avg_shifted(x, stride), x.shape


def _avg_shifted_backward(stride, shape, g):
  n, h, w, c = shape
  scaled = (windows.merge_minor(g)
            * _inverse_counts(h, w, stride, c, g.dtype)).reshape(g.shape)
  return (_window_sum_back(windows.to_dense_grid(scaled, stride, h, w), h,
                           w).reshape(n, h, w, c),)


_avg_shifted.defvjp(_avg_shifted_forward, _avg_shifted_backward)


def max_pool_3x3(x: jax.Array, stride: int, impl: str = 'auto') -> jax.Array:
  """3×3 max pool, padding 1: [N, H, W, C] → [N, ⌈H/s⌉, ⌈W/s⌉, C]."""
  if resolve(impl) == 'shifted':
    return _max_shifted(x, stride)
  return nn.max_pool(x, (WINDOW, WINDOW), strides=(stride, stride),
                     padding=_padding())


def avg_pool_3x3(x: jax.Array, stride: int, impl: str = 'auto') -> jax.Array:
  """3×3 average pool over the cells inside the image, padding 1:
  [N, H, W, C] → [N, ⌈H/s⌉, ⌈W/s⌉, C]."""
  if resolve(impl) == 'shifted':
    return _avg_shifted(x, stride)
  return nn.avg_pool(x, (WINDOW, WINDOW), strides=(stride, stride),
                     padding=_padding(), count_include_pad=False)


def _window_matrix(size: int, window: int, stride: int) -> np.ndarray:
  """[size, size'] with 1 where input row h lies in output window a
  (a·stride ≤ h < a·stride + window), for an unpadded window."""
  out = windows.output_size(size, window, stride, 1, 0)
  h = np.arange(size)[:, None]
  start = np.arange(out)[None, :] * stride
  return ((h >= start) & (h < start + window)).astype(np.float32)


def window_average(x: jax.Array, window: int, stride: int) -> jax.Array:
  """`nn.avg_pool(x, (window, window), (stride, stride))` (no padding) as two
  matrix products with 0/1 window matrices:
  out[n, a, b] = Σ_{h,w} M_H[h, a] · M_W[w, b] · x[n, h, w] / window².

  For the auxiliary head's 5×5/3 pool of a small map XLA:CPU's
  reduce-window backward was slower than the step's convolutions around it
  (experiments/RESULTS.md, 'Step time against the official code'); the
  products and their transposes are a few multiply-adds per input.
  """
  _, h, w, _ = x.shape
  rows = jnp.asarray(_window_matrix(h, window, stride), x.dtype)
  cols = jnp.asarray(_window_matrix(w, window, stride), x.dtype)
  return jnp.einsum('nhwc,ha,wb->nabc', x, rows, cols) / (window * window)
