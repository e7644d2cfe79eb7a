"""The GPU job's decisions from the committed records (tools/long_runs): which formulations to
measure, when the smoke test need not run, what compile cache comes back, and what unpacking
keeps of the measurements."""

import json
import os
import tarfile

import pytest

from tools.long_runs import choices, fingerprint, records

CELLS = {'baseline': ({'model.conv_impl': 'xla', 'model.pool_impl': 'reduce_window'}, True, ''),
         'select_im2col': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}, True, ''),
         'select_im2col_nondet': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'},
                                  False, ''),
         'new_cell': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                       'model.inner_loop': 'scan'}, True, '')}


def _record(repo, name, content):
  d = repo / 'docs' / 'bench' / 'windows'
  d.mkdir(parents=True, exist_ok=True)
  (d / name).write_text(json.dumps(content))


def test_auto_measures_only_new_formulations_beside_the_one_in_use(tmp_path):
  _record(tmp_path, 'a_K_formulations.json', {
      'device': 'gpu:K', 'config': 'omni', 'method': 'metadrop',
      'rows': [{'cell': 'baseline'}, {'cell': 'select_im2col'}, {'cell': 'new_cell',
                                                                 'error': 'not run: deadline'}]})
  _record(tmp_path, 'b_L_formulations.json', {'device': 'gpu:L', 'config': 'omni',
                                              'method': 'metadrop', 'rows': [{'cell': 'new_cell'}]})
  measured = choices.measured_formulations('K', 'omni', 'metadrop', repo=str(tmp_path))
  assert measured == {'baseline', 'select_im2col'}        # a cell cut by the deadline is not
  ref = choices.reference_cell({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}, CELLS)
  assert ref == 'select_im2col'                             # the deterministic one
  assert choices.reference_cell({'model.pool_impl': 'select'}, CELLS) is None
  cells = list(CELLS)
  assert choices.formulation_plan('auto', cells, measured, ref) == (
      'formulations', ['select_im2col', 'select_im2col_nondet', 'new_cell'])
  assert choices.formulation_plan('auto', cells, set(cells), ref) == ('skip', [])
  assert choices.formulation_plan('formulations', cells[:2], set(cells), ref) == (
      'formulations', cells[:2])


def test_the_smoke_test_is_on_record_only_for_the_same_card_and_numerics(tmp_path):
  fp = fingerprint.numerics_fingerprint('0.11.2')
  assert fp != fingerprint.numerics_fingerprint('0.11.3')     # the jax version is part of it
  smoke = {'rows': [{'pass': True}], 'fingerprint': fp,
           'pass_highest_by_conv_impl': {'im2col': True}}
  _record(tmp_path, '20261204T000000Z_K.json', {'device_kind': 'K',
                                                 'phases': {'smoke': {'result': smoke}}})
  _record(tmp_path, '20261204T000000Z_K_formulations.json', {'device': 'gpu:K', 'rows': []})
  rec = choices.smoke_on_record('K', fp, repo=str(tmp_path))
  assert rec['pass_highest_by_conv_impl'] == {'im2col': True}
  assert rec['on_record'] == os.path.join('docs', 'bench', 'windows', '20261204T000000Z_K.json')
  assert choices.smoke_on_record('L', fp, repo=str(tmp_path)) is None
  assert choices.smoke_on_record('K', fingerprint.numerics_fingerprint('0.12'),
                                 repo=str(tmp_path)) is None


def test_numerics_fingerprint_follows_the_library_files(tmp_path, monkeypatch):
  """A change to a numerics file changes the fingerprint (so the smoke test runs again)."""
  import shutil
  fake = tmp_path / 'repo'
  (fake / 'tools' / 'long_runs').mkdir(parents=True)
  shutil.copytree(os.path.join(os.path.dirname(fingerprint.__file__), '..', '..', 'metadrop_jax'),
                  fake / 'metadrop_jax')
  shutil.copy(fingerprint.__file__, fake / 'tools' / 'long_runs' / 'fingerprint.py')
  monkeypatch.setattr(fingerprint, '__file__', str(fake / 'tools' / 'long_runs' / 'fingerprint.py'))
  before = fingerprint.numerics_fingerprint('0.11.2')
  nets = fake / 'metadrop_jax' / 'nets.py'
  text = nets.read_text()
  # comments, docstrings and layout are not the code: the check on record stays valid
  edited = text.replace('"""The base network', '"""Reworded: the base network', 1).replace(
      'def max_pool(', '# a new comment\n\n\ndef max_pool(', 1)
  assert edited != text
  nets.write_text(edited)
  assert fingerprint.numerics_fingerprint('0.11.2') == before
  nets.write_text(edited.replace('jnp.where(m >= phase, m, phase)', 'jnp.where(m > phase, m, phase)'))
  changed = fingerprint.numerics_fingerprint('0.11.2')
  assert changed != before
  # the Pallas conv's code is the smoke test's subject too
  kernel = fake / 'metadrop_jax' / 'kernels' / 'conv3x3.py'
  kernel.write_text(kernel.read_text().replace('np.uint32(0x1000)', 'np.uint32(0x0800)', 1))
  assert fingerprint.numerics_fingerprint('0.11.2') != changed


