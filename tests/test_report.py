"""The Table-1 report (hand-made results.json files) and the learning-curve PNG."""

import json
import os

import pytest
from PIL import Image

from metadrop_jax import report
from metadrop_jax.cli import report as report_cli


def _write_run(root, name, *, method, dataset, way, shot, acc, ci, step=60000,
               num_steps=60000, episodes=1000, metrics=None):
  wd = root / name
  wd.mkdir()
  res = {'name': name, 'method': method, 'dataset': dataset, 'way': way, 'shot': shot,
         'accuracy': acc, 'ci95': ci, 'episodes': episodes, 'step': step,
         'num_steps': num_steps, 'mc_samples': 30, 'commit': 'abc1234', 'device': 'H100'}
  (wd / 'results.json').write_text(json.dumps(res))
  if metrics is not None:
    (wd / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in metrics))
  return str(wd)


def _row(table, label):
  """Cells of the first table row whose first cell is ``label``."""
  for line in table.splitlines():
    if line.startswith(f'| {label} |'):
      return [c.strip() for c in line.strip().strip('|').split(' | ')][1:]
  raise AssertionError(f'no row {label!r} in\n{table}')


@pytest.fixture
def runs(tmp_path):
  return [
      # inside the paper's interval: |96.50 - 96.63| = 0.13 <= 0.15
      _write_run(tmp_path, 'omni1_md', method='metadrop', dataset='omniglot', way=20, shot=1,
                 acc=96.50, ci=0.15),
      # outside: |94.80 - 95.23| = 0.43 > 0.17; reduced budget (30000 steps)
      _write_run(tmp_path, 'omni1_maml', method='maml', dataset='omniglot', way=20, shot=1,
                 acc=94.80, ci=0.17, step=30000),
      # a config with a reduced num_steps that finished it
      _write_run(tmp_path, 'mimg5_md', method='metadrop', dataset='miniimagenet', way=5, shot=5,
                 acc=67.00, ci=0.50, step=40000, num_steps=40000),
      # another method (no paper number)
      _write_run(tmp_path, 'omni1_vib', method='vib', dataset='omniglot', way=20, shot=1,
                 acc=95.00, ci=0.20),
  ]


def test_paper_constants_match_the_authors_readme():
  # docs/paper.md gains: +1.40, +0.35, +2.35, +2.87 (paper); +1.75, +0.67, +2.94, +2.42 (re-run)
  for table, gains in ((report.PAPER_TABLE1, (1.40, 0.35, 2.35, 2.87)),
                       (report.AUTHORS_RERUN, (1.75, 0.67, 2.94, 2.42))):
    for setting, g in zip(report.PAPER_COLUMNS, gains):
      assert table[('metadrop',) + setting][0] - table[('maml',) + setting][0] == \
          pytest.approx(g, abs=1e-9)
  assert report.PAPER_TABLE1[('metadrop', 'omniglot', 20, 1)] == (96.63, 0.13)
  assert report.AUTHORS_RERUN[('maml', 'miniimagenet', 5, 5)] == (65.70, 0.52)


def test_compare_values_difference_and_ci(runs):
  md, maml, mimg, vib = [report.compare(r) for r in report.load_results(runs)]
  assert md['paper'] == (96.63, 0.13) and md['rerun'] == (96.24, 0.14)
  assert md['diff_paper'] == pytest.approx(-0.13)
  assert md['diff_rerun'] == pytest.approx(0.26)
  assert md['paper_in_ci'] is True and md['reduced_budget'] is False
  assert maml['diff_paper'] == pytest.approx(-0.43)
  assert maml['paper_in_ci'] is False and maml['reduced_budget'] is True
  assert mimg['reduced_budget'] is True            # num_steps 40000 < 60000
  assert vib['paper'] is None and vib['diff_paper'] is None and vib['paper_in_ci'] is None


def test_ci_boundary_is_inclusive():
  r = {'method': 'metadrop', 'dataset': 'omniglot', 'way': 20, 'shot': 5,
       'accuracy': 98.73 + 0.0625, 'ci95': 0.0625, 'step': 60000, 'num_steps': 60000}
  assert report.compare(r)['paper_in_ci'] is True
  r['accuracy'] = 98.73 - 0.07
  assert report.compare(r)['paper_in_ci'] is False


