"""The campaign's state never regresses: the campaign's command line on damaged or missing files
and bad options, signals and broken runs in a sitting, and JSONL logs cut by a crash. Each test
failed before its fix.

Run folders are stand-ins (random checkpoint bytes with their recorded SHA-256, as train() writes
them); sittings train through a stand-in train() so that no test here compiles anything.
"""

import hashlib
import json
import math
import os
import signal
import time

import pytest

from metadrop_jax import metrics
from metadrop_jax import train as train_lib
from metadrop_jax import workdir as workdir_lib
from tools.long_runs import campaign as campaign_cli
from tools.long_runs import runs, sitting, state, window

A, B, C = 'tiny_metadrop_authors', 'tiny_maml_authors', 'tiny_metadrop_exact'
quiet = lambda *_: None


# ---- stand-ins -----------------------------------------------------------------------------------

def fake_run(wd, step, *, nbytes=2000, evaluated=False, sittings=1):
  """A run folder at ``step`` as train() leaves it: config.json, one checkpoint with its
  SHA-256 in checkpoint_hashes.json, runs.jsonl (and results.json when meta-tested)."""
  ck = wd / 'checkpoints' / str(step)
  ck.mkdir(parents=True)
  data = os.urandom(nbytes)
  (ck / 'data').write_bytes(data)
  (wd / 'config.json').write_text(json.dumps({'num_steps': 1000}))
  (wd / 'checkpoint_hashes.json').write_text(json.dumps(
      {str(step): {'data': hashlib.sha256(data).hexdigest()}}))
  (wd / 'runs.jsonl').write_text(''.join(
      json.dumps({'step': step, 'minutes_this_run': 1.0, 'n': i}) + '\n' for i in range(sittings)))
  if evaluated:
    (wd / 'results.json').write_text(json.dumps({'step': step, 'accuracy': 50.0, 'ci95': 1.0}))


def row(start, **more):
  return {'start': start, 'runs': [], 'skipped': [], **more}


