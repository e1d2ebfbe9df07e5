"""Base augmentation: flips, pad-and-crop, random-resized crop, Cutout, etc."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax.augment import base

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('augment_base_test')

NUM, HEIGHT, WIDTH, CHANNELS = 64, 12, 10, 3


@pytest.fixture(scope='module')
def images():
  """Distinct uint8 images in [1, 255] (no pixel equals a zero pad)."""
  rng = np.random.RandomState(0)
  return jnp.asarray(rng.randint(1, 256, (NUM, HEIGHT, WIDTH, CHANNELS)),
                     jnp.uint8)


def test_random_flip_flips_about_half(images):
  out = np.asarray(jax.jit(base.random_flip)(jax.random.key(0), images))
  flipped = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(out == np.asarray(images), axis=(1, 2, 3))
  assert np.all(flipped ^ kept)
  assert 0.25 < flipped.mean() < 0.75
  never = base.random_flip(jax.random.key(0), images, probability=0.)
  always = base.random_flip(jax.random.key(0), images, probability=1.)
  np.testing.assert_array_equal(never, images)
  np.testing.assert_array_equal(always, images[:, :, ::-1])


def shift_of(out: np.ndarray, image: np.ndarray, pad: int):
  """The (dy, dx) with out[y, x] = image[y + dy, x + dx] inside, 0 outside."""
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  for dy in range(-pad, pad + 1):
    for dx in range(-pad, pad + 1):
      crop = padded[pad + dy:pad + dy + HEIGHT, pad + dx:pad + dx + WIDTH]
      if np.array_equal(crop, out):
        return dy, dx
  return None


def test_pad_and_crop_is_a_zero_filled_shift(images):
  pad = 3
  out = np.asarray(jax.jit(base.pad_and_crop, static_argnums=2)(
      jax.random.key(1), images, pad))
  assert out.shape == images.shape
  shifts = [shift_of(o, np.asarray(im), pad) for o, im in zip(out, images)]
  assert all(s is not None for s in shifts)
  assert len(set(shifts)) > 10  # Offsets really vary per example.
  np.testing.assert_array_equal(
      base.pad_and_crop(jax.random.key(1), images, 0), images)


def test_pad_and_crop_reflect_has_no_zeros(images):
  out = np.asarray(base.pad_and_crop(jax.random.key(2), images, 3,
                                     padding_mode='reflect'))
  assert out.min() > 0
  # The part of the image still in view is an exact shift of the input.
  image = np.asarray(images[0])
  reflected = np.pad(image, ((3, 3), (3, 3), (0, 0)), mode='reflect')
  windows = [reflected[dy:dy + HEIGHT, dx:dx + WIDTH]
             for dy in range(7) for dx in range(7)]
  assert any(np.array_equal(out[0], w) for w in windows)


def test_cutout_zeroes_one_clipped_square(images):
  size = 6
  ones = jnp.ones((NUM, HEIGHT, WIDTH, CHANNELS), jnp.float32)
  out = np.asarray(jax.jit(base.cutout, static_argnums=2)(
      jax.random.key(3), ones, size))
  zero = out == 0
  assert np.all(zero == zero[..., :1])  # Every channel alike.
  full_squares = 0
  for mask in zero[..., 0]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    assert rows.size and cols.size
    # One solid rectangle, at most size x size, touching a border if smaller.
    assert mask.sum() == rows.size * cols.size
    assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
    assert rows.size <= size and cols.size <= size
    if rows.size < size:
      assert rows[0] == 0 or rows[-1] == HEIGHT - 1
    if cols.size < size:
      assert cols[0] == 0 or cols[-1] == WIDTH - 1
    full_squares += rows.size == size and cols.size == size
  assert full_squares > 0
  np.testing.assert_array_equal(out[~zero], 1.)
  np.testing.assert_array_equal(base.cutout(jax.random.key(3), ones, 0), ones)


def test_random_resized_crop_boxes_follow_torchvision_ranges():
  top, left, crop_h, crop_w = base._rrc_boxes(
      jax.random.key(4), 2000, 32, 48, base.RRC_SCALE, base.RRC_RATIO,
      base.RRC_ATTEMPTS)
  top, left, crop_h, crop_w = map(np.asarray, (top, left, crop_h, crop_w))
  assert np.all((top >= 0) & (top + crop_h <= 32) & (crop_h >= 1))
  assert np.all((left >= 0) & (left + crop_w <= 48) & (crop_w >= 1))
  area = crop_h * crop_w / (32 * 48)
  assert area.min() < 0.2 and area.max() > 0.8
  # Rounding to whole pixels widens the ranges a little.
  assert area.min() >= 0.06 and area.max() <= 1.
  ratio = crop_w / crop_h
  assert ratio.min() >= 0.7 and ratio.max() <= 1.4


def test_random_resized_crop_output_and_identity(images):
  out = jax.jit(base.random_resized_crop, static_argnums=2)(
      jax.random.key(5), images, 8)
  assert out.shape == (NUM, 8, 8, CHANNELS) and out.dtype == jnp.uint8
  square = images[:, :WIDTH]
  whole = base.random_resized_crop(jax.random.key(6), square, WIDTH,
                                   scale=(1., 1.), ratio=(1., 1.))
  np.testing.assert_array_equal(whole, square)


def test_center_crop(images):
  out = base.center_crop(images, 8)
  np.testing.assert_array_equal(out, images[:, 2:10, 1:9])
  with pytest.raises(ValueError, match='crop size'):
    base.center_crop(images, 11)


def test_normalize_values():
  pixels = jnp.asarray([[[[0, 51, 255]]]], jnp.uint8)
  out = base.normalize(pixels, mean=(0., 0.2, 0.5), std=(1., 0.5, 0.25))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, 0, 0], [0., 0., 2.], atol=1e-6)
  # Already-normalised floats would be divided by 255 again.
  with pytest.raises(AssertionError, match='uint8'):
    base.normalize(out, mean=(0., 0.2, 0.5), std=(1., 0.5, 0.25))
  with pytest.raises(AssertionError, match='rank'):
    base.normalize(pixels[0, 0, 0], mean=(0., 0.2, 0.5), std=(1., 0.5, 0.25))


def test_train_and_eval_helpers(images):
  key = jax.random.key(7)
  mean, std = (0.5,) * CHANNELS, (0.25,) * CHANNELS
  np.testing.assert_array_equal(
      base.train_geometry(key, images, mode='none', flip=False), images)
  cifar = base.train_geometry(key, images, mode='cifar', pad=2)
  assert cifar.shape == images.shape and cifar.dtype == jnp.uint8
  imagenet = base.train_geometry(key, images, mode='imagenet', crop_size=8)
  assert imagenet.shape == (NUM, 8, 8, CHANNELS)
  normalized = base.normalize(images, mean, std)
  np.testing.assert_array_equal(
      base.train_finalize(key, images, mean=mean, std=std), normalized)
  cut = base.train_finalize(key, images, mean=mean, std=std, cutout_size=4)
  assert np.all(np.any(np.asarray(cut) != np.asarray(normalized),
                       axis=(1, 2, 3)))
  np.testing.assert_array_equal(
      base.eval_preprocess(images, mode='cifar', crop_size=8, mean=mean,
                           std=std), normalized)
  np.testing.assert_array_equal(
      base.eval_preprocess(images, mode='imagenet', crop_size=8, mean=mean,
                           std=std), base.center_crop(normalized, 8))
  with pytest.raises(ValueError, match='mode'):
    base.train_geometry(key, images, mode='svhn')
