"""A meta-test cut by a deadline or a signal keeps the episodes it finished, and the next call
continues it: the result equals an uninterrupted meta-test's, episode for episode. This is what
makes every finished Table-1 run meta-tested, in the sitting that finished it or first thing in
the next (tools/long_runs/sitting.py)."""

import json
import os
import shutil
import types

import numpy as np
import pytest

from metadrop_jax import evaluation
from metadrop_jax import metrics
from metadrop_jax import train
from metadrop_jax import workdir as workdir_lib
from tests.test_bad_inputs_workdir import small
from tools.long_runs import sitting


def _stop_after(k):
  """should_stop for evaluate_checkpoint: lets ``k`` batches run, then says stop."""
  asked = []
  def should_stop():
    asked.append(1)
    return len(asked) > k
  return should_stop


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished 4-step tiny run whose protocol is 8 episodes in batches of 2."""
  wd = tmp_path_factory.mktemp('run') / 'r'
  train.train(small(**{'eval.num_episodes': 8, 'eval.batch_tasks': 2, 'eval.mc_samples': 2}),
              str(wd))
  os.remove(wd / '.lock')
  return wd


def test_a_cut_meta_test_continues_to_the_uninterrupted_result(finished, tmp_path):
  whole, cut = shutil.copytree(finished, tmp_path / 'whole'), shutil.copytree(finished,
                                                                              tmp_path / 'cut')
  ref = evaluation.evaluate_checkpoint(None, str(whole))
  assert evaluation.evaluate_checkpoint(None, str(cut), should_stop=_stop_after(2)) is None
  assert not (cut / 'results.json').exists()
  config = workdir_lib.load_run_config(str(cut))
  p = evaluation.load_partial(str(cut), config, 4)
  assert p['batches'] == 2 and len(p['accs']) == 4
  # another checkpoint or protocol never continues this progress
  assert evaluation.load_partial(str(cut), config, 2) is None
  assert evaluation.evaluate_checkpoint(None, str(cut), should_stop=_stop_after(1)) is None
  assert evaluation.load_partial(str(cut), config, 4)['batches'] == 3
  r = evaluation.evaluate_checkpoint(None, str(cut))
  assert r['continued_from_episode'] == 6
  assert (r['accuracy'], r['ci95'], r['loss']) == (ref['accuracy'], ref['ci95'], ref['loss'])
  np.testing.assert_array_equal(np.load(metrics.episode_accs_path(str(cut), 'test')),
                                np.load(metrics.episode_accs_path(str(whole), 'test')))
  assert not any(f.startswith('eval_partial') for f in os.listdir(cut))


class _StopAfterReads:
  """A sitting's stop flag that turns on after ``k`` reads (a signal arriving mid meta-test)."""

  def __init__(self, k):
    self.k = k

  @property
  def requested(self):
    self.k -= 1
    return 'SIGTERM' if self.k < 0 else None


def test_a_sitting_cut_inside_a_meta_test_hands_it_to_the_next(finished, tmp_path):
  cdir = tmp_path / 'camp'
  shutil.copytree(finished, cdir / 'r')
  cfg = workdir_lib.load_run_config(str(cdir / 'r'))
  lines = []
  ctx = {'cdir': str(cdir), 'deadline': float('inf'), 'stop': _StopAfterReads(2),
         'log': lines.append}
  entry = sitting.meta_test(ctx, {'name': 'r'}, cfg, {'name': 'r', 'from': 4, 'to': 4})
  assert entry['evaluated'] is False and entry['eval_episodes_done'] == 4
  assert 'meta-test interrupted (SIGTERM) at 4/8 episodes' in lines[-1]
  assert 'continues it first' in lines[-1]
  ctx['stop'] = types.SimpleNamespace(requested=None)
  entry = sitting.meta_test(ctx, {'name': 'r'}, cfg, {'name': 'r', 'from': 4, 'to': 4})
  assert entry['evaluated'] is True and 'meta-test' in lines[-1]
  assert json.loads((cdir / 'r' / 'results.json').read_text())['continued_from_episode'] == 4
