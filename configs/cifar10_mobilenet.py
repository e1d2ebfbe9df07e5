"""CIFAR-10, MobileNet-like space, CPU scale: DHA in about 6 minutes.

The ProxylessNAS chain of MBConv layers (`model.space='mobilenet'`,
docs/design.md, 'Search spaces') made tiny for two CPU cores: a quarter of
the widths, 9 searchable layers (2 in each of the first three stages, 1 in
the others), a 256-wide head, on 5000 images of the CIFAR-10 image-folder
zip at 32 px, with the short-run search dynamics of configs/default.py
(docs/fidelity.md, 'Settings that depart from the paper for short runs'),
α normalised over all layers. The recorded run took 6 min on two CPU
cores and reached 0.30 test accuracy (experiments/RESULTS.md, 'End-to-end
runs'). From the repository root:

  python -m dha_jax.main --config=configs/cifar10_mobilenet.py \
    --workdir=/tmp/c10_mobilenet

Then train the searched genotype from scratch (`train` mode):

  python -m dha_jax.main --config=configs/cifar10_mobilenet.py \
    --workdir=/tmp/c10_mobilenet_train --config.mode=train \
    --config.model.genotype=/tmp/c10_mobilenet/genotype.json

The paper-scale MobileNet values are in configs/imagenet_mobilenet.py.
"""

import ml_collections

from configs import cifar10_cell
from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.mode = 'dha'
  cifar10_cell.set_cifar10_data(config)
  config.dataset.source = 'image_folder'
  config.dataset.path = '../shared/data/cifar10/cifar10_jpeg.zip'
  config.dataset.max_train_examples = 5000
  config.dataset.max_test_examples = 2000
  config.preprocess.cutout_size = 0
  config.model.space = 'mobilenet'
  # Stride 1 in the stem and the first stage: 32 px end at 4 px.
  config.model.stem = 'cifar'
  config.model.stage_layers = (2, 2, 2, 1, 1, 1)
  config.model.width_multiplier = 0.25
  config.model.head_channels = 256
  config.model.genotype = 'proxyless_mobile'
  config.model.auxiliary = False
  config.optimizer.learning_rate = 0.05
  config.batch_size = 64
  config.eval_batch_size = 500
  # 8 epochs of 70 steps, the first 4 of them searching.
  config.num_train_steps = 560
  # A MobileNet layer has 6-7 candidates: codes of length 4 compress them.
  config.nas.proj_dims = 4
  # One op per layer: α is normalised over all layers, not per layer (per
  # layer it would be ±1, and b would get no gradient).
  config.nas.alpha_norm = 'group_mean_abs'
  config.nas.search_steps = 280
  config.nas.min_freeze_steps = 140
  config.log_every_steps = 35
  config.checkpoint_every_steps = 280
  return config
