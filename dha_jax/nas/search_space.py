"""The architecture as an explicit PyTree, and the DARTS cell search space.

Any search space here is a set of *groups* of searchable *nodes*; a node has
input edges, each of which may carry any of the node's candidate ops
(`NodeShape`; a space's `Layout` lists them by group). The DARTS cell space
has two groups, the normal and the reduction cell, of 4 nodes each; the
MobileNet-like space (`mobilenet_space`) one group of layers with a single
input edge each.

A cell has `NUM_NODES` intermediate nodes; node i (0-based) reads from i + 2
inputs (the two previous cells' outputs, then nodes 0..i-1), so a cell has
2 + 3 + 4 + 5 = 14 edges. Every edge can carry any op of the search space's
primitive list. A *support* says which (edge, op) pairs of each node exist;
an `Architecture` adds one real-valued weight α per supported pair:

    node_i = Σ_{(e, o) ∈ S_i} α_{i,(e,o)} · op_o(input_e)

The support is static PyTree metadata (a hashable tuple), the α values are
array leaves. Changing the support changes the tree structure, so `jax.jit`
retraces and compiles once per support and caches the result; changing α
never recompiles. A fixed genotype is the special case α = 1 with two pairs
per node on two distinct edges.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

# The 7 ISTA-NAS candidate operations, in the reference order
# (docs/fidelity.md, 'NAS'). `none` is prepended when `include_none` is set.
ISTA_PRIMITIVES: tuple[str, ...] = (
    'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
    'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
NONE_OP = 'none'
NUM_NODES = 4
NUM_INPUTS_FIRST_NODE = 2
CELL_TYPES: tuple[str, ...] = ('normal', 'reduce')


def primitives(include_none: bool = False) -> tuple[str, ...]:
  """Candidate ops of the search space: the 7 ISTA-NAS ops, optionally `none`."""
  return ((NONE_OP,) if include_none else ()) + ISTA_PRIMITIVES


def num_edges(node: int) -> int:
  """Number of input edges of intermediate node `node` (0-based): node + 2."""
  return node + NUM_INPUTS_FIRST_NODE


# A node's support: sorted (edge, op_name) pairs; a cell's (a group's): one
# per node. A space's support is {group: CellSupport}.
NodeSupport = tuple[tuple[int, str], ...]
CellSupport = tuple[NodeSupport, ...]
SupportItems = tuple[tuple[str, CellSupport], ...]


class NodeShape(NamedTuple):
  """A searchable node: `num_edges` inputs, each able to carry any of `ops`.

  Its architecture vector x ∈ R^{size} is laid out edge-major:
  `x.reshape(num_edges, len(ops))[edge, op]`.
  """
  num_edges: int
  ops: tuple[str, ...]

  @property
  def size(self) -> int:
    return self.num_edges * len(self.ops)


# The searchable nodes of a space: (group, (NodeShape, ...)) items.
Layout = tuple[tuple[str, tuple[NodeShape, ...]], ...]


def cell_layout(ops: Sequence[str]) -> Layout:
  """The DARTS cells' nodes: node i of each cell has i + 2 edges over `ops`."""
  nodes = tuple(NodeShape(num_edges(n), tuple(ops)) for n in range(NUM_NODES))
  return tuple((cell, nodes) for cell in CELL_TYPES)


def support_items(support: dict[str, CellSupport]) -> SupportItems:
  """A support as hashable static metadata: its groups in sorted order."""
  return tuple((group, support[group]) for group in sorted(support))


class Genotype(NamedTuple):
  """A DARTS genotype: per node two (op_name, input_index) pairs."""
  normal: tuple[tuple[str, int], ...]
  normal_concat: tuple[int, ...]
  reduce: tuple[tuple[str, int], ...]
  reduce_concat: tuple[int, ...]

  def to_json(self) -> str:
    return json.dumps(
        {'normal': [list(p) for p in self.normal],
         'normal_concat': list(self.normal_concat),
         'reduce': [list(p) for p in self.reduce],
         'reduce_concat': list(self.reduce_concat)}, indent=2)

  @classmethod
  def from_json(cls, text: str) -> 'Genotype':
    """Parses the JSON written by `to_json`; raises ValueError if malformed."""
    try:
      d = json.loads(text)
      g = cls(normal=tuple((str(o), int(i)) for o, i in d['normal']),
              normal_concat=tuple(int(i) for i in d['normal_concat']),
              reduce=tuple((str(o), int(i)) for o, i in d['reduce']),
              reduce_concat=tuple(int(i) for i in d['reduce_concat']))
    except (KeyError, TypeError, ValueError) as e:
      if isinstance(e, KeyError) and 'layers' in d:
        raise ValueError(
            'This genotype is of the MobileNet space (it has `layers`, not '
            "cells): set model.space='mobilenet' to train it, or pass the "
            'genotype.json of a DARTS-cell run.') from e
      raise ValueError(
          'A genotype JSON needs keys normal, normal_concat, reduce, '
          f'reduce_concat with [op_name, input_index] pairs: {e}') from e
    genotype_to_support(g)  # validates ops and indices
    return g


