"""Bad inputs and faults, tried as a new user would: each case asserts the exact outcome.

Either the GOOD outcome (nothing lost, nothing silently wrong) or a user error: exit code 2 and
one line on stderr, ``error: <problem>: <fix>``, naming the field or file, with no traceback
(``--verbose`` / METADROP_VERBOSE=1 keeps it). Workdir and trainer cases (resume, checkpoints,
signals, locks) are in tests/test_bad_inputs_workdir.py.

launch.py runs in-process (``run_launch``) except for a few real subprocesses that check the
exit code and stderr of ``python launch.py`` itself.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import os
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from absl import flags

import data_helpers as H
from metadrop_jax import config as config_lib
from metadrop_jax import metrics
from metadrop_jax.data import DataError, cache, miniimagenet, omniglot

ROOT = Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS


# ---- helpers ------------------------------------------------------------------------------------

def _reset_flags():
  for name in [n for n in FLAGS if n.startswith('config.')]:   # overrides are defined per parse
    delattr(FLAGS, name)
  FLAGS.unparse_flags()


def run_launch(monkeypatch, capsys, *args):
  """``python launch.py *args`` in this process: (exit code, stdout, stderr)."""
  import launch
  argv = ['launch.py', *args]
  monkeypatch.setattr(sys, 'argv', argv)
  monkeypatch.chdir(ROOT)
  _reset_flags()
  try:
    parse = getattr(launch, 'parse_flags', FLAGS)   # (FLAGS: launch.py before the fix)
    launch.main(parse(argv))
    rc = 0
  except SystemExit as e:
    rc = e.code
  finally:
    _reset_flags()
  out, err = capsys.readouterr()
  return rc, out, err


def run_cli(*args, env=None):
  """A real ``python launch.py *args`` subprocess: (exit code, stderr)."""
  e = dict(os.environ)
  e.pop('METADROP_VERBOSE', None)
  e.update(JAX_PLATFORMS='cpu', **(env or {}))
  p = subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, env=e, capture_output=True,
                     text=True, timeout=120)
  return p.returncode, p.stderr


def error_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.startswith('error: ')]


def assert_user_error(rc, err, *needles):
  """Exit code 2, exactly one ``error:`` line, no traceback, every needle in that line."""
  assert rc == 2, err
  assert 'Traceback' not in err, err
  lines = error_lines(err)
  assert len(lines) == 1, err
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


def tiny_config(**over):
  from configs import tiny
  c = tiny.get_config()
  c.progress_bar = False
  return config_lib.override(c, over)


@pytest.fixture
def deny_read(monkeypatch):
  """deny_read(path): opening ``path`` raises PermissionError, as for a file chmod 000 (tests
  may run as root, which chmod does not stop)."""
  real_open = builtins.open
  denied = set()

  def guarded(file, *a, **k):
    if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in denied:
      raise PermissionError(errno.EACCES, 'Permission denied', os.fspath(file))
    return real_open(file, *a, **k)
  monkeypatch.setattr(builtins, 'open', guarded)
  monkeypatch.setattr(io, 'open', guarded)
  return lambda p: denied.add(os.path.abspath(p))


# ==== the config file and the command line ========================================================

def test_cli_missing_config_file_is_one_line():
  rc, err = run_cli('--config=configs/nope.py')
  line = assert_user_error(rc, err, "config file 'configs/nope.py' not found", '--config=')
  assert err.strip() == line     # nothing else on stderr


def test_cli_unknown_override_is_one_line_with_did_you_mean():
  rc, err = run_cli('--config=configs/tiny.py', '--config.inner_lrr=0.2')
  line = assert_user_error(rc, err, '--config.inner_lrr', 'did you mean --config.inner_lr?')
  assert err.strip() == line


def test_cli_verbose_keeps_the_traceback():
  for extra, env in ((['--verbose'], None), ([], {'METADROP_VERBOSE': '1'})):
    rc, err = run_cli('--config=configs/tiny.py', '--config.inner_lrr=0.2', *extra, env=env)
    assert rc == 2 and 'Traceback' in err, err
    assert err.strip().splitlines()[-1].startswith('error: --config.inner_lrr')


def test_config_file_syntax_error_names_file_and_line(monkeypatch, capsys, tmp_path):
  f = tmp_path / 'bad.py'
  f.write_text('from metadrop_jax import config\n\ndef get_config(:\n  return None\n')
  rc, _, err = run_launch(monkeypatch, capsys, f'--config={f}')
  assert_user_error(rc, err, f'config file {f}, line 3: syntax error', 'fix the file')


def test_config_file_without_get_config(monkeypatch, capsys, tmp_path):
  f = tmp_path / 'noget.py'
  f.write_text('x = 1\n')
  rc, _, err = run_launch(monkeypatch, capsys, f'--config={f}')
  assert_user_error(rc, err, f'config file {f} has no get_config()', 'define get_config()')


def test_config_file_whose_get_config_raises(monkeypatch, capsys, tmp_path):
  f = tmp_path / 'raises.py'
  f.write_text('def get_config():\n  return {}["missing"]\n')
  rc, _, err = run_launch(monkeypatch, capsys, f'--config={f}')
  assert_user_error(rc, err, f'config file {f}, line 2: get_config() raised KeyError')


def test_config_file_whose_get_config_returns_a_dict(monkeypatch, capsys, tmp_path):
  f = tmp_path / 'dict.py'
  f.write_text('def get_config():\n  return {"method": "maml"}\n')
  for extra in ([], ['--config.way=3']):
    rc, _, err = run_launch(monkeypatch, capsys, f'--config={f}', '--mode=prepare', *extra)
    assert_user_error(rc, err, f'config file {f}: get_config() returned a dict, not an '
                      'ml_collections.ConfigDict', 'base_config()')


def test_config_is_a_folder(monkeypatch, capsys):
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs')
  assert_user_error(rc, err, '--config=configs is a folder')


def test_unknown_nested_override_suggests_the_full_path(monkeypatch, capsys):
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py',
                          '--config.model.chanels=8')
  assert_user_error(rc, err, '--config.model.chanels', 'did you mean --config.model.channels?')
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--config.data.foo.x=1')
  assert_user_error(rc, err, '--config.data.foo.x', "no field 'foo'")


def test_override_of_the_wrong_type(monkeypatch, capsys):
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--config.way=abc')
  assert_user_error(rc, err, '--config.way=abc', 'value of its type')


def test_unknown_flag_unknown_mode_stray_argument_no_config(monkeypatch, capsys):
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--workdirr=x')
  assert_user_error(rc, err, "'workdirr'", 'Did you mean: workdir')
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=evaluate')
  assert_user_error(rc, err, '--mode', 'evaluate')
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', 'train')
  assert_user_error(rc, err, "unexpected arguments ['train']")
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=train')
  assert_user_error(rc, err, '--config is required')


def test_launch_refuses_inf_and_nan(monkeypatch, capsys):
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py',
                          '--config.inner_lr=inf', '--mode=prepare')
  assert_user_error(rc, err, 'inner_lr=inf', 'finite')
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py',
                          '--config.data.synthetic_noise=nan', '--mode=prepare')
  assert_user_error(rc, err, 'data.synthetic_noise=nan', 'finite')


# ==== validate ====================================================================================

def _float_fields(d, prefix=''):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _float_fields(v, f'{prefix}{k}.')
    elif isinstance(v, float):
      yield prefix + k


FLOAT_FIELDS = sorted(set(_float_fields(config_lib.base_config().to_dict())) | {'meta_lr'})


def test_every_float_field_refuses_non_finite_values():
  assert len(FLOAT_FIELDS) > 10 and {'inner_lr', 'meta_lr', 'grad_clip'} <= set(FLOAT_FIELDS)
  for field in FLOAT_FIELDS:
    for bad in (math.inf, -math.inf, math.nan):
      c = tiny_config(**{field: bad})
      with pytest.raises(config_lib.ConfigError, match=f'{field}={bad!r}: must be a finite'):
        config_lib.validate(c)


@hypothesis.given(field=st.sampled_from(FLOAT_FIELDS),
                  bad=st.sampled_from([math.inf, -math.inf, math.nan]),
                  other=st.sampled_from(FLOAT_FIELDS))
def test_non_finite_anywhere_is_named(field, bad, other):
  """Any non-finite value in any float field, alone or beside another, is refused by name."""
  c = tiny_config(**{field: bad, other: math.inf})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert '\n' not in msg
  assert f'{other}=inf' in msg and (field == other or f'{field}={bad!r}' in msg)


@pytest.mark.parametrize('field', ['seed', 'eval.seed'])
@pytest.mark.parametrize('value', [-1, 2**31, 2**32 - 1, 99999999999])
def test_seeds_that_alias_other_seeds_are_refused(field, value):
  with pytest.raises(config_lib.ConfigError, match=rf'{field}={value}: must be an integer in '
                                                   r'\[0, 2147483647\]'):
    config_lib.validate(tiny_config(**{field: value}))


def test_seed_range_is_exactly_the_non_aliasing_one():
  import jax
  for s in (0, 1, 2**31 - 1):
    config_lib.validate(tiny_config(seed=s, **{'eval.seed': s}))
  # what the refused seeds would have done: -1 and 2**32-1, 99999999999 and its low 32 bits
  same = lambda a, b: np.array_equal(jax.random.PRNGKey(a), jax.random.PRNGKey(b))
  assert same(-1, 2**32 - 1) and same(99999999999, 99999999999 % 2**32)


def test_negative_synthetic_noise_and_one_line_message():
  c = tiny_config(**{'data.synthetic_noise': -0.5, 'way': 1, 'method': 'dropout'})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert '\n' not in msg and 'data.synthetic_noise=-0.5' in msg and 'way=1' in msg
  assert "method='dropout'" in msg and 'meta_lr' not in msg   # no follow-on error


# ==== workdir, eval, disk (launch's side) =========================================================

def test_eval_on_missing_and_empty_workdir(monkeypatch, capsys, tmp_path):
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={tmp_path / "none"}')
  assert_user_error(rc, err, f'{tmp_path / "none"}/config.json not found', 'train first')
  (tmp_path / 'empty').mkdir()
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={tmp_path / "empty"}')
  assert_user_error(rc, err, f'{tmp_path / "empty"}/config.json not found', 'train first')
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={tmp_path / "empty"}',
                          '--config=configs/tiny.py')
  assert_user_error(rc, err, str(tmp_path / 'empty'), 'train first')


def test_eval_of_a_workdir_takes_eval_overrides_without_config(monkeypatch, capsys, tmp_path):
  """``--mode=eval --workdir=W --config.eval.num_episodes=N`` without --config used to stop at
  "Unknown command line flag": eval and loop fields override W's config.json; a field that
  changes results, an unknown field and a value without '=' are one line each."""
  from metadrop_jax import train
  from tests.conftest import tiny
  wd = str(tmp_path / 'w')
  train.train(tiny(num_steps=2, val_every=0, checkpoint_every=2, **{'model.num_layers': 1}), wd)
  rc, out, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={wd}',
                            '--config.eval.num_episodes=3', '--config.eval.mc_samples=2')
  assert rc == 0, err
  name = 'results_3ep_2mc_seed0.json'     # not the run's protocol: never its results.json
  res = json.load(open(os.path.join(wd, name)))
  assert res['episodes'] == 3 and res['mc_samples'] == 2 and res['step'] == 2
  assert res['file'] == name and not os.path.exists(os.path.join(wd, 'results.json'))
  assert '| Meta-dropout |' in out and f"{res['accuracy']:.2f} ± {res['ci95']:.2f}" in out
  assert 'episode' in err                           # the progress bar, with its rate
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={wd}',
                          '--config.inner_lr=0.5')
  assert_user_error(rc, err, '--config.inner_lr', 'only eval.* and loop fields', 'new training run')
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={wd}',
                          '--config.eval.num_episode=3')
  assert_user_error(rc, err, 'eval.num_episode', 'no field')
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={wd}',
                          '--config.eval.num_episodes', '3')
  assert_user_error(rc, err, 'eval.num_episodes=VALUE')
  assert json.load(open(os.path.join(wd, name)))['episodes'] == 3   # untouched


def test_eval_with_a_different_way_names_the_field(monkeypatch, capsys, tmp_path):
  """The checkpoint's head has 3 outputs; way=4 used to fail deep in orbax on a shape mismatch."""
  w = tmp_path / 'w'
  w.mkdir()
  (w / 'config.json').write_text(tiny_config().to_json_best_effort())
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=eval',
                          f'--workdir={w}', '--config.way=4')
  assert_user_error(rc, err, 'way=4 does not match the checkpoint', 'trained with way=3',
                    f'--workdir={w}, without --config')


