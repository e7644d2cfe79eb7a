"""The campaign's state never regresses: unpacking a GPU job's files (stale copies, damaged or
incomplete transfers, unsafe archives), packing more than a job may bring back, the campaign's
command line on damaged or missing files and bad options, signals and broken runs in a sitting,
and JSONL logs cut by a crash. Each test failed before its fix.

Run folders and archives are stand-ins (random checkpoint bytes with their recorded SHA-256, as
train() writes them): unpacking judges files, not models; sittings train through a stand-in
train() so that no test here compiles anything.
"""

import hashlib
import json
import math
import os
import signal
import tarfile
import time

import pytest

from metadrop_jax import metrics
from metadrop_jax import train as train_lib
from metadrop_jax import workdir as workdir_lib
from tools.long_runs import campaign as campaign_cli
from tools.long_runs import pack, runs, sitting, state, unpack, window

A, B, C = 'tiny_metadrop_authors', 'tiny_maml_authors', 'tiny_metadrop_exact'
H200 = 'NVIDIA H200'
LOCK = {'device': H200, 'jax': '0.11.2', 'date': '2026-11-27', 'from_window_choice': 'highest'}
quiet = lambda *_: None


# ---- stand-ins -----------------------------------------------------------------------------------

def fake_run(wd, step, *, nbytes=2000, evaluated=False, sittings=1):
  """A run folder at ``step`` as train() leaves it: config.json, one checkpoint with its
  SHA-256 in checkpoint_hashes.json, runs.jsonl (and results.json with the per-episode
  accuracies when meta-tested)."""
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
    metrics.save_npy_atomic(metrics.episode_accs_path(str(wd), 'test'), [0.5] * 10)


def row(start, **more):
  return {'start': start, 'runs': [], 'skipped': [], **more}


def fake_job(tmp_path, name, steps, *, lock=None, formulations=None, rows=(), limits=None,
             corrupt=None):
  """The $OUT of a job whose campaign holds ``steps`` (run -> step): packed as the job packs it,
  window.json last (with the list of files). ``corrupt``: a run whose checkpoint is damaged after
  its SHA-256 was recorded."""
  cdir = tmp_path / name / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  camp = runs.load_campaign(str(cdir))
  if lock:
    camp.update(matmul_precision='highest', matmul_precision_locked_by=lock)
  if formulations:
    camp['formulations'] = formulations
  runs.save_campaign(str(cdir), camp)
  for r in rows:
    metrics.append_jsonl(str(cdir / 'sittings.jsonl'), r)
  for run, step in steps.items():
    fake_run(cdir / run, step)
  if corrupt:
    f = next((cdir / corrupt / 'checkpoints').glob('*/data'))
    f.write_bytes(f.read_bytes()[:-10] + b'0123456789')
  out = tmp_path / name / 'out'
  out.mkdir()
  summary = {'start': f'2026-12-0{len(name) % 9 + 1}T10:00:00Z', 'phases': {}}
  files = pack.pack(str(out), str(tmp_path), str(cdir), since=0, summary=summary, log=quiet,
                    limits=limits or pack.TransferLimits())
  (out / 'window.json').write_text(json.dumps({**summary, 'files': files}))
  return out


