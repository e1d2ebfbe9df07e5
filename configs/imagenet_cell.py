"""ImageNet, DARTS cell space (paper Table 2, "DHA† (C)"): DHA.

TFDS imagenet2012 (prepared in the array_record format; the test split is
the official validation set), 224-pixel random-resized crops, the DARTS
ImageNet network (three stride-2 stem convolutions). Paper-scale values from
ISTA-NAS' ImageNet evaluation (C=48, 14 cells, batch 1024, lr 0.5, wd 3e-5,
250 epochs, docs/fidelity.md, 'Network and training'); searched directly on
ImageNet:

  python -m dha_jax.main --config=configs/imagenet_cell.py --workdir=DIR \
    --config.dataset.data_dir=/path/to/tensorflow_datasets
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  # The reference's search dynamics (configs/default.py's base).
  config = default.get_base_config()
  config.mode = 'dha'
  config.dataset.source = 'tfds'
  config.dataset.name = 'imagenet2012'
  config.dataset.test_split = 'validation'
  # Stored at 256 px (shorter side, centre square), cropped on device.
  config.dataset.image_size = 256
  config.dataset.val_ratio = 0.02
  config.dataset.mean = (0.485, 0.456, 0.406)
  config.dataset.std = (0.229, 0.224, 0.225)
  config.preprocess.mode = 'imagenet'
  config.preprocess.crop_size = 224
  config.preprocess.flip = True
  config.preprocess.cutout_size = 0  # the reference uses no Cutout here
  config.model.stem = 'imagenet'
  config.model.channels = 48
  config.model.layers = 14
  config.model.auxiliary = True
  config.model.aux_weight = 0.4
  config.model.drop_path_prob = 0.0
  config.optimizer.learning_rate = 0.5
  config.optimizer.weight_decay = 3e-5
  # A learned η shares this schedule's annealing (docs/fidelity.md, 'HPO').
  config.optimizer.anneal_learned_lr = True
  config.batch_size = 1024
  config.eval_batch_size = 1024
  # Exact hypergradient (Eq. 4) on a separate batch of the HPO split; the
  # reference's ImageNet HPO batches are half the training batch.
  config.hpo.mode = 'exact'
  config.heldout_batch_size = 512
  config.num_epochs = 250
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.nas.code_init_scale = 1e-3
  config.nas.dist_limit = 1e-3
  config.nas.search_epochs = 50
  # ImageNet learning rates: the η bounds bracket 0.5.
  config.hpo.lr_bounds = (0.05, 1.0)
  config.hpo.wd_bounds = (1e-6, 1e-3)
  return config
