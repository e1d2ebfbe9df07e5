"""Tests of the choice of search space by config, and its errors."""

import json
import os

import jax
import pytest

from configs import cifar10_mobilenet
from configs import imagenet_mobilenet
from dha_jax import train
from dha_jax.nas import component as nas_component
from dha_jax.nas import mobilenet_network
from dha_jax.nas import mobilenet_space as ms
from dha_jax.nas import network
from dha_jax.nas import search_space as ss
from dha_jax.nas import spaces
from tests import tiny

MOBILENET = tiny.MOBILENET


def test_the_cell_space_is_the_darts_cells():
  space = spaces.from_config(tiny.tiny_config('dha'))
  assert space.name == spaces.DARTS_CELL
  assert space.layout == ss.cell_layout(ss.ISTA_PRIMITIVES)
  assert space.dense_support() == ss.dense_support(ss.ISTA_PRIMITIVES)
  assert (space.k_edges, space.ops_per_edge) == (2, 1)
  assert space.genotypes['darts_v2'] == ss.DARTS_V2
  model = train.create_model(tiny.tiny_config('dha'), 10)
  assert isinstance(model, network.DARTSNetwork)


def test_the_mobilenet_space_from_config():
  config = tiny.tiny_config('dha', MOBILENET)
  space = spaces.from_config(config)
  assert space.name == spaces.MOBILENET
  assert space.layout == ms.layout(ms.network_plan(
      (2, 2, 0, 0, 0, 0), width_multiplier=0.25, stem='cifar', head_width=16))
  # The first layer keeps the CIFAR stem's 8 channels at stride 1: it has
  # the residual, and so `zero`.
  (_, shapes), = space.layout
  assert [len(s.ops) for s in shapes] == [7, 7, 6, 7]
  assert (space.k_edges, space.ops_per_edge, space.excluded_ops) == (1, 1, ())
  assert space.genotype_to_support(ms.MobileNetGenotype(
      ((ms.MBCONV_OPS[0],), (ms.ZERO,)) * 2))[ms.GROUP][1] == ((0, ms.ZERO),)
  model = train.create_model(config, 10)
  assert isinstance(model, mobilenet_network.MobileNetwork)
  assert len(model.plan.layers) == 4


@pytest.mark.parametrize('module,layers', [(cifar10_mobilenet, 9),
                                           (imagenet_mobilenet, 21)])
def test_the_mobilenet_configs(module, layers):
  config = module.get_config()
  space = spaces.from_config(config)
  assert len(dict(space.layout)[ms.GROUP]) == layers
  assert isinstance(train.create_model(config, 10),
                    mobilenet_network.MobileNetwork)
  assert train.load_genotype(config.model.genotype, space) == (
      ms.PROXYLESS_MOBILE)


@pytest.mark.parametrize('overrides,match', [
    ({'model.space': 'resnet'}, "model.space='resnet'"),
    ({**MOBILENET, 'nas.include_none': True}, 'nas.include_none=False'),
    ({**MOBILENET, 'nas.ops_per_layer': 7}, 'nas.ops_per_layer=7'),
    ({'nas.ops_per_layer': 2}, "model.space='mobilenet'"),
    ({**MOBILENET, 'model.stage_layers': (1, 1)}, 'model.stage_layers'),
])
def test_space_errors_name_the_field_and_fix(overrides, match):
  with pytest.raises(ValueError, match=match):
    spaces.from_config(tiny.tiny_config('dha', overrides))


def test_no_auxiliary_head_in_the_mobilenet_network():
  config = tiny.tiny_config('dha', {**MOBILENET, 'model.auxiliary': True})
  with pytest.raises(ValueError, match='model.auxiliary=False'):
    train.create_model(config, 10)


def test_a_genotype_of_the_other_space_is_refused(tmp_path):
  space = spaces.from_config(tiny.tiny_config('train', MOBILENET))
  with pytest.raises(train.RunError, match="model.space='mobilenet'"):
    train.load_genotype('darts_v2', space)
  path = tmp_path / 'cells.json'
  path.write_text(ss.DARTS_V2.to_json())
  with pytest.raises(ValueError, match="model.space='darts_cell'"):
    train.load_genotype(str(path), space)
  path.write_text(ms.PROXYLESS_MOBILE.to_json())
  with pytest.raises(ValueError, match="model.space='mobilenet'"):
    train.load_genotype(str(path), spaces.cell_space())


@pytest.mark.parametrize('overrides,match', [
    ({**MOBILENET, 'model.genotype': 'darts_v2'}, 'proxyless_mobile'),
    ({**MOBILENET, 'model.genotype': 'proxyless_mobile'}, 'model.stage_layers'),
    ({'model.space': 'resnet'}, 'model.space'),
])
def test_the_run_refuses_before_the_workdir_is_made(overrides, match,
                                                    tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.RunError, match=match):
    train.train_and_evaluate(tiny.tiny_config('train', overrides), workdir)
  assert not os.path.exists(workdir)


def test_the_nas_component_searches_the_mobilenet_layers():
  config = tiny.tiny_config('dha', {**MOBILENET, 'nas.param_limit_mb': 0.5})
  space = spaces.from_config(config)
  candidates = []

  def param_count(support):
    candidates.append(support)
    return 1e6  # over the limit: every new support is refused

  comp = nas_component.make_component(config.nas, param_count, space=space)
  state = comp.init(jax.random.key(0))
  arch = comp.architecture(state, comp.trainable(state))
  assert set(arch.support_dict) == {ms.GROUP}
  assert all(len(node) == 1 for node in arch.support_dict[ms.GROUP])
  new_state, report = comp.epoch_end(state, 0)
  assert report['refused'] and candidates == [arch.support_dict]
  assert new_state.ista.support == state.ista.support
  assert report['candidate_support']['space'] == 'mobilenet'
  assert len(report['candidate_support']['layers']) == 4
  assert report['alpha_norm_layers'] > 0 and report['pairs_changed'] == 0
  assert report['over_budget'] == ['params_mb']
  json.dumps(report)


def test_a_multiply_add_budget_refuses_a_costlier_support():
  config = tiny.tiny_config('dha', {**MOBILENET,
                                    'nas.multiply_adds_limit_m': 2.0})
  space = spaces.from_config(config)
  with pytest.raises(ValueError, match='multiply_adds_limit_m'):
    nas_component.make_component(config.nas, space=space)
  comp = nas_component.make_component(
      config.nas, space=space, multiply_adds_fn=lambda support: 3e6)
  _, report = comp.epoch_end(comp.init(jax.random.key(0)), 0)
  assert report['refused'] and report['over_budget'] == ['multiply_adds_m']
  assert report['resources'] == {'multiply_adds_m': 3.0}