def test_table_layout_and_cells(runs):
  table = report.build_table(report.load_results(runs))
  header = next(l for l in table.splitlines() if l.startswith('| Method |'))
  assert [c.strip() for c in header.strip().strip('|').split(' | ')] == [
      'Method', 'Omniglot 20-way 1-shot', 'Omniglot 20-way 5-shot', 'miniImageNet 5-way 1-shot',
      'miniImageNet 5-way 5-shot']
  md = _row(table, 'Meta-dropout')
  assert md[0].startswith('**96.50 ± 0.15**')
  assert 'paper 96.63 ± 0.13 (Δ -0.13; paper in our CI: yes)' in md[0]
  assert 're-run 96.24 ± 0.14 (Δ +0.26)' in md[0]
  assert 'reduced budget' not in md[0]
  # missing cell: a dash, still showing the reference numbers
  assert md[1] == '—<br>paper 98.73 ± 0.06<br>re-run 98.81 ± 0.06'
  assert md[2].startswith('—<br>paper 51.93 ± 0.67')
  assert '**67.00 ± 0.50**' in md[3] and 'reduced budget (40000/40000 steps)' in md[3]
  maml = _row(table, 'MAML')
  assert 'paper in our CI: no' in maml[0] and 'reduced budget (30000/60000 steps)' in maml[0]
  assert maml[3].startswith('—')
  vib = _row(table, 'VIB')
  assert vib[0].startswith('**95.00 ± 0.20**') and 'paper: n/a' in vib[0]
  gain = _row(table, 'Gain (Meta-dropout − MAML)')
  assert gain[0] == '**+1.70**<br>paper +1.40<br>re-run +1.75'
  assert gain[1] == '—<br>paper +0.35<br>re-run +0.67'
  # row order: MAML, Meta-dropout, then others
  labels = [l.split(' | ')[0] for l in table.splitlines() if l.startswith('| ')]
  assert labels.index('| MAML') < labels.index('| Meta-dropout') < labels.index('| VIB')
  # per-run table
  run_rows = [l for l in table.split('### Runs')[1].splitlines() if l.startswith('| ')][1:]
  assert len(run_rows) == 4
  assert any('omni1_maml' in l and 'reduced budget' in l and '| no |' in l for l in run_rows)
  assert any('omni1_md' in l and '| full |' in l and '| yes |' in l for l in run_rows)


def test_empty_table_still_shows_paper_rows():
  table = report.build_table([])
  assert _row(table, 'MAML')[0] == '—<br>paper 95.23 ± 0.17<br>re-run 94.49 ± 0.16'
  assert _row(table, 'Meta-dropout')[3] == '—<br>paper 67.42 ± 0.52<br>re-run 68.12 ± 0.53'
  assert 'no results.json found' in table


def test_duplicates_and_other_settings(tmp_path):
  a = _write_run(tmp_path, 'a', method='metadrop', dataset='omniglot', way=20, shot=1,
                 acc=96.0, ci=0.1)
  b = _write_run(tmp_path, 'b', method='metadrop', dataset='omniglot', way=20, shot=1,
                 acc=96.4, ci=0.1)
  c = _write_run(tmp_path, 'c', method='metadrop', dataset='synthetic', way=3, shot=1,
                 acc=40.0, ci=5.0, step=20, num_steps=20, episodes=20)
  table = report.build_table(report.load_results([a, b, c]))
  assert 'synthetic 3-way 1-shot' in table.splitlines()[4]
  first, second = _row(table, 'Meta-dropout'), _row(table, 'Meta-dropout (2)')
  assert first[0].startswith('**96.00') and second[0].startswith('**96.40')
  assert first[4].startswith('**40.00 ± 5.00**')
  assert 'paper: n/a' in first[4] and 'reduced budget (20/20 steps)' in first[4]
  assert '20 episodes' in first[4]
  assert second[4] == '—'


def test_missing_results_json_is_skipped(tmp_path, runs):
  (tmp_path / 'empty').mkdir()
  with pytest.warns(UserWarning, match='results.json not found'):
    loaded = report.load_results(runs[:1] + [str(tmp_path / 'empty')])
  assert len(loaded) == 1


def test_reduced_budget_rule():
  assert not report.is_reduced_budget({'step': 60000, 'num_steps': 60000})
  assert report.is_reduced_budget({'step': 59999, 'num_steps': 60000})
  assert report.is_reduced_budget({'step': 60000, 'num_steps': 40000})
  assert report.is_reduced_budget({})


