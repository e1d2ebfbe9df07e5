"""The MobileNet-like search space of ProxylessNAS (Cai et al., 2019).

The paper's Table 2 "M" rows search this space (docs/fidelity.md, 'NAS',
'MobileNet space'). The network is a chain: a 3×3 stem convolution, a fixed
MBConv (expansion 1, 3×3) to 16 channels, then the searchable inverted-
residual layers of `STAGES`, then a 1×1 convolution to the head width,
global average pooling and the classifier:

    stage  width  layers  stride   (ProxylessNAS-mobile)
      1     32      4       2
      2     40      4       2
      3     80      4       2
      4     96      4       1
      5    192      4       2
      6    320      1       1

Every searchable layer chooses among MBConv with kernel k ∈ {3, 5, 7} and
expansion e ∈ {3, 6} (`MBCONV_OPS`). As in ProxylessNAS, a layer that keeps
its input's shape (stride 1, input width = its width: every layer but a
stage's first, and a stage's first where neither changes, e.g. the CIFAR
stem's first stage at width 0.25) has an identity residual and may also
choose `zero` (the layer is skipped: output = input):

    shape changes:  y = Σ_{o ∈ S} α_o · MBConv_o(x)
    shape kept:     y = x + Σ_{o ∈ S} α_o · MBConv_o(x)     (zero: 0)

In the terms of `search_space`, the space is one group, 'layers', whose
nodes (one per searchable layer) have a single input edge (edge 0) carrying
6 or 7 candidate ops; a support keeps `ops_per_layer` of them (1: one op
per layer). Widths scale with a width multiplier, rounded as MobileNetV2
does (`make_divisible`), and the number of layers per stage is configurable
(a stage of 0 layers is left out), so that a CPU network can be tiny.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Sequence

from dha_jax.nas.search_space import CellSupport, Layout, NodeShape

GROUP = 'layers'
ZERO = 'zero'
KERNELS = (3, 5, 7)
EXPANSIONS = (3, 6)
# {op name: (kernel, expansion)}, in ProxylessNAS' candidate order.
MBCONV_SHAPES: dict[str, tuple[int, int]] = {
    f'mbconv_{k}x{k}_e{e}': (k, e) for k in KERNELS for e in EXPANSIONS}
MBCONV_OPS: tuple[str, ...] = tuple(MBCONV_SHAPES)
# `zero` last, so that ties of the support selection go to a convolution.
OPS: tuple[str, ...] = MBCONV_OPS + (ZERO,)
# (width, layers, stride) of the searchable stages (ProxylessNAS-mobile).
STAGES: tuple[tuple[int, int, int], ...] = (
    (32, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1))
STAGE_LAYERS: tuple[int, ...] = tuple(layers for _, layers, _ in STAGES)
STEM_WIDTH = 32
FIRST_BLOCK_WIDTH = 16
FIRST_BLOCK_KERNEL = 3
HEAD_WIDTH = 1280
# MobileNetV2 / ProxylessNAS round every width to a multiple of this.
CHANNEL_DIVISOR = 8
# `make_divisible` never rounds a width down by more than this fraction.
MAX_ROUND_DOWN = 0.1
# Stride of the stem and of the first stage: ImageNet-style (224 px) or, for
# 32-px CIFAR images, 1 in both (as MobileNetV2's CIFAR variants), so that
# the network reduces 32 px to 4 px instead of to 1 px.
STEMS = ('imagenet', 'cifar')
IMAGENET_STRIDE = 2


def make_divisible(width: float, divisor: int = CHANNEL_DIVISOR) -> int:
  """`width` rounded to the nearest multiple of `divisor` (at least
  `divisor`), and up when that would lose more than 10 % (MobileNetV2)."""
  rounded = max(divisor, int(width + divisor / 2) // divisor * divisor)
  if rounded < (1 - MAX_ROUND_DOWN) * width:
    rounded += divisor
  return rounded


class LayerSpec(NamedTuple):
  """One searchable layer: its output width, stride and whether it has the
  identity residual (stride 1 and as wide as its input; it may then choose
  `zero`)."""
  features: int
  stride: int
  residual: bool

  @property
  def ops(self) -> tuple[str, ...]:
    return OPS if self.residual else MBCONV_OPS


class NetworkPlan(NamedTuple):
  """The fixed widths and strides of a MobileNet-space network.

  Attributes:
    stem_width, stem_stride: the first 3×3 convolution.
    first_block_width: the fixed MBConv (expansion 1) after the stem.
    layers: the searchable layers, in order.
    head_width: the 1×1 convolution before pooling.
  """
  stem_width: int
  stem_stride: int
  first_block_width: int
  layers: tuple[LayerSpec, ...]
  head_width: int


def check_stage_layers(stage_layers: Sequence[int]) -> tuple[int, ...]:
  """`stage_layers` as a tuple; ValueError naming the config field unless
  it has one non-negative count per stage and at least one layer."""
  stage_layers = tuple(int(n) for n in stage_layers)
  if (len(stage_layers) != len(STAGES) or min(stage_layers) < 0
      or not sum(stage_layers)):
    raise ValueError(
        f'model.stage_layers={stage_layers} must give {len(STAGES)} '
        f'non-negative layer counts, one per stage of {STAGES} (width, '
        f'layers, stride), at least one layer in all; ProxylessNAS uses '
        f'{STAGE_LAYERS}.')
  return stage_layers


def network_plan(stage_layers: Sequence[int] = STAGE_LAYERS,
                 width_multiplier: float = 1.0, stem: str = 'imagenet',
                 head_width: int = HEAD_WIDTH) -> NetworkPlan:
  """The widths and strides of the network (ProxylessNAS' rules).

  Every width but the head's is `make_divisible(width · width_multiplier)`;
  the head keeps `head_width` unless the multiplier exceeds 1. A stage's
  stride applies to its first layer; a stage of 0 layers is left out. A
  layer of stride 1 whose input is as wide as it has the identity residual.

  Args:
    stage_layers: searchable layers per stage of `STAGES`.
    width_multiplier: scales every width (> 0).
    stem: one of `STEMS` ('cifar': stride 1 in the stem and stage 1).
    head_width: width of the 1×1 convolution before pooling.

  Returns:
    The `NetworkPlan`.
  """
  stage_layers = check_stage_layers(stage_layers)
  if stem not in STEMS:
    raise ValueError(f'model.stem must be one of {STEMS} for the MobileNet '
                     f'space, got {stem!r}')
  if width_multiplier <= 0 or head_width <= 0:
    raise ValueError(f'model.width_multiplier ({width_multiplier}) and '
                     f'model.head_channels ({head_width}) must be positive')
  scale = lambda width: make_divisible(width * width_multiplier)
  layers = []
  in_width = first_block_width = scale(FIRST_BLOCK_WIDTH)
  for stage, ((width, _, stage_stride), count) in enumerate(
      zip(STAGES, stage_layers)):
    if stem == 'cifar' and stage == 0:
      stage_stride = 1
    features = scale(width)
    for i in range(count):
      stride = stage_stride if i == 0 else 1
      layers.append(LayerSpec(features, stride,
                              stride == 1 and in_width == features))
      in_width = features
  return NetworkPlan(
      stem_width=scale(STEM_WIDTH),
      stem_stride=IMAGENET_STRIDE if stem == 'imagenet' else 1,
      first_block_width=first_block_width, layers=tuple(layers),
      head_width=(make_divisible(head_width * width_multiplier)
                  if width_multiplier > 1 else head_width))


def layout(plan: NetworkPlan) -> Layout:
  """The searchable nodes of `plan`: one per layer, one edge, its candidate
  ops."""
  return ((GROUP, tuple(NodeShape(1, spec.ops) for spec in plan.layers)),)


class MobileNetGenotype(NamedTuple):
  """A MobileNet-space genotype: the ops of each searchable layer, in order
  (one op per layer unless the search kept more)."""
  layers: tuple[tuple[str, ...], ...]

  def to_json(self) -> str:
    return json.dumps({'space': 'mobilenet',
                       'layers': [list(ops) for ops in self.layers]},
                      indent=2)

  @classmethod
  def from_json(cls, text: str) -> 'MobileNetGenotype':
    """Parses the JSON written by `to_json`; raises ValueError naming the
    problem (a DARTS-cell genotype included)."""
    try:
      d = json.loads(text)
      if 'normal' in d:
        raise ValueError(
            "this genotype is of the DARTS cell space (it has cells); set "
            "model.space='darts_cell' to train it, or pass the genotype.json "
            'of a MobileNet-space run')
      return cls(layers=tuple(tuple(str(op) for op in ops)
                              for ops in d['layers']))
    except (KeyError, TypeError) as e:
      raise ValueError('A MobileNet genotype JSON needs the key layers: a '
                       f'list of op-name lists, one per layer: {e}') from e


# ProxylessNAS-mobile's searched network (Cai et al., 2019; 4.08 M parameters
# at 224 px, 1000 classes), over `STAGE_LAYERS`.
PROXYLESS_MOBILE = MobileNetGenotype(layers=tuple((op,) for op in (
    'mbconv_5x5_e3', 'mbconv_3x3_e3', ZERO, ZERO,
    'mbconv_7x7_e3', 'mbconv_3x3_e3', 'mbconv_5x5_e3', 'mbconv_5x5_e3',
    'mbconv_7x7_e6', 'mbconv_5x5_e3', 'mbconv_5x5_e3', 'mbconv_5x5_e3',
    'mbconv_5x5_e6', 'mbconv_5x5_e3', 'mbconv_5x5_e3', 'mbconv_5x5_e3',
    'mbconv_7x7_e6', 'mbconv_7x7_e6', 'mbconv_7x7_e3', 'mbconv_7x7_e3',
    'mbconv_7x7_e6')))

GENOTYPES = {'proxyless_mobile': PROXYLESS_MOBILE}


def genotype_to_support(genotype: MobileNetGenotype,
                        plan: NetworkPlan | None = None
                        ) -> dict[str, CellSupport]:
  """The support {'layers': ((0, op), ...) per layer} of a genotype,
  validated against the layers of `plan` (None: `network_plan()`)."""
  layers = (network_plan() if plan is None else plan).layers
  if len(genotype.layers) != len(layers):
    raise ValueError(
        f'the genotype has {len(genotype.layers)} layers, the network of '
        f'model.stage_layers has {len(layers)}: set model.stage_layers to '
        'that of the run that wrote the genotype')
  for i, (ops, spec) in enumerate(zip(genotype.layers, layers)):
    if not ops or len(set(ops)) != len(ops):
      raise ValueError(f'genotype layer {i}: {list(ops)} must name one or '
                       'more distinct ops')
    for op in ops:
      if op not in spec.ops:
        raise ValueError(f'genotype layer {i}: op {op!r} is not a candidate '
                         f'of this layer; its candidates are '
                         f'{list(spec.ops)} (`{ZERO}` needs a residual: '
                         'stride 1 and equal input and output widths, which '
                         'model.width_multiplier and model.stem decide)')
  return {GROUP: tuple(tuple(sorted((0, op) for op in ops))
                       for ops in genotype.layers)}


def support_to_genotype(support: dict[str, CellSupport]) -> MobileNetGenotype:
  """The genotype of a support: each layer's ops, in the support's order."""
  return MobileNetGenotype(layers=tuple(tuple(op for _, op in node)
                                        for node in support[GROUP]))

