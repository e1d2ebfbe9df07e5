"""The input sources and batching.

Three sources sit behind one interface (docs/design.md, 'Decisions'):

* `digits`: scikit-learn's bundled 8x8 digits (real data shipped in the
  wheel), the offline default;
* `image_folder`: a directory or a `.zip` laid out `split/class/image` (how
  SPORT8, MIT67 and the CIFAR-10 JPEG zip ship);
* `tfds`: a prepared TFDS dataset read through `tfds.data_source`
  (array_record, no TensorFlow needed), never downloaded.

Every source yields raw uint8 images of one fixed square size `image_size`
plus int32 labels; crops, flips, augmentation and normalisation run on device
(`dha_jax.augment`). A non-square image is resized so that its shorter side is
`image_size` and then centre-cropped, so for the 224-pixel datasets a stored
256 square followed by the on-device 224 centre crop is exactly the
reference's evaluation transform, Resize(256) + CenterCrop(224).

Splits. The source's train split gives the training part and the HPO part:
the HPO part is the last `val_ratio` fraction of the training split shuffled
by `split_seed` (the reference's `val_data_ori`, "last val_ratio fraction of
the training set", docs/fidelity.md, 'Data'), and it is disjoint from the
training part (the reference's `real_val=True`; its `real_val=False` overlap
is not reproduced). Every selection (subsets, the HPO split, the images used
for mean/std) is a deterministic function of `split_seed`, independent of the
run seed, and the batch order is a deterministic function of the run seed and
the step, so a resumed run sees exactly the batches of an uninterrupted one.

Sources are random access: `Split.images.take(indices)`. Small splits are
decoded once into memory; big ones (ImageNet, big folders) decode and resize
on `take`, in a thread pool (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
from typing import Any, Callable, Iterator, Protocol, Sequence
import warnings
import zipfile

from absl import logging
import chex
import ml_collections
import numpy as np
from PIL import Image

SOURCES = ('digits', 'image_folder', 'tfds')
# Decode a whole dataset into memory when its uint8 images (train + HPO +
# test) take at most this many bytes (CIFAR-10: 184 MB; ImageNet at 256 px:
# 250 GB); `dataset.in_memory` overrides the choice.
IN_MEMORY_MAX_BYTES = 4 * 1024**3
# Computed mean/std use at most this many training images.
STATS_MAX_EXAMPLES = 5000
# Images per chunk when decoding everything or computing statistics.
CHUNK = 1024
# Worker threads that decode and resize images.
DECODE_THREADS = min(8, os.cpu_count() or 1)
_CHUNKS_PER_THREAD = 4
# Resampling filter of every resize (torchvision's Resize default, which the
# reference uses).
RESAMPLE = Image.Resampling.BILINEAR
# File name endings the image folder source reads (others are ignored).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.ppm', '.pgm',
                    '.tif', '.tiff', '.webp')
# Feature keys of TFDS image classification datasets.
TFDS_IMAGE_KEY = 'image'
TFDS_LABEL_KEY = 'label'
# Digits: the fixed test split is every DIGITS_TEST_EVERY-th example of each
# class (20%); pixel values 0..DIGITS_MAX_VALUE are scaled to 0..255.
DIGITS_TEST_EVERY = 5
DIGITS_MAX_VALUE = 16.0
CHANNELS = 3
# A classifier needs at least this many classes.
MIN_CLASSES = 2
_UINT8_MAX = 255.0
# Independent random streams derived from `split_seed`.
_STREAM_TRAIN_SUBSET, _STREAM_TEST_SUBSET, _STREAM_HPO, _STREAM_STATS = range(4)
_IN_MEMORY_CHOICES = {'auto': None, 'true': True, 'false': False}


class DataError(ValueError):
  """Bad data configuration or data; the message names the problem and fix."""


# ----------------------------------------------------------------- sources
class ImageSource(Protocol):
  """Random access to N uint8 images of one shape [H, W, C]."""

  def __len__(self) -> int:
    ...

  def take(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [k, H, W, C] images at `indices` (int [k])."""

  def subset(self, indices: np.ndarray) -> ImageSource:
    """The source restricted to `indices`, in that order."""


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Images held in memory, uint8 [N, H, W, C]."""
  images: np.ndarray

  def __post_init__(self):
    chex.assert_rank(self.images, 4)
    chex.assert_type(self.images, np.uint8)

  def __len__(self) -> int:
    return len(self.images)

  def take(self, indices: np.ndarray) -> np.ndarray:
    return self.images[np.asarray(indices, np.int64)]

  def subset(self, indices: np.ndarray) -> ArraySource:
    return ArraySource(self.take(indices))


# A reader maps a key (a file name, a zip member or a record index) to the
# encoded image bytes or a decoded uint8 array.
Reader = Callable[[Any], 'bytes | np.ndarray']


@dataclasses.dataclass(frozen=True)
class LazySource:
  """Images decoded and resized on `take`, from `reader(keys[i])`.

  An image that cannot be decoded here (the folder source checks nothing in
  advance) comes back black, counted in a warning, so batches keep their
  shape; decode such data in memory to have unreadable images dropped.
  """
  reader: Reader
  keys: np.ndarray
  image_size: int

  def __len__(self) -> int:
    return len(self.keys)

  def take(self, indices: np.ndarray) -> np.ndarray:
    images, failed = decode_images(
        self.reader, self.keys[np.asarray(indices, np.int64)],
        self.image_size)
    if failed:
      warnings.warn(f'{len(failed)} unreadable images replaced by black ones '
                    f'(first: {failed[0]}); delete or fix them.')
    return images

  def subset(self, indices: np.ndarray) -> LazySource:
    return dataclasses.replace(
        self, keys=self.keys[np.asarray(indices, np.int64)])


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: N images and their labels."""
  images: ImageSource
  labels: np.ndarray  # int32 [N]

  def __post_init__(self):
    chex.assert_rank(self.labels, 1)
    chex.assert_type(self.labels, np.int32)
    if len(self.images) != len(self.labels):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} '
                       'labels.')

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices: np.ndarray) -> Split:
    indices = np.asarray(indices, np.int64)
    return Split(self.images.subset(indices), self.labels[indices])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The three splits and what the model and preprocessing need to know."""
  train: Split
  hpo: Split  # held out from the source's train split (may be empty)
  test: Split
  num_classes: int
  class_names: tuple[str, ...]
  image_size: int
  mean: tuple[float, float, float]  # per channel, in [0, 1]
  std: tuple[float, float, float]
  name: str


# ---------------------------------------------------------------- decoding
@functools.lru_cache(maxsize=1)
def _executor() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(
      DECODE_THREADS, thread_name_prefix='dha_jax_decode')


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any]
                 ) -> list[Any]:
  """[fn(x) for x in items], computed in the decode thread pool."""
  def run(chunk):
    return [fn(x) for x in chunk]
  # A few chunks per thread: one future per item costs more than decoding
  # a small image.
  num_chunks = max(1, min(len(items), DECODE_THREADS * _CHUNKS_PER_THREAD))
  bounds = np.linspace(0, len(items), num_chunks + 1).astype(int)
  chunks = (items[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))
  return [y for part in _executor().map(run, chunks) for y in part]


def to_square(image: Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` and centre-crops: uint8 [size,size,3].

  Args:
    image: any PIL image (converted to RGB).
    size: output side in pixels.

  Returns:
    uint8 [size, size, 3].
  """
  if image.mode != 'RGB':
    image = image.convert('RGB')
  width, height = image.size
  if (width, height) != (size, size):
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    image = image.resize((size, size), RESAMPLE,
                         box=(left, top, left + side, top + side))
  return np.asarray(image, np.uint8)


