"""Unpacking a GPU job's files when something goes wrong: a cut unpack, a run training here, a
stale decision, a damaged line, a cut write. Each case: nothing is lost, nothing silently wrong.
(The ordinary unpacking cases are in tests/test_long_runs_state.py, whose helpers these use.)"""

import json
import os

import pytest

from metadrop_jax import metrics
from metadrop_jax import workdir as workdir_lib
from tools.long_runs import pack, procs, runs, sitting, state, swap, unpack
from tests.test_long_runs_state import (A, B, H200, do_unpack, fake_job, fake_run, quiet, repo,
                                        row, steps_of, tree)

assert repo    # (a fixture, used by name)


def test_a_job_with_the_same_rows_keeps_the_newer_formulation(tmp_path, repo):
  """A job cut before any run logged a row adds no sittings row: its (older) formulation used to
  replace the newer one recorded here without a word."""
  r0 = row('2026-11-01T00:00:00Z')
  f_old = {H200: {'overrides': {'model.pool_impl': 'select'}, 'date': '2026-12-01'}}
  f_new = {H200: {'overrides': {'model.conv_impl': 'im2col'}, 'date': '2026-12-04'}}
  do_unpack(fake_job(tmp_path, 'newer', {A: 20}, formulations=f_new, rows=[r0]), repo)
  older = fake_job(tmp_path, 'older', {A: 10}, formulations=f_old, rows=[r0])
  before = tree(repo / 'camp')
  with pytest.raises(state.CampaignError, match='adds no row.*compare the dates'):
    do_unpack(older, repo)
  assert tree(repo / 'camp') == before
  assert runs.load_campaign(str(repo / 'camp'))['formulations'] == f_new


def _cut_between_the_renames(repo, run):
  """What an unpack killed inside its swap leaves: ``run`` moved aside, its new copy not yet in
  place."""
  cdir = repo / 'camp'
  old = swap.staging_dir(str(cdir)) + '/old'
  os.makedirs(old)
  os.rename(cdir / run, os.path.join(old, run))
  return cdir


def test_an_unpack_cut_mid_swap_loses_no_run(tmp_path, repo):
  """The run moved aside used to be deleted by the next unpack once a sitting had started it
  anew here; now a sitting refuses to start until the unpack is finished, and if a run is here
  again anyway, the newer state stays and the other is kept aside."""
  do_unpack(fake_job(tmp_path, 'here', {A: 900, B: 100}), repo)
  cdir = _cut_between_the_renames(repo, A)
  assert 'unpack the same job again' in swap.unfinished(str(cdir))
  with pytest.raises(state.CampaignError, match='an unpack of .* was cut'):
    sitting.sitting(str(cdir), budget_s=60.0, log=quiet)
  fake_run(cdir / A, 5)                      # started anew meanwhile (by hand)
  do_unpack(fake_job(tmp_path, 'other', {B: 200}), repo)
  assert steps_of(cdir, A) == [900] and steps_of(cdir, B) == [200]
  kept = repo / '.camp.superseded'
  aside = os.listdir(kept)
  assert len(aside) == 1 and aside[0].startswith(A + '.') and steps_of(kept, aside[0]) == [5]
  assert swap.unfinished(str(cdir)) is None


def test_a_cut_swap_with_nothing_here_puts_the_run_back(tmp_path, repo):
  do_unpack(fake_job(tmp_path, 'here', {A: 900}), repo)
  cdir = _cut_between_the_renames(repo, A)
  do_unpack(fake_job(tmp_path, 'other', {B: 3}), repo)
  assert steps_of(cdir, A) == [900] and not (repo / '.camp.superseded').exists()


def test_a_failing_swap_changes_nothing(tmp_path, repo, monkeypatch):
  """The state files were written before the runs were swapped; a swap that failed left them
  ahead of the runs."""
  do_unpack(fake_job(tmp_path, 'here', {A: 100, B: 100}, rows=[row('2026-11-01T00:00:00Z')]),
            repo)
  before = tree(repo / 'camp')
  real = swap.swap_runs

  def fails_after_one(cdir, stage, take, swapped):
    real(cdir, stage, take[:1], swapped)
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(swap, 'swap_runs', fails_after_one)
  newer = fake_job(tmp_path, 'newer', {A: 200, B: 200},
                   rows=[row('2026-11-01T00:00:00Z'), row('2026-11-02T00:00:00Z')])
  with pytest.raises(OSError):
    do_unpack(newer, repo)
  assert tree(repo / 'camp') == before
  monkeypatch.undo()
  do_unpack(newer, repo)
  assert steps_of(repo / 'camp', A) == [200] and steps_of(repo / 'camp', B) == [200]