def test_disk_full_names_the_place_and_the_fix(monkeypatch, capsys, tmp_path):
  from metadrop_jax import train

  def full(*a, **k):   # as a checkpoint library reports it: the OSError is the cause
    raise RuntimeError('save failed') from OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(train, 'train', full)
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=train',
                          f'--workdir={tmp_path / "w"}')
  assert_user_error(rc, err, f'disk full at {tmp_path / "w"}: free space or choose another '
                    '--workdir')


def test_disk_full_reported_only_in_words(monkeypatch, capsys, tmp_path):
  """tensorstore (orbax's array writer) reports ENOSPC as a ValueError carrying the OS's words."""
  from metadrop_jax import train

  def full(*a, **k):
    raise ValueError('Error writing "d/0.0" in OCDBT: OUT_OF_RANGE: [OS error: No space left on '
                     'device] [source locations=...]')
  monkeypatch.setattr(train, 'train', full)
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=train',
                          f'--workdir={tmp_path}')
  assert_user_error(rc, err, f'disk full at {tmp_path}: free space')


def test_permission_denied_is_one_line(monkeypatch, capsys, tmp_path):
  from metadrop_jax import train

  def denied(config, workdir):
    raise PermissionError(errno.EACCES, 'Permission denied', os.path.join(workdir, 'config.json'))
  monkeypatch.setattr(train, 'train', denied)
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=train',
                          f'--workdir={tmp_path}')
  assert_user_error(rc, err, f'permission denied: {tmp_path}/config.json', 'another --workdir')