def _decode(raw: bytes | np.ndarray, size: int) -> np.ndarray:
  if isinstance(raw, np.ndarray):
    image = Image.fromarray(raw.squeeze(-1) if raw.shape[-1] == 1 else raw)
  else:
    image = Image.open(io.BytesIO(raw))
    # JPEG: decode directly at the smallest DCT scale still >= size (fast for
    # 224-pixel datasets; no effect when the image is not larger).
    image.draft('RGB', (size, size))
  return to_square(image, size)


def decode_images(reader: Reader, keys: Sequence[Any], size: int
                  ) -> tuple[np.ndarray, list[Any]]:
  """Reads, decodes and resizes images in the decode thread pool.

  Args:
    reader: key -> encoded bytes or a uint8 array.
    keys: the k keys to read.
    size: side of the output squares.

  Returns:
    (uint8 [k, size, size, 3] with black images where decoding failed, the
    keys that failed).
  """
  def decode(key):
    try:
      return _decode(reader(key), size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
      return None  # PIL's errors for corrupt, truncated or foreign files.
  decoded = parallel_map(decode, keys)
  images = np.zeros((len(keys), size, size, CHANNELS), np.uint8)
  failed = []
  for i, (key, image) in enumerate(zip(keys, decoded)):
    if image is None:
      failed.append(key)
    else:
      images[i] = image
  return images, failed


def _materialize(split: Split, image_size: int, what: str) -> Split:
  """Decodes a lazy split into memory, dropping unreadable images."""
  if isinstance(split.images, ArraySource):
    return split
  source = split.images
  images, failed = [], []
  for start in range(0, len(source), CHUNK):
    keys = source.keys[start:start + CHUNK]
    chunk, bad = decode_images(source.reader, keys, image_size)
    images.append(chunk)
    failed += bad
  images = (np.concatenate(images) if images else
            np.zeros((0, image_size, image_size, CHANNELS), np.uint8))
  if failed:
    warnings.warn(f'{what}: skipped {len(failed)} unreadable images (first: '
                  f'{failed[0]}).')
    bad = set(failed)
    keep = np.array([k not in bad for k in source.keys], bool)
    return Split(ArraySource(images[keep]), split.labels[keep])
  return Split(ArraySource(images), split.labels)


# ---------------------------------------------------------------- selection
def balanced_subset(labels: np.ndarray, size: int,
                    rng: np.random.Generator) -> np.ndarray:
  """A random subset of `size` indices with classes as equal as possible.

  Classes take turns: the subset holds the first ceil/floor(size/classes)
  examples of each class in a random order (all of a class if it has fewer).

  Args:
    labels: int [N].
    size: subset size (all indices if size >= N).
    rng: the source of randomness.

  Returns:
    Sorted int64 indices [min(size, N)].
  """
  n = len(labels)
  if size >= n:
    return np.arange(n)
  perm = rng.permutation(n)
  shuffled = labels[perm]
  order = np.argsort(shuffled, kind='stable')
  first_of_class = np.searchsorted(shuffled[order], shuffled[order])
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n) - first_of_class
  return np.sort(perm[np.argsort(rank, kind='stable')[:size]])