def _metrics(n, offset=0.0):
  rows = []
  for s in range(10, 10 * n + 1, 10):
    rows.append({'step': s, 'train/loss': 1.0 - s / 1000 + offset, 'train/acc': 0.3 + s / 1000,
                 'train/inner_loss_first': 1.0, 'train/inner_loss_last': 0.9,
                 'train/steps_per_sec': 5.0})
    if s % 20 == 0:
      rows.append({'step': s, 'val/acc': 0.3 + s / 1200, 'val/ci95': 0.01,
                   'val/loss': 1.1 - s / 1000})
  return rows


def test_cli_writes_table_and_curves(tmp_path, capsys):
  a = _write_run(tmp_path, 'md', method='metadrop', dataset='omniglot', way=20, shot=1,
                 acc=96.5, ci=0.15, metrics=_metrics(20))
  b = _write_run(tmp_path, 'maml', method='maml', dataset='omniglot', way=20, shot=1,
                 acc=95.0, ci=0.15, metrics=_metrics(20, 0.1))
  out, curves = tmp_path / 'out' / 'table.md', tmp_path / 'curves.png'
  assert report_cli.main([f'--workdirs={a},{b}', f'--out={out}', f'--curves={curves}',
                      '--smooth=3']) == 0
  printed = capsys.readouterr().out
  assert out.read_text() in printed
  assert '**96.50 ± 0.15**' in out.read_text()
  assert not [f for f in os.listdir(out.parent) if '.tmp.' in f]
  assert curves.stat().st_size > 5000
  with Image.open(curves) as im:
    assert im.size == (1100, 400)


def test_curves_skip_missing_and_fail_when_none(tmp_path):
  a = _write_run(tmp_path, 'md', method='metadrop', dataset='omniglot', way=20, shot=1,
                 acc=96.5, ci=0.15, metrics=_metrics(5))
  b = _write_run(tmp_path, 'nometrics', method='maml', dataset='omniglot', way=20, shot=1,
                 acc=95.0, ci=0.15)
  out = tmp_path / 'c.png'
  with pytest.warns(UserWarning, match='metrics.jsonl'):
    report.plot_learning_curves([a, b], str(out), size=(6, 3))
  with Image.open(out) as im:
    assert im.size == (600, 300)
  with pytest.raises(FileNotFoundError), pytest.warns(UserWarning):
    report.plot_learning_curves([b], str(tmp_path / 'd.png'))


def test_help(capsys):
  with pytest.raises(SystemExit) as e:
    report_cli.main(['--help'])
  assert e.value.code == 0
  assert '--workdirs' in capsys.readouterr().out


def test_accuracy_bars_one_panel_per_setting(tmp_path, runs):
  """--bars: one 5.5-inch panel per setting (runs has two settings), drawn (not blank)."""
  out = tmp_path / 'bars.png'
  assert report_cli.main([f'--workdirs={",".join(runs)}', f'--bars={out}', '--title=t']) == 0
  with Image.open(out) as im:
    assert im.size[0] == 1100
    colors = im.convert('RGB').getcolors(maxcolors=1 << 16)
    assert colors is not None and len(colors) > 20
  with pytest.raises(ValueError, match='no results'):
    report.plot_accuracy_bars([], str(tmp_path / 'none.png'))


def test_gain_has_a_paired_ci_only_over_the_same_episodes(tmp_path):
  import numpy as np
  from metadrop_jax import metrics
  rng = np.random.default_rng(0)
  hard = rng.uniform(0.3, 1.0, 1000)               # episode difficulty, shared by both models
  a = np.clip(hard + rng.normal(0.02, 0.03, 1000), 0, 1)
  b = np.clip(hard + rng.normal(0.0, 0.03, 1000), 0, 1)
  wds = []
  for name, method, accs in (('md', 'metadrop', a), ('maml', 'maml', b)):
    s = metrics.summarize(accs)
    wd = _write_run(tmp_path, name, method=method, dataset='omniglot', way=5, shot=1,
                    acc=s['mean'], ci=s['ci95'])
    res = json.loads((tmp_path / name / 'results.json').read_text())
    res.update(split='test', eval_seed=0)
    (tmp_path / name / 'results.json').write_text(json.dumps(res))
    np.save(tmp_path / name / 'episode_accs_test.npy', accs)
    wds.append(wd)
  want = metrics.summarize(a - b)
  gain = _row(report.build_table(report.load_results(wds)), 'Gain (Meta-dropout − MAML)')
  assert gain[-1] == f"**{want['mean']:+.2f}** (paired ± {want['ci95']:.2f})"
  # the paired interval is far narrower than either model's own (the difficulty cancels)
  assert want['ci95'] < 0.5 * metrics.summarize(a)['ci95']
  # other evaluation episodes: no pairing
  res = json.loads((tmp_path / 'maml' / 'results.json').read_text())
  (tmp_path / 'maml' / 'results.json').write_text(json.dumps({**res, 'eval_seed': 1}))
  gain = _row(report.build_table(report.load_results(wds)), 'Gain (Meta-dropout − MAML)')
  assert gain[-1] == f"**{want['mean']:+.2f}**"
  with pytest.raises(ValueError, match='paired'):
    metrics.paired_difference(a, b[:10])


