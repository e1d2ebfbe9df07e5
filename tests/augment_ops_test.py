"""The 14 DA ops against Pillow on real CIFAR-10 images, and jit/vmap checks.

The Pillow side transcribes the reference's `data/auto_augment.py`
(level -> parameter, op calls), so these tests check both the PIL semantics
and the magnitude mapping. CIFAR-10 JPEGs are read from the zip named by
`experiments.paths.CIFAR10_ZIP` (beside the repository, or $DHA_CIFAR10_ZIP);
the tests skip without it.
"""

import io
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from dha_jax.augment import ops
from experiments.paths import CIFAR10_ZIP as CIFAR_ZIP

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('augment_ops_test')

CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                 'frog', 'horse', 'ship', 'truck')
# Fill colour of the affine ops: CIFAR-10's mean x 255, as the reference.
FILL = (125, 123, 114)
# Integer and half-integer levels put blends on integers, where a product
# fused into the addition (XLA's multiply-add) would land one grey level off
# (Contrast, Color, Sharpness at 3.5, 4.5, 7, 7.5, 9); the others are
# arbitrary.
LEVELS = (0., 1.3, 3.5, 3.7, 4.5, 5., 7., 7.5, 7.77, 9., 10.)
SIGNS = (1., -1.)
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
BILINEAR_AFFINE_OPS = frozenset(GEOMETRIC)

# Per op, (max mean |ours - PIL| over a batch, max fraction of pixels off by
# more than one grey level). Unlisted ops must match Pillow exactly.
TOLERANCE = {
    # Exact integer stretch; PIL's double arithmetic is one level lower at
    # 0.4% of (lo, hi, value) triples.
    'AutoContrast': (0.02, 0.0),
}
# Bilinear affine ops: float32 coordinates and weights vs PIL's double, so
# a value on an integer boundary truncates one level apart (up to ~6% of
# pixels for fractional translations); a sample point on the image border
# may get the fill colour on one side only.
BILINEAR_TOLERANCE = (0.1, 0.002)
# Nearest: PIL rotates and shears in 16.16 fixed point, we floor float32.
NEAREST_TOLERANCE = (0.5, 0.002)


def load_cifar_images(path: str = CIFAR_ZIP) -> np.ndarray:
  """The first test image of each CIFAR-10 class, uint8 [10, 32, 32, 3]."""
  if not os.path.exists(path):
    pytest.skip(f'CIFAR-10 zip not found at {path}; set DHA_CIFAR10_ZIP to '
                'a zip with test/<class>/<NNNN>.jpg members to run this test')
  with zipfile.ZipFile(path) as archive:
    return np.stack([
        np.asarray(Image.open(io.BytesIO(
            archive.read(f'test/{name}/0000.jpg'))).convert('RGB'))
        for name in CIFAR_CLASSES])


def pil_op(image: np.ndarray, name: str, level: float, sign: float,
           max_level: float, interpolation: str) -> np.ndarray:
  """The reference's op at `level` on one image, with Pillow."""
  im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  r = min(max(level, 0.), max_level) / max_level
  resample = {'bilinear': Image.BILINEAR, 'nearest': Image.NEAREST}
  fill = FILL if im.mode == 'RGB' else FILL[0]
  affine = dict(resample=resample[interpolation], fillcolor=fill)
  width, height = im.size
  if name == 'AutoContrast':
    out = ImageOps.autocontrast(im)
  elif name == 'Equalize':
    out = ImageOps.equalize(im)
  elif name == 'Rotate':
    out = im.rotate(sign * 30. * r, **affine)
  elif name == 'Posterize':
    out = ImageOps.posterize(im, int(3 * r + 1))
  elif name == 'Solarize':
    out = ImageOps.solarize(im, int(256 * r))
  elif name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    out = getattr(ImageEnhance, name)(im).enhance(0.1 + 1.8 * r)
  elif name == 'ShearX':
    out = im.transform(im.size, Image.AFFINE, (1, sign * 0.3 * r, 0, 0, 1, 0),
                       **affine)
  elif name == 'ShearY':
    out = im.transform(im.size, Image.AFFINE, (1, 0, 0, sign * 0.3 * r, 1, 0),
                       **affine)
  elif name == 'TranslateX':
    out = im.transform(im.size, Image.AFFINE,
                       (1, 0, sign * 0.45 * r * width, 0, 1, 0), **affine)
  elif name == 'TranslateY':
    out = im.transform(im.size, Image.AFFINE,
                       (1, 0, 0, 0, 1, sign * 0.45 * r * height), **affine)
  else:
    out = im
  return np.asarray(out).reshape(image.shape)