def hpo_split(n: int, val_ratio: float, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
  """Train / HPO indices: the HPO part is the shuffled tail.

  Args:
    n: examples in the training split.
    val_ratio: fraction held out, in [0, 1).
    rng: the source of randomness.

  Returns:
    (sorted train indices, sorted HPO indices), disjoint, covering range(n).
  """
  perm = rng.permutation(n)
  num_hpo = int(round(val_ratio * n))
  return np.sort(perm[:n - num_hpo]), np.sort(perm[n - num_hpo:])


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng((seed, stream))


def _limit(max_examples: int) -> int | None:
  return None if max_examples < 0 else int(max_examples)


def _balanced(split: Split, max_examples: int, rng: np.random.Generator
              ) -> Split:
  limit = _limit(max_examples)
  if limit is None:
    return split
  return split.subset(balanced_subset(split.labels, limit, rng))


# ------------------------------------------------------------------- digits
def _digits(config: ml_collections.ConfigDict
            ) -> tuple[Split, Split, tuple[str, ...]]:
  """scikit-learn's 1797 digits, the fixed 80/20 split, resized to RGB."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  pixels = np.round(digits.images * (_UINT8_MAX / DIGITS_MAX_VALUE))
  size = config.image_size
  images = np.stack([to_square(Image.fromarray(p.astype(np.uint8)), size)
                     for p in pixels])
  labels = digits.target.astype(np.int32)
  # The k-th example of its class, in the file's order: fixed, seed-free.
  rank = np.zeros_like(labels)
  for c in np.unique(labels):
    rank[labels == c] = np.arange(np.sum(labels == c))
  is_test = rank % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
  names = tuple(str(c) for c in digits.target_names)
  return (Split(ArraySource(images[~is_test]), labels[~is_test]),
          Split(ArraySource(images[is_test]), labels[is_test]), names)


# ------------------------------------------------------------- image folder
def _read_file(root: str, name: str) -> bytes:
  with open(os.path.join(root, name), 'rb') as f:
    return f.read()


def _is_image(name: str) -> bool:
  parts = name.split('/')
  return (name.lower().endswith(IMAGE_EXTENSIONS)
          and not any(p.startswith('.') or p == '__MACOSX' for p in parts))


def _list_files(path: str) -> tuple[list[str], Reader]:
  """Names ('/'-separated, relative) of every image under a dir or zip.

  Returns:
    (the names, a reader of the bytes of a name).
  """
  if zipfile.is_zipfile(path):
    # One handle serves every thread: zipfile locks each member read.
    archive = zipfile.ZipFile(path)
    names, reader = archive.namelist(), archive.read
  else:
    names, reader = [], functools.partial(_read_file, path)
    for root, _, files in os.walk(path):
      rel = os.path.relpath(root, path).replace(os.sep, '/')
      names += [f if rel == '.' else f'{rel}/{f}' for f in files]
  return [n for n in names if _is_image(n)], reader


def _folder_split(files: list[str], prefix: str, split: str
                  ) -> dict[str, list[str]]:
  """class name -> sorted member names of `prefix + split/class/...`."""
  head = f'{prefix}{split}/'
  classes: dict[str, list[str]] = {}
  for name in files:
    if name.startswith(head):
      rest = name[len(head):].split('/')
      if len(rest) >= 2:
        classes.setdefault(rest[0], []).append(name)
  return {c: sorted(v) for c, v in sorted(classes.items())}


def _image_folder(config: ml_collections.ConfigDict
                  ) -> tuple[Split, Split, tuple[str, ...]]:
  """Lazy splits over `path` (a directory or .zip) laid out split/class/img."""
  path = os.path.expanduser(config.path)
  if not path:
    raise DataError(
        "dataset.source='image_folder' needs dataset.path: a directory or a "
        '.zip laid out split/class/image, e.g. --config.dataset.path='
        '/data/sport8.zip.')
  if not os.path.exists(path):
    raise DataError(f'dataset.path={path!r} does not exist; pass an existing '
                    'directory or .zip laid out split/class/image.')
  files, reader = _list_files(path)
  splits = (config.train_split, config.test_split)
  # Accept one enclosing folder (a zip of `cifar10/train/...`).
  tops = {n.split('/')[0] for n in files}
  prefix = ''
  if splits[0] not in tops and len(tops) == 1:
    prefix = f'{tops.pop()}/'
  found = {split: _folder_split(files, prefix, split) for split in splits}
  for split, classes in found.items():
    if not classes:
      present = sorted({n[len(prefix):].split('/')[0] for n in files})
      raise DataError(
          f'{path} has no images under {prefix}{split}/<class>/ (top-level '
          f'folders: {present}). Lay it out split/class/image, or set '
          'dataset.train_split / dataset.test_split to its split folders.')
  train_classes, test_classes = (list(found[s]) for s in splits)
  if train_classes != test_classes:
    raise DataError(
        f'{path}: the splits have different classes; only in '
        f'{splits[0]!r}: {sorted(set(train_classes) - set(test_classes))}, '
        f'only in {splits[1]!r}: '
        f'{sorted(set(test_classes) - set(train_classes))}. Every split '
        'needs an image folder for every class.')

  def split_of(classes: dict[str, list[str]]) -> Split:
    keys = np.array([n for members in classes.values() for n in members])
    labels = np.concatenate([np.full(len(m), c, np.int32)
                             for c, m in enumerate(classes.values())])
    return Split(LazySource(reader, keys, config.image_size), labels)
  return (split_of(found[splits[0]]), split_of(found[splits[1]]),
          tuple(train_classes))


# --------------------------------------------------------------------- tfds
def _tfds_not_prepared(name: str, data_dir: str, looked_in: str) -> DataError:
  target = data_dir or 'DATA_DIR'
  return DataError(
      f'TFDS dataset {name!r} is not prepared at {looked_in}, and dha_jax '
      'never downloads it (it reads TFDS without TensorFlow, from the '
      'array_record format). Prepare it once, on a machine with TensorFlow '
      'and internet access (imagenet2012 also wants its archives in '
      f'{target}/downloads/manual):\n'
      '  pip install tensorflow tensorflow-datasets\n'
      f'  tfds build {name} --file_format=array_record --data_dir={target}\n'
      f'then make {target} visible here and pass '
      f'--config.dataset.data_dir={target}. Or use an image folder: '
      '--config.dataset.source=image_folder --config.dataset.path=DIR_OR_ZIP '
      '(laid out split/class/image).')


def _open_tfds(name: str, split: str, data_dir: str) -> Any:
  """A TFDS data source whose records hold the encoded image bytes."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = dict(split=split, data_dir=data_dir or None, download=False)
  try:
    source = tfds.data_source(
        name, decoders={TFDS_IMAGE_KEY: tfds.decode.SkipDecoding()}, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(f'There is no TFDS dataset named {name!r}; set '
                    'dataset.name to one of tfds.list_builders(), e.g. '
                    "'cifar10'.") from None
  except Exception as e:  # pylint: disable=broad-except
    builder = tfds.builder(name, data_dir=data_dir or None)
    if not builder.is_prepared():
      raise _tfds_not_prepared(name, data_dir, builder.data_dir) from None
    if split.split('[')[0] not in builder.info.splits:
      raise DataError(
          f'TFDS dataset {name!r} has no split {split!r} (it has '
          f'{sorted(builder.info.splits)}); set dataset.train_split / '
          "dataset.test_split (imagenet2012's test split is 'validation').")
    raise DataError(
        f'TFDS dataset {name!r} at {builder.data_dir} cannot be read '
        f'({type(e).__name__}: {e}). dha_jax reads TFDS without TensorFlow, '
        f'which needs the array_record format: re-prepare it with `tfds '
        f'build {name} --file_format=array_record`.') from e
  if not len(source):  # pylint: disable=g-explicit-length-test
    return source
  try:
    source[0]  # pylint: disable=pointless-statement
  except ImportError:
    # `tfds.testing.mock_data` encodes its random examples with TensorFlow
    # before skipping the decoding; without TF, read them decoded.
    source = tfds.data_source(name, **kwargs)
  return source


class _TfdsReader:
  """Reads the image of a record (encoded bytes, or decoded under a mock)."""

  def __init__(self, source: Any):
    self._source = source

  def __call__(self, index: int) -> bytes | np.ndarray:
    return self._source[int(index)][TFDS_IMAGE_KEY]

  def label(self, index: int) -> int:
    return int(self._source[int(index)][TFDS_LABEL_KEY])


def _tfds(config: ml_collections.ConfigDict
          ) -> tuple[Split, Split, tuple[str, ...]]:
  """Lazy splits of a prepared TFDS dataset.

  Labels are read once at load, with the images left encoded: a pass over
  the selected records (for the whole of ImageNet that is one read of its
  files, so set max_train_examples for quick runs). Subsets are uniformly
  random, not class-balanced: balancing would need every label first.
  """
  if not config.name:
    raise DataError("dataset.source='tfds' needs dataset.name, a TFDS name "
                    "such as 'cifar10', 'cifar100', 'oxford_flowers102' or "
                    "'imagenet2012'.")
  splits = []
  for split, max_examples, stream in (
      (config.train_split, config.max_train_examples, _STREAM_TRAIN_SUBSET),
      (config.test_split, config.max_test_examples, _STREAM_TEST_SUBSET)):
    source = _open_tfds(config.name, split, config.data_dir)
    reader = _TfdsReader(source)
    n, limit = len(source), _limit(max_examples)
    keys = (np.arange(n) if limit is None or limit >= n else np.sort(
        _rng(config.split_seed, stream).choice(n, limit, replace=False)))
    logging.info('Reading %d labels of TFDS %s[%s].', len(keys), config.name,
                 split)
    labels = np.array(parallel_map(reader.label, keys), np.int32)
    splits.append(Split(LazySource(reader, keys, config.image_size), labels))
  label = source.dataset_info.features[TFDS_LABEL_KEY]
  names = tuple(label.names) if label.names else tuple(
      str(c) for c in range(label.num_classes))
  return splits[0], splits[1], names


# ---------------------------------------------------------------- load
def _in_memory(config: ml_collections.ConfigDict) -> bool | None:
  value = config.get('in_memory', 'auto')
  if isinstance(value, bool):
    return value
  if str(value).lower() not in _IN_MEMORY_CHOICES:
    raise DataError(f'dataset.in_memory={value!r}; use one of '
                    f'{sorted(_IN_MEMORY_CHOICES)}.')
  return _IN_MEMORY_CHOICES[str(value).lower()]


def compute_mean_std(split: Split, max_examples: int, seed: int
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel pixel mean and std in [0, 1] over up to max_examples images.

  Args:
    split: the images.
    max_examples: how many images at most (a seeded random subset).
    seed: seed of the subset.

  Returns:
    (mean, std), each a tuple of C floats.
  """
  n = len(split)
  if not n:
    raise DataError('Cannot compute mean/std of an empty training split; set '
                    'dataset.mean and dataset.std, or use more data.')
  indices = (np.arange(n) if n <= max_examples else np.sort(
      _rng(seed, _STREAM_STATS).choice(n, max_examples, replace=False)))
  total = total_sq = 0.0
  for start in range(0, len(indices), CHUNK):
    images = split.images.take(indices[start:start + CHUNK])
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    total = total + pixels.sum(0)
    total_sq = total_sq + np.square(pixels).sum(0)
  count = len(indices) * np.prod(images.shape[1:-1])
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
  return (tuple(float(m) for m in mean / _UINT8_MAX),
          tuple(float(s) for s in std / _UINT8_MAX))


def _given_stats(config: ml_collections.ConfigDict
                 ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  mean, std = tuple(config.mean), tuple(config.std)
  if not mean and not std:
    return None
  if (len(mean) != CHANNELS or len(std) != CHANNELS
      or not all(0.0 <= m <= 1.0 for m in mean)
      or not all(0.0 < s <= 1.0 for s in std)):
    raise DataError(
        f'dataset.mean={mean} / dataset.std={std}: give {CHANNELS} values '
        'each, in [0, 1] (std > 0), or () for both to compute them.')
  return tuple(map(float, mean)), tuple(map(float, std))


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """Loads the dataset that `config` (a `config.dataset`) describes.

  Args:
    config: fields `source`, `name`, `data_dir`, `path`, `image_size`,
      `val_ratio`, `split_seed`, `max_train_examples`, `max_test_examples`,
      `train_split`, `test_split`, `mean`, `std` and optionally `in_memory`
      ('auto' | 'true' | 'false'); see configs/default.py.

  Returns:
    The Dataset: uint8 images of [image_size, image_size, 3], int32 labels.

  Raises:
    DataError: when the configuration or the data is unusable; the message
      says how to fix it.
  """
  loaders = {'digits': _digits, 'image_folder': _image_folder, 'tfds': _tfds}
  if config.source not in loaders:
    raise DataError(f'dataset.source={config.source!r} is unknown; use one '
                    f'of {list(SOURCES)}.')
  if not isinstance(config.image_size, int) or config.image_size <= 0:
    raise DataError(f'dataset.image_size={config.image_size!r}: give a '
                    'positive number of pixels.')
  if not 0.0 <= config.val_ratio < 1.0:
    raise DataError(f'dataset.val_ratio={config.val_ratio}: give a fraction '
                    'in [0, 1).')
  for field in ('max_train_examples', 'max_test_examples'):
    if config[field] == 0 or config[field] < -1:
      raise DataError(f'dataset.{field}={config[field]}: give a positive '
                      'number of examples, or -1 for all of them.')
  in_memory = _in_memory(config)
  stats = _given_stats(config)
  train, test, class_names = loaders[config.source](config)
  if len(class_names) < MIN_CLASSES:
    where = (f'{config.path}/{config.train_split}'
             if config.source == 'image_folder'
             else f'{config.source} {config.name}'.strip())
    raise DataError(
        f'{where} has {len(class_names)} class(es) {list(class_names)}; a '
        f'classifier needs at least {MIN_CLASSES}. Give the training split '
        'one folder per class.')
  seed = config.split_seed
  if config.source != 'tfds':  # TFDS subsets are chosen before reading.
    train = _balanced(train, config.max_train_examples,
                      _rng(seed, _STREAM_TRAIN_SUBSET))
    test = _balanced(test, config.max_test_examples,
                     _rng(seed, _STREAM_TEST_SUBSET))
  size = config.image_size
  if in_memory is None:
    pixels = (len(train) + len(test)) * size * size * CHANNELS
    in_memory = pixels <= IN_MEMORY_MAX_BYTES
  if in_memory:
    train = _materialize(train, size, f'{config.source} {config.train_split}')
    test = _materialize(test, size, f'{config.source} {config.test_split}')
  train_idx, hpo_idx = hpo_split(len(train), config.val_ratio,
                                 _rng(seed, _STREAM_HPO))
  train, hpo = train.subset(train_idx), train.subset(hpo_idx)
  if stats is None:
    stats = compute_mean_std(train, STATS_MAX_EXAMPLES, seed)
  name = config.name or (
      config.source if config.source != 'image_folder' else
      os.path.splitext(os.path.basename(config.path.rstrip('/')))[0])
  return Dataset(train=train, hpo=hpo, test=test,
                 num_classes=len(class_names), class_names=class_names,
                 image_size=size, mean=stats[0], std=stats[1], name=name)


# ---------------------------------------------------------------- batching
def check_batch_size(batch_size: int, num_devices: int,
                     field: str = 'batch_size') -> None:
  """Raises DataError unless the global batch splits evenly over devices.

  `field` names the config field that set `batch_size`, for the message.
  """
  if batch_size <= 0 or batch_size % num_devices:
    raise DataError(
        f'config.{field} = {batch_size}: the global batch does not divide '
        f'evenly over {num_devices} devices; use a positive multiple of '
        f'{num_devices} (e.g. '
        f'{max(1, round(batch_size / num_devices)) * num_devices}).')


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """Full batches per pass over `split` (the remainder is dropped)."""
  steps = len(split) // batch_size
  if steps == 0:
    raise DataError(
        f'A split of {len(split)} examples holds no full batch of '
        f'{batch_size}; lower batch_size, or give the split more data '
        '(max_train_examples, val_ratio).')
  return steps


def _local_slice(batch_size: int, process_index: int, process_count: int
                 ) -> slice:
  if batch_size % process_count:
    raise DataError(f'The global batch size {batch_size} does not divide '
                    f'over {process_count} processes.')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_batches(split: Split, batch_size: int, *, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Infinite shuffled training batches, a pure function of (seed, step).

  The batch of step s is rows [i*B, (i+1)*B) of the permutation
  `default_rng((seed, epoch))` of the split, with epoch, i = divmod(s,
  steps_per_epoch); each epoch drops its remainder. Starting at `start_step`
  therefore yields exactly what an uninterrupted run yields from that step.

  Args:
    split: the examples.
    batch_size: the global batch size B.
    seed: the run's batch-order seed (a non-negative int).
    start_step: the first step to yield.
    process_index: this process (multi-host); it gets its slice of B.
    process_count: the number of processes (must divide B).

  Yields:
    (uint8 images [B/P, H, W, C], int32 labels [B/P]).
  """
  if seed < 0 or start_step < 0:
    raise DataError(f'seed={seed} and start_step={start_step} must be >= 0.')
  steps = steps_per_epoch(split, batch_size)
  local = _local_slice(batch_size, process_index, process_count)
  step, epoch, perm = start_step, None, None
  while True:
    if step // steps != epoch:
      epoch = step // steps
      perm = np.random.default_rng((seed, epoch)).permutation(len(split))
    start = (step % steps) * batch_size
    indices = perm[start:start + batch_size][local]
    yield split.images.take(indices), split.labels[indices]
    step += 1


def eval_batches(split: Split, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """One ordered pass in fixed-shape batches; the last one is padded.

  Args:
    split: the examples.
    batch_size: the global batch size B.
    process_index: this process (multi-host); it gets its slice of B.
    process_count: the number of processes (must divide B).

  Yields:
    (uint8 images [B/P, H, W, C], int32 labels [B/P], bool mask [B/P]) where
    padding rows are zero images with label 0 and mask False.
  """
  local = _local_slice(batch_size, process_index, process_count)
  n = len(split)
  for start in range(0, n, batch_size):
    indices = np.arange(start, start + batch_size)[local]
    mask = indices < n
    images = split.images.take(indices[mask])
    padded = np.zeros((len(indices),) + images.shape[1:], np.uint8)
    padded[mask] = images
    labels = np.zeros(len(indices), np.int32)
    labels[mask] = split.labels[indices[mask]]
    yield padded, labels, mask
