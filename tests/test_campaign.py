"""The Table-1 campaign (order, shares, state, its command line), report columns per
meta-gradient, and the GPU job's dry run on the CPU (the real scripts/device_window.sh path, tiny
config, 60 s)."""

import json
import os
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import pytest

from metadrop_jax import evaluation, report
from metadrop_jax import workdir as workdir_lib
from tools.long_runs import choices, gpu_check, pack, reports, unpack, window
from tools.long_runs import runs
from tests.test_long_runs_state import fake_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_campaign_order_authors_first_then_exact():
  names = [r['name'] for r in runs.default_runs()]
  assert len(names) == 16
  assert names[:8] == [
      'omniglot_20way1shot_metadrop_authors', 'omniglot_20way1shot_maml_authors',
      'mimgnet_5way1shot_metadrop_authors', 'mimgnet_5way1shot_maml_authors',
      'omniglot_20way5shot_metadrop_authors', 'omniglot_20way5shot_maml_authors',
      'mimgnet_5way5shot_metadrop_authors', 'mimgnet_5way5shot_maml_authors']
  assert [n.replace('_exact', '_authors') for n in names[8:]] == names[:8]


def test_committed_campaign_state_matches_the_code():
  """results/table1/campaign.json is the default campaign; every run's config builds."""
  camp = runs.load_campaign(os.path.join(ROOT, runs.DEFAULT_DIR))
  assert camp['runs'] == runs.default_runs()
  for run in camp['runs']:
    c = runs.run_config(run, camp)
    assert c.keep_checkpoints == 1 and c.num_steps == 60000
    assert (c.method, c.meta_gradient) == (run['method'], run['meta_gradient'])
  with pytest.raises(ValueError, match='campaign of'):
    runs.init_campaign(os.path.join(ROOT, runs.DEFAULT_DIR), ['tiny'])


def test_plan_and_status_of_an_empty_campaign(tmp_path):
  runs.init_campaign(str(tmp_path), ['tiny'])
  rows = runs.plan(str(tmp_path))
  assert [r['action'] for r in rows] == ['train'] * 4 and all(r['data_here'] for r in rows)
  assert 'next: tiny_metadrop_authors (train)' in runs.format_plan(rows)
  md = tmp_path / 'results.md'
  md.write_text(f'a\n{reports.STATUS_BEGIN}\nold\n{reports.STATUS_END}\nb\n')
  reports.write_reports(str(tmp_path), results_md=str(md))
  text = md.read_text()
  assert 'old' not in text and '`tiny_maml_exact`' in text and text.endswith('b\n')


def test_report_has_a_column_per_meta_gradient(tmp_path):
  def run(name, method, mg, acc):
    wd = tmp_path / name
    wd.mkdir()
    (wd / 'results.json').write_text(json.dumps(
        {'method': method, 'dataset': 'omniglot', 'way': 20, 'shot': 1, 'accuracy': acc,
         'ci95': 0.1, 'step': 60000, 'num_steps': 60000, 'episodes': 1000}))
    (wd / 'config.json').write_text(json.dumps({'meta_gradient': mg}))
    return str(wd)
  wds = [run('a', 'metadrop', 'authors', 96.0), run('b', 'maml', 'authors', 95.0),
         run('c', 'metadrop', 'exact', 96.5)]
  table = report.build_table(report.load_results(wds))
  header = table.splitlines()[4]
  assert ("Omniglot 20-way 1-shot, authors' meta-gradient | Omniglot 20-way 1-shot, exact "
          'meta-gradient | Omniglot 20-way 5-shot |') in header
  gain = next(l for l in table.splitlines() if l.startswith('| Gain'))
  assert gain.split(' | ')[1].startswith('**+1.00**') and gain.split(' | ')[2].startswith('—')


def test_report_mean_and_std_over_seeds(tmp_path):
  def run(name, seed, acc):
    wd = tmp_path / name
    wd.mkdir()
    (wd / 'results.json').write_text(json.dumps(
        {'method': 'maml', 'dataset': 'omniglot', 'way': 20, 'shot': 1, 'accuracy': acc,
         'ci95': 0.2, 'step': 100, 'num_steps': 100, 'episodes': 1000}))
    (wd / 'config.json').write_text(json.dumps({'meta_gradient': 'exact', 'seed': seed}))
    return str(wd)
  table = report.build_table(report.load_results([run('a', 0, 95.0), run('b', 1, 96.0)]))
  row = next(l for l in table.splitlines() if l.startswith('| MAML | Omniglot 20-way 1-shot, '
                                                            'exact meta-gradient | 100 | 2 |'))
  assert '**95.50 ± 0.71**' in row and '0: 95.00 ± 0.20, 1: 96.00 ± 0.20' in row
  single = report.build_table(report.load_results([run('c', 0, 95.0)]))
  assert 'Over seeds' not in single


