"""Tests of the DARTS network over Architecture PyTrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax.nas import mobilenet_space as ms
from dha_jax.nas import network
from dha_jax.nas import search_space as ss

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('network_test')


def _shapes(model, arch, size, train=True):
  init = lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
      jnp.zeros((2, size, size, 3)), arch, train=train)
  return jax.eval_shape(init)


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize('stem,channels,layers,size,classes,expected', [
    # The published DARTS-V2 sizes: 3.349342 M (CIFAR-10, C=36, 20 cells) and
    # 4.718752 M (ImageNet, C=48, 14 cells), auxiliary head excluded.
    ('cifar', 36, 20, 32, 10, 3_349_342),
    ('imagenet', 48, 14, 224, 1000, 4_718_752),
])
def test_darts_v2_parameter_counts(stem, channels, layers, size, classes,
                                   expected):
  model = network.DARTSNetwork(classes, channels, layers, auxiliary=True,
                               stem=stem)
  variables = _shapes(model, ss.genotype_architecture(ss.DARTS_V2), size)
  params = dict(variables['params'])
  aux = params.pop('aux_head')
  assert _count(params) == expected
  assert _count(aux) > 0


def test_reduction_layers():
  assert network.reduction_layers(20) == (6, 13)
  assert network.reduction_layers(8) == (2, 5)
  assert network.reduction_layers(3) == (1, 2)


@pytest.fixture(scope='module')
def tiny():
  """A 3-cell C=4 network initialised on the dense all-ops support."""
  ops = ss.primitives()
  model = network.DARTSNetwork(5, 4, 3, auxiliary=True)
  dense = ss.dense_support(ops)
  arch = ss.make_architecture(dense)
  x = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3))
  variables = model.init({'params': jax.random.key(0),
                          'dropout': jax.random.key(1)}, x, arch, train=True)
  return model, dense, variables, x


def test_output_shapes_and_aux_only_in_training(tiny):
  model, _, variables, x = tiny
  arch = ss.genotype_architecture(ss.DARTS_V2)
  (logits, aux), _ = model.apply(variables, x, arch, train=True,
                                 rngs={'dropout': jax.random.key(0)},
                                 mutable=['batch_stats'])
  assert logits.shape == (4, 5) and aux.shape == (4, 5)
  logits, aux = model.apply(variables, x, arch, train=False)
  assert logits.shape == (4, 5) and aux is None


def test_no_drop_path_rate_builds_no_drop_path(tiny):
  """`drop_path_rate=None` gives the same training-mode function as a rate
  of 0 without any drop-path op: no 'dropout' rng is drawn, and a rate
  drops whole examples of some op outputs."""
  model, _, variables, x = tiny
  arch = ss.genotype_architecture(ss.DARTS_V2)
  apply = lambda rate, **kw: model.apply(
      variables, x, arch, train=True, drop_path_rate=rate,
      mutable=['batch_stats'], **kw)[0][0]
  rngs = {'dropout': jax.random.key(0)}
  np.testing.assert_array_equal(apply(None), apply(0.0, rngs=rngs))
  with pytest.raises(Exception, match='dropout'):
    apply(0.0)
  assert not np.allclose(apply(None), apply(0.5, rngs=rngs), atol=1e-3)


def test_sparse_child_equals_dense_with_zero_alpha(tiny):
  """Only supported ops run, and that equals the dense all-ops sum with α=0
  off the support."""
  model, dense, variables, x = tiny
  support = ss.genotype_to_support(ss.DARTS_V2)
  rng = np.random.default_rng(0)
  sparse_w, dense_w = {}, {}
  for cell in ss.CELL_TYPES:
    sparse_w[cell], dense_w[cell] = [], []
    for node, pairs in enumerate(support[cell]):
      a = rng.normal(size=len(pairs)).astype(np.float32)
      full = np.zeros(len(dense[cell][node]), np.float32)
      for k, pair in enumerate(pairs):
        full[dense[cell][node].index(pair)] = a[k]
      sparse_w[cell].append(a)
      dense_w[cell].append(full)
  sparse = ss.make_architecture(support, sparse_w)
  full = ss.make_architecture(dense, dense_w)
  for train in (False, True):
    kw = dict(rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
    out_s = model.apply(variables, x, sparse, train=train, **kw)[0][0]
    out_d = model.apply(variables, x, full, train=train, **kw)[0][0]
    np.testing.assert_allclose(out_s, out_d, rtol=1e-5, atol=1e-5)


def test_prune_params_keeps_exactly_the_genotype(tiny):
  model, _, variables, x = tiny
  arch = ss.genotype_architecture(ss.DARTS_V2)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, arch,
      train=True))
  pruned = network.prune_params(variables['params'], shapes['params'])
  assert jax.tree.structure(pruned) == jax.tree.structure(shapes['params'])
  assert _count(pruned) < _count(variables['params'])
  stats = network.prune_params(variables['batch_stats'], shapes['batch_stats'])
  out_pruned = model.apply({'params': pruned, 'batch_stats': stats}, x, arch,
                           train=False)
  out_full = model.apply(variables, x, arch, train=False)
  np.testing.assert_allclose(out_pruned[0], out_full[0], rtol=1e-6)


def test_genotype_json_round_trip_and_errors():
  text = ss.DARTS_V2.to_json()
  assert ss.Genotype.from_json(text) == ss.DARTS_V2
  support = ss.genotype_to_support(ss.DARTS_V2)
  assert ss.genotype_to_support(ss.support_to_genotype(support)) == support
  with pytest.raises(ValueError, match='unknown op'):
    ss.Genotype.from_json(text.replace('sep_conv_3x3', 'conv_9x9'))
  with pytest.raises(ValueError, match='out of range'):
    bad = ss.DARTS_V2._replace(
        normal=(('sep_conv_3x3', 7),) + ss.DARTS_V2.normal[1:])
    ss.genotype_to_support(bad)
  # Node 1 with ('sep_conv_3x3', 0) twice: one op built twice under one name.
  twice = ss.DARTS_V2._replace(normal=ss.DARTS_V2.normal[:2] + (
      ('sep_conv_3x3', 0),) * 2 + ss.DARTS_V2.normal[4:])
  with pytest.raises(ValueError,
                     match=r"node 1 has the pair \('sep_conv_3x3', 0\) twice"):
    ss.genotype_to_support(twice)


def test_new_support_is_a_new_jit_cache_entry():
  traces = []

  @jax.jit
  def f(arch):
    traces.append(1)
    return sum(jnp.sum(w) for c in arch.weights.values() for w in c)

  a = ss.genotype_architecture(ss.DARTS_V2)
  f(a)
  f(jax.tree.map(lambda w: w * 2, a))
  assert len(traces) == 1
  support = ss.genotype_to_support(ss.DARTS_V2)
  support['normal'] = (((0, 'dil_conv_5x5'), (1, 'avg_pool_3x3')),
                       ) + support['normal'][1:]
  f(ss.make_architecture(support))
  assert len(traces) == 2


def test_an_architecture_of_the_other_space_is_a_clear_error():
  model = network.DARTSNetwork(10, 4, 3)
  layers = ss.make_architecture(
      ss.layout_dense_support(ms.layout(ms.network_plan((1, 1, 0, 0, 0, 0)))))
  with pytest.raises(ValueError, match=r"\{'layers': 2\}.*model.space"):
    _shapes(model, layers, 8)
  one_cell = ss.make_architecture(
      {'normal': ss.genotype_to_support(ss.DARTS_V2)['normal']})
  with pytest.raises(ValueError, match='cell groups'):
    _shapes(model, one_cell, 8)
