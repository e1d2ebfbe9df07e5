"""DHA's 14 AutoAugment operations in JAX, matching Pillow.

DHA (docs/fidelity.md, 'DA') augments with ordered pairs of these ops, in this
order (the reference's `aug_choice=14` list):

  0 AutoContrast  1 Equalize  2 Rotate  3 Posterize  4 Solarize  5 Color
  6 Contrast  7 Brightness  8 Sharpness  9 ShearX  10 ShearY  11 TranslateX
  12 TranslateY  13 Identity

Images are uint8 [H, W, C] (C = 1 or 3) in and out, and every op reproduces
Pillow's integer semantics (the AutoAugment convention), so that a policy
learned here means what it means in the reference:

* Point ops, per channel (PIL applies them as lookup tables):
  `ImageOps.autocontrast`, `ImageOps.equalize` (PIL's histogram table and
  integer arithmetic), `ImageOps.posterize`, `ImageOps.solarize`.
* Enhance ops, `Image.blend(degenerate, image, factor)`: Color (degenerate =
  the L image), Contrast (the rounded mean of the L image), Brightness
  (black), Sharpness (`ImageFilter.SMOOTH`, border pixels kept).
* Affine ops, `Image.transform(AFFINE)` with PIL's inverse map and pixel
  centres: Rotate (about the centre), ShearX/Y (about the top-left corner, as
  the reference does), TranslateX/Y; pixels mapped from outside the image get
  `fill_value`.

A magnitude level in [0, max_level] maps to r = level / max_level and then,
as in the reference's `*_level_to_arg`: Rotate ±30r degrees, Shear ±0.3r,
Translate ±0.45r of the width/height, enhance factor 0.1 + 1.8r, Posterize
int(3r + 1) bits, Solarize threshold int(256r) (so level 0 inverts every
pixel: the reference's convention, kept). The sign (random in the reference)
is an argument and only affects Rotate, Shear and Translate.

Deviations from the reference and from Pillow:
* Resampling of the affine ops is bilinear (default) or nearest; the reference
  picks bilinear or bicubic at random per call. Bicubic is not offered.
* Affine coordinates are float32 where PIL uses double: a bilinear pixel may
  be one grey level apart (a few % of pixels for fractional translations),
  and a sample point on the image border may get the fill colour on one side
  only. Nearest resampling floors float32, PIL rotates and shears in 16.16
  fixed point (no difference seen on CIFAR-10).
* AutoContrast uses the exact stretch floor((v - lo)·255/(hi - lo)); PIL's
  double arithmetic is one level lower for 0.4% of (lo, hi, v).
* Every other op matches Pillow 13 exactly on the tests' CIFAR-10 images,
  eagerly and under jit (the blends are written so that XLA's fused
  multiply-adds cannot change their rounding, see `blend`).
* `max_level` is configurable: 10 as in the paper, 8 as in the reference code.

Each op is also a function of one image and PIL's own argument (`equalize`,
`posterize(image, bits)`, `color(image, factor)`, `shear_x(image, shear)`,
`translate_y(image, pixels)`, ...), named after the PIL call it reproduces;
`apply_op` maps a level to that argument and applies the same computation.

dm-pix is not used here: its ops take float images and follow TF/scipy
conventions (additive brightness, per-channel-mean contrast, HSV saturation,
`1 - x` solarize, integer-centred `map_coordinates`), none of which is PIL's.

`apply_ops` applies traced per-example ops to a batch, either one example
after another with a real `lax.switch` ('switch', the CPU default: only the
chosen op runs) or vectorised ('select'): under `vmap` a per-example choice
computes every candidate, so there every op is one of three stages, point ->
blend -> affine, each choosing its parameters per example (the ops of the
other stages see an identity), and an image costs one histogram, one
smoothing and one resampling rather than fourteen ops.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

OP_NAMES: tuple[str, ...] = (
    'AutoContrast', 'Equalize', 'Rotate', 'Posterize', 'Solarize', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
    'TranslateY', 'Identity')
NUM_OPS = len(OP_NAMES)

# Level scale: the paper draws levels in [0, 10]; the reference code clips
# and divides by _MAX_LEVEL = 8.
PAPER_MAX_LEVEL = 10.0
REFERENCE_MAX_LEVEL = 8.0
# Grey fill of the affine ops (timm's _FILL); the reference fills with the
# dataset mean x 255, which callers pass per channel.
DEFAULT_FILL_VALUE = 128
INTERPOLATIONS = ('bilinear', 'nearest')
DEFAULT_INTERPOLATION = 'bilinear'

# Level -> parameter, r = level / max_level in [0, 1] (reference L148-199).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_FRACTION = 0.45
# Enhance factor 0.1 + 1.8 r = (1 + 18 r) / 10, kept as integers: an integer
# level then gets the factor in one float32 rounding, as PIL rounds the
# reference's double factor; a factor one ulp off moves blends that land on
# an integer (Brightness 1.18 x 50) by one grey level.
_ENHANCE_OFFSET, _ENHANCE_SLOPE, _ENHANCE_DENOMINATOR = 1, 18, 10
MIN_POSTERIZE_BITS = 1
POSTERIZE_BITS_RANGE = 3

PIXEL_LEVELS = 256
MAX_PIXEL = PIXEL_LEVELS - 1
BITS_PER_PIXEL = 8
SUPPORTED_CHANNELS = (1, 3)

# PIL's RGB -> L conversion (Convert.c, rgb2l): ITU-R 601-2 luma in 16.16
# fixed point, L = (19595 R + 38470 G + 7471 B + 2**15) >> 16.
_LUMA_WEIGHTS = (19595, 38470, 7471)
_LUMA_SHIFT = 16
# ImageFilter.SMOOTH: 3x3 kernel / 13; PIL stores kernel / scale in float32
# and adds 0.5 before truncating (Filter.c, ImagingFilter3x3).
_SMOOTH_KERNEL = ((1, 1, 1), (1, 5, 1), (1, 1, 1))
_SMOOTH_SCALE = 13
_ROUNDING_OFFSET = 0.5
# `blend` splits the factor into a part with this many significant bits and
# a remainder (at most 24 - 16 = 8 bits): times a difference of at most 255
# (8 bits), each is exact in float32. The mask keeps the sign, the exponent
# and the top 15 stored mantissa bits.
_EXACT_FACTOR_BITS = 16
_FLOAT32_MANTISSA_BITS = 23
_EXACT_FACTOR_MASK = np.uint32(
    (0xFFFFFFFF << (_FLOAT32_MANTISSA_BITS + 1 - _EXACT_FACTOR_BITS))
    & 0xFFFFFFFF)


def _check_image(image: chex.Array) -> None:
  chex.assert_rank(image, 3)
  chex.assert_type(image, jnp.uint8)
  if image.shape[-1] not in SUPPORTED_CHANNELS:
    raise ValueError(
        f'images must be [H, W, C] with C in {SUPPORTED_CHANNELS} (L or '
        f'RGB, channels last), got shape {image.shape}')


# ------------------------------------------- point ops (PIL's LUT ops)
#
# PIL applies these as per-channel lookup tables (`Image.point`). Only
# Equalize's table depends on more than the pixel and a few per-channel
# numbers; the others are computed per pixel here, which is cheaper under
# XLA (it fuses a table's computation into the gather that reads it, so a
# table is recomputed for every pixel anyway).


def _exact_floor_div(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """floor(n / d) of int32 arrays with |n|, |n / d| * d < 2**24 (d > 0).

  Integer division is not vectorised on CPU and costs ~10x a float one.
  float32 is exact here: n and d are exact, n / d is correctly rounded, and
  a quotient k - δ below an integer k has δ >= 1/d > k·2**-24, more than
  the rounding error, so the floor is right. Positive d only; d <= 0 gives
  garbage that callers mask.
  """
  quotient = numerator.astype(jnp.float32) / denominator.astype(jnp.float32)
  return jnp.floor(quotient).astype(jnp.int32)


def apply_lut(image: chex.Array, lut: chex.Array) -> jax.Array:
  """`Image.point(lut)`: out[..., c] = lut[c, image[..., c]].

  Args:
    image: uint8 [H, W, C].
    lut: integer [C, 256], values in [0, 255].

  Returns:
    uint8 [H, W, C].
  """
  channels = image.shape[-1]
  chex.assert_shape(lut, (channels, PIXEL_LEVELS))
  flat_index = (image.astype(jnp.int32)
                + PIXEL_LEVELS * jnp.arange(channels, dtype=jnp.int32))
  return jnp.take(lut.reshape(-1), flat_index).astype(jnp.uint8)


def equalize_lut(image: chex.Array) -> jax.Array:
  """LUT [C, 256] of `ImageOps.equalize(image)`, PIL's integer arithmetic.

  Per channel with histogram h: step = (Σh - h[last non-empty bin]) // 255;
  lut[i] = (step // 2 + Σ_{j<i} h[j]) // step, clipped to 255 as
  `Image.point` does; identity when step == 0 (at most one grey level).
  """
  channels = image.shape[-1]
  # One flat 1-D scatter is ~2x faster on CPU than a 2-D one.
  flat_index = (image.astype(jnp.int32)
                + PIXEL_LEVELS * jnp.arange(channels, dtype=jnp.int32))
  hist = jnp.zeros((channels * PIXEL_LEVELS,), jnp.int32).at[
      flat_index.reshape(-1)].add(1).reshape(channels, PIXEL_LEVELS)
  last = MAX_PIXEL - jnp.argmax(hist[:, ::-1] > 0, axis=-1)
  last_count = jnp.take_along_axis(hist, last[:, None], axis=-1)
  step = (jnp.sum(hist, axis=-1, keepdims=True) - last_count) // MAX_PIXEL
  below = jnp.cumsum(hist, axis=-1) - hist
  lut = _exact_floor_div(step // 2 + below, step)
  identity = jnp.arange(PIXEL_LEVELS, dtype=jnp.int32)
  return jnp.where(step > 0, jnp.clip(lut, 0, MAX_PIXEL), identity)


def autocontrast(image: chex.Array) -> jax.Array:
  """`ImageOps.autocontrast(image)` (cutoff 0): uint8 [H, W, C] -> same.

  Each channel's [min, max] is stretched to [0, 255] with the exact
  floor((v - lo) * 255 / (hi - lo)); a constant channel is left alone.
  """
  _check_image(image)
  pixels = image.astype(jnp.int32)
  lo = jnp.min(pixels, axis=(0, 1))
  span = jnp.max(pixels, axis=(0, 1)) - lo
  stretched = _exact_floor_div((pixels - lo) * MAX_PIXEL, span)
  return jnp.where(span > 0, stretched, pixels).astype(jnp.uint8)


def equalize(image: chex.Array) -> jax.Array:
  """`ImageOps.equalize(image)`: uint8 [H, W, C] -> uint8 [H, W, C]."""
  _check_image(image)
  return apply_lut(image, equalize_lut(image))


def posterize(image: chex.Array, bits: chex.Numeric) -> jax.Array:
  """`ImageOps.posterize(image, bits)`, bits in [1, 8]: keep the top bits."""
  _check_image(image)
  shift = BITS_PER_PIXEL - jnp.asarray(bits, jnp.int32)
  return ((image.astype(jnp.int32) >> shift) << shift).astype(jnp.uint8)


def solarize(image: chex.Array, threshold: chex.Numeric) -> jax.Array:
  """`ImageOps.solarize(image, threshold)`, threshold in [0, 256]: v >= t
  becomes 255 - v."""
  _check_image(image)
  pixels = image.astype(jnp.int32)
  return jnp.where(pixels < threshold, pixels,
                   MAX_PIXEL - pixels).astype(jnp.uint8)


# ----------------------------------------------------------- enhance ops


def grayscale(image: chex.Array) -> jax.Array:
  """`image.convert('L')` as int32 [H, W, 1] (identity for C = 1)."""
  pixels = image.astype(jnp.int32)
  if image.shape[-1] == 1:
    return pixels
  luma = sum(pixels[..., i] * weight for i, weight in enumerate(_LUMA_WEIGHTS))
  return ((luma + (1 << (_LUMA_SHIFT - 1))) >> _LUMA_SHIFT)[..., None]


def color_degenerate(image: chex.Array) -> jax.Array:
  """ImageEnhance.Color's degenerate: the L image as [H, W, C] float32."""
  return jnp.broadcast_to(grayscale(image), image.shape).astype(jnp.float32)


def contrast_degenerate(image: chex.Array) -> jax.Array:
  """ImageEnhance.Contrast's degenerate: int(mean(L) + 0.5) everywhere."""
  gray = grayscale(image)
  count = gray.size
  # int(x + 0.5) of x = total / count, in exact integer arithmetic.
  mean = (2 * jnp.sum(gray) + count) // (2 * count)
  return jnp.broadcast_to(mean, image.shape).astype(jnp.float32)


def brightness_degenerate(image: chex.Array) -> jax.Array:
  """ImageEnhance.Brightness's degenerate: a black image."""
  return jnp.zeros(image.shape, jnp.float32)


def sharpness_degenerate(image: chex.Array) -> jax.Array:
  """ImageEnhance.Sharpness's degenerate: `image.filter(SMOOTH)`.

  Interior pixels get PIL's float32 sum, in PIL's order (rows y+1, y, y-1),
  plus 0.5, clipped and truncated; the one-pixel border is copied.
  """
  kernel = np.asarray(_SMOOTH_KERNEL, np.float64) / _SMOOTH_SCALE
  kernel = kernel.astype(np.float32)
  pixels = image.astype(jnp.float32)

  def row_sum(rows, weights):
    return (rows[:, :-2] * weights[0] + rows[:, 1:-1] * weights[1]
            + rows[:, 2:] * weights[2])

  smooth = _ROUNDING_OFFSET + row_sum(pixels[2:], kernel[0])
  smooth = smooth + row_sum(pixels[1:-1], kernel[1])
  smooth = smooth + row_sum(pixels[:-2], kernel[2])
  smooth = jnp.floor(jnp.clip(smooth, 0, MAX_PIXEL))
  return pixels.at[1:-1, 1:-1].set(smooth)


def blend(degenerate: chex.Array, image: chex.Array,
          factor: chex.Numeric) -> jax.Array:
  """`Image.blend(degenerate, image, factor)`, float32 as PIL computes it.

  PIL rounds the product factor·(image − degenerate) to float32 before
  adding the degenerate. Under jit, XLA may contract a product feeding an
  addition into one fused multiply-add (it does on CPU), which skips that
  rounding and moves results that land on an integer by one grey level
  (Contrast at factor 1.45: 152 − 1.45·100 = 6.999995, PIL's 7). So the
  product is the sum of two exact products, factor = high + low with `high`
  keeping the top _EXACT_FACTOR_BITS significant bits: each part times a
  difference of at most 255 fits float32's 24 bits, so their sum is the
  correctly rounded product however XLA fuses it, and the final addition
  has no product left to absorb. The result is the same eagerly and under
  jit.

  Args:
    degenerate: float32 [H, W, C] with integer values in [0, 255].
    image: uint8 [H, W, C].
    factor: the enhance factor (0: degenerate, 1: image, > 1 extrapolates).

  Returns:
    uint8 [H, W, C]: degenerate + factor (image - degenerate), clipped to
    [0, 255] and truncated.
  """
  factor = jnp.asarray(factor, jnp.float32)
  high = lax.bitcast_convert_type(
      lax.bitcast_convert_type(factor, jnp.uint32) & _EXACT_FACTOR_MASK,
      jnp.float32)
  low = factor - high
  difference = image.astype(jnp.float32) - degenerate
  mixed = degenerate + (high * difference + low * difference)
  return jnp.clip(mixed, 0, MAX_PIXEL).astype(jnp.uint8)


def color(image: chex.Array, factor: chex.Numeric) -> jax.Array:
  """`ImageEnhance.Color(image).enhance(factor)`."""
  _check_image(image)
  return blend(color_degenerate(image), image, factor)


def contrast(image: chex.Array, factor: chex.Numeric) -> jax.Array:
  """`ImageEnhance.Contrast(image).enhance(factor)`."""
  _check_image(image)
  return blend(contrast_degenerate(image), image, factor)


def brightness(image: chex.Array, factor: chex.Numeric) -> jax.Array:
  """`ImageEnhance.Brightness(image).enhance(factor)`."""
  _check_image(image)
  return blend(brightness_degenerate(image), image, factor)


def sharpness(image: chex.Array, factor: chex.Numeric) -> jax.Array:
  """`ImageEnhance.Sharpness(image).enhance(factor)`."""
  _check_image(image)
  return blend(sharpness_degenerate(image), image, factor)


# ------------------------------------------------------------ affine ops


def rotate_matrix(degrees: chex.Numeric, height: int,
                  width: int) -> jax.Array:
  """Inverse map [6] of `Image.rotate` (counter-clockwise about the centre)."""
  theta = -jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cx, cy = width / 2, height / 2
  return jnp.stack([cos, sin, cx - cos * cx - sin * cy,
                    -sin, cos, cy + sin * cx - cos * cy])


def shear_x_matrix(shear: chex.Numeric) -> jax.Array:
  """Inverse map [6] of the reference's ShearX: x_in = x + shear * y."""
  one, zero, shear = jnp.float32(1), jnp.float32(0), jnp.float32(shear)
  return jnp.stack([one, shear, zero, zero, one, zero])


def shear_y_matrix(shear: chex.Numeric) -> jax.Array:
  """Inverse map [6] of the reference's ShearY: y_in = y + shear * x."""
  one, zero, shear = jnp.float32(1), jnp.float32(0), jnp.float32(shear)
  return jnp.stack([one, zero, zero, shear, one, zero])


def translate_matrix(dx: chex.Numeric, dy: chex.Numeric) -> jax.Array:
  """Inverse map [6] of a translation: (x_in, y_in) = (x + dx, y + dy)."""
  one, zero = jnp.float32(1), jnp.float32(0)
  return jnp.stack([one, zero, jnp.float32(dx), zero, one, jnp.float32(dy)])


def affine_transform(
    image: chex.Array,
    matrix: chex.Array,
    *,
    fill_value: chex.Numeric = DEFAULT_FILL_VALUE,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> jax.Array:
  """`image.transform(size, Image.AFFINE, matrix, resample, fillcolor=fill)`.

  Output pixel (x, y) samples the input at (a x' + b y' + c, d x' + e y' + f)
  with x' = x + 0.5, y' = y + 0.5 (PIL's pixel centres). Sample points outside
  [0, W) x [0, H) get the fill colour. 'bilinear' interpolates between the
  four nearest pixel centres, clamped at the border, and truncates (PIL's
  bilinear_filter32RGB); 'nearest' takes the pixel containing the point.

  Args:
    image: uint8 [H, W, C].
    matrix: float [6], (a, b, c, d, e, f).
    fill_value: scalar or [C] integer grey level(s) in [0, 255] of pixels
      mapped from outside.
    interpolation: 'bilinear' or 'nearest'.

  Returns:
    uint8 [H, W, C].
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation must be one of {INTERPOLATIONS}, got '
                     f'{interpolation!r}')
  chex.assert_shape(matrix, (6,))
  height, width, channels = image.shape
  a, b, c, d, e, f = (matrix[i].astype(jnp.float32) for i in range(6))
  ys = jnp.arange(height, dtype=jnp.float32)[:, None] + _ROUNDING_OFFSET
  xs = jnp.arange(width, dtype=jnp.float32)[None, :] + _ROUNDING_OFFSET
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
  # Points outside read an extra "fill pixel" appended to the image (all of a
  # bilinear sample's corners, so it is exactly the fill colour): 4x faster
  # on CPU than a select after sampling, which XLA fuses badly.
  fill = jnp.broadcast_to(
      jnp.clip(jnp.asarray(fill_value), 0, MAX_PIXEL).astype(image.dtype),
      (1, channels))
  pixels = jnp.concatenate([image.reshape(height * width, channels), fill])
  fill_index = height * width

  def gather(rows, cols):
    index = (jnp.clip(rows, 0, height - 1) * width
             + jnp.clip(cols, 0, width - 1))
    index = jnp.where(inside, index, fill_index)
    return jnp.take(pixels, index, axis=0).astype(jnp.float32)

  if interpolation == 'nearest':
    sampled = gather(jnp.floor(y_in).astype(jnp.int32),
                     jnp.floor(x_in).astype(jnp.int32))
  else:
    x_c = x_in - _ROUNDING_OFFSET
    y_c = y_in - _ROUNDING_OFFSET
    x0 = jnp.floor(x_c)
    y0 = jnp.floor(y_c)
    dx = (x_c - x0)[..., None]
    dy = (y_c - y0)[..., None]
    col, row = x0.astype(jnp.int32), y0.astype(jnp.int32)
    top_left, top_right = gather(row, col), gather(row, col + 1)
    bottom_left, bottom_right = gather(row + 1, col), gather(row + 1, col + 1)
    top = top_left + (top_right - top_left) * dx
    bottom = bottom_left + (bottom_right - bottom_left) * dx
    sampled = top + (bottom - top) * dy
  return jnp.clip(sampled, 0, MAX_PIXEL).astype(jnp.uint8)


def rotate(image: chex.Array, degrees: chex.Numeric,
           **kwargs) -> jax.Array:
  """`image.rotate(degrees, resample, fillcolor=fill)`, counter-clockwise.

  Keyword arguments go to `affine_transform` (fill_value, interpolation).
  """
  _check_image(image)
  height, width = image.shape[:2]
  return affine_transform(image, rotate_matrix(degrees, height, width),
                          **kwargs)


def shear_x(image: chex.Array, shear: chex.Numeric, **kwargs) -> jax.Array:
  """The reference's ShearX: transform AFFINE (1, shear, 0, 0, 1, 0)."""
  _check_image(image)
  return affine_transform(image, shear_x_matrix(shear), **kwargs)


def shear_y(image: chex.Array, shear: chex.Numeric, **kwargs) -> jax.Array:
  """The reference's ShearY: transform AFFINE (1, 0, 0, shear, 1, 0)."""
  _check_image(image)
  return affine_transform(image, shear_y_matrix(shear), **kwargs)


def translate_x(image: chex.Array, pixels: chex.Numeric,
                **kwargs) -> jax.Array:
  """Transform AFFINE (1, 0, pixels, 0, 1, 0): content moves left by pixels."""
  _check_image(image)
  return affine_transform(image, translate_matrix(pixels, 0.), **kwargs)


def translate_y(image: chex.Array, pixels: chex.Numeric,
                **kwargs) -> jax.Array:
  """Transform AFFINE (1, 0, 0, 0, 1, pixels): content moves up by pixels."""
  _check_image(image)
  return affine_transform(image, translate_matrix(0., pixels), **kwargs)


# --------------------------------------------------- level -> parameter


def _divide(numerator: chex.Array, denominator: float) -> jax.Array:
  """numerator / denominator, correctly rounded in float32, also under vmap.

  XLA turns a division by a constant or a broadcast scalar into a
  multiplication by the rounded reciprocal (6 · fl(1/10) != fl(6/10)), which
  moves blends that land on an integer (Brightness 0.1 x 170) by one grey
  level. A denominator computed from the numerator (x · 0 + d, which IEEE
  rules forbid XLA to fold) keeps a true division, so integer levels get
  the parameters PIL gets from the reference's double arithmetic. The
  numerator must be finite.
  """
  numerator = jnp.asarray(numerator, jnp.float32)
  return numerator / (numerator * 0. + denominator)


def clip_level(level: chex.Numeric, max_level: float) -> jax.Array:
  """The level as float32, clipped to [0, max_level]."""
  if max_level <= 0:
    raise ValueError(f'max_level must be positive, got {max_level}')
  return jnp.clip(jnp.asarray(level, jnp.float32), 0., max_level)


def posterize_bits(r: chex.Numeric) -> jax.Array:
  """Bits kept, int(3r + 1) in [1, 4]."""
  return (POSTERIZE_BITS_RANGE * r + MIN_POSTERIZE_BITS).astype(jnp.int32)


def solarize_threshold(r: chex.Numeric) -> jax.Array:
  """Threshold int(256 r) in [0, 256]."""
  return (PIXEL_LEVELS * r).astype(jnp.int32)


def enhance_factor(level: chex.Numeric, max_level: float) -> jax.Array:
  """Blend factor 0.1 + 1.8 r in [0.1, 1.9], r = level / max_level."""
  return _divide(_ENHANCE_OFFSET * max_level + _ENHANCE_SLOPE * level,
                 _ENHANCE_DENOMINATOR * max_level)


# ------------------------------------------- one op by id, three stages
#
# Every op is one stage with its own parameters: a point op, a blend with a
# degenerate image, or an affine resampling. Branch 0 of each stage is the
# identity, which the ops of the other stages use.

_POINT_OPS = ('AutoContrast', 'Equalize', 'Posterize', 'Solarize')
_BLEND_OPS = ('Color', 'Contrast', 'Brightness', 'Sharpness')
_AFFINE_OPS = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


def _branch_table(family: Sequence[str]) -> np.ndarray:
  return np.asarray([family.index(name) + 1 if name in family else 0
                     for name in OP_NAMES], np.int32)


_POINT_BRANCH = _branch_table(_POINT_OPS)
_BLEND_BRANCH = _branch_table(_BLEND_OPS)
_AFFINE_BRANCH = _branch_table(_AFFINE_OPS)

STRATEGIES = ('auto', 'switch', 'select')


def _point_candidates(image, r):
  return (
      lambda: image,
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: posterize(image, posterize_bits(r)),
      lambda: solarize(image, solarize_threshold(r)),
  )


def _degenerate_candidates(image):
  return (
      lambda: image.astype(jnp.float32),
      lambda: color_degenerate(image),
      lambda: contrast_degenerate(image),
      lambda: brightness_degenerate(image),
      lambda: sharpness_degenerate(image),
  )


def _matrix_candidates(r, sign, height, width):
  shear = sign * MAX_SHEAR * r
  shift = sign * MAX_TRANSLATE_FRACTION * r
  return (
      lambda: translate_matrix(0., 0.),
      lambda: rotate_matrix(sign * MAX_ROTATE_DEGREES * r, height, width),
      lambda: shear_x_matrix(shear),
      lambda: shear_y_matrix(shear),
      lambda: translate_matrix(shift * width, 0.),
      lambda: translate_matrix(0., shift * height),
  )


def _runs(branch: int | jax.Array) -> bool:
  """Whether a stage must run: always when traced, else unless identity."""
  return not isinstance(branch, int) or branch != 0


def _choose(branch: int | jax.Array,
            candidates: Sequence[Callable[[], jax.Array]]) -> jax.Array:
  """A static branch builds one candidate; a traced one builds them all and
  selects (`select_n`, which is what `lax.switch` becomes under vmap)."""
  if isinstance(branch, int):
    return candidates[branch]()
  return lax.select_n(branch, *(candidate() for candidate in candidates))


def _static_op_id(op_id) -> int | None:
  if isinstance(op_id, str):
    if op_id not in OP_NAMES:
      raise ValueError(f'unknown op {op_id!r}; ops are {OP_NAMES}')
    return OP_NAMES.index(op_id)
  if isinstance(op_id, (int, np.integer)):
    if not 0 <= op_id < NUM_OPS:
      raise ValueError(f'op id must be in [0, {NUM_OPS}), got {op_id}')
    return int(op_id)
  return None


def apply_op(
    image: chex.Array,
    op_id: int | str | chex.Array,
    level: chex.Numeric,
    sign: chex.Numeric = 1.0,
    *,
    max_level: float = PAPER_MAX_LEVEL,
    fill_value: chex.Numeric = DEFAULT_FILL_VALUE,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> jax.Array:
  """Applies op `op_id` at magnitude `level` to one image.

  Args:
    image: uint8 [H, W, C], C in {1, 3}.
    op_id: index into `OP_NAMES`, or the name. A Python int or str builds
      only that op; a traced int32 scalar builds every stage's candidates
      and selects among them.
    level: magnitude in [0, max_level] (clipped to it).
    sign: +1 or -1, the direction of Rotate/Shear/Translate (ignored by the
      other ops).
    max_level: the level that maps to the strongest parameter (10 as the
      paper, 8 as the reference code).
    fill_value: scalar or [C] grey level(s) for pixels mapped from outside
      the image by the affine ops.
    interpolation: 'bilinear' or 'nearest' resampling of the affine ops.

  Returns:
    uint8 [H, W, C].
  """
  _check_image(image)
  static_id = _static_op_id(op_id)
  if static_id is None:
    op_id = jnp.asarray(op_id, jnp.int32)
    chex.assert_shape(op_id, ())
    point_branch = jnp.asarray(_POINT_BRANCH)[op_id]
    blend_branch = jnp.asarray(_BLEND_BRANCH)[op_id]
    affine_branch = jnp.asarray(_AFFINE_BRANCH)[op_id]
  else:
    point_branch = int(_POINT_BRANCH[static_id])
    blend_branch = int(_BLEND_BRANCH[static_id])
    affine_branch = int(_AFFINE_BRANCH[static_id])
  level = clip_level(level, max_level)
  r = _divide(level, max_level)
  sign = jnp.asarray(sign, jnp.float32)
  height, width = image.shape[:2]
  if _runs(point_branch):
    image = _choose(point_branch, _point_candidates(image, r))
  if _runs(blend_branch):
    degenerate = _choose(blend_branch, _degenerate_candidates(image))
    image = blend(degenerate, image, enhance_factor(level, max_level))
  if _runs(affine_branch):
    matrix = _choose(affine_branch,
                     _matrix_candidates(r, sign, height, width))
    image = affine_transform(image, matrix, fill_value=fill_value,
                             interpolation=interpolation)
  return image


def apply_ops(
    images: chex.Array,
    op_ids: chex.Array,
    levels: chex.Array,
    signs: chex.Array | None = None,
    *,
    max_level: float = PAPER_MAX_LEVEL,
    fill_value: chex.Numeric = DEFAULT_FILL_VALUE,
    interpolation: str = DEFAULT_INTERPOLATION,
    strategy: str = 'auto',
) -> jax.Array:
  """Applies one op per example: images[k] <- op op_ids[k] at levels[k].

  Jittable with traced per-example ops and levels. Two ways to run the
  per-example choice, equal up to float rounding (bilinear affine ops may
  differ by one grey level where XLA fuses a multiply-add differently):

  * 'switch': `lax.map` over the examples with a real `lax.switch`: only
    the chosen op runs, one example after another. Fastest on CPU (about
    4 µs per 32 px image and op on one core, 8-10x Pillow's loop for a
    pair). A batch sharded over devices may be gathered on each of them.
  * 'select': `vmap`; every op's stage runs for every image and the chosen
    one is selected (what `lax.switch` becomes under vmap). One wide pass,
    meant for GPU/TPU. On CPU it is ~40x slower than 'switch': XLA fuses
    each stage into every read of its output by the next (the smoothing
    reads each pixel nine times). Accelerator timings are unmeasured: run
    `experiments/bench_augment.py --strategy select|switch` there.
  * 'auto': 'switch' when JAX's default backend is the CPU, else 'select'.

  Args:
    images: uint8 [N, H, W, C].
    op_ids: int [N], indices into `OP_NAMES`.
    levels: float [N], magnitudes in [0, max_level] (clipped to it).
    signs: float [N] in {-1, +1}, directions of Rotate/Shear/Translate
      (None: all +1).
    max_level: level of the strongest parameter (10 paper, 8 reference).
    fill_value: scalar or [C] fill grey level(s) of the affine ops.
    interpolation: 'bilinear' or 'nearest'.
    strategy: 'auto', 'switch' or 'select' (see above).

  Returns:
    uint8 [N, H, W, C].
  """
  chex.assert_rank(images, 4)
  chex.assert_type(images, jnp.uint8)
  if strategy not in STRATEGIES:
    raise ValueError(f'strategy must be one of {STRATEGIES}, got '
                     f'{strategy!r}')
  if strategy == 'auto':
    strategy = 'switch' if jax.default_backend() == 'cpu' else 'select'
  num = images.shape[0]
  op_ids = jnp.asarray(op_ids, jnp.int32)
  levels = jnp.asarray(levels, jnp.float32)
  signs = (jnp.ones((num,), jnp.float32) if signs is None
           else jnp.asarray(signs, jnp.float32))
  chex.assert_shape([op_ids, levels, signs], (num,))
  op = functools.partial(apply_op, max_level=max_level, fill_value=fill_value,
                         interpolation=interpolation)
  if strategy == 'select':
    return jax.vmap(op)(images, op_ids, levels, signs)
  def branch(op_id):
    return lambda image, level, sign: op(image, op_id, level, sign)

  branches = [branch(op_id) for op_id in range(NUM_OPS)]

  def one(example):
    image, op_id, level, sign = example
    return lax.switch(op_id, branches, image, level, sign)

  return lax.map(one, (images, op_ids, levels, signs))


def augment_pairs(
    key: chex.PRNGKey,
    images: chex.Array,
    op1: chex.Array,
    op2: chex.Array,
    *,
    magnitude: float,
    max_level: float = PAPER_MAX_LEVEL,
    fill_value: chex.Numeric = DEFAULT_FILL_VALUE,
    interpolation: str = DEFAULT_INTERPOLATION,
    strategy: str = 'auto',
) -> jax.Array:
  """Applies the sampled op pairs: op1 first, then op2 (reference RandAugment).

  Each example and each of its two ops draws an independent level
  m ~ U(0, magnitude), clipped to [0, max_level] (the reference's
  'rand-muni0' mode: with magnitude > max_level the top level gets the
  excess mass), and a sign, +1 or -1 with probability 1/2.

  Args:
    key: PRNG key.
    images: uint8 [N, H, W, C].
    op1: int [N], first op of each example's pair.
    op2: int [N], second op.
    magnitude: upper bound M of the level distribution.
    max_level: level of the strongest parameter (10 paper, 8 reference).
    fill_value: scalar or [C] fill grey level(s) of the affine ops.
    interpolation: 'bilinear' or 'nearest'.
    strategy: how `apply_ops` runs per-example ops ('auto', 'switch',
      'select').

  Returns:
    uint8 [N, H, W, C].
  """
  chex.assert_rank(images, 4)
  num = images.shape[0]
  level_key, sign_key = jax.random.split(key)
  levels = jnp.clip(
      jax.random.uniform(level_key, (2, num), maxval=magnitude), 0, max_level)
  signs = jnp.where(jax.random.bernoulli(sign_key, shape=(2, num)), 1., -1.)
  apply = functools.partial(apply_ops, max_level=max_level,
                            fill_value=fill_value, interpolation=interpolation,
                            strategy=strategy)
  images = apply(images, op1, levels[0], signs[0])
  return apply(images, op2, levels[1], signs[1])
