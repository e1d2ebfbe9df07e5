"""Search spaces by name (`config.model.space`): what the loop and the NAS
component need of one.

A `SearchSpace` is static data: its searchable nodes (`search_space.Layout`,
ISTA-NAS' problems, Eq. 5-7), the rule that turns a recovered x̂ into a
support (`ista.select_support`'s k_edges and ops_per_edge), and its
genotypes (parsing, conversion to and from a support, the built-in ones).
Two spaces exist (docs/design.md, 'Search spaces'):

  'darts_cell'  DARTS cells: 2 groups ('normal', 'reduce') of 4 nodes, node
                i with i + 2 input edges over the 7 ISTA-NAS ops; a support
                keeps 2 edges per node with 1 op each (`search_space`,
                `network.DARTSNetwork`).
  'mobilenet'   ProxylessNAS' chain of MBConv layers: 1 group ('layers'),
                one node per layer with 1 edge over 6 or 7 ops; a support
                keeps `nas.ops_per_layer` ops per layer (`mobilenet_space`,
                `mobilenet_network.MobileNetwork`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Union

import flax.linen as nn
import ml_collections

from dha_jax.nas import ista
from dha_jax.nas import mobilenet_network
from dha_jax.nas import mobilenet_space
from dha_jax.nas import network
from dha_jax.nas import search_space
from dha_jax.nas.search_space import Architecture, CellSupport, Layout

DARTS_CELL = 'darts_cell'
MOBILENET = 'mobilenet'
SPACES = (DARTS_CELL, MOBILENET)

Genotype = Union[search_space.Genotype, mobilenet_space.MobileNetGenotype]
Support = dict[str, CellSupport]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A search space as data (see the module docstring).

  Attributes:
    name: one of `SPACES`.
    ops: every candidate op of the space (the dense network builds all).
    layout: the searchable nodes by group, each with its edges and ops.
    k_edges: input edges each node keeps in a support.
    ops_per_edge: ops each kept edge carries.
    excluded_ops: ops built in the dense network but never selected.
    genotypes: the built-in genotypes by name (`model.genotype`).
    parse_genotype: genotype.json text → genotype; ValueError naming the
      problem (a genotype of the other space included).
    genotype_to_support: genotype → support, validated against the layout.
    support_to_genotype: support → genotype.
  """
  name: str
  ops: tuple[str, ...]
  layout: Layout
  k_edges: int
  ops_per_edge: int
  excluded_ops: tuple[str, ...]
  genotypes: Mapping[str, Genotype]
  parse_genotype: Callable[[str], Genotype]
  genotype_to_support: Callable[[Genotype], Support]
  support_to_genotype: Callable[[Support], Genotype]

  def dense_support(self) -> Support:
    """Every (edge, op) pair of every node: the dense super-network."""
    return search_space.layout_dense_support(self.layout)

  def genotype_architecture(self, genotype: Genotype) -> Architecture:
    """The fixed-architecture network of a genotype: α = 1 on its pairs."""
    return search_space.make_architecture(self.genotype_to_support(genotype))


def cell_space(include_none: bool = False) -> SearchSpace:
  """The DARTS cell space over the 7 ISTA-NAS ops (and `none`, never
  selected, with `include_none`)."""
  ops = search_space.primitives(include_none)
  return SearchSpace(
      name=DARTS_CELL, ops=ops, layout=search_space.cell_layout(ops),
      k_edges=ista.DEFAULT_K_EDGES, ops_per_edge=1,
      excluded_ops=(search_space.NONE_OP,),
      genotypes=search_space.GENOTYPES,
      parse_genotype=search_space.Genotype.from_json,
      genotype_to_support=search_space.genotype_to_support,
      support_to_genotype=search_space.support_to_genotype)


def mobilenet(plan: mobilenet_space.NetworkPlan,
              ops_per_layer: int = 1) -> SearchSpace:
  """The MobileNet space over the searchable layers of `plan`, keeping
  `ops_per_layer` ops per layer."""
  return SearchSpace(
      name=MOBILENET, ops=mobilenet_space.OPS,
      layout=mobilenet_space.layout(plan), k_edges=1,
      ops_per_edge=ops_per_layer, excluded_ops=(),
      genotypes=mobilenet_space.GENOTYPES,
      parse_genotype=mobilenet_space.MobileNetGenotype.from_json,
      genotype_to_support=functools.partial(
          mobilenet_space.genotype_to_support, plan=plan),
      support_to_genotype=mobilenet_space.support_to_genotype)


def check_space_name(name: str) -> None:
  """Raises ValueError, naming the config field, unless `name` is known."""
  if name not in SPACES:
    raise ValueError(f'model.space={name!r} is not a search space; choose '
                     f'one of {SPACES}.')


def from_config(config: ml_collections.ConfigDict) -> SearchSpace:
  """The space of `config.model.space`, with the NAS fields that shape it.

  Raises:
    ValueError: on an unknown space, or a field that the space does not
      have set to a value that would change it (the message says which).
  """
  name = config.model.space
  check_space_name(name)
  ops_per_layer = config.nas.ops_per_layer
  if name == DARTS_CELL:
    if ops_per_layer != 1:
      raise ValueError(
          f'nas.ops_per_layer={ops_per_layer} is the sparsity of a MobileNet '
          'layer; a DARTS cell node keeps 2 edges of 1 op: set '
          "nas.ops_per_layer=1, or model.space='mobilenet'.")
    return cell_space(config.nas.include_none)
  if not 1 <= ops_per_layer <= len(mobilenet_space.MBCONV_OPS):
    raise ValueError(
        f'nas.ops_per_layer={ops_per_layer} must be in [1, '
        f'{len(mobilenet_space.MBCONV_OPS)}], the candidates of a layer '
        'without a residual.')
  if config.nas.include_none:
    raise ValueError("nas.include_none adds DARTS' `none` op to the cell "
                     "space; the MobileNet space has `zero` (skip a layer) "
                     'already: set nas.include_none=False.')
  return mobilenet(_mobilenet_plan(config.model), ops_per_layer)


def _mobilenet_plan(model: ml_collections.ConfigDict
                    ) -> mobilenet_space.NetworkPlan:
  return mobilenet_space.network_plan(
      model.stage_layers, model.width_multiplier, model.stem,
      model.head_channels)


def create_network(model: ml_collections.ConfigDict,
                   num_classes: int) -> nn.Module:
  """The network of `model.space`, sized by the `model` config fields.

  Raises:
    ValueError: on an unknown space, or a field the network does not have
      (the MobileNet network has no auxiliary head).
  """
  check_space_name(model.space)
  if model.space == DARTS_CELL:
    return network.DARTSNetwork(num_classes=num_classes,
                                channels=model.channels, layers=model.layers,
                                auxiliary=model.auxiliary, stem=model.stem,
                                depthwise=model.depthwise,
                                pooling=model.pooling)
  if model.auxiliary:
    raise ValueError("model.auxiliary adds DARTS' auxiliary head; the "
                     'MobileNet network has none: set model.auxiliary=False.')
  return mobilenet_network.MobileNetwork(num_classes=num_classes,
                                         plan=_mobilenet_plan(model),
                                         depthwise=model.depthwise)