def test_the_compile_cache_keeps_the_newest_entries_that_fit(tmp_path):
  cache = tmp_path / 'cache'
  cache.mkdir()
  for i in range(6):
    p = cache / f'entry{i}'
    p.write_bytes(os.urandom(100_000))             # incompressible
    os.utime(p, (1000 + i, 1000 + i))
  dest = str(tmp_path / 'c.tgz')
  assert records.pack_cache(str(cache), dest, 350_000) == 3
  with tarfile.open(dest) as tar:
    assert sorted(tar.getnames()) == ['entry3', 'entry4', 'entry5']
  assert os.path.getsize(dest) <= 350_000
  assert records.pack_cache(str(cache), str(tmp_path / 'd.tgz'), 50_000) == 0
  assert not os.path.exists(tmp_path / 'd.tgz')


def test_every_setting_and_method_the_campaign_reaches_gets_a_timing():
  """auto: the first config's untimed cells, then the cell in use for each (setting, method) of
  the next sitting that has no timing on this card kind; formulations: the cells as given."""
  timed = {('omni', 'metadrop'): {'baseline', 'select_im2col'},
           ('omni', 'maml'): {'select_im2col'}}
  measured = lambda c, m: timed.get((c, m), set())
  cells = ['baseline', 'select_im2col', 'new_cell']
  pending = [('omni', 'metadrop'), ('omni', 'maml'), ('mimg', 'metadrop')]
  assert choices.formulation_runs('auto', 'omni', cells, 'select_im2col', measured, pending) == [
      ('omni', 'metadrop', ['select_im2col', 'new_cell']), ('mimg', 'metadrop', ['select_im2col'])]
  timed[('omni', 'metadrop')].add('new_cell')
  timed[('mimg', 'metadrop')] = {'select_im2col'}
  assert choices.formulation_runs('auto', 'omni', cells, 'select_im2col', measured, pending) == []
  assert choices.formulation_runs('formulations', 'omni', cells[:1], None, measured, pending) == [
      ('omni', 'metadrop', ['baseline'])]


def test_measured_formulations_reads_every_run_of_a_record(tmp_path):
  _record(tmp_path, 'a_K_formulations.json', {
      'device': 'gpu:K', 'config': 'omni', 'method': 'metadrop', 'rows': [{'cell': 'x'}],
      'also': [{'device': 'gpu:K', 'config': 'omni', 'method': 'maml', 'rows': [{'cell': 'y'}]}]})
  assert choices.measured_formulations('K', 'omni', 'maml', repo=str(tmp_path)) == {'y'}
  assert choices.measured_formulations('K', 'omni', 'metadrop', repo=str(tmp_path)) == {'x'}


