"""CIFAR-10, DARTS cell space (paper Table 1, first column): DHA.

Paper-scale values are the ISTA-NAS / DARTS CIFAR-10 defaults (C=36, 20 cells,
auxiliary head, Cutout 16, batch 96, search up to 120 epochs, 600 epochs in
all; docs/fidelity.md, 'NAS' lists them; the DHA repository ships no config,
so its per-dataset values are unknown). On a CPU shrink it with overrides,
e.g. training the DARTS-V2 genotype on the real CIFAR-10 image folder:

  python -m dha_jax.main --config=configs/cifar10_cell.py --workdir=/tmp/c10 \
    --config.mode=train --config.dataset.source=image_folder \
    --config.dataset.path=../shared/data/cifar10/cifar10_jpeg.zip \
    --config.dataset.max_train_examples=5000 --config.num_train_steps=300 \
    --config.model.channels=8 --config.model.layers=3 \
    --config.model.auxiliary=False --config.preprocess.cutout_size=0 \
    --config.batch_size=64

With a prepared TFDS cifar10 instead: --config.dataset.source=tfds
--config.dataset.name=cifar10 [--config.dataset.data_dir=DIR].
"""

import ml_collections

from configs import default


def set_cifar10_data(config: ml_collections.ConfigDict) -> None:
  """CIFAR-10 at 32 px with the DARTS augmentation (pad-and-crop, flip,
  Cutout 16), from TFDS; the space's configs share it."""
  # Data: TFDS cifar10 by default (the paper's data); see the docstring for
  # the image-folder zip of this repository's machine.
  config.dataset.source = 'tfds'
  config.dataset.name = 'cifar10'
  config.dataset.image_size = 32
  # Half of the training split is the HPO split in ISTA-NAS' search; DHA's
  # reference reads val_ratio from a missing config: 0.1 keeps most data.
  config.dataset.val_ratio = 0.1
  # The usual CIFAR-10 channel statistics.
  config.dataset.mean = (0.4914, 0.4822, 0.4465)
  config.dataset.std = (0.2470, 0.2435, 0.2616)
  config.preprocess.mode = 'cifar'
  config.preprocess.pad = 4
  config.preprocess.flip = True
  config.preprocess.cutout_size = 16


def get_config() -> ml_collections.ConfigDict:
  # The reference's search dynamics (configs/default.py's base).
  config = default.get_base_config()
  set_cifar10_data(config)
  # The ISTA-NAS one-stage network: C=36, 20 cells, auxiliary head.
  config.model.channels = 36
  config.model.layers = 20
  config.model.auxiliary = True
  config.model.aux_weight = 0.4
  config.model.drop_path_prob = 0.2
  # DARTS evaluation schedule: SGD 0.025 cosine to 0, momentum 0.9, wd 3e-4.
  config.optimizer.learning_rate = 0.025
  config.optimizer.min_learning_rate = 0.0
  config.optimizer.weight_decay = 3e-4
  config.optimizer.grad_clip = 5.0
  # A learned η shares this schedule's annealing (docs/fidelity.md, 'HPO').
  config.optimizer.anneal_learned_lr = True
  config.batch_size = 96
  config.eval_batch_size = 500
  config.num_epochs = 600
  config.mode = 'dha'
  # The ISTA-NAS one-stage values: b ~ 1e-3·N(0, 1), a node freezes when
  # its x̂ moved by at most 1e-3 in an epoch (the absolute rule), a search
  # of at most 120 epochs, 3.7 M parameters at most (Eq. 1).
  config.nas.code_init_scale = 1e-3
  config.nas.dist_limit = 1e-3
  config.nas.search_epochs = 120
  config.nas.param_limit_mb = 3.7
  # Exact hypergradient (Eq. 4) on a separate batch of the HPO split.
  config.hpo.mode = 'exact'
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