# DARTS-V2 (Liu et al., 2019), the genotype built into the package.
DARTS_V2 = Genotype(
    normal=(('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0),
            ('skip_connect', 0), ('dil_conv_3x3', 2)),
    normal_concat=(2, 3, 4, 5),
    reduce=(('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
            ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2),
            ('skip_connect', 2), ('max_pool_3x3', 1)),
    reduce_concat=(2, 3, 4, 5))

GENOTYPES = {'darts_v2': DARTS_V2}


def _check_cell(pairs: Sequence[tuple[str, int]], ops: Sequence[str],
                name: str) -> None:
  if len(pairs) != 2 * NUM_NODES:
    raise ValueError(f'genotype.{name} needs {2 * NUM_NODES} (op, input) '
                     f'pairs (2 per node), got {len(pairs)}')
  for k, (op, inp) in enumerate(pairs):
    node = k // 2
    if op not in ops:
      raise ValueError(f'genotype.{name}[{k}]: unknown op {op!r}; '
                       f'known ops are {list(ops)}')
    if not 0 <= inp < num_edges(node):
      raise ValueError(f'genotype.{name}[{k}]: input {inp} out of range '
                       f'[0, {num_edges(node)}) for node {node}')
  for node in range(NUM_NODES):
    first, second = pairs[2 * node], pairs[2 * node + 1]
    if tuple(first) == tuple(second):
      # The network would build one op twice under one name.
      raise ValueError(
          f'genotype.{name}[{2 * node}:{2 * node + 2}]: node {node} has the '
          f'pair {tuple(first)} twice; a node needs two distinct (op, input) '
          'pairs')


def genotype_to_support(genotype: Genotype) -> dict[str, CellSupport]:
  """Converts a genotype to per-cell-type supports (validating it)."""
  ops = primitives(include_none=False)
  out = {}
  for cell, pairs in (('normal', genotype.normal),
                      ('reduce', genotype.reduce)):
    _check_cell(pairs, ops, cell)
    out[cell] = tuple(
        tuple(sorted((inp, op) for op, inp in pairs[2 * n:2 * n + 2]))
        for n in range(NUM_NODES))
  return out


def support_to_genotype(support: dict[str, CellSupport]) -> Genotype:
  """Converts supports with two pairs per node into a DARTS genotype."""
  cells = {}
  for cell in CELL_TYPES:
    pairs = []
    for node in support[cell]:
      if len(node) != 2:
        raise ValueError(f'a genotype needs 2 (edge, op) pairs per node, '
                         f'got {node}')
      pairs.extend((op, edge) for edge, op in node)
    cells[cell] = tuple(pairs)
  concat = tuple(range(2, 2 + NUM_NODES))
  return Genotype(cells['normal'], concat, cells['reduce'], concat)


def layout_dense_support(layout: Layout) -> dict[str, CellSupport]:
  """Every (edge, op) pair of every node of `layout`, edge-major: the dense
  all-ops super-network."""
  node = lambda shape: tuple((e, o) for e in range(shape.num_edges)
                             for o in shape.ops)
  return {group: tuple(node(shape) for shape in nodes)
          for group, nodes in layout}


def dense_support(ops: Sequence[str]) -> dict[str, CellSupport]:
  """Every (edge, op) pair of every cell node: the dense DARTS super-network."""
  return layout_dense_support(cell_layout(ops))


def changed_pairs(before: dict[str, CellSupport],
                  after: dict[str, CellSupport]) -> int:
  """How many (edge, op) pairs of `after` are not in `before`, over all
  nodes of all groups (0 when the supports are equal; 16 pairs in all for
  two pairs per cell node)."""
  return sum(len(set(new) - set(old))
             for group in after
             for old, new in zip(before[group], after[group]))


def random_genotype(rng: np.random.Generator,
                    ops: Sequence[str] = ISTA_PRIMITIVES) -> Genotype:
  """A genotype drawn uniformly from the space the ISTA search selects in.

  Every node of both cells keeps two distinct input edges, drawn uniformly,
  each with an op drawn uniformly from `ops` (the baseline of a search:
  random architectures of the same space).
  """
  support = {}
  for cell in CELL_TYPES:
    nodes = []
    for node in range(NUM_NODES):
      edges = rng.choice(num_edges(node), size=2, replace=False)
      nodes.append(tuple(sorted((int(e), str(ops[rng.integers(len(ops))]))
                                for e in edges)))
    support[cell] = tuple(nodes)
  return support_to_genotype(support)


@flax.struct.dataclass
class Architecture:
  """An architecture as a PyTree: static support, α values as leaves.

  Attributes:
    weights: {group: (α_0, α_1, ...)}, e.g. {'normal': (α_0, ..., α_3),
      'reduce': (...)} for cells; α_i of shape [len(support[group][i])],
      aligned with the support's pairs.
    support: static metadata, a tuple of (group, CellSupport) items; part
      of the tree structure, so a new support is a new jit cache entry.
  """
  weights: dict[str, tuple[jnp.ndarray, ...]]
  support: SupportItems = flax.struct.field(pytree_node=False)

  def cell_support(self, cell: str) -> CellSupport:
    return dict(self.support)[cell]

  @property
  def support_dict(self) -> dict[str, CellSupport]:
    return dict(self.support)


def make_architecture(support: dict[str, CellSupport],
                      weights: dict[str, Sequence[jnp.ndarray]] | None = None,
                      ) -> Architecture:
  """Builds an `Architecture` over the groups of `support`; α defaults to
  one for every supported pair."""
  if weights is None:
    weights = {c: [np.ones((len(n),), np.float32) for n in support[c]]
               for c in support}
  w = {c: tuple(jnp.asarray(a, jnp.float32) for a in weights[c])
       for c in support}
  for c in support:
    if len(w[c]) != len(support[c]):
      raise ValueError(f'α[{c}] has {len(w[c])} nodes, the support '
                       f'{len(support[c])}')
    for n, (a, s) in enumerate(zip(w[c], support[c])):
      if a.shape != (len(s),):
        raise ValueError(f'α[{c}][{n}] has shape {a.shape}, support has '
                         f'{len(s)} pairs')
  return Architecture(weights=w, support=support_items(support))


def genotype_architecture(genotype: Genotype) -> Architecture:
  """The fixed-architecture network of a genotype: α = 1 on its pairs."""
  return make_architecture(genotype_to_support(genotype))
