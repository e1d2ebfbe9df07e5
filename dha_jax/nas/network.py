"""DARTS networks whose cells are built from an `Architecture` PyTree.

One Linen module serves every use in DHA:

* the fixed-architecture evaluation network of a genotype (α = 1 on two
  (edge, op) pairs per node): DARTS' `NetworkCIFAR` / `NetworkImageNet`;
* the sparse child network of one-stage ISTA-NAS (Eq. 7 gives real-valued α on
  the current support; only the supported ops are built and run);
* the dense all-ops super-network (the support holds every pair), used by
  tests and benchmarks as the reference for the sparse child network.

Every op's parameters are named by (node, edge, op) — `n{i}_e{e}_{op}` — so a
parameter tree initialised on the dense support contains the parameters of
every sparse support, and pruning it to the final genotype is a key lookup
(`prune_params`).

Op definitions follow DARTS (Liu et al., 2019) `operations.py`: ReLU-Conv-BN,
separable convs are two stacked depthwise-separable blocks, dilated convs use
dilation 2, pools have no parameters, a strided skip is FactorizedReduce.
BatchNorm is affine everywhere (the ISTA-NAS search net keeps the MixedOp BN
affine frozen at (1, 0) until the node freezes; here it trains throughout, which
is also what the reference's HPO/DHA modes end up doing, docs/fidelity.md,
'Network and training').
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dha_jax.nas import batch_chunks
from dha_jax.nas import batch_norm as batch_norm_lib
from dha_jax.nas import dense_conv
from dha_jax.nas import op_weights
from dha_jax.nas import pooling as pooling_lib
from dha_jax.nas import search_space
from dha_jax.nas import separable_conv
from dha_jax.nas.search_space import Architecture

BN_MOMENTUM = 0.9   # PyTorch's momentum=0.1 convention, flipped.
BN_EPSILON = 1e-5
STEM_MULTIPLIER = 3
AUX_CHANNELS = (128, 768)
AUX_POOL = 5
# The auxiliary head's 5×5 average pool strides by stem, as DARTS'
# AuxiliaryHeadCIFAR (8 px → 2) and AuxiliaryHeadImageNet (14 px → 5).
AUX_POOL_STRIDES = {'cifar': 3, 'imagenet': 2}


def batch_norm(train: bool, name: str | None = None,
               epsilon: float = BN_EPSILON) -> batch_norm_lib.BatchNorm:
  """Affine BatchNorm, batch statistics in training, running ones else
  (`nn.BatchNorm`'s function and variables; on CPU its reductions are
  kernels of our own, `nas/batch_norm.py`)."""
  return batch_norm_lib.BatchNorm(use_running_average=not train,
                                  momentum=BN_MOMENTUM, epsilon=epsilon,
                                  name=name)


class ReLUConvBN(nn.Module):
  """ReLU → 1×1 conv (no bias) → BN, the cells' preprocessing (DARTS'
  ReLUConvBN, which the cells only use with a 1×1 kernel); the ReLU and the
  product (of the strided input) are one op
  (`separable_conv.relu_pointwise_conv`), its parameter named as
  `nn.Conv`'s (Conv_0)."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kernel = separable_conv.ConvKernel(
        (1, 1, x.shape[-1], self.features), name='Conv_0')()
    s = self.stride
    return batch_norm(train)(
        separable_conv.relu_pointwise_conv(x[:, ::s, ::s], kernel))