def _cli_error(capsys, *args):
  """The one ``error:`` line of a report command that must fail (exit code 2, no traceback)."""
  with pytest.raises(SystemExit) as e:
    report_cli.main(list(args))
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith('error: ')]
  assert e.value.code == 2 and 'Traceback' not in err and len(lines) == 1, err
  return lines[0]


def test_a_missing_workdir_never_empties_an_existing_table(tmp_path, capsys, runs):
  """--workdirs=<typo>: an error, the table untouched; an empty table (workdirs without results)
  replaces an existing file only with --force."""
  out = tmp_path / 'table1.md'
  assert report_cli.main([f'--workdirs={runs[0]}', f'--out={out}']) == 0
  table = out.read_text()
  line = _cli_error(capsys, f'--workdirs={tmp_path / "omni1_mb"}', f'--out={out}')
  assert 'omni1_mb' in line and 'no such folder' in line and out.read_text() == table
  (tmp_path / 'fresh').mkdir()
  with pytest.warns(UserWarning):
    line = _cli_error(capsys, f'--workdirs={tmp_path / "fresh"}', f'--out={out}')
  assert '--force' in line and out.read_text() == table
  with pytest.warns(UserWarning):
    assert report_cli.main([f'--workdirs={tmp_path / "fresh"}', f'--out={out}', '--force']) == 0
  assert out.read_text() != table


def test_an_unwritable_out_or_a_cut_results_json_is_one_line(tmp_path, capsys, runs):
  (tmp_path / 'a_file').write_text('x')
  line = _cli_error(capsys, f'--workdirs={runs[0]}', f'--out={tmp_path / "a_file" / "t.md"}')
  assert 'a_file' in line and 'writable' in line
  path = os.path.join(runs[1], 'results.json')
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(text[:40])
  line = _cli_error(capsys, f'--workdirs={runs[0]},{runs[1]}')
  assert path in line and '--mode=eval' in line


def test_result_row_names_setting_computation_and_ci():
  run = {'method': 'metadrop', 'dataset': 'omniglot', 'way': 20, 'shot': 1, 'accuracy': 96.123,
         'ci95': 0.141, 'step': 60000, 'num_steps': 60000, 'episodes': 1000, 'mc_samples': 30,
         'split': 'test', 'meta_gradient': 'authors', 'omniglot_split': 'lake'}
  row = report.result_row(run)
  assert row.count('|') == report.RESULT_HEADER.splitlines()[0].count('|')
  for needle in ('Meta-dropout', 'Omniglot 20-way 1-shot (lake split)', "authors'", '60000/60000',
                 '**96.12 ± 0.14**'):
    assert needle in row, (needle, row)
  assert '96.63' not in row              # the paper's number is of the other split
  vinyals = report.result_row({**run, 'omniglot_split': 'vinyals'})
  assert '(vinyals split)' not in vinyals and '96.63 ± 0.13' in vinyals


def test_a_lake_split_run_gets_its_own_column_not_the_papers():
  """A run on Lake's split is not compared with the paper's (Vinyals-split) number."""
  run = {'method': 'maml', 'dataset': 'omniglot', 'way': 20, 'shot': 1, 'accuracy': 90.0,
         'ci95': 0.5, 'step': 60000, 'num_steps': 60000, 'omniglot_split': 'lake'}
  c = report.compare(run)
  assert c['paper'] is None and c['rerun'] is None
  assert report.column_label(c['setting']) == 'Omniglot 20-way 1-shot (lake split)'
  assert report.compare({**run, 'omniglot_split': 'vinyals'})['paper'] is not None