def pil_batch(images, name, level, sign, max_level=10.,
              interpolation='bilinear'):
  return np.stack([pil_op(im, name, level, sign, max_level, interpolation)
                   for im in images])


def assert_close_to_pil(ours, ref, tolerance, context):
  diff = np.abs(np.asarray(ours).astype(np.int32) - ref.astype(np.int32))
  max_mean, max_frac = tolerance
  assert diff.mean() <= max_mean, (context, diff.mean())
  assert (diff > 1).mean() <= max_frac, (context, (diff > 1).mean())
  if max_mean == 0:
    assert diff.max() == 0, (context, diff.max())


@pytest.fixture(scope='module')
def cifar():
  return load_cifar_images()


@pytest.fixture(scope='module')
def jitted_apply_ops():
  """jit(apply_ops) by (interpolation, strategy, max_level), compiled once."""
  cache = {}

  def get(interpolation='bilinear', strategy='select', max_level=10.):
    config = (interpolation, strategy, max_level)
    if config not in cache:
      cache[config] = jax.jit(lambda images, op_ids, levels, signs: (
          ops.apply_ops(images, op_ids, levels, signs, max_level=max_level,
                        fill_value=FILL, interpolation=interpolation,
                        strategy=strategy)))
    return cache[config]

  return get


def test_op_names_in_reference_order():
  assert ops.OP_NAMES == (
      'AutoContrast', 'Equalize', 'Rotate', 'Posterize', 'Solarize', 'Color',
      'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
      'TranslateY', 'Identity')
  assert ops.NUM_OPS == 14


def check_against_pillow(images, jitted_apply_ops, name, interpolation,
                         tolerance):
  """Both strategies of `apply_ops`, every level and sign, vs Pillow."""
  num = len(images)
  op_ids = jnp.full((num,), ops.OP_NAMES.index(name))
  for level in LEVELS:
    for sign in SIGNS:
      ref = pil_batch(images, name, level, sign,
                      interpolation=interpolation)
      for strategy in ('select', 'switch'):
        ours = jitted_apply_ops(interpolation, strategy)(
            images, op_ids, jnp.full((num,), level), jnp.full((num,), sign))
        assert_close_to_pil(ours, ref, tolerance,
                            (name, level, sign, strategy))


@pytest.mark.parametrize('name', ops.OP_NAMES)
def test_matches_pillow(cifar, jitted_apply_ops, name):
  tolerance = (BILINEAR_TOLERANCE if name in BILINEAR_AFFINE_OPS
               else TOLERANCE.get(name, (0., 0.)))
  check_against_pillow(cifar, jitted_apply_ops, name, 'bilinear', tolerance)


@pytest.mark.parametrize('name', GEOMETRIC)
def test_nearest_matches_pillow(cifar, jitted_apply_ops, name):
  check_against_pillow(cifar, jitted_apply_ops, name, 'nearest',
                       NEAREST_TOLERANCE)


