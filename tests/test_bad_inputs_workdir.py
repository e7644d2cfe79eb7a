"""Bad inputs and accidents around a workdir: each test failed before its fix.

Eval overrides that would change results, a resume with another sampler, a failed start that
blocked its own fix, non-finite states and checkpoints, Ctrl-C / SIGTERM, an unwritable
workdir, damaged checkpoints, a workdir that is a file, an unreadable config.json, two runs on
one workdir, and the first metrics row after a resume.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from metadrop_jax import config as config_lib
from metadrop_jax import evaluation
from metadrop_jax import keys
from metadrop_jax import meta
from metadrop_jax import metrics
from metadrop_jax import train
from metadrop_jax import workdir as workdir_lib
from metadrop_jax.data import DataError
from tests.conftest import tiny
from tools.long_runs import runs

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

@pytest.mark.parametrize('log_every', [100, 1])      # seen in the parameters / in the metrics
def test_a_run_that_diverges_after_a_finite_checkpoint(tmp_path, log_every):
  """The newest checkpoint stays the last finite one; the error says that resuming repeats the
  same steps (a lower meta_lr needs a new workdir: a resume refuses it); the resume says that
  the last sitting diverged, and diverges again without saving anything."""
  c = small(meta_lr=1e30, checkpoint_every=1, log_every=log_every)  # parameters explode at step 2
  with pytest.raises(FloatingPointError, match=r'(not finite at step 2|non-finite training metrics '
                                               r'in steps 2-2).*newest checkpoint, step 1, is '
                                               r'finite and kept.*new --workdir') as e:
    train.train(c, str(tmp_path))
  assert '\n' not in str(e.value)
  with pytest.warns(RuntimeWarning, match=r'last sitting of this run diverged at step 2 '
                                          r'\(runs\.jsonl\); resuming from its newest finite '
                                          r'checkpoint, step 1'):
    with pytest.raises(FloatingPointError, match='step 1, is finite and kept'):
      train.train(c, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == ['1']
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
  err = ''.join(lines) + p.stderr.read()       # (the rest, through the same buffer)
  out = p.stdout.read()
  p.wait(timeout=600)
  assert p.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and f'interrupted ({sig.name})' in err
  # the terminal holds the project's lines only: orbax logged ~50 INFO lines at the start and
  # ~35 per checkpoint (absl's --verbosity=0 shows them again)
  logged = [l for l in err.splitlines() if re.match(r'[IWEF]\d{4} ', l)]
  assert len(logged) == 2 and all('launch.py' in l for l in logged), err
  assert len(err.splitlines()) <= 12, err
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


# ==== a full disk, a deleted workdir, a lowered num_steps, other data, a clock jump ============

def _full(path):
  """The next atomic write of ``path`` meets a real ENOSPC: its temp file is a link to /dev/full."""
  if not os.path.exists('/dev/full'):
    pytest.skip('no /dev/full on this system')
  os.symlink('/dev/full', f'{path}.tmp.{os.getpid()}')


def _files(wd):
  return {os.path.relpath(os.path.join(r, f), wd): open(os.path.join(r, f), 'rb').read()
          for r, _, fs in os.walk(wd) for f in fs if f != '.lock'}


def test_a_meta_test_on_a_full_disk_writes_nothing(trained, tmp_path):
  """The per-episode accuracies could not be written: the result is not written either (a
  results.json stood without them, and the paired interval could never use the run); an earlier
  pair of both stays as it was, and no temp file is left."""
  wd = _copy(trained[0], tmp_path / 'wd')
  first = evaluation.evaluate_checkpoint(None, wd)
  before = _files(wd)
  assert {'results.json', 'episode_accs_test.npy'} <= set(before)
  _full(metrics.episode_accs_path(wd, 'test'))
  with pytest.raises(OSError) as e:
    evaluation.evaluate_checkpoint(None, wd)
  assert e.value.errno == errno.ENOSPC
  assert _files(wd) == before and json.loads(before['results.json']) == first


def test_a_workdir_without_its_accs_is_not_meta_tested(tmp_path):
  from tests.test_long_runs_state import fake_run
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  fake_run(cdir / 'tiny_maml_exact', 1000, evaluated=True)
  assert runs.plan(str(cdir))[-1]['action'] == 'done'
  os.remove(metrics.episode_accs_path(str(cdir / 'tiny_maml_exact'), 'test'))
  assert runs.plan(str(cdir))[-1]['action'] == 'eval'


CAMPAIGN_OVERRIDES = {'num_steps': 4, 'log_every': 2, 'val_every': 0, 'checkpoint_every': 2,
                      'eval.num_episodes': 8, 'eval.batch_tasks': 4, 'eval.mc_samples': 1,
                      'model.num_layers': 1}


@pytest.fixture
def finished_campaign_run(trained, tmp_path, monkeypatch):
  """A campaign of the tiny setting whose run tiny_metadrop_exact is ``trained`` (4 of 4 steps,
  not meta-tested; its meta-test: 8 episodes in 2 batches). (cdir, the run's folder)

  The meta-test's compiled step is a stand-in (what these tests judge is what is written and
  when it stops, not the accuracy), so that nothing compiles under the sitting's matmul
  precision."""
  monkeypatch.setattr(meta, '_COMPILED', {})
  monkeypatch.setattr(meta, 'make_eval_step', lambda config, mc, n: lambda *_: (
      jax.numpy.full((n,), 0.5), jax.numpy.ones((n,))))
  precision = jax.config.jax_default_matmul_precision   # a sitting sets it
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'], CAMPAIGN_OVERRIDES)
  wd = _copy(trained[0], cdir / 'tiny_metadrop_exact')
  with open(os.path.join(wd, 'config.json')) as f:
    cfg = json.load(f)
  cfg['eval']['num_episodes'] = 8
  with open(os.path.join(wd, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  assert [r['action'] for r in runs.plan(str(cdir))][2] == 'eval'
  yield cdir, wd
  jax.config.update('jax_default_matmul_precision', precision)


def test_a_sitting_meta_testing_on_a_full_disk_is_one_line(finished_campaign_run, capsys):
  """A traceback before; the run counted as meta-tested without its per-episode file."""
  from tools.long_runs import campaign
  from tests.test_bad_inputs import assert_user_error
  cdir, wd = finished_campaign_run
  before = _files(wd)
  _full(metrics.episode_accs_path(wd, 'test'))
  with pytest.raises(SystemExit) as e:
    campaign.main(['sitting', f'--campaign_dir={cdir}'])
  assert_user_error(e.value.code, capsys.readouterr().err,
                    f'disk full at {cdir}: free space or choose another --campaign_dir')
  assert _files(wd) == before
  assert runs.plan(str(cdir))[2]['action'] == 'eval'      # not meta-tested


def test_sigterm_during_a_sittings_meta_test(finished_campaign_run, monkeypatch):
  """The meta-test stops at its next batch keeping the episodes it finished (and nothing else),
  no run starts after it, the sitting's row says so, and the next sitting continues the run's
  meta-test (tests/test_meta_test_resume.py: to the uninterrupted result)."""
  from tools.long_runs import sitting
  cdir, wd = finished_campaign_run
  real, batches = keys.eval_batch_keys, []

  def batch_keys(*a):           # SIGTERM while the first batch of episodes is computed
    batches.append(a[-1])
    if len(batches) == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*a)
  monkeypatch.setattr(keys, 'eval_batch_keys', batch_keys)
  before = _files(wd)
  said = []
  s = sitting.sitting(str(cdir), 3600.0, log=said.append)
  assert batches == [0] and s['stopped'] == 'interrupted (SIGTERM)'
  (entry,) = s['runs']
  assert entry.pop('eval_s') >= 0
  assert entry == {'name': 'tiny_metadrop_exact', 'from': 4, 'to': 4, 'minutes': 0.0,
                   'evaluated': False, 'eval_episodes_done': 4,
                   'stopped': 'meta-test interrupted (SIGTERM)'}
  assert any('meta-test interrupted (SIGTERM) at 4/8 episodes' in l and 'continues it first' in l
             for l in said)
  assert sorted(set(_files(wd)) - set(before)) == ['eval_partial_test.npz']
  assert [r['action'] for r in runs.plan(str(cdir))] == ['train', 'train', 'eval', 'train']


def test_a_nan_meta_test_result_is_never_written(trained, tmp_path, monkeypatch):
  wd = _copy(trained[0], tmp_path / 'wd')
  real = evaluation.evaluate

  def nan_episode(*a, **k):
    r = real(*a, **k)
    accs = r['accs'].astype(np.float64)
    accs[1] = np.nan
    return {**r, **metrics.summarize(accs), 'accs': accs}
  monkeypatch.setattr(evaluation, 'evaluate', nan_episode)
  with pytest.raises(FloatingPointError, match=r'the query mean and ci95 of checkpoint 4 are not '
                                               r'finite.*no result written'):
    evaluation.evaluate_checkpoint(None, wd)
  assert not [f for f in os.listdir(wd) if f.startswith(('results', 'episode_accs'))]


def test_eval_while_a_training_holds_the_workdir_says_so(trained, tmp_path):
  wd = _copy(trained[0], tmp_path / 'wd')
  assert workdir_lib.lock_holder(wd) is None
  with workdir_lib.locked(wd):
    assert workdir_lib.lock_holder(wd) == str(os.getpid())
    with pytest.warns(RuntimeWarning, match=rf'{wd} is in use by a training \(pid {os.getpid()}\): '
                                            r'evaluating its newest checkpoint so far, step 4 '
                                            r'of 4'):
      evaluation.evaluate_checkpoint(None, wd)
  assert workdir_lib.lock_holder(wd) is None


@pytest.mark.parametrize('how', ['deleted', 'replaced'])
def test_a_workdir_deleted_while_training(tmp_path, monkeypatch, how):
  """The run re-created parts of it (a checkpoint, a run log) and ended with exit code 0,
  without config.json, metrics or events. Now it stops at its next write, saying why."""
  import shutil
  wd = str(tmp_path / 'w')
  real = workdir_lib.save_metrics_window

  def then_delete(workdir, step, window):
    real(workdir, step, window)
    if step == 2:
      shutil.rmtree(workdir)
      if how == 'replaced':
        os.makedirs(workdir)
        open(os.path.join(workdir, 'other'), 'w').close()
  monkeypatch.setattr(workdir_lib, 'save_metrics_window', then_delete)
  with pytest.raises(workdir_lib.WorkdirError, match='deleted or replaced while this run trained: '
                                                     'nothing more is written there') as e:
    train.train(small(), wd)
  assert '\n' not in str(e.value)
  assert (os.listdir(wd) == ['other']) if how == 'replaced' else not os.path.exists(wd)


def test_num_steps_below_the_checkpoint_is_refused_and_changes_nothing(trained, tmp_path,
                                                                       monkeypatch, capsys):
  """It said "finished" and rewrote config.json with the lower num_steps."""
  from tests.test_bad_inputs import assert_user_error, run_launch
  wd = _copy(trained[0], tmp_path / 'wd')
  before = _files(wd)
  with pytest.raises(config_lib.ConfigError, match=r'num_steps=3 is below the step of .*checkpoint '
                                                   r'\(4; config\.json says num_steps=4\)'):
    train.train(small(num_steps=3), wd)
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', f'--workdir={wd}',
                          '--config.model.num_layers=1', '--config.num_steps=3')
  assert_user_error(rc, err, 'num_steps=3 is below', 'nothing was changed',
                    '--config.num_steps=4 or more')
  assert _files(wd) == before


def test_num_steps_lowered_above_the_checkpoint_is_said(tmp_path):
  wd = str(tmp_path)
  train.train(small(max_steps_per_run=2), wd)                 # at step 2 of 4
  with pytest.warns(RuntimeWarning, match='num_steps lowered from 4 to 3: this run now ends at '
                                          'step 3'):
    status = train.train(small(num_steps=3), wd)
  assert status['step'] == 3 and status['done']
  assert workdir_lib.load_run_config(wd).num_steps == 3


def test_other_data_between_two_sittings_is_refused(tmp_path, monkeypatch):
  """A data.path moved to another copy (a different zip) between two sittings trained one run
  on two data sets without a word; the workdir records the arrays it trains on."""
  from metadrop_jax import data as data_lib
  wd = str(tmp_path / 'w')
  train.train(small(max_steps_per_run=2), wd)
  with open(os.path.join(wd, 'data.json')) as f:
    assert set(json.load(f)) == {'train'}
  real = data_lib.load_split

  def other_copy(cfg, split):          # the same shape, one class replaced
    a = real(cfg, split).copy()
    a[0] = a[1]
    return a
  monkeypatch.setattr(data_lib, 'load_split', other_copy)
  before = _files(wd)
  with pytest.raises(workdir_lib.WorkdirError, match=r'the train data of synthetic at /elsewhere '
                                                     r'is not what .* trained on \(now CRC-32 '
                                                     r'\w{8}, shape .*data\.json records CRC-32 '
                                                     r'\w{8}') as e:
    train.train(small(**{'data.path': '/elsewhere'}), wd)
  assert '\n' not in str(e.value)
  assert _files(wd) == before
  monkeypatch.setattr(data_lib, 'load_split', real)
  assert train.train(small(), wd)['step'] == 4       # the same data again: it resumes


def test_a_clock_jump_does_not_cut_a_training(tmp_path, monkeypatch):
  """The time limit counted wall time: the system clock set 2 h ahead mid-run stopped a run
  with 60 minutes to go (and one set back would let it overrun)."""
  real_time, offset = time.time, [0.0]
  monkeypatch.setattr(time, 'time', lambda: real_time() + offset[0])
  real = workdir_lib.save_metrics_window

  def jump(workdir, step, window):
    real(workdir, step, window)
    offset[0] = 7200.0
  monkeypatch.setattr(workdir_lib, 'save_metrics_window', jump)
  status = train.train(small(max_minutes_per_run=60.0), str(tmp_path))
  assert status['stopped'] == 'finished' and status['step'] == 4
  assert status['minutes_this_run'] < 60


def test_a_clock_jump_does_not_cut_a_sitting(tmp_path, monkeypatch):
  from tests.test_long_runs_state import quiet
  from tools.long_runs import sitting
  calls = []
  real_time, offset = time.time, [0.0]
  monkeypatch.setattr(time, 'time', lambda: real_time() + offset[0])

  def fake(cfg, wd):      # the clock jumps 2 h while the first run trains
    calls.append(os.path.basename(wd))
    offset[0] = 7200.0
    return {'step': 5, 'num_steps': cfg.num_steps, 'stopped': 'time limit', 'done': False,
            'minutes_this_run': 0.01, 'state': None}
  monkeypatch.setattr(train, 'train', fake)
  precision = jax.config.jax_default_matmul_precision
  try:
    cdir = str(tmp_path / 'camp')
    runs.init_campaign(cdir, ['tiny'])
    sitting.sitting(cdir, 600.0, log=quiet)
    assert len(calls) == 4                        # every run had its share
    # a --deadline counts from the command's start: 590 of 600 s gone, too little for a run
    calls.clear()
    sitting.sitting(cdir, 600.0, started=time.monotonic() - 590.0, log=quiet)
    assert calls == []
  finally:
    jax.config.update('jax_default_matmul_precision', precision)


# ==== the ETA, the metrics window, a failed checkpoint save =====================================

def test_the_eta_counts_checkpoints_once_timed(tmp_path, monkeypatch, capsys):
  """The first ETA timed two steps without checkpoint or validation (30-50x too low when they
  are frequent). Now it names what it leaves out and is said again with their cost."""
  real = workdir_lib.save_checkpoint
  monkeypatch.setattr(workdir_lib, 'save_checkpoint',
                      lambda *a: (time.sleep(0.5), real(*a)))
  train.train(small(num_steps=8, checkpoint_every=4), str(tmp_path))
  eta = [l for l in capsys.readouterr().err.splitlines() if 'remaining steps' in l]
  assert len(eta) == 2, eta
  assert eta[0].endswith('2 checkpoints not counted yet (the ETA is said again once the first of '
                         'each is timed)')
  each = re.search(r'for the 4 remaining steps \(1 checkpoint x ([\d.]+) s included\)$', eta[1])
  assert each and float(each.group(1)) >= 0.5, eta[1]


def test_the_eta_of_validations_leaves_out_their_compile():
  c = small(num_steps=100, val_every=10, checkpoint_every=50)
  eta = train.Eta(c, validating=True)
  assert eta.message(2, 'gpu') is None                       # no step timed yet
  eta.step_s = 0.01
  assert eta.message(3, 'gpu').endswith('2 checkpoints and 10 validations not counted yet (the '
                                        'ETA is said again once the first of each is timed)')
  assert eta.message(4, 'gpu') is None                       # nothing new
  eta.time_validation(0.0, [5.0, 5.5, 6.0, 6.5])              # the first batch compiled for 5 s
  assert eta.validation_s == 2.0
  assert eta.message(10, 'gpu') is None                      # the checkpoint is still untimed
  eta.checkpoint_s = 1.0
  # 90 steps x 0.01 s + 2 checkpoints x 1 s + 9 validations x 2 s = 20.9 s
  assert eta.message(10, 'gpu') == ('meta-train: 0.01 s/step on gpu -> ETA 0.3 min for the 90 '
                                    'remaining steps (2 checkpoints x 1 s, 9 validations x 2 s '
                                    'included)')
  assert eta.message(11, 'gpu') is None


def test_a_cut_or_stale_metrics_window_is_said_on_resume(tmp_path):
  """A cut metrics_window.json was read as empty without a word: the first row after the
  resume then averaged fewer steps."""
  wd = str(tmp_path)
  path = tmp_path / 'metrics_window.json'
  workdir_lib.save_metrics_window(wd, 4, [{'train/loss': np.float32(1.5)}])
  assert workdir_lib.load_metrics_window(wd, 4) == [{'train/loss': np.float32(1.5)}]
  text = path.read_text()
  path.write_text(text[:len(text) // 2])
  with pytest.warns(RuntimeWarning, match=r'metrics_window\.json is unreadable .*averages only the '
                                          r'steps from 5 on; training goes on'):
    assert workdir_lib.load_metrics_window(wd, 4) == []
  workdir_lib.save_metrics_window(wd, 2, [{'train/loss': np.float32(1.5)}])
  with pytest.warns(RuntimeWarning, match='of step 2, older than the checkpoint resumed from'):
    assert workdir_lib.load_metrics_window(wd, 4) == []
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert workdir_lib.load_metrics_window(wd, 1) == []      # a newer one: restore said it
    assert workdir_lib.load_metrics_window(wd, 0) == []


def test_a_checkpoint_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
  """orbax's threads each logged a traceback of the full disk and left a half-written folder:
  a checkpoint that does not fit is refused first (one line, with the sizes), and a save that
  fails all the same (the disk filled meanwhile) leaves no temporary folder."""
  import shutil
  from metadrop_jax import cli
  c = small()
  wd = str(tmp_path)
  mgr = workdir_lib.checkpoint_manager(wd, c)
  state, _ = meta.create_state(keys.run_keys(c)[0], c)
  real = shutil.disk_usage
  monkeypatch.setattr(shutil, 'disk_usage', lambda p: real(p)._replace(free=100 << 10))
  with pytest.raises(OSError) as e:
    workdir_lib.save_checkpoint(mgr, wd, 2, state)
  assert e.value.errno == errno.ENOSPC and os.listdir(mgr.directory) == []
  assert re.fullmatch(rf'disk full at {wd} \(checkpoint 2 needs about \d+ KiB, 100 KiB are free\): '
                      'free space or choose another --workdir', cli.error_line(e.value))
  monkeypatch.setattr(shutil, 'disk_usage', real)

  def full(step, args):      # what orbax leaves when tensorstore meets a full disk
    os.makedirs(os.path.join(mgr.directory, f'{step}.orbax-checkpoint-tmp', 'default'))
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file: No space left on device')
  monkeypatch.setattr(mgr, 'save', full)
  with pytest.raises(ValueError, match='No space left'):
    workdir_lib.save_checkpoint(mgr, wd, 2, state)
  assert os.listdir(mgr.directory) == []


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_on_a_real_tmpfs(tmp_path):
  """A 48 KiB tmpfs (a mount namespace of its own): config and logs fit, the first checkpoint
  does not. One line (orbax's threads logged tracebacks before it), nothing half-written."""
  import shutil
  if not shutil.which('unshare') or subprocess.run(
      ['unshare', '-rm', 'true'], capture_output=True).returncode:
    pytest.skip('no user and mount namespaces here (unshare -rm)')
  mnt = tmp_path / 'mnt'
  mnt.mkdir()
  script = (f'mount -t tmpfs -o size=48k tmpfs {mnt} && {sys.executable} launch.py '
            f'--config=configs/tiny.py --workdir={mnt}/w --mode=train --config.num_steps=2 '
            '--config.checkpoint_every=2 --config.val_every=0 --config.progress_bar=False; '
            f'echo rc=$?; ls -a {mnt}/w/checkpoints')
  p = subprocess.run(['unshare', '-rm', 'sh', '-c', script], cwd=ROOT, capture_output=True,
                     text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert 'rc=2' in p.stdout, p.stdout + p.stderr[-3000:]
  assert 'Traceback' not in p.stderr and 'orbax' not in p.stderr, p.stderr[-3000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and re.fullmatch(
      rf'error: disk full at {mnt}/w \(checkpoint 2 needs about \d+ KiB, \d+ KiB are free\): '
      'free space or choose another --workdir', errors[0]), errors
  assert 'orbax-checkpoint-tmp' not in p.stdout
