"""Tests of the input sources and batching (dha_jax/data.py)."""

import io
import os
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import default as default_config
from dha_jax import data
from experiments.paths import CIFAR10_ZIP

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('data_test')

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')
# Image folder fixture: class -> a colour that survives resizing exactly.
FOLDER_COLOURS = {'emu': (0, 0, 250), 'cat': (250, 0, 0), 'dog': (0, 250, 0)}
FOLDER_COUNTS = {'train': 6, 'test': 2}


def dataset_config(**overrides):
  config = default_config.get_config().dataset
  config.update(overrides)
  return config


# ------------------------------------------------------------------ digits
@pytest.fixture(scope='module')
def digits():
  return data.load_dataset(dataset_config(image_size=12))


def test_digits_shapes_channels_and_values(digits):
  for split in (digits.train, digits.hpo, digits.test):
    images = split.images.take(np.arange(len(split)))
    assert images.shape == (len(split), 12, 12, 3)
    assert images.dtype == np.uint8 and split.labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
  assert len(digits.train) + len(digits.hpo) + len(digits.test) == 1797
  assert digits.num_classes == 10 and digits.class_names[3] == '3'
  assert digits.image_size == 12 and digits.name == 'digits'
  assert digits.train.images.take(np.arange(len(digits.train))).max() == 255
  assert digits.mean[0] == digits.mean[1] and 0.1 < digits.mean[0] < 0.5
  assert 0.1 < digits.std[0] < 0.5


def test_digits_split_is_fixed_and_balanced(digits):
  other = data.load_dataset(dataset_config(image_size=12, split_seed=7))
  test_images = digits.test.images.take(np.arange(len(digits.test)))
  np.testing.assert_array_equal(
      other.test.images.take(np.arange(len(other.test))), test_images)
  np.testing.assert_array_equal(other.test.labels, digits.test.labels)
  assert len(digits.test) == 355  # every 5th example of each class
  # A different split_seed moves examples between the train and HPO parts.
  assert not np.array_equal(other.hpo.labels, digits.hpo.labels)
  for labels in (digits.test.labels,
                 np.concatenate([digits.train.labels, digits.hpo.labels])):
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 0.9 * counts.max()


def test_max_examples_are_class_balanced_and_deterministic():
  config = dataset_config(image_size=8, max_train_examples=100,
                          max_test_examples=30, val_ratio=0.2)
  first, second = data.load_dataset(config), data.load_dataset(config)
  assert (len(first.train), len(first.hpo), len(first.test)) == (80, 20, 30)
  labels = np.concatenate([first.train.labels, first.hpo.labels])
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 10))
  np.testing.assert_array_equal(np.bincount(first.test.labels), np.full(10, 3))
  np.testing.assert_array_equal(
      first.hpo.images.take(np.arange(20)),
      second.hpo.images.take(np.arange(20)))


def test_balanced_subset_counts_differ_by_at_most_one():
  labels = np.repeat(np.arange(4), [50, 7, 30, 13])
  subset = data.balanced_subset(labels, 25, np.random.default_rng(0))
  assert len(np.unique(subset)) == 25
  np.testing.assert_array_equal(np.sort(np.bincount(labels[subset])),
                                [6, 6, 6, 7])
  small = data.balanced_subset(labels, 40, np.random.default_rng(0))
  assert np.bincount(labels[small])[1] == 7  # a small class gives all it has


def test_hpo_split_is_disjoint_deterministic_and_seeded():
  train, hpo = data.hpo_split(50, 0.2, np.random.default_rng((3, 2)))
  assert len(hpo) == 10 and not set(train) & set(hpo)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, hpo])),
                                np.arange(50))
  again = data.hpo_split(50, 0.2, np.random.default_rng((3, 2)))
  np.testing.assert_array_equal(again[1], hpo)
  other = data.hpo_split(50, 0.2, np.random.default_rng((4, 2)))
  assert not np.array_equal(other[1], hpo)