def test_a_bug_keeps_its_traceback(monkeypatch, capsys, tmp_path):
  """Only errors a user can fix are shortened; anything else propagates (exit 1, traceback)."""
  from metadrop_jax import train
  monkeypatch.setattr(train, 'train', lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=train',
               f'--workdir={tmp_path}')


# ==== metrics.jsonl ===============================================================================

def _metrics_file(path: Path, n=80, bad=None, tail=''):
  lines = [json.dumps({'step': 5 * i, 'train/loss': 1.0 / i}) for i in range(1, n + 1)]
  for i, text in (bad or {}).items():
    lines[i - 1] = text
  path.write_text('\n'.join(lines) + '\n' + tail)
  return lines


def test_garbage_line_in_metrics_keeps_every_valid_row(tmp_path):
  """One garbage line (line 10) in metrics.jsonl, then resume: the rows after it used to be
  deleted silently. Now every valid row stays, the warning names metrics.jsonl:10 and the line
  is kept in metrics.jsonl.skipped."""
  lines = _metrics_file(tmp_path / 'metrics.jsonl', bad={10: '{"step": 50, "train/lo#@!'})
  with pytest.warns(RuntimeWarning, match=r'metrics\.jsonl:10: not a metrics row'):
    w = metrics.MetricWriter(str(tmp_path), resume_step=400, tensorboard=False)
  w.write_scalars(405, {'train/loss': 0.5})
  w.close()
  rows = metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  want = [json.loads(l) for i, l in enumerate(lines, 1) if i != 10] + [
      {'step': 405, 'train/loss': 0.5}]
  assert rows == want and len(rows) == 80
  assert (tmp_path / 'metrics.jsonl.skipped').read_text() == lines[9] + '\n'


