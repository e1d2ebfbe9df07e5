"""Executes experiments/colab_tpu.ipynb on CPU with a tiny config."""

import json
import os

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_colab_notebook_runs(tmp_path):
  nb = nbformat.read(os.path.join(REPO, 'experiments', 'colab_tpu.ipynb'),
                     as_version=4)
  workdir = str(tmp_path / 'wd')
  params = nb.cells[1]
  assert 'parameters' in params.metadata.get('tags', [])
  params.source += f'\nTINY = True\nWORKDIR = {workdir!r}\n'
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': REPO}})
  client.execute()
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['mode'] == 'dha'
  assert summary['train_steps'] == 4
  outputs = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                    for o in c.get('outputs', []))
  assert "'test_accuracy'" in outputs
