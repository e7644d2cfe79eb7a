"""The GPU job's decisions from the committed records (tools/long_runs): which formulations to
measure, when the smoke test need not run, what compile cache comes back, and what unpacking
keeps of the measurements."""

import json
import os
import tarfile


from tools.long_runs import choices, gpu_check, records

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
  fp = gpu_check.numerics_fingerprint('0.11.2')
  assert fp != gpu_check.numerics_fingerprint('0.11.3')     # the jax version is part of it
  smoke = {'rows': [{'pass': True}], 'fingerprint': fp,
           'pass_highest_by_conv_impl': {'im2col': True}}
  _record(tmp_path, '20261204T000000Z_K.json', {'device_kind': 'K',
                                                 'phases': {'smoke': {'result': smoke}}})
  _record(tmp_path, '20261204T000000Z_K_formulations.json', {'device': 'gpu:K', 'rows': []})
  rec = choices.smoke_on_record('K', fp, repo=str(tmp_path))
  assert rec['pass_highest_by_conv_impl'] == {'im2col': True}
  assert rec['on_record'] == os.path.join('docs', 'bench', 'windows', '20261204T000000Z_K.json')
  assert choices.smoke_on_record('L', fp, repo=str(tmp_path)) is None
  assert choices.smoke_on_record('K', gpu_check.numerics_fingerprint('0.12'),
                                 repo=str(tmp_path)) is None


def test_numerics_fingerprint_follows_the_library_files(tmp_path, monkeypatch):
  """A change to a numerics file changes the fingerprint (so the smoke test runs again)."""
  import shutil
  fake = tmp_path / 'repo'
  (fake / 'tools' / 'long_runs').mkdir(parents=True)
  shutil.copytree(os.path.join(os.path.dirname(gpu_check.__file__), '..', '..', 'metadrop_jax'),
                  fake / 'metadrop_jax')
  shutil.copy(gpu_check.__file__, fake / 'tools' / 'long_runs' / 'gpu_check.py')
  monkeypatch.setattr(gpu_check, '__file__', str(fake / 'tools' / 'long_runs' / 'gpu_check.py'))
  before = gpu_check.numerics_fingerprint('0.11.2')
  with open(fake / 'metadrop_jax' / 'nets.py', 'a') as f:
    f.write('\n# changed\n')
  assert gpu_check.numerics_fingerprint('0.11.2') != before


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