def test_reference_max_level(cifar, jitted_apply_ops):
  """max_level=8 (the reference code): level 8 is the strongest parameter."""
  apply = jitted_apply_ops('bilinear', max_level=ops.REFERENCE_MAX_LEVEL)
  num = len(cifar)
  for name in ('Rotate', 'Posterize', 'Solarize', 'Contrast'):
    for level in (3., 8., 9.5):
      ours = apply(cifar, jnp.full((num,), ops.OP_NAMES.index(name)),
                   jnp.full((num,), level), jnp.ones((num,)))
      ref = pil_batch(cifar, name, level, 1., max_level=8.)
      tolerance = (BILINEAR_TOLERANCE if name == 'Rotate'
                   else TOLERANCE.get(name, (0., 0.)))
      assert_close_to_pil(ours, ref, tolerance, (name, level))


def test_grayscale_images_match_pillow(cifar):
  gray = np.stack([np.asarray(Image.fromarray(im).convert('L'))[..., None]
                   for im in cifar])
  num = len(gray)
  apply = jax.jit(lambda op_ids, levels: ops.apply_ops(
      gray, op_ids, levels, fill_value=FILL[0], strategy='select'))
  for op_id, name in enumerate(ops.OP_NAMES):
    ours = apply(jnp.full((num,), op_id), jnp.full((num,), 6.))
    ref = pil_batch(gray, name, 6., 1.)
    tolerance = (BILINEAR_TOLERANCE if name in BILINEAR_AFFINE_OPS
                 else TOLERANCE.get(name, (0., 0.)))
    assert_close_to_pil(ours, ref, tolerance, name)


def test_parameter_functions_match_level_path(cifar):
  """The PIL-named functions, given PIL's argument, are the ops the level
  path applies (level 5 of 10: r = 1/2, so the arguments are exact)."""
  image = jnp.asarray(cifar[3])
  half = np.float32(0.5)
  factor = ops.enhance_factor(5., ops.PAPER_MAX_LEVEL)
  shear = np.float32(ops.MAX_SHEAR) * half
  shift = np.float32(ops.MAX_TRANSLATE_FRACTION) * half * image.shape[1]
  expected = {
      'AutoContrast': ops.autocontrast(image),
      'Equalize': ops.equalize(image),
      'Rotate': ops.rotate(image, ops.MAX_ROTATE_DEGREES / 2),
      'Posterize': ops.posterize(image, 2),
      'Solarize': ops.solarize(image, 128),
      'Color': ops.color(image, factor),
      'Contrast': ops.contrast(image, factor),
      'Brightness': ops.brightness(image, factor),
      'Sharpness': ops.sharpness(image, factor),
      'ShearX': ops.shear_x(image, shear),
      'ShearY': ops.shear_y(image, shear),
      'TranslateX': ops.translate_x(image, shift),
      'TranslateY': ops.translate_y(image, shift),
      'Identity': image,
  }
  assert set(expected) == set(ops.OP_NAMES)
  for name, out in expected.items():
    np.testing.assert_array_equal(out, ops.apply_op(image, name, 5.),
                                  err_msg=name)
  # Neutral arguments leave the image alone, and shifts move it.
  np.testing.assert_array_equal(ops.sharpness(image, 1.), image)
  np.testing.assert_array_equal(ops.rotate(image, 0.), image)
  np.testing.assert_array_equal(
      ops.translate_x(image, 4., interpolation='nearest')[:, :-4],
      image[:, 4:])
  np.testing.assert_array_equal(
      ops.translate_y(image, 4., interpolation='nearest')[:-4],
      image[4:])