def test_given_mean_std_are_used_and_validated():
  dataset = data.load_dataset(dataset_config(
      image_size=8, max_train_examples=20, mean=(0.1, 0.2, 0.3),
      std=(0.4, 0.5, 0.6)))
  assert dataset.mean == (0.1, 0.2, 0.3) and dataset.std == (0.4, 0.5, 0.6)
  with pytest.raises(data.DataError, match='3 values'):
    data.load_dataset(dataset_config(mean=(0.5,), std=(0.2,)))


def test_bad_config_raises_data_error_naming_the_fix():
  with pytest.raises(data.DataError, match="'digits', 'image_folder'"):
    data.load_dataset(dataset_config(source='mnist_csv'))
  with pytest.raises(data.DataError, match=r'in \[0, 1\)'):
    data.load_dataset(dataset_config(val_ratio=1.0))
  with pytest.raises(data.DataError, match='in_memory'):
    data.load_dataset(dataset_config(in_memory='sometimes'))


# ---------------------------------------------------------------- batching
def _indexed_split(n):
  """Example i has label i and pixels i: batches show which rows they hold."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, 2, 2, 3)).copy()
  return data.Split(data.ArraySource(images), np.arange(n, dtype=np.int32))


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def test_train_batches_are_deterministic_and_cover_each_epoch():
  split = _indexed_split(23)
  assert data.steps_per_epoch(split, 5) == 4
  batches = _take(data.train_batches(split, 5, seed=1), 8)
  again = _take(data.train_batches(split, 5, seed=1), 8)
  for (images, labels), (images2, labels2) in zip(batches, again):
    assert images.shape == (5, 2, 2, 3) and labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
    np.testing.assert_array_equal(labels, labels2)
  for epoch in range(2):
    seen = np.concatenate([b[1] for b in batches[4 * epoch:4 * epoch + 4]])
    assert len(np.unique(seen)) == 20  # no repeats; the remainder is dropped
  assert not np.array_equal(batches[0][1], batches[4][1])
  other = next(data.train_batches(split, 5, seed=2))[1]
  assert not np.array_equal(other, batches[0][1])


def test_train_batches_resume_at_start_step():
  split = _indexed_split(23)
  full = _take(data.train_batches(split, 5, seed=3), 11)
  resumed = _take(data.train_batches(split, 5, seed=3, start_step=6), 5)
  for (_, expected), (_, labels) in zip(full[6:], resumed):
    np.testing.assert_array_equal(labels, expected)


def test_train_batches_split_over_processes():
  split = _indexed_split(23)
  whole = next(data.train_batches(split, 6, seed=0))[1]
  parts = [next(data.train_batches(split, 6, seed=0, process_index=p,
                                   process_count=3))[1] for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_eval_batches_pad_and_mask_the_last_batch():
  split = _indexed_split(11)
  batches = list(data.eval_batches(split, 4))
  assert [b[0].shape for b in batches] == [(4, 2, 2, 3)] * 3
  mask = np.concatenate([b[2] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  assert mask.dtype == bool and mask.sum() == 11 and not mask[11:].any()
  np.testing.assert_array_equal(labels[mask], np.arange(11))
  assert not batches[-1][0][~batches[-1][2]].any()


def test_batch_size_must_divide_over_devices():
  data.check_batch_size(16, 8)
  with pytest.raises(data.DataError, match='multiple of 8'):
    data.check_batch_size(12, 8)
  with pytest.raises(data.DataError, match='config.heldout_batch_size = 3'):
    data.check_batch_size(3, 2, 'heldout_batch_size')
  with pytest.raises(data.DataError, match='no full batch'):
    data.steps_per_epoch(_indexed_split(3), 4)


# ------------------------------------------------------------ image folder
def _png(colour, shape=(10, 14)):
  buffer = io.BytesIO()
  Image.fromarray(np.full(shape + (3,), colour, np.uint8)).save(buffer, 'PNG')
  return buffer.getvalue()


def _write_folder(root, classes=FOLDER_COLOURS, extra=None):
  """Writes root/split/class/i.png (+ `extra`: relative name -> bytes)."""
  files = {f'{split}/{c}/{i}.png': _png(colour, (10 + i, 14))
           for split, count in FOLDER_COUNTS.items()
           for c, colour in classes.items() for i in range(count)}
  files.update(extra or {})
  for name, content in files.items():
    os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    with open(os.path.join(root, name), 'wb') as f:
      f.write(content)
  return files


@pytest.fixture(params=['directory', 'zip'])
def folder(request, tmp_path):
  """An image folder, as a directory or as a zip with an enclosing folder."""
  root = str(tmp_path / 'tiny')
  files = _write_folder(root)
  if request.param == 'directory':
    return root
  path = str(tmp_path / 'tiny.zip')
  with zipfile.ZipFile(path, 'w') as z:
    for name, content in files.items():
      z.writestr(f'tiny/{name}', content)
  return path


def _folder_config(path, **overrides):
  return dataset_config(**{'source': 'image_folder', 'path': path,
                           'image_size': 8, 'val_ratio': 0.25, **overrides})


@pytest.mark.parametrize('in_memory', ['auto', 'false'])
def test_image_folder_sorted_classes_labels_and_size(folder, in_memory):
  dataset = data.load_dataset(_folder_config(folder, in_memory=in_memory))
  assert dataset.class_names == ('cat', 'dog', 'emu')
  assert dataset.name == 'tiny'
  assert (len(dataset.train), len(dataset.hpo), len(dataset.test)) == (
      14, 4, 6)
  colours = np.array([FOLDER_COLOURS[c] for c in dataset.class_names])
  for split in (dataset.train, dataset.hpo, dataset.test):
    images = split.images.take(np.arange(len(split)))
    assert images.shape == (len(split), 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 3, 5], colours[split.labels])
  np.testing.assert_array_equal(np.bincount(dataset.test.labels), [2, 2, 2])
  expected_mean = colours[dataset.train.labels].mean(0) / 255
  np.testing.assert_allclose(dataset.mean, expected_mean, rtol=1e-6)


def test_image_folder_mismatched_classes(tmp_path):
  _write_folder(str(tmp_path), extra={'test/fox/0.png': _png(9)})
  with pytest.raises(data.DataError, match=r"only in 'test': \['fox'\]"):
    data.load_dataset(_folder_config(str(tmp_path)))


def test_image_folder_skips_and_counts_unreadable_images(tmp_path):
  _write_folder(str(tmp_path), extra={'train/cat/bad.png': b'not an image',
                                      'train/dog/notes.txt': b'ignored'})
  with pytest.warns(UserWarning, match='skipped 1 unreadable'):
    dataset = data.load_dataset(_folder_config(str(tmp_path)))
  assert len(dataset.train) + len(dataset.hpo) == 18
  lazy = data.load_dataset(_folder_config(
      str(tmp_path), in_memory='false', val_ratio=0.0, mean=(0.5,) * 3,
      std=(0.5,) * 3))
  assert len(lazy.train) == 19  # lazy sources check nothing in advance
  with pytest.warns(UserWarning, match='1 unreadable images replaced'):
    images = lazy.train.images.take(np.arange(19))
  assert (images.reshape(19, -1).max(1) == 0).sum() == 1


def test_image_folder_missing_path_and_split(tmp_path):
  with pytest.raises(data.DataError, match='needs dataset.path'):
    data.load_dataset(_folder_config(''))
  with pytest.raises(data.DataError, match='does not exist'):
    data.load_dataset(_folder_config(str(tmp_path / 'nowhere.zip')))
  _write_folder(str(tmp_path))
  with pytest.raises(data.DataError, match='test_split'):
    data.load_dataset(_folder_config(str(tmp_path), test_split='val'))


@pytest.mark.skipif(not os.path.exists(CIFAR10_ZIP),
                    reason=f'the CIFAR-10 JPEG zip is not at {CIFAR10_ZIP}')
def test_cifar10_zip_subset():
  dataset = data.load_dataset(dataset_config(
      source='image_folder', path=CIFAR10_ZIP, image_size=32,
      max_train_examples=200, max_test_examples=100))
  assert dataset.class_names == CIFAR10_CLASSES
  images = dataset.train.images.take(np.arange(len(dataset.train)))
  assert images.shape == (180, 32, 32, 3) and images.std() > 20
  assert len(dataset.hpo) == 20
  np.testing.assert_array_equal(np.bincount(dataset.test.labels),
                                np.full(10, 10))
  np.testing.assert_allclose(dataset.mean, (0.49, 0.48, 0.45), atol=0.06)


# -------------------------------------------------------------------- tfds
class DhaTinyImages(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) array_record TFDS dataset, built without TensorFlow.

  Images are given as encoded PNG bytes, which TFDS stores without TF.
  """
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3)),
        'label': tfds.features.ClassLabel(names=['ant', 'bee', 'cow'])})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(12),
            'test': self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': io.BytesIO(_png(40 * (i % 3), (6 + i, 9))),
                'label': i % 3}