def _params(workdir):
  config = workdir_lib.load_run_config(workdir)
  _, state = workdir_lib.restore(workdir, config)
  return jax.device_get(state)


# The dry run's tiny config made smaller still (one block, one inner step): compiles dominate a
# 60-s budget on a 2-core CPU. The benchmark cell and the campaign's runs get the same config, so
# the sitting reuses the benchmark's compiled step through the persistent cache, as on a GPU.
SMALLER = 'inner_steps=1,model.num_layers=1'


def test_window_dry_run_on_cpu(tmp_path):
  """scripts/device_window.sh end to end with a 60-s budget: smoke test, benchmark of the tiny
  config, torch peer (skipped: no torch here), a campaign sitting, packing within the host's
  default transfer limits (<= 8 files of <= 16 MiB); then unpacking into another tree restores the same checkpoints bit for bit, and a
  finished run meta-tested there gives the window's number.

  Whatever a phase produced must be right; a phase that its deadline cut on a slow machine
  (the budget is wall time) turns the test into a skip naming it, after everything else is
  checked."""
  if (os.getloadavg()[0] > 3 * (os.cpu_count() or 1) and
      not os.environ.get('METADROP_DRY_RUN_ANY_LOAD')):
    pytest.skip(f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a 60-s budget '
                'cannot be judged on a machine this busy (CI runs it on an idle one)')
  out, cdir = tmp_path / 'out', tmp_path / 'camp'
  tuned = tmp_path / 'autotune'        # XLA's autotune cache of an earlier job: carried on
  tuned.mkdir()
  (tuned / 'fusion.textproto').write_text('tuned')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'OUT': str(out),
         'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
         'METADROP_AUTOTUNE_CACHE_DIR': str(tuned),
         'METADROP_DATA_DIR': str(tmp_path / 'data'), 'METADROP_WINDOW_DATA': '0',
         'PYTHON': sys.executable}
  cmd = ['bash', 'scripts/device_window.sh', '60', f'--campaign_dir={cdir}',
         '--campaign_settings=tiny', '--smoke_setting=tiny', '--smoke_gradients=authors',
         f'--smoke_set={SMALLER}',
         f'--campaign_overrides=val_every=0,eval.num_episodes=10,{SMALLER}',
         '--bench=quick', '--bench_configs=tiny', f'--bench_set={SMALLER}', '--bench_iters=3',
         '--bench_warmup=1', f'--work={tmp_path / "w"}']
  t0 = time.time()
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert time.time() - t0 < 60 + 15          # the budget holds, setup and packing included
  files = sorted(os.listdir(out))
  limits = pack.TransferLimits()
  assert len(files) <= limits.max_files and {'window.json', 'window.log'} <= set(files)
  assert all(os.path.getsize(out / f) <= limits.max_file_bytes for f in files)
  s = json.loads((out / 'window.json').read_text())
  assert s['phases']['info']['result']['backend'] == 'cpu'
  cut = []
  smoke = s['phases']['smoke']['result']
  if smoke.get('rows'):
    assert smoke['pass_highest'] and smoke['rows'][0]['rel_err'] < gpu_check.TOL_HIGHEST
  else:
    assert smoke['rc'] == 'timeout', smoke
    cut.append('smoke')
  bench = [b for b in s['phases']['bench']['result']['rows'] if 'error' not in b]
  if bench:
    assert bench[0]['config'] == 'tiny' and bench[0]['s_per_iter'] > 0
  else:
    cut.append('bench')
  assert 'skipped' in s['phases']['torch']['result']
  sitting = s['phases']['campaign']['result']['sitting']
  trained = [x for x in sitting['runs'] if x['to'] > x['from']] if sitting else []
  if not trained:
    cut.append('campaign')
  # back "here": unpack into another tree, the state is the device's, bit for bit
  repo = tmp_path / 'repo'
  (repo / 'docs').mkdir(parents=True)
  unpack.unpack(str(out), repo=str(repo), campaign_dir='camp')
  for x in trained:
    a, b = _params(str(cdir / x['name'])), _params(str(repo / 'camp' / x['name']))
    assert int(b.step) == x['to']
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(u, v)
    assert not (repo / 'camp' / x['name'] / 'tb').exists()
  assert (repo / 'camp' / 'status.md').exists()
  assert json.loads((repo / '.gpu_cache' / 'autotune_cache.json').read_text())['jax'] == (
      s['phases']['info']['result']['versions']['jax'])
  with tarfile.open(repo / '.gpu_cache' / 'autotune_cache.tgz') as tar:
    assert tar.getnames() == ['fusion.textproto']
  assert list((repo / 'docs' / 'bench' / 'windows').glob('*.json'))
  # a finished run is a released model: meta-testing the unpacked checkpoint here gives the
  # window's number (same episodes and noise; bit-equal on the same platform)
  done = [x for x in (sitting or {}).get('runs', []) if x.get('accuracy') is not None]
  for x in done[:1]:
    wd = str(repo / 'camp' / x['name'])
    r = evaluation.evaluate_checkpoint(workdir_lib.load_run_config(wd), wd)
    assert (r['accuracy'], r['ci95']) == (x['accuracy'], x['ci95'])
  if cut:
    pytest.skip(f'this machine was too slow for the 60-s budget: {cut} cut by their deadlines '
                f'(load average {os.getloadavg()[0]:.1f}); the rest checked out')