def tree(path):
  """Every file under ``path`` with its bytes (to assert that nothing changed)."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def steps_of(cdir, run):
  return sorted(int(n) for n in os.listdir(cdir / run / 'checkpoints'))


@pytest.fixture
def repo(tmp_path):
  r = tmp_path / 'repo'
  (r / 'docs').mkdir(parents=True)
  return r


def do_unpack(out, repo, **kw):
  return unpack.unpack(str(out), repo=str(repo), campaign_dir='camp', log=quiet, **kw)


def cli_error(capsys, fn, *args):
  """(exit code, the one error line) of a command line that must fail with a one-line error."""
  with pytest.raises(SystemExit) as e:
    fn(list(args))
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = [l for l in err.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, err
  return e.value.code, lines[0]


# ==== unpacking ===================================================================================

def test_an_older_jobs_files_never_regress_runs_rows_or_the_lock(tmp_path, repo):
  """The newer job first, then the older one: each run keeps the newer state, sittings.jsonl
  keeps every row, campaign.json keeps its precision lock; --force=RUN takes the older run."""
  r0, r_new, r_old = row('2026-11-01T00:00:00Z'), row('2026-11-20T00:00:00Z'), \
      row('2026-11-10T00:00:00Z')
  new = fake_job(tmp_path, 'new', {A: 591, B: 971}, lock=LOCK, rows=[r0, r_new])
  old = fake_job(tmp_path, 'old', {A: 305, B: 471}, rows=[r0, r_old])
  do_unpack(new, repo)
  done = do_unpack(old, repo)
  cdir = repo / 'camp'
  assert (steps_of(cdir, A), steps_of(cdir, B)) == ([591], [971])
  assert done['replaced'] == [] and done['kept'] == [B, A]
  assert metrics.read_jsonl(str(cdir / 'sittings.jsonl')) == [r0, r_old, r_new]
  camp = runs.load_campaign(str(cdir))
  assert camp['matmul_precision_locked_by'] == LOCK and camp['matmul_precision'] == 'highest'
  do_unpack(old, repo, force=[A])
  assert (steps_of(cdir, A), steps_of(cdir, B)) == ([305], [971])


def test_a_changed_precision_or_formulation_is_refused_unless_forced(tmp_path, repo):
  f1 = {H200: {'overrides': {'model.pool_impl': 'select'}, 'date': '2026-12-01'}}
  f2 = {H200: {'overrides': {'model.conv_impl': 'xla'}, 'date': '2026-12-02'}}
  do_unpack(fake_job(tmp_path, 'first', {A: 10}, lock=LOCK, formulations=f1,
                     rows=[row('2026-12-01T00:00:00Z')]), repo)
  before = tree(repo / 'camp')
  other_lock = {**LOCK, 'from_window_choice': 'default'}
  relocked = fake_job(tmp_path, 'relocked', {A: 20}, lock=other_lock)
  with pytest.raises(state.CampaignError, match='matmul precision differs'):
    do_unpack(relocked, repo)
  stale = fake_job(tmp_path, 'stale', {A: 30}, lock=LOCK, formulations=f2)
  with pytest.raises(state.CampaignError, match='formulation'):
    do_unpack(stale, repo)
  assert tree(repo / 'camp') == before            # checked before any run folder was touched
  do_unpack(stale, repo, force=['formulations'])
  assert runs.recorded_formulation(runs.load_campaign(str(repo / 'camp')), H200) == \
      f2[H200]['overrides']
  do_unpack(relocked, repo, force=['matmul_precision'])
  assert runs.load_campaign(str(repo / 'camp'))['matmul_precision_locked_by'] == other_lock


def test_a_job_that_continues_this_copy_records_its_new_formulation(tmp_path, repo):
  """A later measurement on the same kind of device (the returned sittings.jsonl holds every row
  here) replaces the recorded formulation; a kind recorded only here is kept."""
  r0 = row('2026-12-01T00:00:00Z')
  cpu = {'cpu': {'overrides': {'model.conv_impl': 'xla'}}}
  f1 = {H200: {'overrides': {'model.pool_impl': 'select'}}, **cpu}
  f2 = {H200: {'overrides': {'model.conv_impl': 'im2col'}}}
  do_unpack(fake_job(tmp_path, 'first', {A: 10}, formulations=f1, rows=[r0]), repo)
  do_unpack(fake_job(tmp_path, 'second', {A: 20}, formulations=f2,
                     rows=[r0, row('2026-12-02T00:00:00Z')]), repo)
  camp = runs.load_campaign(str(repo / 'camp'))
  assert camp['formulations'] == {**f2, **cpu}


def test_the_flags_of_a_formulation_are_part_of_it_when_unpacking(tmp_path, repo):
  """The same fields under other XLA flags (autotuned deterministic kernels instead of
  deterministic ops) are another formulation: a job that continues this copy brings its flags
  along; a stale copy with other flags is refused unless forced."""
  r0 = row('2026-12-01T00:00:00Z')
  fields = {'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}
  f1 = {H200: {'overrides': fields}}
  f2 = {H200: {'overrides': fields, 'xla_flags': '--xla_gpu_exclude_nondeterministic_ops=true'}}
  do_unpack(fake_job(tmp_path, 'first', {A: 10}, formulations=f1, rows=[r0]), repo)
  do_unpack(fake_job(tmp_path, 'second', {A: 20}, formulations=f2,
                     rows=[r0, row('2026-12-02T00:00:00Z')]), repo)
  camp = runs.load_campaign(str(repo / 'camp'))
  assert runs.recorded_xla_flags(camp, H200) == f2[H200]['xla_flags']
  stale = fake_job(tmp_path, 'stale', {A: 30}, formulations=f1)
  with pytest.raises(state.CampaignError, match='XLA_FLAGS'):
    do_unpack(stale, repo)
  assert runs.recorded_xla_flags(runs.load_campaign(str(repo / 'camp')), H200) == \
      f2[H200]['xla_flags']


@pytest.mark.parametrize('damage', ['altered', 'no_hash'])
def test_a_damaged_returned_checkpoint_changes_nothing(tmp_path, repo, damage):
  """Verified before anything is replaced: the intact run here stays; --skip=RUN unpacks the
  rest."""
  do_unpack(fake_job(tmp_path, 'here', {A: 100, B: 100}), repo)
  before = tree(repo / 'camp')
  out = fake_job(tmp_path, 'bad', {A: 200, B: 200},
                 corrupt=A if damage == 'altered' else None)
  if damage == 'no_hash':     # a job whose hashes file did not come back with its run
    out = tmp_path / 'bad' / 'out'
    cdir = tmp_path / 'bad' / 'camp'
    os.remove(cdir / A / 'checkpoint_hashes.json')
    for f in out.glob('campaign.tgz*'):
      f.unlink()
    summary = {'start': '2026-12-09T10:00:00Z', 'phases': {}}
    files = pack.pack(str(out), str(tmp_path), str(cdir), since=0, summary=summary, log=quiet)
    (out / 'window.json').write_text(json.dumps({**summary, 'files': files}))
  with pytest.raises(state.CampaignError, match=f'{A}: .*checkpoint 200.*--skip={A}'):
    do_unpack(out, repo)
  assert tree(repo / 'camp') == before
  do_unpack(out, repo, skip=[A])
  assert (steps_of(repo / 'camp', A), steps_of(repo / 'camp', B)) == ([100], [200])


@pytest.mark.parametrize('cut', ['missing_part', 'truncated_part', 'gap_unlisted',
                                 'truncated_unlisted', 'fewer_members'])
def test_an_incomplete_or_truncated_archive_changes_nothing(tmp_path, repo, cut):
  do_unpack(fake_job(tmp_path, 'here', {A: 100}), repo)
  before = tree(repo / 'camp')
  out = fake_job(tmp_path, 'split', {A: 200, B: 200}, limits=pack.TransferLimits(part_bytes=1500))
  parts = sorted(out.glob('campaign.tgz.*'), key=lambda p: int(p.suffix[1:]))
  assert len(parts) >= 3
  summary = json.loads((out / 'window.json').read_text())
  if cut == 'missing_part':
    parts[1].unlink()
  elif cut == 'truncated_part':
    parts[-1].write_bytes(parts[-1].read_bytes()[:-5])
  elif cut == 'gap_unlisted':            # a window.json without the list of files
    del summary['files']
    parts[1].unlink()
  elif cut == 'truncated_unlisted':
    del summary['files']
    parts[-1].unlink()
  else:
    summary['campaign_members'] += 1
  (out / 'window.json').write_text(json.dumps(summary))
  with pytest.raises(state.CampaignError, match='incomplete|truncated|packed'):
    do_unpack(out, repo)
  assert tree(repo / 'camp') == before


@pytest.mark.parametrize('window_json', ['missing', 'empty', 'cut', 'no_start', 'bad_phases'])
def test_a_missing_or_incomplete_window_json_changes_nothing(tmp_path, repo, capsys,
                                                             window_json):
  """Checked before anything is replaced (a window.json without ``start`` used to fail after the
  runs were replaced), and said in one line by the command."""
  do_unpack(fake_job(tmp_path, 'here', {A: 100}), repo)
  before = tree(repo)
  out = fake_job(tmp_path, 'newer', {A: 200})
  w = out / 'window.json'
  text = w.read_text()
  if window_json == 'missing':
    w.unlink()
  elif window_json == 'empty':
    w.write_text('')
  elif window_json == 'cut':
    w.write_text(text[:len(text) // 2])
  else:
    s = json.loads(text)
    s.pop('start') if window_json == 'no_start' else s.update(phases=[])
    w.write_text(json.dumps(s))
  capsys.readouterr()
  rc = window.main(['unpack', str(out), f'--repo={repo}', '--campaign_dir=camp'])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith('error: ') and len(err.splitlines()) == 1, err
  assert 'window.json' in err and tree(repo) == before


@pytest.mark.parametrize('member', ['../outside', 'link'])
def test_unsafe_archive_members_are_a_one_line_error(tmp_path, repo, capsys, member):
  out = tmp_path / 'out'
  out.mkdir()
  with tarfile.open(out / 'campaign.tgz', 'w:gz') as tar:
    if member == 'link':
      info = tarfile.TarInfo('run/evil')
      info.type, info.linkname = tarfile.SYMTYPE, '/etc/passwd'
      tar.addfile(info)
    else:
      (tmp_path / 'x').write_text('x')
      tar.add(tmp_path / 'x', arcname=member)
  (out / 'window.json').write_text(json.dumps({'start': '2026-12-01T00:00:00Z', 'phases': {}}))
  rc = window.main(['unpack', str(out), f'--repo={repo}', '--campaign_dir=camp'])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith('error: ') and len(err.splitlines()) == 1, err
  assert 'unsafe member' in err and not (tmp_path / 'outside').exists()
  assert not (repo / 'camp').exists() or not list((repo / 'camp').iterdir())


def test_an_unpack_killed_while_swapping_is_put_right_by_the_next(tmp_path, repo):
  do_unpack(fake_job(tmp_path, 'here', {A: 100}), repo)
  cdir = repo / 'camp'
  stage = tmp_path / 'repo' / '.camp.unpack'
  (stage / 'old').mkdir(parents=True)
  os.rename(cdir / A, stage / 'old' / A)      # killed between moving it aside and the new one in
  do_unpack(fake_job(tmp_path, 'again', {B: 5}), repo)
  assert steps_of(cdir, A) == [100] and steps_of(cdir, B) == [5] and not stage.exists()


def test_a_campaign_too_large_for_the_job_is_packed_in_whole_runs(tmp_path, repo):
  """Runs are packed whole, in the campaign's order, while they fit; the others are named (log
  and window.json), never cut; unpacking restores every packed run."""
  cdir = tmp_path / 'dev' / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  for run in (C, B, A):
    fake_run(cdir / run, 50, nbytes=5000)
  out = tmp_path / 'out'
  out.mkdir()
  said, summary = [], {'start': '2026-12-01T00:00:00Z', 'phases': {}}
  limits = pack.TransferLimits(max_files=4, max_file_bytes=8000, part_bytes=7000)
  files = pack.pack(str(out), str(tmp_path), str(cdir), since=0, summary=summary, log=said.append,
                    limits=limits)
  assert len(files) <= limits.max_files - 2 and max(files.values()) <= limits.part_bytes
  assert summary['campaign_runs_packed'] == [B, A] and summary['campaign_runs_left'] == [C]
  assert any('left out' in s and C in s for s in said)
  (out / 'window.json').write_text(json.dumps({**summary, 'files': files}))
  done = do_unpack(out, repo)
  assert done['replaced'] == [B, A]
  for run in (A, B):
    assert tree(repo / 'camp' / run) == tree(cdir / run)


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
@pytest.mark.parametrize('override', ['val_evry=0', 'val_every=abc'])
def test_a_misspelled_override_is_one_line_and_writes_nothing(tmp_path, capsys, cmd, override):
  """An unknown field, or a value of the wrong type (a traceback before)."""
  cdir = tmp_path / 'camp'
  rc, line = cli_error(capsys, campaign_cli.main, cmd, f'--campaign_dir={cdir}',
                       '--campaign_settings=tiny', f'--campaign_overrides={override}')
  assert rc == 2 and 'val_ev' in line and not cdir.exists()


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
      with train_lib.StopOnSignal() as stop:      # what train() does around its loop
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
