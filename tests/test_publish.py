"""metadrop_jax.publish: the committed copy of a finished run holds its results and last
checkpoint only, and is itself a workdir that evaluates."""

import json
import os

import pytest

from metadrop_jax import evaluation
from metadrop_jax import publish
from metadrop_jax.cli import publish as publish_cli
from metadrop_jax import train
from tests.conftest import tiny


def test_publish_keeps_results_and_the_last_checkpoint_and_evaluates(tmp_path):
  wd, out = str(tmp_path / 'wd'), str(tmp_path / 'pub' / 'run')
  c = tiny(num_steps=4, log_every=2, val_every=0, checkpoint_every=2,
           **{'model.num_layers': 1, 'eval.num_episodes': 4, 'eval.mc_samples': 1})
  train.train_and_evaluate(c, wd)
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2', '4']
  r = publish.publish(wd, out)
  assert r['step'] == 4 and os.listdir(os.path.join(out, 'checkpoints')) == ['4']
  kept = set(os.listdir(out))
  assert {'config.json', 'results.json', 'metrics.jsonl', 'runs.jsonl', 'episode_accs_test.npy',
          'checkpoint_hashes.json', 'checkpoints'} <= kept
  assert not kept & {'tb', '.lock'}
  with open(os.path.join(out, 'checkpoint_hashes.json')) as f:
    assert list(json.load(f)) == ['4']
  with open(os.path.join(wd, 'results.json')) as f:
    trained = json.load(f)
  again = evaluation.evaluate_checkpoint(None, out)       # the copy is a workdir
  assert again['step'] == 4 and again['accuracy'] == trained['accuracy']
  # a shortened meta-test of the committed copy writes its own file, never results.json
  with open(os.path.join(out, 'results.json')) as f:
    committed = f.read()
  short = evaluation.evaluate_checkpoint(_with_eval(out, num_episodes=2), out)
  assert short['file'] == 'results_2ep_1mc_seed0.json' and short['episodes'] == 2
  assert os.path.isfile(os.path.join(out, 'episode_accs_test_2ep_1mc_seed0.npy'))
  with open(os.path.join(out, 'results.json')) as f:
    assert f.read() == committed
  assert publish.publish(wd, out)['step'] == 4             # replaces a previous copy
  assert [n for n in os.listdir(os.path.dirname(out)) if n.startswith('.')] == []


def _with_eval(workdir, **fields):
  from metadrop_jax import workdir as workdir_lib
  c = workdir_lib.load_run_config(workdir)
  for k, v in fields.items():
    c.eval[k] = v
  return c


def test_kept_files():
  assert publish.kept_files(['results.json', 'results_val.json', 'events.tb', 'x.npy',
                             'episode_accs_val.npy', '.lock', 'config.json']) == [
      'config.json', 'episode_accs_val.npy', 'results.json', 'results_val.json']


def test_publish_without_checkpoint_is_an_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    publish_cli.main([f'--workdir={tmp_path}', f'--out={tmp_path / "o"}'])
  assert e.value.code == 2 and 'no finished checkpoint' in capsys.readouterr().err