def test_cut_last_line_and_stepless_rows_are_kept_aside(tmp_path):
  _metrics_file(tmp_path / 'metrics.jsonl', n=6, bad={2: '[1, 2]', 3: '{"loss": 1}'},
                tail='{"step": 35, "tra')
  with pytest.warns(RuntimeWarning) as rec:
    metrics.MetricWriter(str(tmp_path), resume_step=20, tensorboard=False).close()
  msg = ' '.join(str(r.message) for r in rec)
  assert 'metrics.jsonl:2' in msg and 'metrics.jsonl:7' in msg and 'without a step' in msg
  assert [r['step'] for r in metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))] == [5, 20]
  assert len((tmp_path / 'metrics.jsonl.skipped').read_text().splitlines()) == 3


def test_read_jsonl_warns_with_file_and_line(tmp_path):
  p = tmp_path / 'm.jsonl'
  p.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.warns(RuntimeWarning, match=r'm\.jsonl:2: not a JSON object'):
    assert metrics.read_jsonl(str(p)) == [{'step': 1}, {'step': 2}]


# ==== the data cache ==============================================================================

def _prepare_fake(tmp_path, arrays=None):
  arrays = arrays or {'train': np.random.default_rng(0).integers(0, 256, (10, 4, 8, 8, 1),
                                                                 dtype=np.uint8)}
  d, m = cache.prepare(dataset='fake', cache_dir=tmp_path / 'cache', key={'v': 1},
                       source_files=lambda: [], build=lambda: (arrays, {}), description='',
                       log=H.quiet)
  return d, m, arrays


def test_modified_cache_array_of_the_same_shape_is_detected(tmp_path):
  """A cached train.npy with classes altered (same shape, same dtype) was used
  silently. The manifest's per-split CRC-32 catches it; the message says how to rebuild."""
  d, m, arrays = _prepare_fake(tmp_path)
  assert len(m['splits']['train']['crc32']) == 8
  np.testing.assert_array_equal(cache.load(d, m, 'train'), arrays['train'])
  altered = arrays['train'].copy()
  altered[3:7] = altered[3:7][::-1]               # 4 classes swapped around: same values, shape
  np.save(d / 'train.npy', altered)
  with pytest.raises(DataError, match=rf'{d}/train\.npy: contents changed since the cache was '
                                      rf'built .*delete {d} to rebuild it'):
    cache.load(d, cache.read_manifest(d), 'train')
  one_bit = arrays['train'].copy()
  one_bit[9, 3, 7, 7, 0] ^= 1
  np.save(d / 'train.npy', one_bit)
  with pytest.raises(DataError, match='contents changed'):
    cache.load(d, cache.read_manifest(d), 'train')