def test_precision_choice_needs_the_check_and_a_speedup():
  smoke = {'pass_default': True}
  row = lambda p, s: {'config': 'c', 'method': 'metadrop', 'precision': p, 's_per_iter': s,
                      'xla_flags': ''}
  assert choices.choose_precision(smoke, [row('highest', 10.0), row('default', 5.0)])[0] == 'default'
  assert choices.choose_precision(smoke, [row('highest', 10.0), row('default', 9.0)])[0] == 'highest'
  assert choices.choose_precision({'pass_default': False},
                                 [row('highest', 10.0), row('default', 5.0)])[0] == 'highest'
  assert choices.choose_precision(smoke, [row('highest', 10.0)])[0] == 'highest'


def test_pack_splits_large_archives_and_unpack_replaces_runs(tmp_path):
  """Parts of <= part_bytes (the host's transfer limit), reassembled; a returned run that is
  ahead replaces the local one (its old checkpoint goes); runs not returned stay; runs unchanged
  since the window's start are not packed; temporaries and TensorBoard files never travel."""
  cdir = tmp_path / 'dev' / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  for run in ('a', 'b'):
    fake_run(cdir / run, 7, nbytes=3000)
    (cdir / run / 'tb').mkdir()
    (cdir / run / 'tb' / 'events').write_text('x')
    (cdir / run / 'metrics.jsonl.tmp.1').write_text('x')
  old = time.time() - 100
  for p in (cdir / 'b').rglob('*'):
    os.utime(p, (old, old))
  members = pack.campaign_members(str(cdir), since=time.time() - 10)
  assert sorted(members) == [os.path.join('a', f) for f in (
      'checkpoint_hashes.json', os.path.join('checkpoints', '7', 'data'), 'config.json',
      'runs.jsonl')] + ['campaign.json']
  out = tmp_path / 'out'
  out.mkdir()
  summary = {'start': '2026-01-01T00:00:00Z', 'phases': {}}
  files = pack.pack(str(out), str(tmp_path), str(cdir), since=time.time() - 10, summary=summary,
                    limits=pack.TransferLimits(part_bytes=1000))
  assert len(files) >= 3 and all(n.startswith('campaign.tgz.') for n in files)
  assert all(s <= 1000 for s in files.values())
  (out / 'window.json').write_text(json.dumps({**summary, 'files': files}))
  repo = tmp_path / 'repo'
  (repo / 'camp' / 'a' / 'checkpoints' / '5').mkdir(parents=True)
  (repo / 'camp' / 'c').mkdir(parents=True)
  unpack.unpack(str(out), repo=str(repo), campaign_dir='camp', log=lambda *_: None)
  assert sorted(os.listdir(repo / 'camp' / 'a' / 'checkpoints')) == ['7']
  assert (repo / 'camp' / 'a' / 'checkpoints' / '7' / 'data').read_bytes() == \
      (cdir / 'a' / 'checkpoints' / '7' / 'data').read_bytes()
  assert (repo / 'camp' / 'c').is_dir() and not (repo / 'camp' / 'b').exists()