def test_jit_strategies_agree_with_eager(cifar, jitted_apply_ops):
  """Traced per-example ops under jit ('select' = vmap, 'switch' = map) give
  the eager single-image results: exactly for the point and blend ops, at
  every level of LEVELS (those where a fused multiply-add would move a
  blend included); bilinear affine ops may differ by one grey level where
  XLA fuses a multiply-add."""
  op_ids, levels = (np.asarray(a).reshape(-1) for a in np.meshgrid(
      np.arange(ops.NUM_OPS), np.asarray(LEVELS, np.float32), indexing='ij'))
  num = len(op_ids)
  images = cifar[np.arange(num) % len(cifar)]
  signs = np.where(np.arange(num) % 2, 1., -1.).astype(np.float32)
  eager = np.stack([
      ops.apply_op(jnp.asarray(images[k]), int(op_ids[k]), levels[k],
                   signs[k], fill_value=FILL) for k in range(num)])
  affine = np.isin(op_ids, [ops.OP_NAMES.index(n) for n in GEOMETRIC])
  for strategy in ('select', 'switch'):
    out = np.asarray(jitted_apply_ops('bilinear', strategy)(
        images, op_ids, levels, signs))
    diff = np.abs(out.astype(np.int32) - eager)
    assert diff[~affine].max() == 0, strategy
    assert diff[affine].max() <= 1, strategy


def test_augment_pairs_applies_op1_then_op2(cifar):
  """magnitude 0 gives level 0: Solarize inverts all, Posterize keeps 1 bit."""
  num = len(cifar)
  solarize = jnp.full((num,), ops.OP_NAMES.index('Solarize'))
  posterize = jnp.full((num,), ops.OP_NAMES.index('Posterize'))
  out = ops.augment_pairs(jax.random.key(0), cifar, solarize, posterize,
                          magnitude=0.)
  expected = ((255 - cifar) >> 7) << 7
  np.testing.assert_array_equal(out, expected)


def test_augment_pairs_clips_levels_to_max_level(cifar):
  """A magnitude far above max_level draws max_level almost surely:
  Solarize at threshold 256 then leaves every pixel alone."""
  num = len(cifar)
  solarize = jnp.full((num,), ops.OP_NAMES.index('Solarize'))
  identity = jnp.full((num,), ops.OP_NAMES.index('Identity'))
  out = ops.augment_pairs(jax.random.key(1), cifar, solarize, identity,
                          magnitude=1e6, max_level=ops.REFERENCE_MAX_LEVEL)
  np.testing.assert_array_equal(out, cifar)


def test_augment_pairs_draws_random_signs(cifar):
  """Rotations by one magnitude in both directions appear in one batch."""
  num = len(cifar)
  image = np.broadcast_to(cifar[:1], cifar.shape)
  rotate = jnp.full((num,), ops.OP_NAMES.index('Rotate'))
  identity = jnp.full((num,), ops.OP_NAMES.index('Identity'))
  out = np.asarray(ops.augment_pairs(
      jax.random.key(2), image, rotate, identity, magnitude=1e6,
      fill_value=FILL))
  left = pil_op(cifar[0], 'Rotate', 10., 1., 10., 'bilinear')
  right = pil_op(cifar[0], 'Rotate', 10., -1., 10., 'bilinear')
  is_left = [np.abs(o.astype(int) - left).mean() < 0.1 for o in out]
  is_right = [np.abs(o.astype(int) - right).mean() < 0.1 for o in out]
  assert all(np.logical_xor(is_left, is_right))
  assert any(is_left) and any(is_right)


def test_bad_arguments_raise():
  image = jnp.zeros((8, 8, 3), jnp.uint8)
  with pytest.raises(ValueError, match='unknown op'):
    ops.apply_op(image, 'Invert', 1.)
  with pytest.raises(ValueError, match='op id'):
    ops.apply_op(image, ops.NUM_OPS, 1.)
  with pytest.raises(ValueError, match='interpolation'):
    ops.rotate(image, 10., interpolation='bicubic')
  with pytest.raises(ValueError, match='C in'):
    ops.apply_op(jnp.zeros((8, 8, 4), jnp.uint8), 0, 1.)
  with pytest.raises(ValueError, match='strategy'):
    ops.apply_ops(image[None], jnp.zeros(1, jnp.int32), jnp.zeros(1),
                  strategy='loop')
  with pytest.raises(ValueError, match='max_level'):
    ops.apply_op(image, 0, 1., max_level=0.)
