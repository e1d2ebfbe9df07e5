"""A multi-process run: two processes on this machine (loopback coordinator,
one CPU device each) against one process with both devices, on the same
global batch; and the pair resuming from the checkpoint it wrote."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import cli_run
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The full DHA step: θ, the NAS code b, τ and η all move. The settings of
# DHA's CLI run (tests/cli_run.py), whose check the one-process run is.
OVERRIDES = {**cli_run.cli_overrides('dha'), 'keep_checkpoints': 5}
RESUME_STEP = 2
TIMEOUT_S = 600

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('multihost_test')]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _command(workdir: str) -> list[str]:
  return ([sys.executable, '-m', 'dha_jax.main', '--config=configs/default.py',
           f'--workdir={workdir}', '--config.mode=dha']
          + tiny.cli_flags(OVERRIDES))


def _env(devices: int) -> dict[str, str]:
  return {**os.environ,
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def run_pair(workdir: str) -> list[subprocess.CompletedProcess]:
  """The DHA run as processes 0 and 1 of one job, one device each."""
  address = f'localhost:{_free_port()}'
  procs = [subprocess.Popen(
      _command(workdir) + [f'--coordinator_address={address}',
                           '--num_processes=2', f'--process_id={i}'],
      cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  done = []
  for p in procs:
    out, err = p.communicate(timeout=TIMEOUT_S)
    done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
  for p in done:
    assert p.returncode == 0, p.stderr[-3000:]
  return done


def run_single(workdir: str) -> subprocess.CompletedProcess:
  proc = subprocess.run(_command(workdir), cwd=REPO, env=_env(2),
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def load_state(workdir: str, step: int) -> dict[str, np.ndarray]:
  """{path: array} of the training state in a workdir's checkpoint."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  state = checkpointer.restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7,
                               err_msg=key)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  pair, single = str(root / 'pair'), str(root / 'single')
  pair_procs = run_pair(pair)
  single_proc = run_single(single)
  return pair, single, pair_procs, single_proc


def test_one_process_is_a_complete_dha_run_from_the_cli(runs):
  _, single, _, proc = runs
  cli_run.assert_complete_run(single, 'dha', proc.stderr)


def test_two_processes_match_one_process_with_both_devices(runs):
  pair, single, procs, _ = runs
  with open(os.path.join(pair, 'summary.json')) as f:
    summary = json.load(f)
  final = summary['train_steps']
  state = load_state(pair, final)
  assert_same_state(state, load_state(single, final))
  # Each searched quantity moved away from its start, so the match is not
  # that of two untouched states.
  first = load_state(pair, RESUME_STEP)
  for moved in ("['components']['da']['logits']",
                "['components']['hpo']['raw']['learning_rate']",
                "['components']['nas']['ista']['b']['normal'][0]"):
    assert not np.array_equal(state[moved], first[moved]), moved
  # Process 0 alone writes: every record once, one result line printed.
  with open(os.path.join(pair, 'metrics.jsonl')) as f:
    lines = f.read().splitlines()
  assert len(lines) == len(set(lines))
  assert [r for r in map(json.loads, lines) if r['phase'] == 'test']
  assert 'test_accuracy' in procs[0].stdout
  assert 'test_accuracy' not in procs[1].stdout
  with open(os.path.join(single, 'summary.json')) as f:
    assert json.load(f)['test_loss'] == pytest.approx(summary['test_loss'],
                                                       rel=1e-6)


def test_the_pair_resumes_from_the_checkpoint_it_wrote(runs, tmp_path):
  pair, single, _, _ = runs
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(pair, resumed)
  os.remove(os.path.join(resumed, 'summary.json'))
  steps = sorted(int(s) for s in os.listdir(os.path.join(resumed,
                                                         'checkpoints')))
  for step in steps:
    if step > RESUME_STEP:
      shutil.rmtree(os.path.join(resumed, 'checkpoints', str(step)))
  procs = run_pair(resumed)
  for p in procs:
    assert f'Resumed from the checkpoint of step {RESUME_STEP}' in p.stderr
  assert_same_state(load_state(resumed, steps[-1]),
                    load_state(single, steps[-1]))
