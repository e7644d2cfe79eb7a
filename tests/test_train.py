"""The training loop: resume == uninterrupted, run-config guard, launch.py end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from metadrop_jax import config as config_lib
from metadrop_jax import evaluation
from metadrop_jax import keys
from metadrop_jax import train
from metadrop_jax import workdir as workdir_lib
from tests.conftest import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(**over):
  base = {'num_steps': 6, 'log_every': 2, 'val_every': 3, 'checkpoint_every': 3,
          'eval.num_episodes': 6, 'eval.val_episodes': 4}
  base.update(over)
  return tiny('metadrop', **base)


def params_of(workdir, config):
  init_key, _ = keys.run_keys(config)
  from metadrop_jax import meta
  template, _ = meta.create_state(init_key, config)
  return jax.device_get(workdir_lib.restore_latest(workdir_lib.checkpoint_manager(workdir, config),
                                                    template))


AUTO_FIELDS = ('conv_impl', 'pool_impl', 'task_map')


def _model_fields(path):
  with open(path) as f:
    model = json.load(f)['model']
  return {k: model.get(k) for k in AUTO_FIELDS}


@pytest.mark.parametrize('sampler', ['device', 'host'])
def test_resume_equals_uninterrupted(tmp_path, sampler):
  c = small(**{'data.sampler': sampler})
  straight = train.train(c, str(tmp_path / 'a'))['state']
  c2 = small(**{'data.sampler': sampler, 'max_steps_per_run': 4})
  s1 = train.train(c2, str(tmp_path / 'b'))
  assert (s1['step'], s1['done'], s1['stopped']) == (4, False, 'step limit')
  s2 = train.train(c2, str(tmp_path / 'b'))
  assert (s2['step'], s2['done']) == (6, True)
  resumed = s2['state']
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))):
    np.testing.assert_array_equal(a, b)
  # a new run records what its 'auto' fields resolved to (today's rules: select on the CPU too)
  assert c.model.pool_impl == 'auto'
  for d in ('a', 'b'):
    assert _model_fields(tmp_path / d / 'config.json') == {
        'conv_impl': 'im2col', 'pool_impl': 'select', 'task_map': 'vmap'}
  # the metric logs agree too (rows past the checkpoint are not duplicated)
  rows = lambda d: [json.loads(l) for l in open(tmp_path / d / 'metrics.jsonl')]
  ra, rb = rows('a'), rows('b')
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'train/steps_per_sec'} for r in rs]
  assert strip(ra) == strip(rb)


def test_an_old_auto_config_resumes_and_evaluates_as_it_trained(tmp_path):
  """A config.json written before runs recorded their resolved values holds 'auto' (or lacks
  model.pool_impl: the fidelity runs'); on the CPU such a run trained with reduce_window, and
  resuming or evaluating it, with its own config or an 'auto' one, keeps that."""
  rw = {'model.pool_impl': 'reduce_window', 'val_every': 0, 'model.num_layers': 1}
  straight = train.train(small(**rw), str(tmp_path / 'a'))['state']
  old = str(tmp_path / 'b')
  assert train.train(small(max_steps_per_run=4, **rw), old)['step'] == 4
  path = os.path.join(old, 'config.json')
  with open(path) as f:
    cfg = json.load(f)
  cfg['model'].update(conv_impl='auto', task_map='auto')
  del cfg['model']['pool_impl']
  with open(path, 'w') as f:
    json.dump(cfg, f)
  auto = small(val_every=0, **{'model.num_layers': 1})
  assert auto.model.pool_impl == 'auto'
  want = {'conv_impl': 'im2col', 'pool_impl': 'reduce_window', 'task_map': 'vmap'}
  for c in (workdir_lib.load_run_config(old), workdir_lib.run_config(old, auto),
            workdir_lib.restore(old)[0], workdir_lib.restore(old, auto)[0]):
    assert {k: c.model[k] for k in AUTO_FIELDS} == want
  workdir_lib.check_run_config(old, small(**rw))     # the values it resolved to: the same run
  assert workdir_lib.run_config(str(tmp_path / 'new'), auto).model.pool_impl == 'select'
  resumed = train.train(auto, old)
  assert (resumed['step'], resumed['done']) == (6, True)
  for a, b in zip(jax.tree.leaves(jax.device_get(straight)),
                  jax.tree.leaves(jax.device_get(resumed['state']))):
    np.testing.assert_array_equal(a, b)
  assert _model_fields(path) == want                 # recorded now


def test_every_committed_run_resolves_to_what_it_trained_with():
  """results/**/config.json: each run's execution fields, read today, are the ones it trained
  with: its recorded value, or what 'auto' gave on the backend its sittings ran on (runs.jsonl)
  under the rules of the time (im2col, vmap; reduce_window on the CPU, select elsewhere)."""
  import glob
  from metadrop_jax import meta
  paths = sorted(glob.glob(os.path.join(ROOT, 'results', '**', 'config.json'), recursive=True))
  assert len(paths) >= 40
  for path in paths:
    wd = os.path.dirname(path)
    with open(os.path.join(wd, 'runs.jsonl')) as f:
      backends = {json.loads(line)['backend'] for line in f if line.strip()}
    assert len(backends) == 1, (wd, backends)
    then = {'conv_impl': 'im2col', 'task_map': 'vmap',
            'pool_impl': 'reduce_window' if backends == {'cpu'} else 'select'}
    raw = _model_fields(path)
    want = {k: then[k] if raw[k] in ('auto', None) else raw[k] for k in AUTO_FIELDS}
    cfg = workdir_lib.load_run_config(wd)
    assert {k: cfg.model[k] for k in AUTO_FIELDS} == want, wd
    spec = meta.spec_from_config(workdir_lib.run_config(wd, cfg))
    assert (spec.net.conv_impl, spec.net.pool_impl, spec.task_map) == (
        want['conv_impl'], want['pool_impl'], want['task_map']), wd


def test_refuses_resume_with_different_config(tmp_path):
  train.train(small(num_steps=2), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match='inner_lr'):
    train.train(small(num_steps=2, inner_lr=0.5), str(tmp_path))
  # loop-only fields may change between sittings
  train.train(small(num_steps=3, log_every=1), str(tmp_path))


def test_evaluate_is_deterministic():
  c = small()
  from metadrop_jax import data, meta
  state, _ = meta.create_state(jax.random.PRNGKey(0), c)
  imgs = data.load_split(c.data, 'test')
  a = evaluation.evaluate(state.params, imgs, c, num_episodes=6, mc_samples=2)
  b = evaluation.evaluate(state.params, imgs, c, num_episodes=6, mc_samples=2)
  np.testing.assert_array_equal(a['accs'], b['accs'])
  assert a['n'] == 6 and 0 <= a['mean'] <= 100


def test_every_method_meets_the_same_evaluation_episodes():
  """The episodes (and the noise keys) of every evaluation batch depend on eval.seed and the
  split only: each method, trained with any seed, is scored on the same tasks; another
  eval.seed or split gives others."""
  from metadrop_jax import data, meta
  imgs = jax.numpy.asarray(data.load_split(small().data, 'test'))

  def batch(method, split='test', **over):
    c = small(**over)
    c.method = method
    episode_key, noise_key = keys.eval_batch_keys(*keys.eval_keys(c, split), 1)
    as_is = lambda params, ep, key, spec: (ep, key)
    return meta.eval_batch_fn(as_is, c, 2, 3)(None, imgs, episode_key, noise_key)

  ref = jax.tree.leaves(batch('metadrop'))
  for method, over in (('maml', {}), ('vib', {'seed': 5}), ('metasgd', {'inner_lr': 0.3})):
    for a, b in zip(ref, jax.tree.leaves(batch(method, **over))):
      np.testing.assert_array_equal(a, b)
  for other in (batch('metadrop', 'val'), batch('metadrop', **{'eval.seed': 1})):
    assert not np.array_equal(ref[0], jax.tree.leaves(other)[0])


def test_launch_end_to_end(tmp_path):
  """train (paused) -> resume -> eval -> results.json, through the command line."""
  wd = str(tmp_path / 'run')
  cmd = [sys.executable, 'launch.py', '--config=configs/tiny.py', f'--workdir={wd}',
         '--config.num_steps=6', '--config.checkpoint_every=3', '--config.val_every=3',
         '--config.eval.num_episodes=5', '--config.progress_bar=False']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run(cmd + ['--config.max_steps_per_run=3'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'paused at step 3/6' in r.stderr
  assert 'ETA' in r.stderr and 'remaining steps' in r.stderr    # said after the first steps
  assert not os.path.exists(os.path.join(wd, 'results.json'))
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.load(open(os.path.join(wd, 'results.json')))
  assert res['step'] == 6 and res['episodes'] == 5 and res['method'] == 'metadrop'
  assert 0 <= res['accuracy'] <= 100 and res['ci95'] >= 0
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['3', '6']
  # eval mode from the workdir alone (config.json), on the validation split
  r = subprocess.run([sys.executable, 'launch.py', '--mode=eval', '--split=val', f'--workdir={wd}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.load(open(os.path.join(wd, 'results_val.json')))['split'] == 'val'
  # bad input: a clear message, non-zero exit
  r = subprocess.run([sys.executable, 'launch.py', '--config=configs/tiny.py', f'--workdir={wd}x',
                      '--config.method=dropout'], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode != 0 and 'method=' in r.stderr


def test_inner_loop_divergence_is_reported():
  """The VIB run of docs/results.md (support loss 10.2 -> 4.9e7 over 5 inner steps) is named;
  a loss that falls, rises a little, or is missing (no inner steps) is not."""
  msg = train.inner_loop_diverging({'train/inner_loss_first': 10.2,
                                    'train/inner_loss_last': 4.9e7})
  assert msg and 'inner_lr' in msg and '4.9e+07' in msg
  for first, last in ((1.6, 1.1), (1.6, 1.9), (1.6, 15.9)):
    assert train.inner_loop_diverging({'train/inner_loss_first': first,
                                       'train/inner_loss_last': last}) is None
  assert train.inner_loop_diverging({'train/loss': 1.0}) is None


def test_a_paper_run_on_a_cpu_says_so_with_its_eta():
  """The README's main job on a CPU (60,000 steps at ~5 s) is ~85 hours: the first lines say
  so, with the command of the CPU-sized experiment; short runs and GPUs get the ETA only."""
  msg = train.eta_message(5.1, 60000 - 3, 'cpu')
  assert 'ETA 85.0 h' in msg and train.CPU_EXPERIMENT in msg
  assert 'configs/omniglot_5way1shot_cpu.py' in train.CPU_EXPERIMENT
  for args in ((5.1, 59997, 'gpu'), (0.5, 2000, 'cpu')):
    msg = train.eta_message(*args)
    assert 'ETA' in msg and train.CPU_EXPERIMENT not in msg
  assert 'ETA 16.7 min' in train.eta_message(0.5, 2000, 'cpu')


def test_a_resumed_sitting_in_the_same_process_compiles_nothing(tmp_path):
  """A fresh state was uncommitted and a restored one committed to its device, so the second
  sitting of a run in one process (a notebook's) compiled the step again."""
  from metadrop_jax import meta
  c = tiny('metadrop', num_steps=4, max_steps_per_run=2, checkpoint_every=2, log_every=2,
           val_every=0, **{'model.num_layers': 1})
  assert train.train(c, str(tmp_path))['step'] == 2
  step_fn = meta.compiled('train', workdir_lib.run_config(str(tmp_path), c), lambda: None, None)
  size = step_fn._cache_size()
  assert train.train(c, str(tmp_path))['step'] == 4
  assert step_fn._cache_size() == size


def test_provenance_names_the_code_the_process_loaded(monkeypatch):
  """A long run records the commit of the code it imported, not the checkout's HEAD when it ends
  (a run of hours outlives commits made meanwhile)."""
  from metadrop_jax import workdir as workdir_lib
  loaded = workdir_lib.provenance()['commit']
  monkeypatch.setattr(workdir_lib, 'git_commit', lambda *a, **k: 'moved-on')
  assert workdir_lib.provenance()['commit'] == loaded != 'moved-on'