def _formulations():
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      'formulations', os.path.join(root, 'benchmarks', 'formulations.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _row(cell, ms, digest, det, extra=''):
  return {'cell': cell, 'ms_per_iter_pipelined': ms, 'state_sha256': digest,
          'deterministic_ops': det, 'extra_flags': extra,
          'overrides': {'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}}


def test_a_cell_without_deterministic_ops_trains_only_if_two_processes_agreed():
  """Autotuned deterministic kernels (--xla_gpu_exclude_nondeterministic_ops) may win, but only
  where the cell's two processes ('<cell>', '<cell>_again') ended in the same state; the winner
  comes with the XLA flags it was measured with."""
  f = _formulations()
  ex, tr = f.EXCLUDE_NONDET, f'{f.EXCLUDE_NONDET} {f.TRITON_GEMM}'
  rows = [_row('baseline', 38.0, 'a', True), _row('select_im2col', 18.0, 'b', True),
          _row('select_im2col_excl', 17.0, 'c', False, ex),
          _row('select_im2col_excl_again', 16.5, 'c', False, ex),
          _row('select_nondet', 15.0, 'd', False), _row('select_nondet_again', 15.0, 'e', False),
          _row('select_im2col_excl_triton', 14.0, 'g', False, tr),       # no second process
          {'cell': 'select_im2col_triton', 'error': 'crashed'}]
  d = f.determinism(rows)
  assert d['two_processes_identical'] == {'select_im2col_excl': True, 'select_nondet': False}
  assert d['reproducible'] == ['baseline', 'select_im2col', 'select_im2col_excl']
  assert d['nondet_two_processes_identical'] is False
  assert f.fastest(rows)['cell'] == 'select_im2col'                    # deterministic ops only
  assert f.fastest(rows, d['reproducible'])['cell'] == 'select_im2col_excl'   # not its _again
  smoke = {'rows': [1], 'pass_highest_by_conv_impl': {'im2col': True}}
  c = choices.choose_formulation({'rows': rows, 'determinism': d}, smoke)
  assert (c['cell'], c['xla_flags']) == ('select_im2col_excl', ex)
  # the pair disagreed: the deterministic-ops cell, with its flag
  rows[3] = _row('select_im2col_excl_again', 16.5, 'x', False, ex)
  d = f.determinism(rows)
  c = choices.choose_formulation({'rows': rows, 'determinism': d}, smoke)
  assert (c['cell'], c['xla_flags']) == ('select_im2col', '--xla_gpu_deterministic_ops=true')
  # a record from before pairs were judged: deterministic ops only
  assert choices.choose_formulation({'rows': rows}, smoke)['cell'] == 'select_im2col'


def test_the_formulations_flags_are_recorded_and_reapplied(tmp_path, monkeypatch):
  """The XLA flags a formulation was measured with travel with it: recorded in campaign.json
  for the card kind, put in force (replacing the job's determinism flag, keeping the rest) for
  the sittings of later jobs that only train, and the reference cell of the next benchmark is
  the one with those flags."""
  import types
  from tools.long_runs import runs, window
  det, ex = '--xla_gpu_deterministic_ops=true', '--xla_gpu_exclude_nondeterministic_ops=true'
  assert runs.formulation_xla_flags(f'{det} --xla_other=1', ex) == f'--xla_other=1 {ex}'
  assert runs.formulation_xla_flags(f'{det} --xla_other=1', '') == '--xla_other=1'
  assert runs.formulation_xla_flags(f'{det} --xla_other=1', None) == f'{det} --xla_other=1'
  assert runs.formulation_xla_flags(det, det) == det
  cdir = str(tmp_path / 'camp')
  runs.init_campaign(cdir, ['tiny'])
  monkeypatch.setattr(runs, 'device_kind', lambda: 'K')
  f = {'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}
  runs.resolve_formulation(cdir, runs.load_campaign(cdir), f)        # recorded without flags
  assert runs.recorded_xla_flags(runs.load_campaign(cdir), 'K') is None
  job = types.SimpleNamespace(env={'XLA_FLAGS': det}, a=types.SimpleNamespace(campaign_dir=cdir),
                              device_kind='K')
  none = {'overrides': {}, 'xla_flags': None}
  assert window.sitting_xla_flags(job, none) == det                   # as before: the job's
  assert choices.reference_cell(f, _formulations().CELLS, None) == 'select_im2col'
  runs.resolve_formulation(cdir, runs.load_campaign(cdir), f, ex)    # same fields, new flags
  assert runs.recorded_xla_flags(runs.load_campaign(cdir), 'K') == ex
  assert runs.recorded_formulation(runs.load_campaign(cdir), 'K') == f
  assert window.sitting_xla_flags(job, none) == ex                    # a training-only job
  assert window.sitting_xla_flags(job, {'overrides': f, 'xla_flags': det}) == det   # measured now
  assert choices.reference_cell(f, _formulations().CELLS, ex) == 'select_im2col_excl'
  # a sitting started by hand under other flags says so (it cannot change its own XLA_FLAGS)
  camp = runs.load_campaign(cdir)
  msg = runs.flags_differ_from_record(camp, det, 'K')
  assert ex in msg and 'XLA_FLAGS' in msg
  assert runs.flags_differ_from_record(camp, f'{ex} --xla_other=1', 'K') is None
  assert runs.flags_differ_from_record(camp, det, 'L') is None          # nothing recorded for L


def test_a_sitting_refuses_flags_it_does_not_run_under(tmp_path, monkeypatch, capsys):
  import pytest
  from tools.long_runs import campaign as campaign_cli
  from tools.long_runs import runs
  cdir = str(tmp_path / 'camp')
  runs.init_campaign(cdir, ['tiny'])
  ex = '--xla_gpu_exclude_nondeterministic_ops=true'
  monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_deterministic_ops=true')
  for args, says in (([f'--formulation_xla_flags={ex}'], 'give that --formulation too'),
                     (['--formulation=model.pool_impl=select', f'--formulation_xla_flags={ex}'],
                      'this process runs without')):
    with pytest.raises(SystemExit) as e:
      campaign_cli.main(['sitting', f'--campaign_dir={cdir}', *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1
  assert runs.recorded_formulation(runs.load_campaign(cdir), runs.device_kind()) == {}


def test_the_code_digest_is_the_same_text_on_every_python():
  """Field by field without the empty ones: Python 3.12's ``type_params=[]`` and the like do not
  change it, so the GPU machine's Python computes the fingerprint this one does."""
  assert fingerprint.code_digest_text('def f():\n  """Doc."""\n  # note\n  return 1\n') == (
      "Module(body=[FunctionDef(name='f', args=arguments(), "
      "body=[Return(value=Constant(value=1))])])")


def test_records_from_before_code_fingerprints_get_theirs_verified_against_git(tmp_path):
  """A job record whose fingerprint is the bytes-digest of the numerics files at its commit gets
  the code fingerprint of that commit; a record that does not match its commit is left alone;
  after an edit of comments only, the code fingerprint still finds the check on record."""
  import shutil
  import subprocess
  if shutil.which('git') is None:
    import pytest
    pytest.skip('no git here')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  repo = tmp_path / 'repo'
  shutil.copytree(os.path.join(root, 'metadrop_jax'), repo / 'metadrop_jax')
  git = lambda *a: subprocess.run(['git', *a], cwd=repo, check=True, capture_output=True,
                                  text=True).stdout.strip()
  git('init', '-q')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'add', 'metadrop_jax')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'x')
  commit = git('rev-parse', '--short', 'HEAD')
  legacy = fingerprint.fingerprint_at(commit, '0.11.2', str(repo), code_only=False)
  smoke = {'rows': [{'pass': True}], 'jax': '0.11.2', 'pass_highest_by_conv_impl': {'im2col': True}}
  job = lambda fp: {'device_kind': 'K', 'phases': {'info': {'result': {'commit': commit}},
                                                    'smoke': {'result': {**smoke, 'fingerprint': fp}}}}
  _record(repo, 'a_K.json', job(legacy))
  _record(repo, 'b_K.json', job('0123456789abcdef'))       # not this commit's
  changed = fingerprint.add_code_fingerprints(str(repo), log=lambda m: None)
  assert [os.path.basename(p) for p in changed] == ['a_K.json']
  code_fp = fingerprint.fingerprint_at(commit, '0.11.2', str(repo))
  rec = json.loads((repo / 'docs' / 'bench' / 'windows' / 'a_K.json').read_text())
  assert rec['phases']['smoke']['result']['code_fingerprint'] == code_fp != legacy
  assert choices.smoke_on_record('K', code_fp, repo=str(repo))['on_record'].endswith('a_K.json')
  assert fingerprint.add_code_fingerprints(str(repo), log=lambda m: None) == []   # done once


def test_the_committed_code_fingerprints_are_those_of_their_commits():
  """Every code_fingerprint in docs/bench/windows is that of the numerics code at its job's
  commit (recomputed from git)."""
  import pathlib
  import shutil
  import pytest
  root = pathlib.Path(__file__).resolve().parents[1]
  if shutil.which('git') is None or not (root / '.git').exists():
    pytest.skip('no git history here')
  checked = 0
  for p in sorted((root / 'docs' / 'bench' / 'windows').glob('*.json')):
    rec = json.loads(p.read_text())
    sm = (rec.get('phases', {}).get('smoke', {}).get('result') or {}) if isinstance(rec, dict) \
        else {}
    if 'code_fingerprint' in sm:
      commit = rec['phases']['info']['result']['commit']
      assert fingerprint.fingerprint_at(commit, sm['jax'], str(root)) == sm['code_fingerprint'], p
      checked += 1
  assert checked >= 1


def test_a_pallas_cell_trains_only_if_its_two_processes_agreed():
  """Deterministic ops say nothing about a Pallas kernel (Triton compiles it, XLA does not choose
  it): its cell is reproducible, and may win, only if '<cell>' and '<cell>_again' ended in the
  same state, even with deterministic ops on; its conv formulation must pass the smoke test."""
  f = _formulations()
  assert {'select_pallas', 'select_pallas_again'} <= set(f.CELLS)
  pallas = {'model.conv_impl': 'pallas', 'model.pool_impl': 'select'}
  rows = [_row('baseline', 38.0, 'a', True), _row('select_im2col', 18.0, 'b', True),
          {**_row('select_pallas', 9.0, 'p', True), 'overrides': pallas},
          {**_row('select_pallas_again', 9.1, 'p', True), 'overrides': pallas}]
  smoke = {'rows': [1], 'pass_highest_by_conv_impl': {'im2col': True, 'pallas': True}}
  d = f.determinism(rows)
  assert d['reproducible'] == ['baseline', 'select_im2col', 'select_pallas']
  assert f.fastest(rows, d['reproducible'])['cell'] == 'select_pallas'
  assert f.fastest(rows)['cell'] == 'select_im2col'             # flags alone: not the kernel
  c = choices.choose_formulation({'rows': rows, 'determinism': d}, smoke)
  assert (c['cell'], c['overrides']) == ('select_pallas', pallas)
  assert choices.choose_formulation({'rows': rows, 'determinism': d},
                                    {'rows': [1], 'pass_highest_by_conv_impl': {'im2col': True}}
                                    )['cell'] == 'select_im2col'   # pallas not checked vs float64
  rows[3] = {**rows[3], 'state_sha256': 'q'}                       # the two processes differ
  d = f.determinism(rows)
  assert d['reproducible'] == ['baseline', 'select_im2col']
  assert choices.choose_formulation({'rows': rows, 'determinism': d}, smoke)['cell'] == \
      'select_im2col'
  rows.pop(3)                                                      # no second process timed
  d = f.determinism(rows)
  assert 'select_pallas' not in d['reproducible']
  assert choices.choose_formulation({'rows': rows, 'determinism': d}, smoke)['cell'] == \
      'select_im2col'


def test_the_job_times_the_pallas_cell_and_checks_its_formulation_by_default():
  """The GPU job's defaults: both processes of the Pallas cell among the formulations it times
  (right after today's winner, so that a short job still reaches them), and its conv
  formulation among those the smoke test checks against float64 in a job that times it."""
  from tools.long_runs import window
  ap = window._parser()
  a = ap.parse_args(['run', '--budget_s=60'])
  cells = a.formulations_cells.split(',')
  assert set(cells) <= set(_formulations().CELLS)
  assert cells.index('select_pallas') == cells.index('select_im2col') + 1
  assert cells.index('select_pallas_again') == cells.index('select_pallas') + 1
  from tools.long_runs import choices
  planned = [('omniglot_20way1shot', 'metadrop', cells)]   # a wave that times every cell
  assert 'pallas' in choices.smoke_keys(a.smoke_conv_impls, planned,
                                        _formulations().CELLS).split(',')
  measured = {'baseline', 'select', 'select_im2col'}
  mode, todo = choices.formulation_plan('auto', cells, measured, 'select_im2col')
  assert todo[:3] == ['select_im2col', 'select_pallas', 'select_pallas_again']
  # once the campaign trains with it, a later job times it beside new cells with its second
  # process, without which it would not count as reproducible in that job
  measured |= {'select_pallas', 'select_pallas_again'}
  mode, todo = choices.formulation_plan('auto', cells, measured, 'select_pallas')
  assert todo[:2] == ['select_pallas', 'select_pallas_again'] and 'select_nondet' in todo


def test_a_formulation_that_fails_on_the_device_fails_its_smoke_check_alone(monkeypatch):
  """A conv formulation whose kernel does not compile or run on the device fails its own rows
  of the smoke test; the others are still checked and passed."""
  import types
  import jax
  import numpy as np
  from tools.long_runs import gpu_check
  cpu, gpu = types.SimpleNamespace(platform='cpu'), types.SimpleNamespace(
      platform='gpu', device_kind='K')

  def fake_grad(cfg, params, ep, key, *, device, dtype, conv_impl):
    if device is gpu and conv_impl == 'pallas':
      raise RuntimeError('Triton: cannot compile')
    return 1.0, {'w': np.ones(3)}, 0.1
  monkeypatch.setattr(gpu_check, '_problem', lambda *a, **k: (None, None, None, None))
  monkeypatch.setattr(gpu_check, '_grad', fake_grad)
  monkeypatch.setattr(jax, 'devices', lambda backend=None: [cpu if backend == 'cpu' else gpu])
  out = gpu_check.check('tiny', gradients=('authors', 'exact'), precisions=('highest',),
                        conv_impls=('im2col', 'pallas'))
  assert out['pass_highest_by_conv_impl'] == {'im2col': True, 'pallas': False}
  assert len(out['rows']) == 4
  text = gpu_check.format_check(out)
  assert 'RuntimeError: Triton: cannot compile: FAIL' in text and text.count('PASS') == 2


# ------------------------------------------------------------------------------------------------
# Triton GEMMs and XLA's autotune cache (benchmarks/formulations.py, tools/long_runs)
# ------------------------------------------------------------------------------------------------

TRITON_HLO = """HloModule jit_train_step

%nested_lhs.1 (p0: f32[4,784,576]) -> f32[4,784,576] {
  %p0 = f32[4,784,576]{2,1,0} parameter(0)
  ROOT %bitcast.9 = f32[4,784,576]{2,1,0} bitcast(%p0)
}

%gemm_fusion_dot.3 (p0: f32[4,784,576], p1: f32[4,576,128]) -> f32[4,784,128] {
  %p0 = f32[4,784,576]{2,1,0} parameter(0)
  %lhs = f32[4,784,576]{2,1,0} fusion(%p0), kind=kCustom, calls=%nested_lhs.1
  %p1 = f32[4,576,128]{2,1,0} parameter(1)
  ROOT %dot.3 = f32[4,784,128]{2,1,0} dot(%lhs, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}, algorithm=dot_tf32_tf32_f32_x3
}

%gemm_fusion_dot.4 (p0: f32[4,196,576], p1: f32[4,576,128]) -> f32[4,196,128] {
  %p0 = f32[4,196,576]{2,1,0} parameter(0)
  %p1 = f32[4,576,128]{2,1,0} parameter(1)
  ROOT %dot.4 = f32[4,196,128]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}, algorithm=dot_tf32_tf32_f32_x3
}

%fused_reduce.5 (p0: f32[4,10]) -> f32[4] {
  %p0 = f32[4,10]{1,0} parameter(0)
  ROOT %dot.5 = f32[4]{0} dot(%p0, %p0), lhs_batch_dims={0}, lhs_contracting_dims={1}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

ENTRY %main.9 (a: f32[4,784,576], b: f32[4,576,128], c: f32[4,196,576], d: f32[4,10], e: f32[32,64], f: f32[64,8]) -> f32[4,784,128] {
  %a = f32[4,784,576]{2,1,0} parameter(0)
  %b = f32[4,576,128]{2,1,0} parameter(1)
  %c = f32[4,196,576]{2,1,0} parameter(2)
  %d = f32[4,10]{1,0} parameter(3)
  %e = f32[32,64]{1,0} parameter(4)
  %f = f32[64,8]{1,0} parameter(5)
  %gemm_fusion_dot.3.0 = f32[4,784,128]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.3, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"output_tiles":[{"sizes":["1","64","128"]}],"num_warps":"4","num_ctas":"1","num_stages":"3"}}}
  %gemm_fusion_dot.4.0 = f32[4,196,128]{2,1,0} fusion(%c, %b), kind=kCustom, calls=%gemm_fusion_dot.4, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"32","block_n":"64","block_k":"32","split_k":"1","num_stages":"4","num_warps":"4","num_ctas":"1"}}}
  %loop_dot_fusion.5 = f32[4]{0} fusion(%d), kind=kLoop, calls=%fused_reduce.5
  %custom-call.6 = (f32[32,8]{1,0}, s8[0]{0}) custom-call(%e, %f), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"precision_config":{"algorithm":"ALG_DOT_TF32_TF32_F32"}}}
  %custom-call.7 = (f32[32,8]{1,0}, s8[0]{0}) custom-call(%e, %f), custom_call_target="__cublas$lt$matmul", backend_config={}
  ROOT %r = f32[4,784,128]{2,1,0} add(%gemm_fusion_dot.3.0, %gemm_fusion_dot.3.0)
}
"""


def test_the_gemm_count_names_what_each_dot_became():
  """Triton GEMM fusions (both kinds XLA prints) with their tile configs, cuBLAS calls (both
  targets), and the dots outside any Triton fusion; a dot inside a Triton fusion's (nested)
  computations is that fusion's, not another one."""
  f = _formulations()
  g = f.gemm_counts(TRITON_HLO)
  assert (g['triton_gemm'], g['cublas_gemm'], g['cudnn_fusion'], g['other_dot']) == (2, 2, 0, 1)
  assert g['algorithms'] == {'dot_tf32_tf32_f32_x3': 2}
  assert len(g['triton_configs']) == 2 and all(v == 1 for v in g['triton_configs'].values())
  assert any('"block_m":"32"' in k for k in g['triton_configs'])
  assert any('"output_tiles"' in k for k in g['triton_configs'])
  assert f.format_gemms(g) == 'dots: 2 triton, 2 cublas, 1 other'
  from tools.long_runs import reports     # the job's closing table says it beside the timing
  row = {**_row('select_im2col_tf32x3_triton', 9.5, 'abcdef12', True), 'ms_per_iter': 9.9,
         'compile_s': 30.0, 'gemms': g}
  text = reports.format_window({'phases': {'bench': {'result': {'formulations': {'rows': [row]}}}}})
  assert '9.50 pipelined' in text and 'dots 2 triton 2 cublas 1 other' in text
  # the cuBLAS path of the same dots: each split into 3 GEMMs, nothing for Triton
  cublas = '\n'.join(f'  %cc.{i} = (f32[8,8]{{1,0}}, s8[0]{{0}}) custom-call(%e, %f), '
                     'custom_call_target="__cublas$gemm"' for i in range(6))
  g = f.gemm_counts('ENTRY %main (e: f32[8,8]) -> f32[8,8] {\n' + cublas + '\n}\n')
  assert (g['triton_gemm'], g['cublas_gemm'], g['other_dot']) == (0, 6, 0)


def test_the_triton_tf32x3_cells_fill_the_autotune_cache_before_they_read_it(tmp_path):
  """The '_fill' cell (no deterministic ops) autotunes into the named cache and compiles in an
  earlier wave than the deterministic cells that read it; every cell runs without the cache jax
  would attach, the cells that name one with that one; the flags are XLA's names."""
  from tools.long_runs import autotune, runs
  f = _formulations()
  fill, read = 'select_im2col_tf32x3_triton_fill', 'select_im2col_tf32x3_triton'
  for c in (fill, read, read + f.AGAIN):
    ov, _, extra = f.CELLS[c]
    assert ov['model.dot_algorithm'] == 'tf32_x3'
    assert {'--xla_gpu_triton_gemm_any=true', '--xla_gpu_cublas_fallback=false',
            f'--xla_gpu_per_fusion_autotune_cache_dir={autotune.CACHE_DIR}'} <= set(extra.split())
  assert f.fills_cache(fill) and not f.reads_cache(fill)
  assert f.reads_cache(read) and not f.fills_cache(read) and not f.reads_cache('select_im2col')
  w = f.waves(['select_im2col', read, 'select_im2col_bn1', fill, read + f.AGAIN, 'baseline'], 3)
  assert w == [[fill, 'select_im2col', 'select_im2col_bn1'], [read, read + f.AGAIN, 'baseline']]
  assert f.waves([fill, read], 6) == [[fill], [read]]
  assert f.waves(['select_im2col', 'baseline', 'select'], 2) == [
      ['select_im2col', 'baseline'], ['select']]                       # no cache: as given
  cache = tmp_path / 'tuned'
  flags = f.CELLS[read][2].replace(autotune.CACHE_DIR, str(cache))
  env = autotune.xla_env(f'{runs.DETERMINISTIC_OPS} {flags}')
  assert cache.is_dir() and env['JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'] == 'none'
  assert 'JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES' not in autotune.xla_env(runs.DETERMINISTIC_OPS)
  ov, det, extra = f.CELLS[fill]      # (this module's own copy: the cache in tmp_path)
  f.CELLS[fill] = (ov, det, extra.replace(autotune.CACHE_DIR, str(cache)))
  for c in ('select_im2col', fill):
    env = f.cell_env(c, '--xla_gpu_deterministic_ops=true --xla_other=1')
    assert env['JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'] == 'none'
    assert ('--xla_gpu_deterministic_ops=true' in env['XLA_FLAGS']) == (c == 'select_im2col')
    assert '--xla_other=1' in env['XLA_FLAGS']
  f.CELLS[fill] = (ov, det, extra)
  # the reading cells compiled the filling cell's kernels, or not
  cfg = lambda x: {'gemms': {'triton_configs': {x: 12}}}
  rows = [{'cell': fill, **cfg('A')}, {'cell': read, **cfg('A')},
          {'cell': read + f.AGAIN, **cfg('B')}, {'cell': 'select_im2col', **cfg('?')}]
  assert f.autotune_check(rows) == {read: {'fill': fill, 'same_triton_configs': True},
                                    read + f.AGAIN: {'fill': fill, 'same_triton_configs': False}}
  summary = {'config': 'omni', 'method': 'metadrop', 'gradient': 'authors', 'precision': 'highest',
             'rows': [], 'autotune': f.autotune_check(rows)}
  assert 'NOT those of' in f.format_table(summary)


def test_the_smoke_test_checks_what_the_planned_cells_compute():
  """One-pass batch norm and multi-pass GEMMs change the arithmetic: a cell with them is judged
  by the check of its own formulation key, which the job's smoke test adds for planned cells."""
  from tools.long_runs import gpu_check
  f = _formulations()
  key = gpu_check.overrides_key(f.CELLS['select_im2col_bn1'][0])
  assert key == 'im2col+bn_one_pass'
  assert gpu_check.parse_key(key) == ('im2col', 'default', 'one_pass')
  assert gpu_check.parse_key('im2col:tf32_x3') == ('im2col', 'tf32_x3', 'two_pass')
  assert gpu_check.parse_key(gpu_check.formulation_key('im2col', 'bf16_x6', 'one_pass')) == (
      'im2col', 'bf16_x6', 'one_pass')
  runs_planned = [('omni', 'metadrop', ['select_im2col', 'select_im2col_bn1',
                                       'select_im2col_tf32x3_triton', 'not_a_cell'])]
  assert choices.smoke_keys('im2col', runs_planned, f.CELLS) == (
      'im2col,im2col+bn_one_pass,im2col:tf32_x3')
  rows = [_row('select_im2col', 18.0, 'b', True),
          {**_row('select_im2col_bn1', 15.0, 'c', True),
           'overrides': f.CELLS['select_im2col_bn1'][0]}]
  smoke = {'rows': [1], 'pass_highest_by_conv_impl': {'im2col': True}}
  assert choices.choose_formulation({'rows': rows}, smoke)['cell'] == 'select_im2col'
  smoke['pass_highest_by_conv_impl']['im2col+bn_one_pass'] = True
  c = choices.choose_formulation({'rows': rows}, smoke)
  assert c['cell'] == 'select_im2col_bn1' and c['overrides']['model.bn_impl'] == 'one_pass'
  assert choices.formulation_checked(smoke, c['overrides']) is True
  assert choices.formulation_checked(smoke, {'model.dot_algorithm': 'tf32_x3'}) is False


def test_the_autotune_cache_travels_with_its_jax_version_and_card(tmp_path):
  """Packed by the job, kept here in .gpu_cache/ with the jax version and card it was tuned
  with, unpacked by device_window.sh on the next machine, and emptied there if either differs."""
  from tools.long_runs import autotune, unpack
  tuned = tmp_path / 'tuned'
  tuned.mkdir()
  (tuned / 'abc.textproto').write_text('config')
  src = tmp_path / 'out'
  src.mkdir()
  assert records.pack_cache(str(tuned), str(src / autotune.ARCHIVE), 1 << 20) == 1
  ident = autotune.identity('0.11.2', 'NVIDIA H200')
  summary = {'start': '2026-12-08T10:00:00Z', 'phases': {}, 'autotune_cache': ident}
  repo = tmp_path / 'repo'
  unpack.record_window(summary, str(src), str(repo))
  kept = repo / '.gpu_cache'
  assert json.loads((kept / autotune.META).read_text()) == ident
  with tarfile.open(kept / autotune.ARCHIVE) as tar:
    assert tar.getnames() == ['abc.textproto']
  meta = str(kept / autotune.META)
  logged = []
  assert autotune.check(str(tuned), meta, ident, logged.append) == 1
  assert autotune.check(str(tuned), str(tmp_path / 'none.json'), {}, logged.append) == 1
  assert not logged
  other = autotune.identity('0.11.3', 'NVIDIA H200')
  assert autotune.check(str(tuned), meta, other, logged.append) == 0
  assert os.listdir(tuned) == [] and 'emptied' in logged[0]
  shell = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'tools', 'long_runs', 'device_window.sh')).read()
  assert f'.gpu_cache/{autotune.ARCHIVE} -C "$METADROP_AUTOTUNE_CACHE_DIR"' in shell


@pytest.mark.slow
def test_a_formulations_run_on_the_cpu_records_its_dots(tmp_path):
  """benchmarks/formulations.py end to end on the tiny config (one cell, its own process): the
  record counts the step's dots (XLA:CPU's: no Triton or cuBLAS) beside its timing."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'f.json'
  r = subprocess.run([sys.executable, 'benchmarks/formulations.py', '--config=tiny',
                      '--cells=select_im2col_bn1', '--iters=1', '--warmup=1', '--parallel=1',
                      '--concurrent=', '--trace=', '--set=model.num_layers=1',
                      '--set=inner_steps=1', f'--out={out}'],
                     cwd=root, capture_output=True, text=True, timeout=600,
                     env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 0, r.stderr[-2000:]
  row = json.loads(out.read_text())['rows'][0]
  assert 'error' not in row, row
  g = row['gemms']
  assert g['other_dot'] > 0 and g['triton_gemm'] == g['cublas_gemm'] == 0
  assert 'autotune_cache' not in row
  assert f"dots: 0 triton, 0 cublas, {g['other_dot']} other" in r.stdout