def test_a_killed_sitting_is_recovered_from_the_runs_logs(tmp_path):
  t0 = time.time() - 1
  (tmp_path / 'r1').mkdir()
  (tmp_path / 'r1' / 'runs.jsonl').write_text(json.dumps(
      {'start_step': 0, 'step': 20, 'minutes_this_run': 0.5, 'stopped': 'finished'}) + '\n')
  (tmp_path / 'r1' / 'results.json').write_text(json.dumps({'accuracy': 50.0, 'ci95': 1.0}))
  (tmp_path / 'r2').mkdir()    # cut inside its share: no row, nothing claimed
  row = window.recover_sitting(str(tmp_path), t0, 'now')
  assert row['runs'] == [{'name': 'r1', 'from': 0, 'to': 20, 'minutes': 0.5, 'stopped': 'finished',
                          'evaluated': True, 'accuracy': 50.0, 'ci95': 1.0}]
  assert json.loads((tmp_path / 'sittings.jsonl').read_text())['killed']


def test_meta_step_bench_plan():
  """--bench=full / quick: benchmarks/meta_step.py's cells (--bench=auto plans formulations)."""
  det = '--xla_gpu_deterministic_ops=true'
  cells = [('highest', 'omni', 'metadrop', None, 1), ('highest', 'omni', 'maml', None, 1),
           ('highest', 'mimg', 'metadrop', None, 1)]
  key = lambda c: choices.cell_key(c, det)
  nxt = ('highest', 'mimg', 'maml', None, 1, 'authors')
  # quick: the campaign's next run; with no campaign run to train, the first cell
  assert choices.bench_plan('quick', cells, {key(cells[0])}, det, lambda: nxt) == ('quick', [nxt])
  assert choices.bench_plan('quick', cells, set(), det, lambda: None) == ('quick', cells[:1])
  # asked for in full: what is missing, else everything again
  assert choices.bench_plan('full', cells, {key(cells[0])}, det, lambda: nxt) == ('full', cells[1:])
  assert choices.bench_plan('full', cells, {key(c) for c in cells}, det, lambda: nxt) == (
      'full', cells)
  assert choices.bench_plan('skip', cells, set(), det, lambda: nxt) == ('skip', [])
  # a row measured without deterministic ops does not count for a deterministic window
  nondet = {choices.cell_key(c, '') for c in cells}
  assert choices.bench_plan('full', cells, nondet, det, lambda: nxt) == ('full', cells)


def _form_row(cell, ms, det=True, **over):
  return {'cell': cell, 'ms_per_iter_pipelined': ms, 'deterministic_ops': det,
          'overrides': {'model.conv_impl': 'xla', 'model.pool_impl': 'select', **over},
          'extra_flags': ''}


