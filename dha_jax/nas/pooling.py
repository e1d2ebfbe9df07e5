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


def _window_sum_back(g_dense: jax.Array, channels: int, h: int, w: int,
                     keep=None) -> jax.Array:
  """Σ over the taps of the cotangent sent back to the input, [N, h, w·C]:
  dx[y, x] = Σ_{i,j} keep(t)·g[y + p − i, x + p − j] (t = k·i + j), the
  correlation of the padded cotangent with the flipped window."""
  g_pad = windows.merge_minor(windows.pad_spatial(g_dense, _REACH))
  total = None
  for a, b, tap in windows.taps(g_pad, WINDOW, 1, channels, h, w):
    t = (WINDOW - 1 - a) * WINDOW + (WINDOW - 1 - b)
    term = tap if keep is None else keep(a, b, t, tap)
    total = term if total is None else total + term
  return total


def _max_with_argmax(x: jax.Array, stride: int
                     ) -> tuple[jax.Array, jax.Array]:
  """The max pool and, per output, the index k·i + j of its first maximal
  tap (int8)."""
  n, h, w, c = x.shape
  x_pad = windows.merge_minor(windows.pad_spatial(x, PADDING, value=-jnp.inf))
  taps = [tap for _, _, tap in windows.taps(x_pad, WINDOW, 1, c, h, w)]
  out = functools.reduce(jnp.maximum, taps)
  first = jnp.full(out.shape, len(taps) - 1, jnp.int8)
  for t in range(len(taps) - 2, -1, -1):   # the lowest index wins ties
    first = jnp.where(taps[t] == out, jnp.int8(t), first)
  return (windows.subsample(out.reshape(n, h, w, c), stride),
          windows.subsample(first.reshape(n, h, w, c), stride))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_shifted(x: jax.Array, stride: int) -> jax.Array:
  return _max_with_argmax(x, stride)[0]


def _max_shifted_forward(x, stride):
  out, first = _max_with_argmax(x, stride)
  return out, (first, x.shape)


def _max_shifted_backward(stride, residuals, g):
  first, (n, h, w, c) = residuals
  # Between a strided output's points, g is 0: the index there is unread.
  first_pad = windows.merge_minor(windows.pad_spatial(
      windows.to_dense_grid(first, stride, h, w), _REACH, value=-1))
  first_taps = {(a, b): tap for a, b, tap in windows.taps(
      first_pad, WINDOW, 1, c, h, w)}

  def keep(a, b, t, g_tap):
    return jnp.where(first_taps[a, b] == t, g_tap, jnp.zeros((), g.dtype))

  grad = _window_sum_back(windows.to_dense_grid(g, stride, h, w), c, h, w,
                          keep)
  return (grad.reshape(n, h, w, c),)


_max_shifted.defvjp(_max_shifted_forward, _max_shifted_backward)


def _inverse_counts(h: int, w: int, channels: int, dtype) -> jax.Array:
  """1 / (the number of the window's cells inside the image), per stride-1
  output, tiled over C: [h, w·C] (a constant)."""
  inside = np.pad(np.ones((h, w)), PADDING)
  counts = sum(inside[i:i + h, j:j + w] for i in range(WINDOW)
               for j in range(WINDOW))
  return jnp.asarray(np.repeat(1.0 / counts, channels, axis=1), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_shifted(x: jax.Array, stride: int) -> jax.Array:
  n, h, w, c = x.shape
  x_pad = windows.merge_minor(windows.pad_spatial(x, PADDING))
  total = functools.reduce(
      jnp.add, [tap for _, _, tap in windows.taps(x_pad, WINDOW, 1, c, h, w)])
  out = total * _inverse_counts(h, w, c, x.dtype)
  return windows.subsample(out.reshape(n, h, w, c), stride)


def _avg_shifted_forward(x, stride):
  return _avg_shifted(x, stride), x.shape


def _avg_shifted_backward(stride, shape, g):
  n, h, w, c = shape
  g_dense = windows.to_dense_grid(g, stride, h, w)
  scaled = (windows.merge_minor(g_dense)
            * _inverse_counts(h, w, c, g.dtype)).reshape(g_dense.shape)
  return (_window_sum_back(scaled, c, h, w).reshape(n, h, w, c),)


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