def test_modified_omniglot_cache_through_load_split(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  c = H.data_config('omniglot', root, 'local', tmp_path / 'cache')
  train = omniglot.load_split(c, 'train', **H.OMNI_COUNTS)
  d, _ = omniglot.prepare(c, log=H.quiet, **H.OMNI_COUNTS)
  train[:4] = train[4:8].copy()                   # one character replaced by another
  np.save(d / 'train.npy', train)
  with pytest.raises(DataError, match=r'train\.npy: contents changed.*delete'):
    omniglot.load_split(c, 'train', **H.OMNI_COUNTS)


def test_a_cache_without_its_crc32_is_rebuilt_never_blessed(tmp_path):
  """A manifest without the CRC-32 (a cache built before the check) and a damaged array: the
  damage was accepted and blessed with a new CRC. Now the cache is rebuilt from the source
  (and a direct load refuses it)."""
  d, m, arrays = _prepare_fake(tmp_path)
  manifest = json.loads((d / 'manifest.json').read_text())
  del manifest['splits']['train']['crc32']
  (d / 'manifest.json').write_text(json.dumps(manifest))
  damaged = arrays['train'].copy()
  damaged[2, 1] ^= 0xFF
  np.save(d / 'train.npy', damaged)
  with pytest.raises(DataError, match=r'records no CRC-32 of it, so it cannot be told intact; '
                                      r'delete .* to rebuild it'):
    cache.load(d, cache.read_manifest(d), 'train')
  logs, builds = [], []
  d2, m2 = cache.prepare(dataset='fake', cache_dir=tmp_path / 'cache', key={'v': 1},
                         source_files=lambda: [], build=lambda: builds.append(1) or (arrays, {}),
                         description='', log=logs.append)
  assert d2 == d and builds == [1] and 'records no CRC-32 of train' in logs[0]
  assert m2['splits']['train']['crc32'] == m['splits']['train']['crc32']
  np.testing.assert_array_equal(cache.load(d, cache.read_manifest(d), 'train'), arrays['train'])


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_no_temp(tmp_path):
  """A real ENOSPC (the temp file is a link to /dev/full): the temp file was left behind."""
  if not os.path.exists('/dev/full'):
    pytest.skip('no /dev/full on this system')
  p = tmp_path / 'r.json'
  metrics.write_json_atomic(str(p), {'a': 1})
  os.symlink('/dev/full', f'{p}.tmp.{os.getpid()}')
  with pytest.raises(OSError) as e:
    metrics.write_json_atomic(str(p), {'a': 2})
  assert e.value.errno == errno.ENOSPC
  assert json.loads(p.read_text()) == {'a': 1} and os.listdir(tmp_path) == ['r.json']


def test_disk_full_while_writing_the_cache(tmp_path, monkeypatch):
  """A real ENOSPC from the kernel: the array's temporary file is a link to /dev/full."""
  d = cache.cache_path(tmp_path / 'cache', 'fake', {'v': 1})
  if os.path.exists('/dev/full'):
    d.mkdir(parents=True)
    os.symlink('/dev/full', d / f'.train.npy.tmp-{os.getpid()}')
  else:
    def full(fd):
      raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(DataError, match=rf'disk full at {d} while writing the data cache: free '
                                      r'space or set --config\.data\.cache_dir') as e:
    _prepare_fake(tmp_path)
  assert '\n' not in str(e.value)
  assert not [p for p in d.iterdir()]              # nothing half-written left behind


def test_a_failed_build_leaves_no_cache_folder(tmp_path):
  """A preparation that fails (missing data, no network) used to leave an empty
  <cache_dir>/<dataset>-<hash> folder; a cache_dir that existed before stays."""
  def fails():
    raise DataError('no data')
  for cache_dir in (tmp_path / 'new' / 'cache', tmp_path):
    with pytest.raises(DataError, match='no data'):
      cache.prepare(dataset='fake', cache_dir=cache_dir, key={'v': 1}, source_files=lambda: [],
                    build=fails, description='', log=H.quiet)
  assert sorted(os.listdir(tmp_path)) == []


def test_unwritable_cache_dir(tmp_path, monkeypatch):
  def denied(path, a):
    raise PermissionError(errno.EACCES, 'Permission denied', str(path))
  monkeypatch.setattr(cache, '_atomic_save_npy', denied)
  with pytest.raises(DataError, match=r'cannot write the data cache .*train\.npy.*'
                                      r'--config\.data\.cache_dir to a writable folder'):
    _prepare_fake(tmp_path)


# ==== source data ================================================================================

def test_unreadable_omniglot_zip_names_the_file(tmp_path, deny_read):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  deny_read(root / 'images_evaluation.zip')
  c = H.data_config('omniglot', root, 'local', tmp_path / 'cache')
  with pytest.raises(DataError, match=rf'{root}/images_evaluation\.zip: cannot read it '
                                      r'\(Permission denied\); make it readable') as e:
    omniglot.load_split(c, 'train', **H.OMNI_COUNTS)
  assert '\n' not in str(e.value)


def test_unreadable_miniimagenet_image_names_the_file(tmp_path, deny_read):
  tree = H.write_tree(tmp_path / 'tree', H.mini_files())
  victim = sorted((tree / 'miniimagenet' / 'val').rglob('*.jpg'))[1]
  deny_read(victim)
  c = H.data_config('miniimagenet', tree, 'local', tmp_path / 'cache')
  with pytest.raises(DataError, match=rf'{victim}: cannot read it \(Permission denied\)'):
    miniimagenet.load_split(c, 'train', **H.MINI_COUNTS)


def _corrupt_deflated_member(path: Path, files: dict, victim: str):
  """A zip of ``files`` (deflated) whose ``victim`` member holds an invalid deflate stream."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
    for name, data in files.items():
      z.writestr(name, data)
  with zipfile.ZipFile(path) as z:
    info = z.getinfo(victim)
  raw = bytearray(path.read_bytes())
  start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
  raw[start:start + 8] = b'\xff' * 8               # block type 11: "invalid block type"
  path.write_bytes(bytes(raw))
  return path


def test_corrupt_deflated_omniglot_member_names_zip_and_member(tmp_path):
  files = H.omniglot_files()
  victim = sorted(files['images_evaluation'])[3]
  root = tmp_path / 'o'
  H.write_zip(root / 'images_background.zip', files['images_background'])
  zp = _corrupt_deflated_member(root / 'images_evaluation.zip', files['images_evaluation'], victim)
  with zipfile.ZipFile(zp) as z, pytest.raises(Exception) as raw:
    z.read(victim)
  assert isinstance(raw.value, zlib.error)        # which used to escape, naming no file
  c = H.data_config('omniglot', root, 'local', tmp_path / 'cache')
  with pytest.raises(DataError, match=rf'{zp}: member {victim} is corrupt \(zlib\.error: .*\); get a '
                                      r'fresh copy of images_evaluation\.zip'):
    omniglot.load_split(c, 'test', **H.OMNI_COUNTS)


def test_corrupt_deflated_miniimagenet_member_names_zip_and_member(tmp_path):
  files = H.mini_files()
  victim = sorted(k for k in files if k.startswith('miniimagenet/test/'))[2]
  zp = _corrupt_deflated_member(tmp_path / 'miniimagenet_84x84.zip', files, victim)
  c = H.data_config('miniimagenet', zp, 'local', tmp_path / 'cache')
  with pytest.raises(DataError, match=rf'member {victim} of {zp} is corrupt or unreadable '
                                      r'\(zlib\.error: .*get a fresh copy of miniimagenet_84x84\.zip'):
    miniimagenet.load_split(c, 'test', **H.MINI_COUNTS)


def test_offline_without_omniglot_fails_fast_saying_where_to_put_it(tmp_path, monkeypatch,
                                                                    capsys):
  """No data path, no local copy, no network: TFDS used to retry its downloads for 213 s."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('METADROP_DATA_DIR', str(tmp_path / 'nothing'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  monkeypatch.setattr(omniglot, 'network_reachable', lambda *a, **k: False)
  from metadrop_jax import data as data_lib
  t0 = time.time()
  with pytest.raises(DataError) as e:
    data_lib.load_split(H.data_config('omniglot', cache_dir=tmp_path / 'cache'), 'train')
  assert time.time() - t0 < 5
  msg = str(e.value)
  assert '\n' not in msg and 'no network' in msg and 'github.com unreachable' in msg
  assert 'put images_background.zip and images_evaluation.zip in ./data/omniglot' in msg
  assert '--config.data.path=' in msg


def test_offline_omniglot_through_launch(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('METADROP_DATA_DIR', str(tmp_path / 'nothing'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  monkeypatch.setattr(omniglot, 'network_reachable', lambda *a, **k: False)
  from metadrop_jax import data as data_lib
  monkeypatch.setattr(data_lib, 'default_search_dirs', lambda name: [str(tmp_path / 'none')])
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/omniglot_20way1shot.py',
                          '--mode=prepare', f'--config.data.cache_dir={tmp_path / "cache"}')
  assert_user_error(rc, err, 'Omniglot: no local copy', 'no network')


def test_network_probe_is_quick_and_honest():
  t0 = time.time()
  assert omniglot.network_reachable(('127.0.0.1', 1), timeout=2.0) is False   # refused port
  assert time.time() - t0 < 3


def test_tfds_with_zips_in_its_manual_dir_is_not_called_offline(tmp_path):
  manual = tmp_path / 'tfds' / 'downloads' / 'manual'
  assert not omniglot.tfds_has_local_copy(tmp_path / 'tfds')
  manual.mkdir(parents=True)
  for f in omniglot.TFDS_FILES:
    (manual / f).write_bytes(b'zip')
  assert omniglot.tfds_has_local_copy(tmp_path / 'tfds')


# ==== the other command lines, and what a failed start leaves behind ==============================

@pytest.mark.parametrize('module,args', [
    ('export', ['--workdir={none}', '--out={tmp}/x.npz']),
    ('robustness', ['--workdirs={none}']),
    ('visualize', ['boundaries', '--npz={none}.npz', '--out_dir={tmp}/figs']),
    ('tuning', ['--workdirs={none}', '--field=inner_lr']),
    ('method_study', ['--columns=a={none}']),
    ('publish', ['--workdir={none}', '--out={tmp}/pub']),
    ('report', ['--workdirs={none}']),
])
def test_every_cli_says_a_missing_input_in_one_line(module, args, tmp_path, capsys):
  """Each metadrop_jax.cli module ends a missing workdir / file with one line and exit code 2
  (export, robustness and visualize used to show a traceback) and writes nothing."""
  import importlib
  main = importlib.import_module(f'metadrop_jax.cli.{module}').main
  argv = [a.format(none=tmp_path / 'none', tmp=tmp_path) for a in args]
  with pytest.raises(SystemExit) as e:
    main(argv)
  err = capsys.readouterr().err
  assert_user_error(e.value.code, err, str(tmp_path / 'none'))
  assert sorted(os.listdir(tmp_path)) == []


def test_a_workdir_under_a_file_is_one_line(monkeypatch, capsys, tmp_path):
  (tmp_path / 'f').write_text('')
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=train',
                          f'--workdir={tmp_path / "f" / "w"}')
  assert_user_error(rc, err, f'--workdir={tmp_path / "f" / "w"} cannot be created',
                    'Not a directory')


def test_a_run_that_cannot_start_leaves_no_workdir(monkeypatch, capsys, tmp_path):
  """Missing data used to leave a workdir holding only its lock file; an existing workdir stays."""
  monkeypatch.setenv('METADROP_DATA_DIR', str(tmp_path / 'nothing'))
  from metadrop_jax import data as data_lib
  monkeypatch.setattr(data_lib, 'default_search_dirs', lambda name: [str(tmp_path / 'none')])
  wd = tmp_path / 'a' / 'w'
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/mimgnet_5way1shot.py',
                          '--mode=train', f'--workdir={wd}')
  line = assert_user_error(rc, err, 'miniImageNet: data.path is empty and nothing is in',
                           str(tmp_path / 'none'), '--config.data.path=')
  assert 'prepare --help' in line and not wd.exists()
  (tmp_path / 'kept').mkdir()
  rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/mimgnet_5way1shot.py',
                          '--mode=train', f'--workdir={tmp_path / "kept"}')
  assert rc == 2 and (tmp_path / 'kept').is_dir()


