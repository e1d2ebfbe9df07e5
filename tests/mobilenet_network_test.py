"""Tests of the MobileNet-like network over Architecture PyTrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dha_jax import train
from dha_jax.nas import mobilenet_network as mn
from dha_jax.nas import mobilenet_space as ms
from dha_jax.nas import network
from dha_jax.nas import search_space as ss

# One worker builds this module's shared fixtures (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('mobilenet_network_test')

TINY_STAGES = (2, 2, 0, 0, 0, 0)
# A support of the tiny network: two ops, zero, one op, one op.
SPARSE = {ms.GROUP: (((0, 'mbconv_3x3_e3'), (0, 'mbconv_7x7_e6')),
                     ((0, ms.ZERO),), ((0, 'mbconv_5x5_e6'),),
                     ((0, 'mbconv_3x3_e6'),))}


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def test_proxyless_mobile_parameter_count():
  """ProxylessNAS-mobile's published size: 4,080,512 parameters."""
  model = mn.MobileNetwork(1000, ms.network_plan())
  arch = ss.make_architecture(ms.genotype_to_support(ms.PROXYLESS_MOBILE))
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), arch, train=False))
  assert _count(shapes['params']) == 4_080_512


def test_proxyless_mobile_multiply_adds():
  """ProxylessNAS-mobile's published compute: 320 M multiply-adds."""
  model = mn.MobileNetwork(1000, ms.network_plan())
  arch = ss.make_architecture(ms.genotype_to_support(ms.PROXYLESS_MOBILE))
  assert train.multiply_adds(model, arch, (1, 224, 224, 3)) == 320_427_584


@pytest.fixture(scope='module')
def tiny():
  """A 4-layer network of width 8-16 initialised on the dense support."""
  plan = ms.network_plan(TINY_STAGES, width_multiplier=0.25, stem='cifar',
                         head_width=16)
  model = mn.MobileNetwork(5, plan)
  dense = ss.layout_dense_support(ms.layout(plan))
  x = jax.random.uniform(jax.random.key(3), (4, 8, 8, 3))
  variables = model.init({'params': jax.random.key(0),
                          'dropout': jax.random.key(1)}, x,
                         ss.make_architecture(dense), train=True)
  return model, dense, variables, x


def test_output_shapes_and_no_aux(tiny):
  model, _, variables, x = tiny
  arch = ss.make_architecture(SPARSE)
  (logits, aux), _ = model.apply(variables, x, arch, train=True,
                                 rngs={'dropout': jax.random.key(0)},
                                 mutable=['batch_stats'])
  assert logits.shape == (4, 5) and aux is None
  logits, aux = model.apply(variables, x, arch, train=False)
  assert logits.shape == (4, 5) and aux is None


def test_sparse_child_equals_dense_with_zero_alpha(tiny):
  """Only supported MBConvs run, and that equals the dense all-candidates
  sum with α = 0 off the support."""
  model, dense, variables, x = tiny
  rng = np.random.default_rng(0)
  sparse_w, dense_w = [], []
  for node, pairs in zip(dense[ms.GROUP], SPARSE[ms.GROUP]):
    a = rng.normal(size=len(pairs)).astype(np.float32)
    full = np.zeros(len(node), np.float32)
    for k, pair in enumerate(pairs):
      full[node.index(pair)] = a[k]
    sparse_w.append(a)
    dense_w.append(full)
  sparse = ss.make_architecture(SPARSE, {ms.GROUP: sparse_w})
  full = ss.make_architecture(dense, {ms.GROUP: dense_w})
  for train in (False, True):
    kw = dict(rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
    out_s = model.apply(variables, x, sparse, train=train, **kw)[0][0]
    out_d = model.apply(variables, x, full, train=train, **kw)[0][0]
    np.testing.assert_allclose(out_s, out_d, rtol=1e-5, atol=1e-5)


def test_zero_passes_the_input_through():
  layer = mn.SearchableLayer(ms.LayerSpec(8, 1, True), ((0, ms.ZERO),))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  variables = layer.init(jax.random.key(1), x, jnp.ones((1,)), train=False,
                         drop_path_rate=0.0)
  assert not variables
  y = layer.apply(variables, x, jnp.ones((1,)), train=True,
                  drop_path_rate=0.5, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(y, x)
  first = mn.SearchableLayer(ms.LayerSpec(8, 2, False), ((0, ms.ZERO),))
  with pytest.raises(ValueError, match='identity residual'):
    first.init(jax.random.key(1), x, jnp.ones((1,)), train=False,
               drop_path_rate=0.0)


def test_prune_params_keeps_exactly_the_support(tiny):
  model, _, variables, x = tiny
  arch = ss.make_architecture(SPARSE)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, arch,
      train=True))
  pruned = network.prune_params(variables['params'], shapes['params'])
  assert jax.tree.structure(pruned) == jax.tree.structure(shapes['params'])
  assert set(pruned['layer0']) == {'mbconv_3x3_e3', 'mbconv_7x7_e6'}
  assert 'layer1' not in pruned  # zero has no parameters
  assert _count(pruned) < _count(variables['params'])
  stats = network.prune_params(variables['batch_stats'],
                               shapes['batch_stats'])
  out_pruned = model.apply({'params': pruned, 'batch_stats': stats}, x, arch,
                           train=False)
  out_full = model.apply(variables, x, arch, train=False)
  np.testing.assert_allclose(out_pruned[0], out_full[0], rtol=1e-6)


def test_an_architecture_of_another_shape_is_refused(tiny):
  model, _, variables, x = tiny
  with pytest.raises(ValueError, match='model.stage_layers'):
    model.apply(variables, x, ss.make_architecture(
        {ms.GROUP: SPARSE[ms.GROUP][:3]}), train=False)
  with pytest.raises(ValueError, match='model.space'):
    model.apply(variables, x, ss.genotype_architecture(ss.DARTS_V2),
                train=False)
