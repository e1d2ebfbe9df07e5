"""Tests of the MobileNet-like search space: plan, layout, genotypes."""

import json

import pytest

from configs import cifar10_mobilenet
from dha_jax.nas import mobilenet_space as ms
from dha_jax.nas import search_space as ss

TINY_STAGES = (2, 2, 0, 0, 0, 0)


@pytest.mark.parametrize('width,expected', [
    (32, 32), (4, 8), (10, 16), (20, 24), (24, 24), (48, 48), (44.8, 48)])
def test_make_divisible(width, expected):
  assert ms.make_divisible(width) == expected


def test_plan_is_proxyless_mobile_at_width_one():
  plan = ms.network_plan()
  assert (plan.stem_width, plan.stem_stride, plan.first_block_width,
          plan.head_width) == (32, 2, 16, 1280)
  assert [l.features for l in plan.layers] == (
      [32] * 4 + [40] * 4 + [80] * 4 + [96] * 4 + [192] * 4 + [320])
  firsts = [0, 4, 8, 12, 16, 20]
  assert [i for i, l in enumerate(plan.layers) if not l.residual] == firsts
  assert [plan.layers[i].stride for i in firsts] == [2, 2, 2, 1, 2, 1]
  assert all(l.stride == 1 for i, l in enumerate(plan.layers)
             if i not in firsts)


def test_plan_scales_and_leaves_out_empty_stages():
  plan = ms.network_plan(TINY_STAGES, width_multiplier=0.25, stem='cifar',
                         head_width=16)
  assert plan.stem_stride == 1 and plan.stem_width == 8
  # The first block's 8 channels at stride 1: the first layer keeps its
  # input's shape and has the residual (ProxylessNAS' rule).
  assert plan.first_block_width == 8
  assert plan.layers == (ms.LayerSpec(8, 1, True), ms.LayerSpec(8, 1, True),
                         ms.LayerSpec(16, 2, False), ms.LayerSpec(16, 1, True))
  assert plan.head_width == 16
  # The head widens only with a multiplier above 1 (ProxylessNAS).
  assert ms.network_plan(width_multiplier=1.4).head_width == 1792


def test_residual_where_stride_one_keeps_the_width():
  """ProxylessNAS gives a layer the identity shortcut and `zero` when its
  stride is 1 and its input is as wide as it, whatever its position."""
  config = cifar10_mobilenet.get_config().model
  plan = ms.network_plan(config.stage_layers, config.width_multiplier,
                         config.stem, config.head_channels)
  widths = [plan.first_block_width] + [l.features for l in plan.layers]
  assert [l.residual for l in plan.layers] == [
      l.stride == 1 and widths[i] == l.features
      for i, l in enumerate(plan.layers)]
  # Stage 1 at stride 1 keeps the first block's 8 channels; stage 4's first
  # layer keeps stage 3's 24 (80 and 96 both round to 24 at width 0.25).
  assert [i for i, l in enumerate(plan.layers) if l.residual] == [
      0, 1, 3, 5, 6]
  (_, shapes), = ms.layout(plan)
  assert shapes[0].ops == shapes[6].ops == ms.OPS
  assert shapes[2].ops == ms.MBCONV_OPS


@pytest.mark.parametrize('kwargs,match', [
    ({'stage_layers': (4, 4)}, 'stage_layers'),
    ({'stage_layers': (0,) * 6}, 'stage_layers'),
    ({'stage_layers': (1, -1, 1, 1, 1, 1)}, 'stage_layers'),
    ({'stem': 'tiny'}, 'model.stem'),
    ({'width_multiplier': 0.0}, 'width_multiplier'),
])
def test_plan_errors_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ms.network_plan(**kwargs)


def test_layout_one_edge_per_layer_zero_where_the_shape_is_kept():
  (group, shapes), = ms.layout(ms.network_plan(TINY_STAGES))
  assert group == ms.GROUP
  assert [s.num_edges for s in shapes] == [1] * 4
  assert [s.ops for s in shapes] == [ms.MBCONV_OPS, ms.OPS] * 2
  assert len(ms.MBCONV_OPS) == 6 and ms.OPS[-1] == ms.ZERO
  assert [s.size for s in shapes] == [6, 7, 6, 7]
  dense = ss.layout_dense_support(
      ms.layout(ms.network_plan(TINY_STAGES)))[ms.GROUP]
  assert dense[1] == tuple((0, op) for op in ms.OPS)


def test_genotype_round_trip_and_support():
  genotype = ms.PROXYLESS_MOBILE
  assert len(genotype.layers) == sum(ms.STAGE_LAYERS)
  assert ms.MobileNetGenotype.from_json(genotype.to_json()) == genotype
  support = ms.genotype_to_support(genotype)
  assert support[ms.GROUP][2] == ((0, ms.ZERO),)
  assert ms.support_to_genotype(support) == genotype
  two_ops = ms.MobileNetGenotype(
      (('mbconv_7x7_e6', 'mbconv_3x3_e3'), (ms.ZERO,), ('mbconv_5x5_e3',),
       ('mbconv_3x3_e6',)))
  tiny = ms.network_plan(TINY_STAGES)
  support = ms.genotype_to_support(two_ops, tiny)
  assert support[ms.GROUP][0] == ((0, 'mbconv_3x3_e3'), (0, 'mbconv_7x7_e6'))
  assert ms.genotype_to_support(ms.support_to_genotype(support),
                                tiny) == support
  # The JSON written by a run (with α) reads back.
  written = json.loads(two_ops.to_json())
  written['alphas'] = {ms.GROUP: [[1.0, 0.5], [1.0], [1.0], [1.0]]}
  assert ms.MobileNetGenotype.from_json(json.dumps(written)) == two_ops


@pytest.mark.parametrize('layers,match', [
    ((('mbconv_3x3_e3',),) * 3, 'model.stage_layers'),
    (((ms.ZERO,), (ms.ZERO,), ('mbconv_3x3_e3',), ('mbconv_3x3_e3',)),
     'not a candidate of this layer'),
    ((('conv_9x9',),) + (('mbconv_3x3_e3',),) * 3, 'not a candidate'),
    (((),) + (('mbconv_3x3_e3',),) * 3, 'distinct ops'),
])
def test_genotype_errors(layers, match):
  with pytest.raises(ValueError, match=match):
    ms.genotype_to_support(ms.MobileNetGenotype(layers),
                           ms.network_plan(TINY_STAGES))


def test_a_genotype_of_the_other_space_says_so():
  with pytest.raises(ValueError, match="model.space='darts_cell'"):
    ms.MobileNetGenotype.from_json(ss.DARTS_V2.to_json())
  with pytest.raises(ValueError, match="model.space='mobilenet'"):
    ss.Genotype.from_json(ms.PROXYLESS_MOBILE.to_json())
  with pytest.raises(ValueError, match='needs the key layers'):
    ms.MobileNetGenotype.from_json('{"cells": []}')
