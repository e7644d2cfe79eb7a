"""The README's Performance table comes from the committed benchmark records
(benchmarks/readme_table.py): the committed README shows what the records say, and each figure is
the right row of the right record."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('readme_table', ROOT / 'benchmarks' / 'readme_table.py')
readme_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_table)


def test_the_committed_readme_shows_the_records():
  text = (ROOT / 'README.md').read_text()
  block = text.split(readme_table.BEGIN, 1)[1].split(readme_table.END, 1)[0]
  assert block == '\n' + readme_table.table(str(ROOT)), (
      'README.md is behind the benchmark records: run python benchmarks/readme_table.py --readme')


def _write(path: pathlib.Path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def test_each_figure_is_the_campaigns_formulation_and_the_same_jobs_peer(tmp_path):
  _write(tmp_path / 'results' / 'table1' / 'campaign.json', {'formulations': {'Card X': {
      'overrides': {'model.pool_impl': 'select'}, 'xla_flags': None}}})
  win = tmp_path / 'docs' / 'bench' / 'windows'
  row = lambda cell, ms, ov, det=True: {'cell': cell, 'ms_per_iter_pipelined': ms,
                                        'overrides': ov, 'deterministic_ops': det}
  _write(win / '20260101T000000Z_Card_X_formulations.json', {
      'device': 'gpu:Card X', 'config': 'omniglot_20way1shot', 'method': 'metadrop', 'jax': '9.9',
      'rows': [row('select', 20.0, {'model.pool_impl': 'select'}),
               row('faster_other', 5.0, {'model.pool_impl': 'reduce_window'}),   # not trained with
               row('select_nondet', 4.0, {'model.pool_impl': 'select'}, det=False)],
      'also': [{'device': 'gpu:Card X', 'config': 'mimgnet_5way1shot', 'method': 'maml',
                'jax': '9.9', 'rows': [row('select', 8.0, {'model.pool_impl': 'select'})]}]})
  _write(win / '20260101T000000Z_Card_X.json', {'device_kind': 'Card X', 'phases': {'torch': {
      'result': {'rows': [{'kind': 'time', 'config': 'omniglot_20way1shot', 'method': 'metadrop',
                           's_per_iter': 0.3, 'precision': 'highest'}]}}}})
  _write(win / '20260202T000000Z_Card_X.json', {'device_kind': 'Card X', 'phases': {'torch': {
      'result': {'rows': [{'kind': 'time', 'config': 'mimgnet_5way1shot', 'method': 'maml',
                           's_per_iter': 0.04, 'precision': 'highest'}]}}}})
  _write(tmp_path / 'docs' / 'bench' / 'cpu_x_2026-01-01.json', {
      'cpu_model': 'Some CPU', 'cpu_count': 2, 'rows': [
          {'config': 'omniglot_20way1shot', 'method': 'maml', 'variant': 'fast', 's_per_iter': 3.0,
           'overrides': {}, 'jax': '9.9'},
          {'config': 'omniglot_20way1shot', 'method': 'maml', 'variant': 'exact',
           's_per_iter': 1.0, 'overrides': {'meta_gradient': 'exact'}, 'jax': '9.9'},
          {'config': 'omniglot_20way1shot', 'method': 'maml', 'variant': 'select',
           's_per_iter': 2.0, 'overrides': {'model.pool_impl': 'select'}, 'jax': '9.9'},
          {'config': 'omniglot_20way1shot', 'method': 'maml', 'variant': 'authors_tf',
           's_per_iter': 0.5, 'tf': '2.21'}]})
  text = readme_table.table(str(tmp_path))
  rows = {tuple(c.strip() for c in line.split('|')[1:3]): line for line in text.splitlines()
          if line.startswith('| ') and 'setting' not in line}
  md = rows[('Omniglot 20-way 1-shot', 'Meta-dropout')]
  assert '| 20.00 | 300.00 | 15.0x |' in md                      # same job: no mark
  assert '| 8.00 | 40.00 | 5.0x † |' in rows[('miniImageNet 5-way 1-shot', 'MAML')]
  assert '| 2.00 (select pooling) | 0.50 | 4.0x |' in rows[('Omniglot 20-way 1-shot', 'MAML')]
  assert 'not timed yet' in rows[('Omniglot 20-way 5-shot', 'MAML')]
  assert '† timed in different jobs' in text and 'Card X: jax 9.9' in text
  assert 'CPU Some CPU, 2 cores: jax 9.9, TensorFlow 2.21' in text