def tree(path):
  """Every file under ``path`` with its bytes (to assert that nothing changed)."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def cli_error(capsys, fn, *args):
  """(exit code, the one error line) of a command line that must fail with a one-line error."""
  with pytest.raises(SystemExit) as e:
    fn(list(args))
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, err
  return e.value.code, lines[0]


# ==== the campaign's command line =================================================================

def plan(cdir, *more):
  return campaign_cli.main(['plan', f'--campaign_dir={cdir}', *more])


def test_plan_and_report_never_write(tmp_path, capsys):
  """plan on a new folder writes nothing; a folder of runs without campaign.json is an error
  that says how to restore it (never a new default campaign)."""
  cdir = tmp_path / 'camp'
  assert plan(cdir, '--campaign_settings=tiny') == 0
  assert 'does not exist yet' in capsys.readouterr().out and not cdir.exists()
  fake_run(cdir / A, 10)
  before = tree(cdir)
  for cmd in ('plan', 'report', 'sitting'):
    rc, line = cli_error(capsys, campaign_cli.main, cmd, f'--campaign_dir={cdir}')
    assert rc == 2 and 'no campaign.json' in line and 'git checkout' in line
  assert tree(cdir) == before


@pytest.mark.parametrize('cmd', ['plan', 'sitting'])
def test_a_misspelled_override_is_one_line_and_writes_nothing(tmp_path, capsys, cmd):
  cdir = tmp_path / 'camp'
  rc, line = cli_error(capsys, campaign_cli.main, cmd, f'--campaign_dir={cdir}',
                       '--campaign_settings=tiny', '--campaign_overrides=val_evry=0')
  assert rc == 2 and 'val_evry' in line and not cdir.exists()


def test_overrides_other_than_the_campaigns_own_are_refused(tmp_path, capsys):
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'], {'val_every': 0})
  before = tree(cdir)
  assert plan(cdir, '--campaign_overrides=val_every=0') == 0       # its own, repeated
  capsys.readouterr()
  rc, line = cli_error(capsys, campaign_cli.main, 'sitting', f'--campaign_dir={cdir}',
                       '--campaign_overrides=val_every=5')
  assert rc == 2 and "'val_every': 0" in line and 'drop --campaign_overrides' in line
  assert tree(cdir) == before


@pytest.mark.parametrize('when', ['--budget_minutes=-5', '--budget_minutes=0',
                                  '--budget_minutes=nan', f'--deadline={time.time() - 60:.0f}'])
def test_a_negative_budget_or_a_past_deadline_is_refused(tmp_path, capsys, when):
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  rc, line = cli_error(capsys, campaign_cli.main, 'sitting', f'--campaign_dir={cdir}', when)
  assert rc == 2 and when.split('=')[0] in line
  assert not (cdir / 'sittings.jsonl').exists()
  with pytest.raises(state.CampaignError):
    sitting.sitting(str(cdir), -1.0, log=quiet)


def _damage_campaign(path, how):
  camp = json.loads(path.read_text())
  text = {'empty': '', 'cut': path.read_text()[:100], 'list': '[]', 'no_runs': '{"version": 1}'}
  if how in text:
    return path.write_text(text[how])
  if how == 'unknown_setting':
    camp['runs'][1]['setting'] = 'omniglot_30way'
  elif how == 'unknown_override':
    camp['overrides'] = {'inner_lrr': 0.1}
  elif how == 'bad_precision':
    camp['matmul_precision'] = 'tf32'
  else:
    del camp['runs'][0]['group']
  path.write_text(json.dumps(camp))


@pytest.mark.parametrize('how', ['empty', 'cut', 'list', 'no_runs', 'run_without_group',
                                 'unknown_setting', 'unknown_override', 'bad_precision'])
def test_a_damaged_campaign_json_is_a_one_line_error(tmp_path, capsys, how):
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  _damage_campaign(cdir / 'campaign.json', how)
  before = tree(cdir)
  for cmd in ('plan', 'report', 'sitting'):
    rc, line = cli_error(capsys, campaign_cli.main, cmd, f'--campaign_dir={cdir}')
    assert rc == 2 and 'campaign.json' in line and ('restore' in line or 'fix' in line), line
  assert tree(cdir) == before


# ==== sittings ====================================================================================

@pytest.fixture
def fake_train(monkeypatch):
  """train.train stand-in: records the runs it is asked to train, 5 steps each; ``plan`` maps a
  run to what it does instead (an exception, or a callable run with the stop handler)."""
  calls, plan_ = [], {}

  def fake(cfg, wd):
    name = os.path.basename(wd)
    calls.append(name)
    os.makedirs(wd, exist_ok=True)
    what = plan_.get(name)
    if isinstance(what, Exception):
      raise what
    stopped = 'time limit'
    if what == 'signal':
      with train_lib._StopOnSignal() as stop:      # what train() does around its loop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        stopped = f'interrupted ({stop.requested})'
    workdir_lib.append_run_log(wd, {'step': 5, 'start_step': 0, 'minutes_this_run': 0.01})
    return {'step': 5, 'num_steps': cfg.num_steps, 'stopped': stopped, 'done': False,
            'minutes_this_run': 0.01, 'state': None}
  monkeypatch.setattr(train_lib, 'train', fake)
  return calls, plan_


def test_sigterm_stops_the_whole_sitting(tmp_path, fake_train):
  calls, plan_ = fake_train
  cdir = str(tmp_path / 'camp')
  runs.init_campaign(cdir, ['tiny'])
  plan_[A] = 'signal'
  s = sitting.sitting(cdir, 3600.0, log=quiet)
  assert calls == [A] and s['stopped'] == 'interrupted (SIGTERM)'
  assert metrics.read_jsonl(os.path.join(cdir, 'sittings.jsonl'))[-1]['stopped'] == s['stopped']


def test_a_run_with_cut_files_or_failing_is_skipped_and_the_others_train(tmp_path, fake_train,
                                                                        capsys):
  """A cut config.json: plan and report name it, the sitting skips it with a warning; a cut
  results.json reads as not meta-tested; a run whose training fails with a user error is skipped
  too. The other runs train."""
  calls, plan_ = fake_train
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  fake_run(cdir / A, 10)
  (cdir / A / 'config.json').write_text('{"num_st')
  fake_run(cdir / C, 20, evaluated=True)
  (cdir / C / 'config.json').write_text(json.dumps({'num_steps': 20}))
  (cdir / C / 'results.json').write_text('{"acc')
  with pytest.warns(RuntimeWarning, match='results.json'):
    rows = {r['name']: r for r in runs.plan(str(cdir))}
  assert rows[A]['action'] == 'skip' and 'config.json' in rows[A]['problem']
  assert rows[C]['action'] == 'eval'
  assert plan(cdir) == 0 and 'config.json' in capsys.readouterr().out
  assert campaign_cli.main(['report', f'--campaign_dir={cdir}']) == 0
  plan_[B] = workdir_lib.WorkdirError(f'no checkpoint in {cdir / B} can be restored')
  said = []
  s = sitting.sitting(str(cdir), 3600.0, eval_min_s=1e9, log=said.append)
  assert calls == [B, 'tiny_maml_exact']
  assert {r['name'] for r in s['skipped']} == {A, B}
  assert any('WARNING' in l and A in l for l in said)


def test_sitting_rows_after_a_cut_line_stay_readable(tmp_path, fake_train):
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  (cdir / 'sittings.jsonl').write_text(json.dumps(row('2026-01-01T00:00:00Z')) + '\n{"start": "20')
  sitting.sitting(str(cdir), 3600.0, log=quiet)
  (cdir / 'r').mkdir()
  (cdir / 'r' / 'runs.jsonl').write_text(json.dumps({'step': 3, 'start_step': 0}) + '\n')
  window.recover_sitting(str(cdir), 0, '2026-01-02T00:00:00Z')
  with pytest.warns(RuntimeWarning, match='sittings.jsonl:2'):
    rows = metrics.read_jsonl(str(cdir / 'sittings.jsonl'))
  assert len(rows) == 3 and 'backend' in rows[1] and rows[2]['killed']
  assert not math.isnan(rows[1]['seconds'])
