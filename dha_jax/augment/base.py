"""Base augmentation and preprocessing: crops, flips, normalisation, Cutout.

Pure JAX over batches [N, H, W, C], one PRNG key per call, per-example
randomness. The order the train step uses (docs/design.md, 'Data flow'):

  train: [pad-and-crop ('cifar') | random-resized crop ('imagenet')] -> flip
         -> op pair of the policy (uint8, `dha_jax.augment.augment_pairs`)
         -> normalize -> Cutout
  eval:  [centre crop ('imagenet')] -> normalize

`train_geometry` is everything before the op pair and `train_finalize`
everything after it; `eval_preprocess` is the evaluation (and HPO-batch)
path. Cutout is applied to training images only: the reference appends it to
a transform object it shares with the validation and test sets, so its test
images are cut out too (docs/fidelity.md, 'Known bugs of the official code');
we do not.

The reference's DA pipeline for CIFAR has no pad-and-crop (flip, op pair,
normalize, Cutout); its non-DA baselines use RandomCrop(32, padding=4).
Mode 'none' (flip only) reproduces the former, 'cifar' the latter.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import dm_pix as pix
import jax
import jax.numpy as jnp

MODES = ('cifar', 'imagenet', 'none')
PADDING_MODES = ('constant', 'reflect')
MAX_PIXEL = 255.0
FLIP_PROBABILITY = 0.5
# torchvision RandomResizedCrop defaults.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
CIFAR_PAD = 4


def _check_batch(images: chex.Array) -> None:
  chex.assert_rank(images, 4)


def random_flip(key: chex.PRNGKey, images: chex.Array,
                probability: float = FLIP_PROBABILITY) -> jax.Array:
  """Flips each image left-right with the given probability.

  Args:
    key: PRNG key.
    images: [N, H, W, C], any dtype.
    probability: chance that an image is flipped.

  Returns:
    [N, H, W, C], same dtype.
  """
  _check_batch(images)
  flip = jax.random.bernoulli(key, probability, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], pix.flip_left_right(images),
                   images)


def pad_and_crop(key: chex.PRNGKey, images: chex.Array, pad: int = CIFAR_PAD,
                 *, padding_mode: str = 'constant') -> jax.Array:
  """CIFAR's random crop: pad by `pad` on every side, crop H x W at random.

  Equivalent to shifting each image by (dy, dx) uniform in [-pad, pad]²,
  filling the uncovered border with zeros ('constant', torchvision's
  RandomCrop(padding=pad) default) or a mirror image ('reflect').

  Args:
    key: PRNG key.
    images: [N, H, W, C].
    pad: padding in pixels (0: identity).
    padding_mode: 'constant' (zeros) or 'reflect'.

  Returns:
    [N, H, W, C], same dtype.
  """
  _check_batch(images)
  if padding_mode not in PADDING_MODES:
    raise ValueError(f'padding_mode must be one of {PADDING_MODES}, got '
                     f'{padding_mode!r}')
  if pad < 0:
    raise ValueError(f'pad must be >= 0, got {pad}')
  if pad == 0:
    return images
  num, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                   mode=padding_mode)
  offsets = jax.random.randint(key, (num, 2), 0, 2 * pad + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, channels))

  return jax.vmap(crop)(padded, offsets)


def _rrc_boxes(key: chex.PRNGKey, num: int, height: int, width: int,
               scale: Sequence[float], ratio: Sequence[float],
               attempts: int) -> tuple[jax.Array, ...]:
  """torchvision's RandomResizedCrop.get_params, vectorised over examples.

  Returns int32 [N] (top, left, crop height, crop width): the first of
  `attempts` draws that fits, else the centre crop clamped to `ratio`.
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(
      area_key, (num, attempts), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(
      ratio_key, (num, attempts), minval=math.log(ratio[0]),
      maxval=math.log(ratio[1])))
  crop_w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  crop_h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = jnp.argmax(fits, axis=1)
  crop_h = jnp.take_along_axis(crop_h, first[:, None], axis=1)[:, 0]
  crop_w = jnp.take_along_axis(crop_w, first[:, None], axis=1)[:, 0]
  # No draw fits: torchvision falls back to the largest centred crop whose
  # aspect ratio lies in `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    fallback_w, fallback_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fallback_w, fallback_h = int(round(height * max(ratio))), height
  else:
    fallback_w, fallback_h = width, height
  any_fits = jnp.any(fits, axis=1)
  crop_h = jnp.where(any_fits, crop_h, fallback_h)
  crop_w = jnp.where(any_fits, crop_w, fallback_w)
  top = jnp.floor(jax.random.uniform(top_key, (num,))
                  * (height - crop_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(left_key, (num,))
                   * (width - crop_w + 1)).astype(jnp.int32)
  top = jnp.where(any_fits, top, (height - crop_h) // 2)
  left = jnp.where(any_fits, left, (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def random_resized_crop(
    key: chex.PRNGKey,
    images: chex.Array,
    size: int,
    *,
    scale: Sequence[float] = RRC_SCALE,
    ratio: Sequence[float] = RRC_RATIO,
    attempts: int = RRC_ATTEMPTS,
) -> jax.Array:
  """torchvision's RandomResizedCrop: a random box resized to size x size.

  The box has area fraction ~ U(scale) and log aspect ratio ~ U(log ratio)
  (first of `attempts` draws that fits, else a centre crop). It is resized
  bilinearly, antialiased when shrinking (triangle filter widened by the
  scale, as PIL's resize does), and rounded back to the input dtype.

  Args:
    key: PRNG key.
    images: [N, H, W, C], uint8 or float.
    size: output height and width (static).
    scale: range of the box's area as a fraction of the image.
    ratio: range of the box's width / height.
    attempts: draws before falling back to the centre crop.

  Returns:
    [N, size, size, C], same dtype.
  """
  _check_batch(images)
  num, height, width, channels = images.shape
  top, left, crop_h, crop_w = _rrc_boxes(key, num, height, width, scale,
                                         ratio, attempts)

  def resize(image, top, left, crop_h, crop_w):
    scale_yx = jnp.stack([size / crop_h, size / crop_w]).astype(jnp.float32)
    offset = -jnp.stack([top, left]).astype(jnp.float32) * scale_yx
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (size, size, channels), (0, 1), scale_yx,
        offset, method='linear', antialias=True)

  out = jax.vmap(resize)(images, top, left, crop_h, crop_w)
  if jnp.issubdtype(images.dtype, jnp.integer):
    out = jnp.clip(jnp.round(out), 0, MAX_PIXEL)
  return out.astype(images.dtype)


def center_crop(images: chex.Array, size: int) -> jax.Array:
  """The centred size x size crop of every image (dm-pix's rounding)."""
  _check_batch(images)
  if size > min(images.shape[1:3]):
    raise ValueError(f'crop size {size} exceeds the images '
                     f'({images.shape[1]}x{images.shape[2]}); store larger '
                     'images or lower the crop size')
  return pix.center_crop(images, size, size)


def normalize(images: chex.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """uint8 [N, H, W, C] -> float32 (x / 255 - mean) / std.

  Args:
    images: uint8 [N, H, W, C] (or [H, W, C]).
    mean: per-channel mean in [0, 1] units, length C.
    std: per-channel standard deviation in [0, 1] units, length C.

  Returns:
    float32, same shape.
  """
  chex.assert_rank(images, {3, 4})
  chex.assert_type(images, jnp.uint8)
  channels = images.shape[-1]
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  chex.assert_shape([mean, std], (channels,))
  return (images.astype(jnp.float32) / MAX_PIXEL - mean) / std


def cutout(key: chex.PRNGKey, images: chex.Array, size: int) -> jax.Array:
  """Zeroes one size x size square per image (DeVries & Taylor; reference L549).

  The centre is uniform over the pixels; the square [cy - size//2,
  cy - size//2 + size) x (same in x) is clipped at the borders, so it can be
  smaller near an edge. Apply after `normalize` (0 is then the mean colour).
  For odd sizes the reference's square is one pixel narrower (it spans
  cy ± size//2); even sizes, the usual 16, agree.

  Args:
    key: PRNG key.
    images: [N, H, W, C] float (normalised).
    size: side of the square; 0 returns the images unchanged.

  Returns:
    [N, H, W, C], same dtype.
  """
  _check_batch(images)
  if size < 0:
    raise ValueError(f'cutout size must be >= 0, got {size}')
  if size == 0:
    return images
  num, height, width, _ = images.shape
  y_key, x_key = jax.random.split(key)
  top = jax.random.randint(y_key, (num, 1), 0, height) - size // 2
  left = jax.random.randint(x_key, (num, 1), 0, width) - size // 2
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top) & (rows < top + size)
  in_cols = (cols >= left) & (cols < left + size)
  square = in_rows[:, :, None] & in_cols[:, None, :]
  return jnp.where(square[..., None], jnp.zeros((), images.dtype), images)


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f'preprocess mode must be one of {MODES}, got {mode!r}')


def train_geometry(key: chex.PRNGKey, images: chex.Array, *, mode: str,
                   pad: int = CIFAR_PAD, crop_size: int = 224,
                   flip: bool = True,
                   padding_mode: str = 'constant') -> jax.Array:
  """The train step's base geometry on uint8 images, before the op pair.

  'cifar': pad-and-crop then flip; 'imagenet': random-resized crop to
  crop_size then flip; 'none': flip only.

  Args:
    key: PRNG key.
    images: uint8 [N, H, W, C].
    mode: 'cifar', 'imagenet' or 'none'.
    pad: pad-and-crop padding ('cifar').
    crop_size: random-resized crop output size ('imagenet').
    flip: whether to flip left-right at random.
    padding_mode: 'constant' or 'reflect' ('cifar').

  Returns:
    uint8 [N, H', W', C] (H' = W' = crop_size in 'imagenet' mode).
  """
  _check_mode(mode)
  crop_key, flip_key = jax.random.split(key)
  if mode == 'cifar':
    images = pad_and_crop(crop_key, images, pad, padding_mode=padding_mode)
  elif mode == 'imagenet':
    images = random_resized_crop(crop_key, images, crop_size)
  if flip:
    images = random_flip(flip_key, images)
  return images


def train_finalize(key: chex.PRNGKey, images: chex.Array, *,
                   mean: Sequence[float], std: Sequence[float],
                   cutout_size: int = 0) -> jax.Array:
  """The train step's last stage, after the op pair: normalize, then Cutout.

  Args:
    key: PRNG key (Cutout).
    images: uint8 [N, H, W, C].
    mean: per-channel mean in [0, 1].
    std: per-channel std in [0, 1].
    cutout_size: side of the Cutout square (0: no Cutout).

  Returns:
    float32 [N, H, W, C].
  """
  return cutout(key, normalize(images, mean, std), cutout_size)


def eval_preprocess(images: chex.Array, *, mode: str, crop_size: int,
                    mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Evaluation (and HPO batch) preprocessing: [centre crop] -> normalize.

  'imagenet' mode takes the centred crop_size crop (store images at 256 px
  for the usual Resize(256) + CenterCrop(224)); other modes only normalize.
  Never Cutout.

  Args:
    images: uint8 [N, H, W, C].
    mode: 'cifar', 'imagenet' or 'none'.
    crop_size: centre crop size ('imagenet').
    mean: per-channel mean in [0, 1].
    std: per-channel std in [0, 1].

  Returns:
    float32 [N, H', W', C].
  """
  _check_mode(mode)
  if mode == 'imagenet':
    images = center_crop(images, crop_size)
  return normalize(images, mean, std)