def _tfds_config(name, **overrides):
  return dataset_config(source='tfds', name=name, image_size=8, **overrides)


def test_tfds_prepared_array_record(tmp_path):
  DhaTinyImages(data_dir=str(tmp_path), file_format='array_record'
                ).download_and_prepare()
  for in_memory in ('true', 'false'):
    dataset = data.load_dataset(_tfds_config(
        'dha_tiny_images', data_dir=str(tmp_path), in_memory=in_memory,
        val_ratio=0.25))
    assert dataset.class_names == ('ant', 'bee', 'cow')
    assert (len(dataset.train), len(dataset.hpo), len(dataset.test)) == (
        9, 3, 6)
    images = dataset.test.images.take(np.arange(6))
    assert images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(images[:, 0, 0, 0], 40 * dataset.test.labels)
  with pytest.raises(data.DataError, match="no split 'validation'"):
    data.load_dataset(_tfds_config('dha_tiny_images', data_dir=str(tmp_path),
                                   test_split='validation'))


@pytest.mark.parametrize('name,test_split,num_classes', [
    ('cifar10', 'test', 10), ('imagenet2012', 'validation', 1000)])
def test_tfds_mock_data(name, test_split, num_classes):
  with tfds.testing.mock_data(num_examples=10):
    dataset = data.load_dataset(_tfds_config(name, test_split=test_split,
                                             max_test_examples=4))
    lazy = data.load_dataset(_tfds_config(name, test_split=test_split,
                                          in_memory='false'))
    lazy_images = lazy.train.images.take(np.arange(9))
  assert dataset.num_classes == num_classes and dataset.name == name
  assert (len(dataset.train), len(dataset.hpo), len(dataset.test)) == (9, 1, 4)
  # Mock images have random shapes (e.g. 47x17): all come back 8x8.
  images = dataset.train.images.take(np.arange(9))
  assert images.shape == (9, 8, 8, 3) and images.std() > 0
  np.testing.assert_array_equal(lazy_images, images)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  with pytest.raises(data.DataError) as error:
    data.load_dataset(_tfds_config('cifar10', data_dir=str(tmp_path)))
  message = str(error.value)
  assert 'tfds build cifar10 --file_format=array_record' in message
  assert f'--data_dir={tmp_path}' in message
  assert 'dataset.data_dir' in message and 'image_folder' in message
  with pytest.raises(data.DataError, match='no TFDS dataset named'):
    data.load_dataset(_tfds_config('no_such_dataset', data_dir=str(tmp_path)))
  with pytest.raises(data.DataError, match='needs dataset.name'):
    data.load_dataset(_tfds_config(''))


def test_a_one_class_folder_is_refused_by_name(tmp_path):
  root = str(tmp_path / 'one')
  _write_folder(root, classes={'cat': FOLDER_COLOURS['cat']})
  with pytest.raises(data.DataError, match=r"one/train has 1 class\(es\) "
                     r"\['cat'\]; a classifier needs at least 2"):
    data.load_dataset(_folder_config(root))