def test_formulation_choice_needs_determinism_the_smoke_test_and_a_speedup():
  """The sitting's formulation: the fastest deterministic cell whose conv formulation passed the
  smoke test; a faster non-deterministic or unchecked cell is never chosen."""
  rows = [_form_row('baseline', 38.0, **{'model.pool_impl': 'reduce_window'}),
          _form_row('select', 25.0),
          _form_row('select_im2col', 18.0, **{'model.conv_impl': 'im2col'}),
          _form_row('select_im2col_nondet', 16.0, det=False, **{'model.conv_impl': 'im2col'}),
          _form_row('bf16', 12.0, **{'model.conv_impl': 'im2col', 'model.dot_algorithm': 'bf16_x3'})]
  smoke = {'rows': [1], 'pass_highest_by_conv_impl': {'xla': True, 'im2col': True,
                                                      'im2col:bf16_x3': False}}
  c = choices.choose_formulation({'rows': rows}, smoke)
  assert c['cell'] == 'select_im2col'
  assert c['overrides'] == {'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}
  smoke['pass_highest_by_conv_impl']['im2col'] = False
  assert choices.choose_formulation({'rows': rows}, smoke)['cell'] == 'select'
  assert choices.choose_formulation({'rows': rows[:1]}, smoke)['overrides'] == {}
  assert choices.choose_formulation(None, smoke)['overrides'] == {}
  # the campaign trains only if its own formulation passed (a failed candidate does not stop it)
  assert choices.formulation_checked(smoke, {'model.conv_impl': 'xla'}) is True
  assert choices.formulation_checked(smoke, {}) is False            # default: im2col, failed here
  assert choices.formulation_checked({}, {}) is None


def test_formulation_is_recorded_per_device_kind(tmp_path):
  """A measured formulation is recorded in campaign.json for this kind of device; later
  sittings without a measurement use it; bad fields are refused before anything is written."""
  cdir = str(tmp_path / 'camp')
  runs.init_campaign(cdir, ['tiny'])
  camp = runs.load_campaign(cdir)
  assert runs.resolve_formulation(cdir, camp, {}) == {}
  f = {'model.pool_impl': 'select'}
  assert runs.resolve_formulation(cdir, camp, f) == f
  again = runs.load_campaign(cdir)
  assert runs.recorded_formulation(again, runs.device_kind()) == f
  assert runs.resolve_formulation(cdir, again, {}) == f
  with pytest.raises(ValueError, match='change results'):
    runs.check_formulation({'inner_lr': 0.3})


def test_campaign_command_line_and_the_launch_alias(tmp_path, capsys):
  """python -m tools.long_runs.campaign is the campaign's home; launch.py --mode=campaign
  forwards to it (--plan as plan); a formulation field that changes results is refused."""
  from tools.long_runs import campaign as campaign_cli
  cdir = str(tmp_path / 'camp')
  runs.init_campaign(cdir, ['tiny'])
  assert campaign_cli.main(['plan', f'--campaign_dir={cdir}', '--campaign_settings=tiny']) == 0
  plan = capsys.readouterr().out
  assert plan.splitlines()[-1] == 'next: tiny_metadrop_authors (train); needs synthetic data'
  assert campaign_cli.main(['--plan', f'--campaign_dir={cdir}']) == 0
  assert capsys.readouterr().out == plan
  assert campaign_cli.main(['report', f'--campaign_dir={cdir}']) == 0
  assert (tmp_path / 'camp' / 'status.md').read_text().startswith('# Table-1 campaign')
  with pytest.raises(SystemExit) as e:
    campaign_cli.main(['sitting', f'--campaign_dir={cdir}', '--formulation=inner_lr=0.3'])
  assert e.value.code == 2 and 'change results' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    campaign_cli.main([f'--campaign_dir={cdir}'])            # no command: usage, not a sitting
  r = subprocess.run([sys.executable, 'launch.py', '--mode=campaign', '--plan',
                      f'--campaign_dir={cdir}'], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and r.stdout == plan, r.stderr[-2000:]
  r = subprocess.run([sys.executable, 'launch.py', '--helpfull'], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert 'python -m tools.long_runs.campaign' in r.stdout and '--budget_minutes' not in r.stdout


def test_the_hosts_transfer_limits_are_flags():
  """--max_files / --max_file_mib / --part_mib default to 8 files, 16 MiB, 15 MiB parts."""
  run = ['run', '--budget_s=60']
  limits = window.transfer_limits(window._parser().parse_args(run))
  assert limits == pack.TransferLimits() == pack.TransferLimits(8, 16 * 2**20, 15 * 2**20)
  small = window.transfer_limits(window._parser().parse_args(
      run + ['--max_files=4', '--max_file_mib=2', '--part_mib=1.5']))
  assert (small.max_files, small.max_file_bytes, small.part_bytes) == (4, 2 * 2**20, 3 * 2**19)
  with pytest.raises(SystemExit):
    window.main(run + ['--part_mib=20'])         # a part larger than a file: refused at once


def test_launch_alias_forwards_every_campaign_option(monkeypatch):
  """Old command lines keep working: --plan and --report_only name their commands, anything
  else is a sitting (results/table1/README.md's --budget_minutes=M); other modes are not touched."""
  import launch
  from tools.long_runs import campaign as campaign_cli
  seen = []
  monkeypatch.setattr(campaign_cli, 'main', lambda argv: seen.append(argv) or 0)
  assert launch.campaign_alias(['--mode=campaign', '--budget_minutes=8']) == 0
  assert launch.campaign_alias(['--mode', 'campaign', '--report_only', '--campaign_dir=d']) == 0
  assert launch.campaign_alias(['--config=configs/tiny.py', '--mode=train']) is None
  assert seen == [['sitting', '--budget_minutes=8'], ['--report_only', '--campaign_dir=d']]