class DilConv(nn.Module):
  """ReLU → depthwise k×k (dilated) → pointwise 1×1 → BN.

  The convs are one op (`separable_conv.relu_separable_conv`; on CPU two
  kernels, forward and backward); `depthwise` picks the depthwise conv's
  implementation (`depthwise.IMPLEMENTATIONS`). The parameters are named as
  with two `nn.Conv`s (Conv_0, Conv_1) whichever it is.
  """
  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  depthwise: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    depthwise_kernel = separable_conv.ConvKernel(
        (self.kernel, self.kernel, 1, c), name='Conv_0')()
    pointwise_kernel = separable_conv.ConvKernel(
        (1, 1, c, self.features), name='Conv_1')()
    x = separable_conv.relu_separable_conv(
        x, depthwise_kernel, pointwise_kernel, stride=self.stride,
        dilation=self.dilation,
        padding=self.dilation * (self.kernel - 1) // 2, impl=self.depthwise)
    return batch_norm(train)(x)


class SepConv(nn.Module):
  """Two stacked depthwise-separable blocks; only the first is strided."""
  features: int
  kernel: int
  stride: int = 1
  depthwise: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = DilConv(x.shape[-1], self.kernel, self.stride,
                depthwise=self.depthwise)(x, train)
    return DilConv(self.features, self.kernel, 1,
                   depthwise=self.depthwise)(x, train)


class FactorizedReduce(nn.Module):
  """Halves the resolution with two offset strided 1×1 convs of the ReLU,
  concatenated; each ReLU → conv of the strided input is one op
  (`separable_conv.relu_pointwise_conv`), its parameter named as `nn.Conv`'s
  (Conv_0, Conv_1)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # The second path reads the image shifted by one pixel; padding keeps odd
    # sizes aligned with the first path (a zero stays zero through the ReLU).
    shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1::2, 1::2]
    c, half = x.shape[-1], self.features // 2
    paths = []
    for i, (source, features) in enumerate(
        ((x[:, ::2, ::2], half), (shifted, self.features - half))):
      kernel = separable_conv.ConvKernel((1, 1, c, features),
                                         name=f'Conv_{i}')()
      paths.append(separable_conv.relu_pointwise_conv(source, kernel))
    return batch_norm(train)(jnp.concatenate(paths, axis=-1))


class CandidateOp(nn.Module):
  """One candidate operation of the search space, by name."""
  op: str
  features: int
  stride: int
  depthwise: str = 'auto'
  pooling: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    op, c, s = self.op, self.features, self.stride
    if op == 'none':
      return jnp.zeros_like(x[:, ::s, ::s])
    if op == 'max_pool_3x3':
      return pooling_lib.max_pool_3x3(x, s, self.pooling)
    if op == 'avg_pool_3x3':
      return pooling_lib.avg_pool_3x3(x, s, self.pooling)
    if op == 'skip_connect':
      return x if s == 1 else FactorizedReduce(c)(x, train)
    if op.startswith('sep_conv_'):
      return SepConv(c, int(op[-1]), s, self.depthwise)(x, train)
    if op.startswith('dil_conv_'):
      return DilConv(c, int(op[-1]), s, dilation=2,
                     depthwise=self.depthwise)(x, train)
    raise ValueError(f'unknown op {op!r}')


def as_drop_path_rate(rate: float | jax.Array | None) -> jax.Array | None:
  """A network's `drop_path_rate` argument as a float32 scalar, or None.

  None builds no drop-path ops at all: the search phases and
  `model.drop_path_prob = 0` need none, and a traced rate of 0, though it
  changes no value, still costs each op's output a random mask, a select
  and a division, forward and backward.
  """
  return None if rate is None else jnp.asarray(rate, jnp.float32)


def drop_path(x: jax.Array, rate: jax.Array, rng: jax.Array) -> jax.Array:
  """Drops whole examples' op outputs with probability `rate`, rescaled."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0], 1, 1, 1))
  return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Cell(nn.Module):
  """A DARTS cell whose node i sums α-weighted ops over its supported pairs.

  node_i = Σ_{(e, o) ∈ S_i} α_{i,k} · op_o(state_e)        (ISTA-NAS Eq. 7 use)
  Output: the channel concatenation of the 4 nodes (multiplier 4).
  """
  features: int
  reduction: bool
  reduction_prev: bool
  support: search_space.CellSupport
  depthwise: str = 'auto'
  pooling: str = 'auto'

  @nn.compact
  def __call__(self, s0: jax.Array, s1: jax.Array,
               alphas: Sequence[jax.Array], *, train: bool,
               drop_path_rate: jax.Array | None) -> jax.Array:
    c = self.features
    s0 = (FactorizedReduce(c, name='pre0')(s0, train) if self.reduction_prev
          else ReLUConvBN(c, name='pre0')(s0, train))
    s1 = ReLUConvBN(c, name='pre1')(s1, train)
    states = [s0, s1]
    for i, pairs in enumerate(self.support):
      node = 0.0
      for k, (edge, op) in enumerate(pairs):
        stride = 2 if self.reduction and edge < 2 else 1
        h = CandidateOp(op, c, stride, self.depthwise, self.pooling,
                        name=f'n{i}_e{edge}_{op}')(
            states[edge], train)
        is_identity = op == 'skip_connect' and stride == 1
        if train and not is_identity and drop_path_rate is not None:
          h = drop_path(h, drop_path_rate, self.make_rng('dropout'))
        node = node + op_weights.weight_output(alphas[i][k], h)
      states.append(node)
    return batch_chunks.concatenate_channels(states[2:])


class AuxiliaryHead(nn.Module):
  """DARTS' auxiliary classifier, made to accept small feature maps."""
  num_classes: int
  pool_stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.relu(x)
    window = min(AUX_POOL, x.shape[1])
    x = pooling_lib.window_average(x, window, self.pool_stride)
    x = dense_conv.Conv(AUX_CHANNELS[0], (1, 1), use_bias=False)(x)
    x = nn.relu(batch_norm(train)(x))
    kernel = min(2, x.shape[1])
    x = dense_conv.Conv(AUX_CHANNELS[1], (kernel, kernel), padding='VALID',
                 use_bias=False)(x)
    x = nn.relu(batch_norm(train)(x))
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def reduction_layers(layers: int) -> tuple[int, ...]:
  """Indices of the reduction cells: at 1/3 and 2/3 of the depth."""
  return tuple(sorted({layers // 3, 2 * layers // 3}))


class DARTSNetwork(nn.Module):
  """The DARTS network (CIFAR- or ImageNet-style stem) over an `Architecture`.

  Attributes:
    num_classes: classifier outputs.
    channels: C, the width of the first cells (doubled at each reduction).
    layers: number of cells.
    auxiliary: adds the auxiliary head after cell 2·layers//3 (training only).
    stem: 'cifar' (3×3 conv to 3C) or 'imagenet' (three stride-2 convs).
    depthwise: the depthwise convs' implementation
      (`depthwise.IMPLEMENTATIONS`; 'auto' by backend).
    pooling: the 3×3 pools' implementation (`pooling.IMPLEMENTATIONS`;
      'auto' by backend).

  Call: `apply(variables, x, arch, train=..., drop_path_rate=...)` with
  x float [N, H, W, 3] → (logits [N, classes], aux logits or None). With a
  `drop_path_rate` (None: no drop path) the dropout rng ('dropout') is
  needed in training.
  """
  num_classes: int
  channels: int
  layers: int
  auxiliary: bool = False
  stem: str = 'cifar'
  depthwise: str = 'auto'
  pooling: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, arch: Architecture, *, train: bool,
               drop_path_rate: float | jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    groups = {group: len(nodes) for group, nodes in arch.support}
    expected = {cell: search_space.NUM_NODES
                for cell in search_space.CELL_TYPES}
    if groups != expected:
      raise ValueError(
          f'the architecture has groups {groups} (nodes per group); the DARTS '
          f'network needs the cell groups {expected} (check model.space and '
          'the genotype)')
    c = self.channels
    rate = as_drop_path_rate(drop_path_rate)
    if self.stem == 'cifar':
      s = dense_conv.Conv(STEM_MULTIPLIER * c, (3, 3), padding=1,
                          use_bias=False, name='stem_conv')(x)
      s0 = s1 = batch_norm(train, 'stem_bn')(s)
      c_curr, reduction_prev = c, False
    elif self.stem == 'imagenet':
      s0 = dense_conv.Conv(c // 2, (3, 3), strides=2, padding=1, use_bias=False,
                    name='stem0_conv0')(x)
      s0 = nn.relu(batch_norm(train, 'stem0_bn0')(s0))
      s0 = dense_conv.Conv(c, (3, 3), strides=2, padding=1, use_bias=False,
                    name='stem0_conv1')(s0)
      s0 = batch_norm(train, 'stem0_bn1')(s0)
      s1 = dense_conv.Conv(c, (3, 3), strides=2, padding=1, use_bias=False,
                    name='stem1_conv')(nn.relu(s0))
      s1 = batch_norm(train, 'stem1_bn')(s1)
      c_curr, reduction_prev = c, True
    else:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    reductions = reduction_layers(self.layers)
    aux_logits = None
    for layer in range(self.layers):
      reduction = layer in reductions
      if reduction:
        c_curr *= 2
      cell_type = 'reduce' if reduction else 'normal'
      cell = Cell(c_curr, reduction, reduction_prev,
                  arch.cell_support(cell_type), self.depthwise, self.pooling,
                  name=f'cell{layer}')
      s0, s1 = s1, cell(s0, s1, arch.weights[cell_type], train=train,
                        drop_path_rate=rate)
      reduction_prev = reduction
      if self.auxiliary and train and layer == 2 * self.layers // 3:
        aux_logits = AuxiliaryHead(
            self.num_classes, AUX_POOL_STRIDES[self.stem],
            name='aux_head')(s1, train)
    logits = nn.Dense(self.num_classes, name='classifier')(
        jnp.mean(s1, axis=(1, 2)))
    return logits, aux_logits


def prune_params(tree: dict, pruned_shapes: dict) -> dict:
  """Keeps the entries of `tree` (params or batch stats) present in another.

  `pruned_shapes` is the tree of a network built on a smaller support (e.g.
  from `jax.eval_shape` of its init): names are shared, so pruning the dense
  super-network to the final genotype is a lookup. Raises KeyError if a leaf
  is missing.
  """
  if not isinstance(pruned_shapes, dict):
    return tree
  return {k: prune_params(tree[k], v) for k, v in pruned_shapes.items()}
