"""Sport8, DARTS cell space (paper Table 1): DHA on an image folder.

Sport8 (and MIT67) ship as `split/class/image` folders; point
`dataset.path` at the folder or its .zip. 224-pixel random-resized crops and
flips for training, a centre crop for evaluation, the ImageNet-style network
(the reference sizes these datasets' networks as NetworkImageNet, C=36,
8 cells, auxiliary head):

  python -m dha_jax.main --config=configs/sport8_cell.py --workdir=DIR \
    --config.dataset.path=/data/sport8.zip
"""

import ml_collections

from configs import imagenet_cell

NUM_EPOCHS = 600


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_cell.get_config()
  config.dataset.source = 'image_folder'
  config.dataset.name = 'sport8'
  config.dataset.path = ''
  config.dataset.test_split = 'test'
  config.dataset.val_ratio = 0.1
  config.preprocess.cutout_size = 16
  config.model.channels = 36
  config.model.layers = 8
  config.optimizer.learning_rate = 0.025
  config.optimizer.weight_decay = 3e-4
  config.batch_size = 96
  # Full-size HPO batches, as the reference on these datasets (only its
  # ImageNet ones are half size): the small HPO splits (Flowers-102's holds
  # 102 images) would hold no batch of ImageNet's 512.
  config.heldout_batch_size = 0
  config.eval_batch_size = 256
  config.num_epochs = NUM_EPOCHS
  config.nas.search_epochs = 120
  config.hpo.lr_bounds = (1e-3, 0.1)
  config.hpo.wd_bounds = (1e-5, 1e-2)
  return config
