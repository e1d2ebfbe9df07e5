"""Paths the experiments and tests share, derived from the repository root.

The CIFAR-10 image-folder zip is looked for beside the repository, at
`../shared/data/cifar10/cifar10_jpeg.zip`, unless `$DHA_CIFAR10_ZIP` names
another copy.
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS_DIR = os.path.join(REPO_ROOT, 'experiments')
CIFAR10_ZIP = os.environ.get(
    'DHA_CIFAR10_ZIP', os.path.join(os.path.dirname(REPO_ROOT), 'shared',
                                    'data', 'cifar10', 'cifar10_jpeg.zip'))
