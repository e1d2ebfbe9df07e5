"""Tests of the config files: each builds and passes the checks a run makes
before it touches data, and the paper configs keep the reference's search
settings."""

import glob
import importlib
import os

import ml_collections
import pytest

from configs import default
from dha_jax import data
from dha_jax import hpo
from dha_jax import modes
from dha_jax import step
from dha_jax import train
from dha_jax.augment import component as da_component
from dha_jax.components import check_components
from dha_jax.hpo import inner as hpo_inner
from dha_jax.nas import component as nas_component
from dha_jax.nas import ista
from dha_jax.nas import spaces

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                          'configs')
CONFIG_NAMES = sorted(
    os.path.basename(p)[:-len('.py')]
    for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
    if not p.endswith('__init__.py'))
# Short-run configs: the default job and the MobileNet space on a CPU.
SHORT_RUN_CONFIGS = ('default', 'cifar10_mobilenet')
PAPER_CONFIGS = tuple(n for n in CONFIG_NAMES if n not in SHORT_RUN_CONFIGS)
NUM_CLASSES = 10
STAND_IN_STATS = (0.5, 0.5, 0.5)
# Flowers-102's TFDS training split: 10 images per class.
FLOWERS102_TRAIN_IMAGES = 1020


def load(name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f'configs.{name}').get_config()


def check_before_data(config: ml_collections.ConfigDict) -> None:
  """What `train.Run.create` checks of a config besides its data, on one
  device: the loop's fields, mode, batch sizes, space, network, genotype, preprocessing, θ's
  optimizer and every phase's components (ISTA's IstaConfig, HPO's and
  DA's fields)."""
  train.check_loop_config(config)
  spec = modes.mode_spec(config.mode)
  for field in ('batch_size', 'eval_batch_size'):
    data.check_batch_size(config[field], 1, field)
  data.check_batch_size(config.heldout_batch_size or config.batch_size, 1,
                        'heldout_batch_size')
  space = spaces.from_config(config)
  train.create_model(config, NUM_CLASSES)
  if spec.search is None:
    space.genotype_to_support(
        train.load_genotype(config.model.genotype, space))
  step.Preprocess.from_config(config, config.dataset.mean or STAND_IN_STATS,
                              config.dataset.std or STAND_IN_STATS)
  hpo_inner.optimizer_from_config(config)
  ctx = modes.BuildContext(search=spec.search, param_shapes=None,
                           param_count=lambda support: 0, space=space,
                           multiply_adds=lambda support: 0.0)
  for phase in spec.phases():
    check_components(list(modes.build_components(phase.components, config,
                                                 ctx)))
  train.ignored_fields(config)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_passes_the_checks_of_a_run(name):
  check_before_data(load(name))


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_passes_in_a_two_stage_mode(name):
  config = load(name)
  config.mode = 'ista_two_stage'
  check_before_data(config)


# configs/cifar10_mobilenet.py's 9 layers train a genotype its search wrote
# (its docstring); ProxylessNAS-mobile has 21.
@pytest.mark.parametrize('name', [n for n in CONFIG_NAMES
                                  if n != 'cifar10_mobilenet'])
def test_every_config_trains_its_genotype(name):
  config = load(name)
  config.mode = 'train'
  check_before_data(config)


def test_the_mobilenet_paper_config_was_refused_with_the_short_run_norm():
  config = load('imagenet_mobilenet')
  config.nas.alpha_norm = 'mean_abs'
  with pytest.raises(ValueError, match="alpha_norm='mean_abs'"):
    check_before_data(config)


def _reference_values() -> dict[str, object]:
  blocks = {'nas': nas_component.default_config(),
            'da': da_component.default_config()}
  values = {}
  for field in default.SHORT_RUN_SEARCH:
    block, name = field.split('.')
    values[field] = blocks[block][name]
  return values


def _value(config: ml_collections.ConfigDict, field: str) -> object:
  block, name = field.split('.')
  return config[block][name]


def test_the_reference_values_are_the_papers():
  # What the paper configs must keep (docs/fidelity.md, 'NAS' and 'DA').
  assert _reference_values() == {
      'nas.alpha_norm': 'none', 'nas.freeze_rule': 'absolute',
      'nas.dist_limit': ista.DEFAULT_DIST_LIMIT, 'nas.min_freeze_steps': 0,
      'da.policy_optimizer': 'sgd', 'da.policy_lr': 2.0,
      'da.max_kl_from_uniform': 0.0}
  assert ista.DEFAULT_DIST_LIMIT == 1e-3
  assert hpo.default_config().mode == 'exact'


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_paper_configs_keep_the_reference_search_settings(name):
  config = load(name)
  assert {f: _value(config, f) for f in default.SHORT_RUN_SEARCH} == (
      _reference_values())
  assert config.nas.code_init_scale == ista.DEFAULT_B_INIT_SCALE
  assert config.hpo.mode == 'exact'


@pytest.mark.parametrize('name', SHORT_RUN_CONFIGS)
def test_short_run_configs_keep_the_short_run_search(name):
  config = load(name)
  expected = dict(default.SHORT_RUN_SEARCH)
  if name == 'cifar10_mobilenet':
    # One op per layer: α normalised over all layers, not per layer.
    expected['nas.alpha_norm'] = 'group_mean_abs'
    expected['nas.min_freeze_steps'] = 140
  assert {f: _value(config, f) for f in expected} == expected
  assert config.hpo.mode == 'online'


def test_the_default_job_is_the_base_and_the_short_run_overlay():
  base = default.get_base_config()
  config = default.get_config()
  changed = {f'{block}.{name}' for block in ('nas', 'da', 'hpo')
             for name in base[block]
             if base[block][name] != config[block][name]}
  assert changed == set(default.SHORT_RUN_SEARCH) | {'nas.search_epochs',
                                                     'hpo.mode'}
  assert config.nas.search_epochs == 4
  base.nas.search_epochs, base.hpo.mode = 4, 'online'
  default.short_run_search(base)
  assert base == config


def test_the_imagenet_hpo_batch_is_half_the_training_batch():
  config = load('imagenet_cell')
  assert config.heldout_batch_size * 2 == config.batch_size


@pytest.mark.parametrize('name', ['sport8_cell', 'mit67_cell',
                                  'flowers102_cell'])
def test_small_datasets_use_full_size_hpo_batches(name):
  config = load(name)
  heldout = config.heldout_batch_size or config.batch_size
  assert heldout == config.batch_size
  # Flowers-102's HPO split holds a held-out batch.
  assert int(FLOWERS102_TRAIN_IMAGES * config.dataset.val_ratio) >= heldout