def test_a_run_training_here_is_not_replaced(tmp_path, repo):
  do_unpack(fake_job(tmp_path, 'here', {A: 100}), repo)
  before = tree(repo / 'camp')
  with workdir_lib.locked(str(repo / 'camp' / A)):
    with pytest.raises(state.CampaignError, match=f'{A} is training here now'):
      do_unpack(fake_job(tmp_path, 'newer', {A: 200}), repo)
  assert tree(repo / 'camp') == before | {f'{A}/.lock': b''}
  do_unpack(fake_job(tmp_path, 'newer2', {A: 200}), repo)
  assert steps_of(repo / 'camp', A) == [200]


def test_unreadable_lines_of_the_returned_sittings_are_kept_aside(tmp_path, repo):
  job_camp = tmp_path / 'job' / 'camp'
  out = fake_job(tmp_path, 'job', {A: 10}, rows=[row('2026-11-01T00:00:00Z')])
  with open(job_camp / 'sittings.jsonl', 'a') as f:
    f.write('{"start": "2026-11-0\n' + json.dumps(row('2026-11-03T00:00:00Z')) + '\n')
  for f in out.iterdir():
    f.unlink()
  summary = {'start': '2026-12-05T10:00:00Z', 'phases': {}}
  files = pack.pack(str(out), str(tmp_path), str(job_camp), since=0, summary=summary, log=quiet)
  (out / 'window.json').write_text(json.dumps({**summary, 'files': files}))
  said = []
  unpack.unpack(str(out), repo=str(repo), campaign_dir='camp', log=said.append)
  cdir = repo / 'camp'
  assert [r['start'] for r in metrics.read_jsonl(str(cdir / 'sittings.jsonl'))] == [
      '2026-11-01T00:00:00Z', '2026-11-03T00:00:00Z']
  assert (cdir / 'sittings.jsonl.skipped').read_text() == '{"start": "2026-11-0\n'
  assert any('1 unreadable line' in s for s in said)
  unpack.unpack(str(out), repo=str(repo), campaign_dir='camp', log=quiet)   # again: no duplicate
  assert (cdir / 'sittings.jsonl.skipped').read_text() == '{"start": "2026-11-0\n'


def test_a_cut_write_leaves_the_old_file_or_none(tmp_path, monkeypatch):
  """Job records, copied tables, the log's tail, the compile cache: written through a temp file,
  so a write cut (disk full, a kill) leaves no half file that a later unpack takes as whole."""
  path = tmp_path / 'record.json'
  procs.write_atomic(str(path), 'old')

  def full(fd):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(procs.os, 'fsync', full)
  with pytest.raises(OSError):
    procs.write_atomic(str(path), '{"start": "2026-12-05"}')
  with pytest.raises(OSError):
    procs.copy_atomic(str(path), str(tmp_path / 'copy'))
  assert path.read_text() == 'old' and sorted(os.listdir(tmp_path)) == ['record.json']


def test_temp_files_are_neither_packed_nor_unpacked(tmp_path):
  cdir = tmp_path / 'camp'
  runs.init_campaign(str(cdir), ['tiny'])
  (cdir / f'campaign.json.tmp.{os.getpid()}').write_text('{"cut')
  assert not [m for m in pack.campaign_members(str(cdir), since=0) if '.tmp' in m]


def test_a_damaged_checkpoint_here_does_not_outrank_a_sound_returned_one(tmp_path, repo):
  do_unpack(fake_job(tmp_path, 'here', {A: 200}), repo)
  data = next((repo / 'camp' / A / 'checkpoints').glob('200/*data*'), None) or next(
      p for p in (repo / 'camp' / A / 'checkpoints' / '200').rglob('*') if p.is_file())
  data.write_bytes(data.read_bytes()[:-10] + b'0123456789')
  said = []
  unpack.unpack(str(fake_job(tmp_path, 'back', {A: 150})), repo=str(repo), campaign_dir='camp',
                log=said.append)
  assert steps_of(repo / 'camp', A) == [150]
  assert any('checkpoint 200 fails its check' in s for s in said)