def test_eval_without_a_checkpoint_makes_no_checkpoint_folder(monkeypatch, capsys, tmp_path):
  wd = tmp_path / 'w'
  wd.mkdir()
  (wd / 'config.json').write_text(tiny_config().to_json_best_effort())
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={wd}')
  assert_user_error(rc, err, f'no checkpoint in {wd}/checkpoints', 'train first')
  assert sorted(os.listdir(wd)) == ['config.json']


def test_eval_shortcut_names_an_unknown_field_and_a_wrong_type(monkeypatch, capsys, tmp_path):
  wd = tmp_path / 'w'
  wd.mkdir()
  (wd / 'config.json').write_text(tiny_config().to_json_best_effort())
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={wd}', '--config.foo=1')
  assert_user_error(rc, err, "--config.foo: the config has no field 'foo'")
  rc, _, err = run_launch(monkeypatch, capsys, '--mode=eval', f'--workdir={wd}',
                          '--config.eval.num_episodes=abc')
  assert_user_error(rc, err, "--config.eval.num_episodes='abc': the field takes int values")


def test_campaign_help_is_the_overview(capsys):
  import launch
  with pytest.raises(SystemExit) as e:
    launch.campaign_alias(['--mode=campaign', '--help'])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert 'python -m tools.long_runs.campaign' in out and '{plan,sitting,report}' in out


