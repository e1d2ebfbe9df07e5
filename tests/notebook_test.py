"""Executes experiments/colab_tpu.ipynb on CPU with a tiny config."""

import ast
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


def test_colab_notebook_installs_as_the_readme():
  """A fresh Colab runtime installs with the README's pinned command."""
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = next(line.split('pip install', 1)[1].split() for line in f
                  if 'pip install' in line)
  nb = nbformat.read(os.path.join(REPO, 'experiments', 'colab_tpu.ipynb'),
                     as_version=4)
  calls = [[e.value for e in node.elts if isinstance(e, ast.Constant)]
           for c in nb.cells if c.cell_type == 'code'
           for node in ast.walk(ast.parse(c.source))
           if isinstance(node, ast.List)]
  (call,) = [c for c in calls if 'install' in c]
  args = call[call.index('install') + 1:]
  assert [a for a in args if a != '-q'] == readme
