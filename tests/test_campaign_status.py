"""What the campaign has cost and what is left (tools/long_runs/projection.py, status.md), the
README's Table 1 with a learning-curve figure per finished cell, and the GPU job's measuring cap
(window run --measure_cap_s): no training."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tools.long_runs import phases
from tools.long_runs import projection
from tools.long_runs import reports
from tools.long_runs import runs
from tools.long_runs import window
from tests.test_long_runs_state import A, do_unpack, fake_job, fake_run, repo

assert repo    # (a fixture, used by name)


def _rows(steps: dict[str, int], num_steps=60000):
  out = []
  for name, step in steps.items():
    setting, method, grad = name.rsplit('_', 2)
    out.append({'name': name, 'setting': setting, 'method': method, 'meta_gradient': grad,
                'group': f'{setting}/{grad}', 'step': step, 'num_steps': num_steps})
  return out


SITTINGS = [
    {'device': 'NVIDIA H200', 'backend': 'gpu', 'runs': [
        {'name': 'a_metadrop_authors', 'from': 0, 'to': 3000, 'minutes': 2.0},
        {'name': 'a_maml_authors', 'from': 0, 'to': 4000, 'minutes': 2.0}]},
    {'device': 'cpu', 'backend': 'cpu', 'runs': [          # CPU sittings never set a GPU rate
        {'name': 'a_metadrop_authors', 'from': 3000, 'to': 3010, 'minutes': 1.0},
        {'name': 'b_metadrop_authors', 'from': 0, 'to': 10, 'minutes': 1.0}]},
    {'device': 'NVIDIA H200', 'backend': 'gpu', 'runs': [   # the newest sitting sets the rate
        {'name': 'a_metadrop_authors', 'from': 3010, 'to': 6010, 'minutes': 1.0}]},
]
RECORDS = [{'budget_s': 300, 'seconds_before_pack': 280.0},
           {'budget_s': 600, 'accounting': {'job_s': 600.0, 'training_min': 8.0,
                                            'steps_trained': 3000}}]


def test_rates_come_from_each_runs_newest_sitting_on_a_card():
  rates = projection.run_rates(SITTINGS)
  assert rates == {'a_metadrop_authors': {'steps_per_min': 3000.0, 'device': 'NVIDIA H200'},
                   'a_maml_authors': {'steps_per_min': 2000.0, 'device': 'NVIDIA H200'}}


def test_totals_count_job_time_and_only_accelerator_training():
  t = projection.job_totals(RECORDS, SITTINGS)
  assert t['jobs'] == 2 and t['job_min'] == pytest.approx((280 + 600) / 60)
  assert t['machine_min_jobs'] == 0
  assert t['sittings'] == 2 and t['steps'] == 10000 and t['training_min'] == pytest.approx(5.0)
  t = projection.job_totals([{'accounting': {'job_s': 60.0, 'machine_min': 3.5}}], [])
  assert (t['machine_min'], t['machine_min_jobs']) == (3.5, 1)


def test_jobs_left_at_the_measured_rates_and_nothing_guessed():
  rows = _rows({'a_metadrop_authors': 6010, 'a_maml_authors': 4000,
                'b_metadrop_authors': 0, 'b_maml_authors': 0}, num_steps=30000)
  p = projection.project(rows, SITTINGS, RECORDS, job_budget_s=540.0)
  # the newest job trained 8 of its 10 minutes: a 540-s job trains 7.2 minutes
  assert p['training_share'] == pytest.approx(0.8)
  assert p['training_min_per_job'] == pytest.approx(7.2)
  a, b = p['groups']
  assert a['steps_left'] == 23990 + 26000
  assert a['training_min_left'] == pytest.approx(23990 / 3000 + 26000 / 2000)
  assert a['jobs_left'] == pytest.approx(a['training_min_left'] / 7.2)
  assert a['jobs_to_here'] == 3
  # group b never trained on a card (its CPU sitting does not count): no projection
  assert b['training_min_left'] is None and b['jobs_left'] is None and b['jobs_to_here'] is None
  # a run not yet on a card takes its group mate's rate
  sittings = [{'device': 'NVIDIA H200', 'runs': [
      {'name': 'b_metadrop_authors', 'from': 0, 'to': 600, 'minutes': 1.0}]}]
  g = projection.project(rows, sittings, RECORDS)['groups'][1]
  assert g['training_min_left'] == pytest.approx(2 * 30000 / 600)
  # before any job trained, no job count
  assert projection.project(rows, SITTINGS, [])['groups'][0]['jobs_left'] is None


def test_status_text_shows_totals_and_the_projection():
  rows = _rows({'a_metadrop_authors': 6010, 'a_maml_authors': 4000})
  text = reports.progress_text(rows, SITTINGS, RECORDS)
  assert '2 GPU jobs on record, 14.7 min of their own wall time' in text
  assert "the host's machine minutes: none recorded" in text
  assert '2 sittings on accelerators trained 10,000 steps in 5.0 min' in text
  assert '| a/authors | 109,990 | metadrop 3,000, maml 2,000 (NVIDIA H200) |' in text
  assert "at the newest job's training share (80%: 7.2 training minutes each)" in text


def _job(tmp_path, *extra):
  a = window._parser().parse_args(['run', '--budget_s=540', f'--out={tmp_path}/out',
                                   f'--work={tmp_path}/work', *extra])
  job = phases.Job.start(a)
  job.measure_end = time.time() + a.measure_cap_s
  return job


def test_the_benchmark_and_the_torch_peer_stay_inside_the_measuring_cap(tmp_path):
  job = _job(tmp_path)
  assert job.a.measure_cap_s == 180.0
  job.bench_mode = 'formulations'          # its own fraction would be 0.45 x 540 = 243 s
  end = phases._bench_end(job)
  assert end == pytest.approx(time.time() + 180 - phases.TORCH_RESERVE_S, abs=1.0)
  job.a.torch = 'skip'                      # no peer after it: the whole cap
  assert phases._bench_end(job) == pytest.approx(time.time() + 180, abs=1.0)
  job.a.torch = 'auto'
  job.bench_end = time.time()
  job.measure_end = time.time() + 5         # the benchmark used the cap: the peer does not start
  assert 'measuring cap' in phases.torch_phase(job)['skipped']
  job = _job(tmp_path, '--measure_cap_s=1000')
  job.bench_mode = 'formulations'
  assert phases._bench_end(job) == pytest.approx(time.time() + 0.45 * 540, abs=1.0)


def test_unpack_keeps_the_hosts_machine_minutes_in_the_jobs_record(tmp_path, repo, capsys):
  out = fake_job(tmp_path, 'job', {A: 20})
  assert window.main(['unpack', str(out), f'--repo={repo}', '--campaign_dir=camp',
                      '--machine_minutes=0']) == 2
  assert '--machine_minutes=0.0: give the positive minutes' in capsys.readouterr().err
  assert not (repo / 'camp').exists()          # refused before anything was changed
  done = do_unpack(out, repo, machine_minutes=6.25)
  rec = json.loads(open(done['bench']).read())
  assert rec['accounting']['machine_min'] == 6.25


def _finished(wd, method, acc, seed):
  """A tiny run trained to its end and meta-tested (results, per-episode accuracies, curves)."""
  fake_run(wd, 1000, evaluated=True)
  (wd / 'results.json').write_text(json.dumps(
      {'method': method, 'dataset': 'synthetic', 'way': 5, 'shot': 1, 'accuracy': acc,
       'ci95': 1.0, 'step': 1000, 'num_steps': 1000, 'episodes': 4, 'split': 'test',
       'eval_seed': 0, 'meta_gradient': 'authors', 'mc_samples': 1}))
  np.save(wd / 'episode_accs_test.npy', np.random.default_rng(seed).uniform(0, 1, 4))
  (wd / 'metrics.jsonl').write_text(''.join(
      json.dumps({'step': s, 'train/acc': 0.2 + s / 2000, 'train/loss': 1.0}) + '\n'
      for s in range(0, 1001, 100)))


def test_the_readme_table_and_a_curve_per_finished_cell(tmp_path):
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  _finished(cdir / 'tiny_metadrop_authors', 'metadrop', 60.0, 1)
  _finished(cdir / 'tiny_maml_authors', 'maml', 55.0, 2)
  fake_run(cdir / 'tiny_metadrop_exact', 500)          # a cell not finished: no figure
  readme = tmp_path / 'README.md'
  readme.write_text(f'intro\n{reports.README_BEGIN}\nold table\n{reports.README_END}\nrest\n')
  rows = runs.plan(str(cdir))
  assert list(reports.finished_groups(rows)) == ['tiny/authors']
  written = reports.write_readme_table(str(cdir), rows, str(readme), str(tmp_path))
  text = readme.read_text()
  assert 'old table' not in text and text.startswith('intro\n') and text.endswith('rest\n')
  assert '| MAML |' in text and '**55.00 ± 1.00**' in text and '**60.00 ± 1.00**' in text
  gain = next(line for line in text.splitlines() if line.startswith('| Gain'))
  assert '**+5.00** (paired ±' in gain
  fig = tmp_path / 'docs' / 'images' / 'table1_tiny_authors.png'
  assert str(fig) in written and fig.stat().st_size > 5000
  assert '![learning curves, tiny/authors](docs/images/table1_tiny_authors.png)' in text


def test_the_torch_peer_times_both_methods_then_each_new_setting_beside_ours():
  cells = [('omniglot_20way1shot', 'metadrop', ['select_im2col', 'select_pallas']),
           ('mimgnet_5way1shot', 'metadrop', ['select_im2col']),
           ('mimgnet_5way1shot', 'maml', ['select_im2col'])]
  assert phases.torch_formulation_cells(cells) == [
      ('omniglot_20way1shot', 'metadrop'), ('omniglot_20way1shot', 'maml'),
      ('mimgnet_5way1shot', 'metadrop'), ('mimgnet_5way1shot', 'maml')]
  assert phases.torch_formulation_cells(cells[1:2]) == [('mimgnet_5way1shot', 'metadrop'),
                                                        ('mimgnet_5way1shot', 'maml')]