def test_data_errors_are_one_line_and_the_whole_help_is_in_prepare(tmp_path, capsys,
                                                                    monkeypatch):
  """Missing data: one line with the fix; the full instructions are prepare's --help, whose own
  errors name its flags (--path, not --config.data.path)."""
  from metadrop_jax import data as data_lib
  monkeypatch.setattr(data_lib, 'default_search_dirs', lambda name: [str(tmp_path / 'none')])
  for name, path in (('omniglot', tmp_path / 'none'), ('miniimagenet', tmp_path / 'none'),
                     ('miniimagenet', '')):
    with pytest.raises(DataError) as e:
      data_lib.load_split(H.data_config(name, path=str(path) if path else '',
                                        cache_dir=tmp_path / 'c'), 'train')
    assert '\n' not in str(e.value) and '--config.data.path=' in str(e.value), str(e.value)
  from metadrop_jax.data import prepare
  assert prepare.main(['--dataset=omniglot', '--source=local', f'--path={tmp_path / "none"}']) == 2
  err = capsys.readouterr().err
  assert ' --path=<that folder>' in err and '--config.data' not in err
  with pytest.raises(SystemExit):
    prepare.main(['--help'])
  out = capsys.readouterr().out
  assert 'images_background.zip' in out and 'cannot be downloaded automatically' in out


