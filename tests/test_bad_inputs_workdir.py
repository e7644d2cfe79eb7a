"""Bad inputs and accidents around a workdir: each test failed before its fix.

Eval overrides that would change results, a resume with another sampler, a failed start that
blocked its own fix, non-finite states and checkpoints, Ctrl-C / SIGTERM, an unwritable
workdir, damaged checkpoints, a workdir that is a file, an unreadable config.json, two runs on
one workdir, and the first metrics row after a resume.
"""

import json
import os
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from metadrop_jax import config as config_lib
from metadrop_jax import evaluation
from metadrop_jax import keys
from metadrop_jax import meta
from metadrop_jax import train
from metadrop_jax import workdir as workdir_lib
from metadrop_jax.data import DataError
from tests.conftest import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**over):
  base = {'num_steps': 4, 'log_every': 2, 'val_every': 0, 'checkpoint_every': 2,
          'eval.num_episodes': 4, 'eval.batch_tasks': 4, 'eval.mc_samples': 1,
          'model.num_layers': 1}
  base.update(over)
  return tiny('metadrop', **base)


def _leaves(state):
  return jax.tree.leaves(jax.device_get(state))


def _assert_same(a, b):
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4), and its final state."""
  wd = str(tmp_path_factory.mktemp('trained'))
  return wd, train.train(small(), wd)['state']


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  os.remove(os.path.join(dst, '.lock'))
  return str(dst)


# (1) eval with overrides that change results ---------------------------------------------------

@pytest.mark.parametrize('override', [{'inner_lr': 0.5}, {'method': 'maml'},
                                      {'data.sampler': 'host'}])
def test_eval_refuses_an_override_that_changes_results(trained, tmp_path, override):
  wd = _copy(trained[0], tmp_path / 'wd')
  with pytest.raises(config_lib.ConfigError, match=list(override)[0].replace('.', r'\.')):
    evaluation.evaluate_checkpoint(config_lib.override(small(), override), wd)
  assert not os.path.exists(os.path.join(wd, 'results.json'))


def test_eval_takes_eval_overrides_and_the_workdirs_config(trained, tmp_path):
  wd = _copy(trained[0], tmp_path / 'wd')
  r = evaluation.evaluate_checkpoint(small(**{'eval.num_episodes': 2}), wd)
  assert r['episodes'] == 2 and r['step'] == 4
  assert evaluation.evaluate_checkpoint(None, wd)['episodes'] == 4    # config.json's


# (2) resume with the other sampler --------------------------------------------------------------

def test_resume_refuses_the_other_sampler(tmp_path):
  train.train(small(num_steps=2), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match='data.sampler') as e:
    train.train(small(num_steps=3, **{'data.sampler': 'host'}), str(tmp_path))
  assert '\n' not in str(e.value) and 'use a new --workdir' in str(e.value)   # one line
  many = {'inner_lr': 0.5, 'shot': 2, 'query': 3, 'way': 3, 'seed': 7, 'data.sampler': 'host'}
  with pytest.raises(config_lib.ConfigError, match=r'; and \d+ more\)') as e:
    train.train(small(num_steps=3, **many), str(tmp_path))
  assert '\n' not in str(e.value)


def test_resume_refuses_another_omniglot_split(tmp_path):
  """The split decides which characters are trained on: a resume with the other one would mix two
  experiments. A config.json from before the field existed is the default split."""
  wd = str(tmp_path)
  vinyals = config_lib.override(config_lib.base_config(), {'data.name': 'omniglot'})
  lake = config_lib.override(vinyals.copy_and_resolve_references(), {'data.omniglot_split': 'lake'})
  workdir_lib.write_run_config(wd, vinyals)
  with pytest.raises(config_lib.ConfigError, match="data.omniglot_split: workdir has 'vinyals'"):
    workdir_lib.check_run_config(wd, lake)
  path = os.path.join(wd, 'config.json')
  with open(path) as f:
    old = json.load(f)
  del old['data']['omniglot_split']
  with open(path, 'w') as f:
    json.dump(old, f)
  workdir_lib.check_run_config(wd, vinyals)
  assert workdir_lib.load_run_config(wd).data.omniglot_split == 'vinyals'
  with pytest.raises(config_lib.ConfigError, match='data.omniglot_split'):
    workdir_lib.check_run_config(wd, lake)


# (3) a failed start writes no config.json --------------------------------------------------------

def test_a_failed_start_does_not_block_its_fix(tmp_path):
  empty = tmp_path / 'no_data'
  empty.mkdir()
  wd = str(tmp_path / 'wd')
  bad = small(**{'data.name': 'omniglot', 'data.source': 'local', 'data.path': str(empty)})
  with pytest.raises(DataError):
    train.train(bad, wd)
  assert not os.path.exists(os.path.join(wd, 'config.json'))
  assert train.train(small(num_steps=1), wd)['step'] == 1     # the fixed config starts


# (4) non-finite states are never checkpointed ---------------------------------------------------

def test_a_non_finite_state_is_not_saved(tmp_path):
  c = small(meta_lr=1e30, checkpoint_every=1, log_every=100)   # parameters explode at step 2
  with pytest.raises(FloatingPointError, match=r'not finite at step 2.*checkpoint \(1, finite\)'):
    train.train(c, str(tmp_path))
  _, state = workdir_lib.restore(str(tmp_path))
  assert int(state.step) == 1 and workdir_lib.all_finite(state.params)


# (5) evaluating a non-finite checkpoint ---------------------------------------------------------

def test_eval_of_a_non_finite_checkpoint_is_refused(tmp_path):
  c = small()
  wd = str(tmp_path)
  workdir_lib.write_run_config(wd, c)
  state, _ = meta.create_state(keys.run_keys(c)[0], c)
  nan = jax.tree.map(lambda x: x * np.nan, state.params)
  workdir_lib.save_checkpoint(workdir_lib.checkpoint_manager(wd, c), wd, 3,
                              state._replace(params=nan))
  with pytest.raises(FloatingPointError, match='non-finite parameters'):
    evaluation.evaluate_checkpoint(None, wd)
  assert not os.path.exists(os.path.join(wd, 'results.json'))


# (7) Ctrl-C / SIGTERM ---------------------------------------------------------------------------

@pytest.mark.parametrize('sig', [signal.SIGTERM])
def test_a_signal_saves_and_stops_cleanly(tmp_path, sig):
  wd = str(tmp_path / 'run')
  p = subprocess.Popen(
      [sys.executable, 'launch.py', '--config=configs/tiny.py', f'--workdir={wd}', '--mode=train',
       '--config.num_steps=1000000', '--config.checkpoint_every=1000000',
       '--config.val_every=0', '--config.progress_bar=False'],
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, stderr=subprocess.PIPE,
      stdout=subprocess.PIPE, text=True)
  lines = []
  for line in p.stderr:       # training has started once the ETA is out
    lines.append(line)
    if 'remaining steps' in line:
      break
  p.send_signal(sig)
  out, err = p.communicate(timeout=600)
  err = ''.join(lines) + err
  assert p.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and f'interrupted ({sig.name})' in err
  status = json.loads(out)
  assert not status['done'] and status['stopped'] == f'interrupted ({sig.name})'
  assert os.listdir(os.path.join(wd, 'checkpoints')) == [str(status['step'])]   # no temp dir
  _, state = workdir_lib.restore(wd)
  assert int(state.step) == status['step'] >= 3


def test_a_signal_during_validation_stops_it_and_saves(tmp_path, monkeypatch):
  """A stop signal that arrives while a validation runs cuts it short (no half-validation
  written) and the run stops at that step, checkpointed, as after a training step."""
  wd = str(tmp_path / 'run')
  c = small(num_steps=10, val_every=2, checkpoint_every=100, log_every=1,
            **{'eval.val_episodes': 8, 'eval.batch_tasks': 2, 'eval.val_mc_samples': 1})
  real, calls = keys.eval_batch_keys, []

  def batch_keys(*a):           # the SIGTERM comes in the second validation, after its 1st batch
    calls.append(a[-1])
    if len(calls) == 6:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*a)

  monkeypatch.setattr(keys, 'eval_batch_keys', batch_keys)
  status = train.train(c, wd)
  assert status['stopped'] == 'interrupted (SIGTERM)' and status['step'] == 4
  assert calls == [0, 1, 2, 3, 0, 1]        # step 2's 4 batches, step 4's first 2 only
  assert os.listdir(os.path.join(wd, 'checkpoints')) == ['4']
  rows = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'val/acc' in r] == [2]
  assert train.train(c, wd)['step'] == 10                   # and it resumes


# (10) an unwritable workdir is refused before the evaluation ------------------------------------

def test_eval_checks_writability_first(trained, tmp_path, monkeypatch):
  with pytest.raises(workdir_lib.WorkdirError, match='not writable'):
    workdir_lib.ensure_writable('/proc/self')     # not writable, even by root
  wd = _copy(trained[0], tmp_path / 'wd')
  calls = []
  monkeypatch.setattr(evaluation, 'evaluate', lambda *a, **k: calls.append(1))
  monkeypatch.setattr(workdir_lib, 'ensure_writable', lambda w: (_ for _ in ()).throw(
      workdir_lib.WorkdirError(f'{w} is not writable')))
  with pytest.raises(workdir_lib.WorkdirError):
    evaluation.evaluate_checkpoint(None, wd)
  assert not calls


# damaged checkpoints ----------------------------------------------------------------------------

def _largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize('damage', ['flip', 'truncate'])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, damage):
  wd, final = trained
  wd = _copy(wd, tmp_path / 'wd')
  path = _largest_file(os.path.join(wd, 'checkpoints', '4'))
  data = bytearray(open(path, 'rb').read())
  if damage == 'flip':
    data[len(data) // 2] ^= 0x10
  else:
    data = data[:len(data) // 2]
  open(path, 'wb').write(bytes(data))
  with pytest.warns(RuntimeWarning, match=r'checkpoint 4 is damaged.*intact checkpoint 2') as w:
    _, state = workdir_lib.restore(wd)
  assert int(state.step) == 2
  assert not any('different method' in str(x.message) for x in w)
  # resuming redoes steps 3-4 from checkpoint 2: the same final state as the uninterrupted run
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    status = train.train(small(), wd)
  assert status['step'] == 4
  _assert_same(status['state'], final)
  assert os.listdir(os.path.join(wd, 'damaged_checkpoints'))


# the workdir itself -----------------------------------------------------------------------------

def test_a_workdir_that_is_a_file(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(workdir_lib.WorkdirError, match='is a file'):
    train.train(small(), str(f))
  with pytest.raises(workdir_lib.WorkdirError, match='is a file'):
    evaluation.evaluate_checkpoint(None, str(f))


def test_an_unreadable_config_json_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"method": "metad')
  for call in (lambda: train.train(small(), str(tmp_path)),
               lambda: workdir_lib.load_run_config(str(tmp_path))):
    with pytest.raises(config_lib.ConfigError, match=r'config\.json is not a readable config'):
      call()


def test_two_runs_on_one_workdir(tmp_path):
  with workdir_lib.locked(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirError, match=f'in use by another run \\(pid {os.getpid()}'):
      train.train(small(), str(tmp_path))
  assert train.train(small(num_steps=1), str(tmp_path))['step'] == 1   # released


# the first metrics row after a resume -----------------------------------------------------------

def test_the_first_row_after_a_resume_averages_a_full_window(tmp_path):
  """log_every=3, paused at step 4: the row of step 6 averages steps 4-6, as without the pause
  (it averaged 5-6, and a partial row for step 4 was written at the pause)."""
  c = small(num_steps=6, log_every=3)
  straight = train.train(c, str(tmp_path / 'a'))['state']
  c2 = small(num_steps=6, log_every=3, max_steps_per_run=4)
  train.train(c2, str(tmp_path / 'b'))
  resumed = train.train(c2, str(tmp_path / 'b'))['state']
  _assert_same(straight, resumed)
  rows = lambda d: [{k: v for k, v in json.loads(line).items() if k != 'train/steps_per_sec'}
                    for line in open(tmp_path / d / 'metrics.jsonl')]
  assert [r['step'] for r in rows('b')] == [3, 6]
  assert rows('a') == rows('b')


# run logs, config and checkpoint hashes of a trained workdir ----------------------------------

def test_a_jsonl_row_after_a_cut_line_starts_on_a_fresh_line(tmp_path):
  """A log whose last line a crash cut (no newline): the next row is readable, the cut line is
  skipped alone (it used to swallow the new row into one unparsable line)."""
  from metadrop_jax import metrics
  path = str(tmp_path / 'runs.jsonl')
  metrics.append_jsonl(path, {'step': 1})
  with open(path, 'a') as f:
    f.write('{"step": 2, "stop')                      # cut by a crash
  metrics.append_jsonl(path, {'step': 3})
  with pytest.warns(RuntimeWarning, match=r'runs\.jsonl:2: not a JSON object'):
    assert metrics.read_jsonl(path) == [{'step': 1}, {'step': 3}]


def test_checkpoints_without_config_json_are_refused(trained, tmp_path):
  """config.json deleted from a trained workdir: training with another config used to resume
  silently and record the new config for the whole run."""
  wd, _ = trained
  wd = _copy(wd, tmp_path / 'wd')
  os.remove(os.path.join(wd, 'config.json'))
  listing = lambda: sorted(set(os.listdir(wd)) - {'.lock'})   # the lock file stays by design
  before = listing()
  with pytest.raises(config_lib.ConfigError, match='checkpoints but no config.json'):
    train.train(small(num_steps=6, inner_lr=0.3), wd)
  assert listing() == before


def test_unreadable_checkpoint_hashes_are_an_error_not_silence(trained, tmp_path):
  """An unreadable checkpoint_hashes.json switched verification off silently and the next save
  dropped the older checkpoints' hashes; a missing one is said."""
  wd, _ = trained
  wd = _copy(wd, tmp_path / 'wd')
  path = os.path.join(wd, 'checkpoint_hashes.json')
  good = open(path).read()
  open(path, 'w').write(good[:len(good) // 2])
  config_json = open(os.path.join(wd, 'config.json')).read()
  with pytest.raises(workdir_lib.WorkdirError, match='checkpoint_hashes.json is unreadable'):
    train.train(small(num_steps=6), wd)
  assert open(path).read() == good[:len(good) // 2]      # nothing rewritten
  assert open(os.path.join(wd, 'config.json')).read() == config_json   # not even num_steps
  os.remove(path)
  with pytest.warns(RuntimeWarning, match='restored without verifying'):
    workdir_lib.restore(wd)


def test_steps_in_flight_are_bounded(tmp_path, monkeypatch):
  """The loop never runs more than one step ahead of the last one that finished: before step
  t+1 is dispatched, step t-1's metrics are ready."""
  waited = []
  real = jax.block_until_ready
  monkeypatch.setattr(train.jax, 'block_until_ready', lambda x: waited.append(x) or real(x))
  status = train.train(small(num_steps=6, checkpoint_every=6, log_every=6), str(tmp_path))
  assert status['step'] == 6
  # step 1 (compile) and the ETA-timed steps wait for their state; every later step waits for
  # the metrics dict of the step before it
  assert sum(isinstance(w, dict) for w in waited) >= 6 - 1 - train.ETA_TIMED_STEPS - 1


def test_eval_of_a_workdir_without_its_config_says_restore(trained, tmp_path):
  """A trained workdir whose config.json was deleted: the eval says to restore it (it said
  'not a training workdir')."""
  wd = _copy(trained[0], tmp_path / 'wd')
  os.remove(os.path.join(wd, 'config.json'))
  with pytest.raises(FileNotFoundError, match='has checkpoints: restore its config.json'):
    workdir_lib.load_run_config(wd)
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    workdir_lib.load_run_config(str(tmp_path / 'empty'))