def test_old_module_entry_points_say_where_they_moved():
  """python -m metadrop_jax.report (its entry point before the CLIs moved) ran nothing, rc 0."""
  for module in ('report', 'export'):
    p = subprocess.run([sys.executable, '-m', f'metadrop_jax.{module}', '--workdirs=x'], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    line = assert_user_error(p.returncode, p.stderr, f'run python -m metadrop_jax.cli.{module} '
                             f'(installed: metadrop-{module}) with the same options')
    assert p.stderr.strip() == line


def test_a_campaign_dir_that_is_a_file(tmp_path, capsys):
  """plan printed the default 16-run plan (rc 0), sitting raised a traceback."""
  from tools.long_runs import campaign
  f = tmp_path / 'camp'
  f.write_text('x')
  for cmd in ('plan', 'sitting', 'report'):
    with pytest.raises(SystemExit) as e:
      campaign.main([cmd, f'--campaign_dir={f}'])
    assert_user_error(e.value.code, capsys.readouterr().err, f'--campaign_dir={f} is a file')
  assert f.read_text() == 'x' and os.listdir(tmp_path) == ['camp']


def test_campaign_report_warns_of_a_cut_results_json(tmp_path, capsys):
  """report left the run's cell blank without a word (plan warned): the same warning, once."""
  from tests.test_long_runs_state import fake_run
  from tools.long_runs import campaign, runs
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  fake_run(cdir / 'tiny_maml_exact', 1000, evaluated=True)
  (cdir / 'tiny_maml_exact' / 'results.json').write_text('{"acc')
  with pytest.warns(RuntimeWarning) as rec:
    assert campaign.main(['report', f'--campaign_dir={cdir}']) == 0
  said = [str(w.message) for w in rec if 'results.json' in str(w.message)]
  assert len(said) == 1 and 'tiny_maml_exact/results.json is unreadable' in said[0]
  assert 'read as not meta-tested (the next sitting meta-tests tiny_maml_exact again)' in said[0]


# ==== the terminal: library logs ==================================================================

def test_library_logs_are_quiet_unless_verbosity_is_given(monkeypatch, capsys, tmp_path):
  """orbax's INFO lines (~35 per checkpoint) and the tracebacks its threads log for an error
  that reaches the main thread (a full disk) are dropped; the project's lines and the libraries'
  warnings stay; --verbosity (absl's flag) installs no filter."""
  import logging as pylogging

  import launch
  import orbax.checkpoint as ocp
  from absl import logging as absl_logging
  from orbax.checkpoint._src.futures import future

  kept, dropped = [], []

  class Sort(pylogging.Handler):
    def emit(self, record):
      (kept if quiet.filter(record) else dropped).append(record)
  quiet = launch.QuietLibraries()
  sort = Sort()
  pylogging.getLogger().addHandler(sort)
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    ocp.CheckpointManager(str(tmp_path / 'ck'))          # orbax's INFO lines

    async def full():        # a save's commit thread meets a full disk
      raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(OSError):                           # the main thread gets the error
      future.CommitFuture(full()).result()
    absl_logging.warning('a library warning')
  finally:
    absl_logging.set_verbosity(level)
    pylogging.getLogger().removeHandler(sort)
  orbax = [r for r in dropped if 'orbax' in r.pathname]
  assert len(orbax) >= 3 and any(r.exc_info for r in orbax), [r.getMessage() for r in dropped]
  assert [r.getMessage() for r in kept] == ['a library warning']
  mine = pylogging.LogRecord('absl', pylogging.INFO, launch.__file__, 1, 'devices: cpu', (), None)
  assert quiet.filter(mine)
  filters = lambda: [f for f in absl_logging.get_absl_handler().filters
                     if isinstance(f, launch.QuietLibraries)]
  for flag, installed in (('--verbosity=0', 0), ('--verbose=false', 1)):
    rc, _, err = run_launch(monkeypatch, capsys, '--config=configs/tiny.py', '--mode=prepare',
                            flag)
    assert rc == 0, err
    assert len(filters()) == installed
  absl_logging.get_absl_handler().removeFilter(filters()[0])
