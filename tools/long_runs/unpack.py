"""Unpacking a GPU job's returned files here without losing or regressing anything: check, stage,
verify, decide, then swap.

  python -m tools.long_runs.window unpack DIR [--force=NAMES] [--skip=RUNS]

1. check: ``window.json`` readable and complete (``start``, ``phases``); the campaign archive's
   parts all there at the sizes window.json lists; the archive readable to its end (gzip's length
   and CRC) with as many files as were packed; every member a file or folder inside the campaign
   folder;
2. stage: extracted into a folder beside the campaign folder (``.<name>.unpack``);
3. verify: each returned run's config.json and results.json read, its checkpoint folders are
   steps, and its newest checkpoint matches the SHA-256 recorded in its checkpoint_hashes.json
   (``--skip=RUN`` leaves out a run that fails, keeping this folder's state of it);
4. decide (:mod:`tools.long_runs.state`): per run the newer of the two states; the rows of both
   ``sittings.jsonl``; ``campaign.json`` merged, its matmul precision lock and per-device
   formulations never lost or changed unless ``--force`` names them (a run named by ``--force``
   takes the returned state even when it is older);
5. swap (:mod:`tools.long_runs.swap`): campaign.json and sittings.jsonl replaced atomically, then
   each run taken renamed into place (the old folder moved aside first, removed at the end); no
   run is replaced while a process trains it. A swap that fails puts back the runs and the two
   files; one killed is finished by the next unpack, which never deletes a state it did not
   replace (unpacking the same files again completes it), and until then no sitting starts.

Nothing in the campaign folder changes before 1-4 have passed; every failure is one
:class:`CampaignError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import shutil
import tarfile
import zlib

from metadrop_jax import metrics as metrics_lib
from tools.long_runs import autotune
from tools.long_runs import reports
from tools.long_runs import state
from tools.long_runs import swap
from tools.long_runs.pack import tail_copy
from tools.long_runs.procs import copy_atomic, write_atomic
from tools.long_runs.state import FORCE_FIELDS, CampaignError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNCHANGED = 'nothing here was changed'
AGAIN = "copy the job's files (its $OUT) again"
STATE_FILES = ('campaign.json', 'sittings.jsonl')


# ------------------------------------------------------------------------------------------------
# 1. check what came back
# ------------------------------------------------------------------------------------------------

def read_window(src: str) -> dict:
  """The job's ``window.json``: present, readable, with its start time and phases."""
  path = os.path.join(src, 'window.json')
  if not os.path.isdir(src):
    raise CampaignError(f'{src} is not a folder: pass the folder the job\'s files were copied to')
  if not os.path.isfile(path):
    raise CampaignError(f'{path} missing: {src} does not hold a job\'s returned files (window.json '
                        f'is written last: the job may have been cut before it): {AGAIN}')
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError) as e:
    raise CampaignError(f'{path} is unreadable ({e}): it was cut in transfer: {AGAIN}; '
                        + UNCHANGED) from None
  start = summary.get('start') if isinstance(summary, dict) else None
  if not (isinstance(start, str) and re.fullmatch(r'[0-9TZ:.\-]+', start) and
          isinstance(summary.get('phases'), dict)):
    raise CampaignError(f'{path} is incomplete (no start time or phases): {AGAIN}; ' + UNCHANGED)
  return summary


def archive_parts(src: str, summary: dict) -> list[str]:
  """The campaign archive's files in order: those window.json lists, each at its listed size
  (else ``campaign.tgz`` or ``campaign.tgz.0..N``, numbered without a gap)."""
  listed = summary.get('files')
  if isinstance(listed, dict):
    names = sorted((n for n in listed if re.fullmatch(r'campaign\.tgz(\.[0-9]+)?', n)),
                   key=lambda n: int(n.rsplit('.', 1)[1]) if n[-1].isdigit() else -1)
    for n in names:
      p = os.path.join(src, n)
      size = os.path.getsize(p) if os.path.isfile(p) else None
      if size != listed[n]:
        have = 'is missing' if size is None else f'is {size} bytes'
        raise CampaignError(f'{p} {have}, window.json says {listed[n]} bytes: the campaign '
                            f'archive is incomplete: {AGAIN}; ' + UNCHANGED)
    return [os.path.join(src, n) for n in names]
  if os.path.isfile(os.path.join(src, 'campaign.tgz')):
    return [os.path.join(src, 'campaign.tgz')]
  nums = sorted(int(n.rsplit('.', 1)[1]) for n in os.listdir(src)
                if re.fullmatch(r'campaign\.tgz\.[0-9]+', n))
  if nums != list(range(len(nums))):
    raise CampaignError(f'{src}: campaign archive parts {nums} (a gap): the archive is incomplete: '
                        f'{AGAIN}; ' + UNCHANGED)
  return [os.path.join(src, f'campaign.tgz.{i}') for i in nums]


def read_archive(parts: list[str], summary: dict) -> tarfile.TarFile | None:
  """The campaign archive, read to its end and checked (None if the job brought none)."""
  data = b''
  for p in parts:
    with open(p, 'rb') as f:
      data += f.read()
  if not data:
    return None
  where = ', '.join(os.path.basename(p) for p in parts)
  try:
    tar = tarfile.open(fileobj=io.BytesIO(gzip.decompress(data)), mode='r:')
    members = tar.getmembers()
  except (OSError, EOFError, zlib.error, tarfile.TarError) as e:
    raise CampaignError(f'the campaign archive ({where}) is truncated or damaged ({e}): {AGAIN}; '
                        + UNCHANGED) from None
  for m in members:
    if (m.name.startswith('/') or '..' in m.name.split('/') or not (m.isfile() or m.isdir())):
      raise CampaignError(f'the campaign archive ({where}) holds an unsafe member {m.name!r} (a '
                          'link, a device, or a path outside the campaign folder): not unpacked; '
                          + UNCHANGED)
  files = sum(m.isfile() for m in members)
  if summary.get('campaign_members') not in (None, files):
    raise CampaignError(f"the campaign archive ({where}) holds {files} files, the job packed "
                        f"{summary['campaign_members']}: {AGAIN}; " + UNCHANGED)
  return tar


# ------------------------------------------------------------------------------------------------
# 2-4. stage, verify, decide
# ------------------------------------------------------------------------------------------------

def verify_run(wd: str) -> tuple[dict, str | None]:
  """(what the returned run folder holds, why it cannot be trusted or None)."""
  from metadrop_jax import workdir as workdir_lib
  r = state.read_run(wd)
  problems = r['odd'] + [p for p in (r['blocking'], r['unread']) if p]
  if r['steps'] and r['config'] is None:
    problems.append('checkpoints without config.json')
  if r['steps']:
    bad = workdir_lib.checkpoint_problem(wd, r['step'])
    if bad:
      problems.append(f"checkpoint {r['step']}: {bad}")
  return r, '; '.join(problems) or None


def intact_state(wd: str, log) -> dict:
  """What this folder holds of a run, at its newest checkpoint that matches its SHA-256 (a newer
  damaged one would otherwise outrank a sound returned state)."""
  from metadrop_jax import workdir as workdir_lib
  r = state.read_run(wd)
  intact = next((s for s in reversed(r['steps']) if not workdir_lib.checkpoint_problem(wd, s)), 0)
  if intact != r['step']:
    log(f"{os.path.basename(wd)}: this folder's checkpoint {r['step']} fails its check; its "
        f'state counts as step {intact}')
  return {**r, 'step': intact}


def decide_runs(cdir: str, new: str, force, skip, log) -> tuple[list[str], list[str]]:
  """(runs whose returned state replaces this folder's, runs kept as they are here)."""
  names = sorted(n for n in os.listdir(new) if os.path.isdir(os.path.join(new, n)))
  unknown = sorted((set(force) - set(names) - set(FORCE_FIELDS)) | (set(skip) - set(names)))
  if unknown:
    raise CampaignError(f'--force/--skip name {unknown}: neither a returned run ({names}) nor one '
                        f'of {FORCE_FIELDS}; ' + UNCHANGED)
  take, kept, damaged = [], [], []
  for name in names:
    if name in skip:
      log(f'{name}: left out (--skip); this folder\'s state is kept')
      kept.append(name)
      continue
    back, problem = verify_run(os.path.join(new, name))
    if problem:
      damaged.append((name, problem))
      continue
    here_wd = os.path.join(cdir, name)
    here = state.rank(intact_state(here_wd, log))
    if not os.path.exists(here_wd) or state.rank(back) > here or name in force:
      take.append(name)
    else:
      kept.append(name)
      how = 'the same' if state.rank(back) == here else 'older'
      log(f'{name}: kept this folder\'s state (step {here[0]}); the returned one (step '
          f"{back['step']}) is {how} (--force={name} takes it)")
  busy = [n for n in take if swap.in_use(os.path.join(cdir, n))]
  if busy:
    raise CampaignError(
        f'{", ".join(busy)} {"is" if len(busy) == 1 else "are"} training here now (a process '
        'holds the run folder\'s .lock): let it finish or stop it (Ctrl-C saves it), then unpack '
        'again; ' + UNCHANGED)
  if damaged:
    raise CampaignError(
        'returned runs fail verification: ' + '; '.join(f'{n}: {p}' for n, p in damaged) +
        f': {AGAIN}, or --skip={",".join(n for n, _ in damaged)} keeps this folder\'s state of '
        'them and unpacks the rest; ' + UNCHANGED)
  return take, kept


def decide_state(cdir: str, new: str, force, log) -> tuple[dict | None, list[dict], list]:
  """(the campaign.json to write, the sittings.jsonl rows, lines of this copy's sittings.jsonl
  that are not rows)."""
  cut = []
  rows_here = metrics_lib.read_jsonl(os.path.join(cdir, 'sittings.jsonl'), skipped=cut,
                                     warn=False)
  cut_back = []
  rows_back = metrics_lib.read_jsonl(os.path.join(new, 'sittings.jsonl'), skipped=cut_back,
                                     warn=False)
  if cut_back:
    log(f'the returned sittings.jsonl has {len(cut_back)} unreadable line(s): kept in '
        'sittings.jsonl.skipped, not as rows')
  cut = cut + cut_back
  rows, added, continues = state.merge_rows(rows_here, rows_back)
  here_path, back_path = (os.path.join(d, 'campaign.json') for d in (cdir, new))
  here = state.read_campaign_file(here_path) if os.path.exists(here_path) else None
  back = None
  if os.path.exists(back_path):
    try:
      back = state.read_campaign_file(back_path)
    except CampaignError:
      raise CampaignError(f'the returned campaign.json is not a readable campaign: {AGAIN}; '
                          + UNCHANGED) from None
  camp, notes = state.merge_campaign(here, back, force, continues, here_path)
  for n in notes + [f'sittings.jsonl: {added} new rows, {len(rows_here)} kept']:
    log(n)
  return camp, rows, cut


def write_state(cdir: str, new: str, camp: dict | None, rows: list[dict], cut: list) -> None:
  if camp is not None:
    metrics_lib.write_json_atomic(os.path.join(cdir, 'campaign.json'), camp)
  path = os.path.join(cdir, 'sittings.jsonl')
  if cut:                           # kept aside once (a retried unpack does not add them again)
    lines = [raw if raw.endswith(b'\n') else raw + b'\n' for _, raw in cut]
    try:
      with open(path + '.skipped', 'rb') as f:
        have = set(f.readlines())
    except FileNotFoundError:
      have = set()
    with open(path + '.skipped', 'ab') as f:
      f.writelines(l for l in lines if l not in have)
  if rows or os.path.exists(path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  for name in os.listdir(new):       # other files (README, tables) only where this copy has none
    src = os.path.join(new, name)
    if (os.path.isfile(src) and name not in STATE_FILES and '.tmp' not in name and
        not os.path.exists(os.path.join(cdir, name))):
      copy_atomic(src, os.path.join(cdir, name))


def unpack_campaign(tar, cdir: str, force, skip, log) -> dict:
  """Stages, verifies and decides (nothing changed if any of it fails), then swaps; a swap that
  fails puts back the campaign files it had written as well as the runs."""
  stage = swap.staging_dir(cdir)
  swap.finish_cut_swap(cdir, stage, log)
  new, before = os.path.join(stage, 'new'), os.path.join(stage, 'state_before')
  swapped = []
  try:
    safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
    tar.extractall(new, **safe)
    take, kept = decide_runs(cdir, new, force, skip, log)
    camp, rows, cut = decide_state(cdir, new, force, log)
    os.makedirs(before)
    for name in STATE_FILES:
      if os.path.exists(os.path.join(cdir, name)):
        shutil.copy2(os.path.join(cdir, name), os.path.join(before, name))
    try:
      write_state(cdir, new, camp, rows, cut)
      swap.swap_runs(cdir, stage, take, swapped)
    except BaseException:            # back to what was here: runs first, then the state files
      swap.undo_swaps(cdir, stage, swapped)
      for name in STATE_FILES:
        if os.path.exists(os.path.join(before, name)):
          os.replace(os.path.join(before, name), os.path.join(cdir, name))
        elif os.path.exists(os.path.join(cdir, name)):
          os.remove(os.path.join(cdir, name))
      raise
  finally:
    swap.finish_cut_swap(cdir, stage, log, replaced=swapped)
  return {'replaced': take, 'kept': kept}


# ------------------------------------------------------------------------------------------------
# the whole unpack
# ------------------------------------------------------------------------------------------------

def record_window(summary: dict, src: str, repo: str) -> str:
  """window.json and the log's tail under docs/bench/windows/; the compile cache and the
  autotune cache in .gpu_cache/."""
  info = (summary['phases'].get('info') or {}).get('result') or {}
  kind = str(info.get('device_kind', 'unknown')).replace(' ', '_').replace(os.sep, '_')
  bench_dir = os.path.join(repo, 'docs', 'bench', 'windows')
  os.makedirs(bench_dir, exist_ok=True)
  base = os.path.join(bench_dir, f"{summary['start'].replace(':', '').replace('-', '')}_{kind}")
  summary['device_kind'] = info.get('device_kind')
  write_atomic(base + '.json', json.dumps(summary, indent=1, default=str))
  if os.path.exists(os.path.join(src, 'window.log')):
    tail_copy(os.path.join(src, 'window.log'), base + '.log', limit=512 * 1024)
  if os.path.exists(os.path.join(src, 'jax_cache.tgz')):
    os.makedirs(os.path.join(repo, '.gpu_cache'), exist_ok=True)
    copy_atomic(os.path.join(src, 'jax_cache.tgz'),
                os.path.join(repo, '.gpu_cache', 'jax_cache.tgz'))
  tuned = summary.get('autotune_cache') or {}
  autotune.keep(src, repo, autotune.identity(
      tuned.get('jax', ''), tuned.get('device_kind', info.get('device_kind', ''))))
  return base


def unpack(src: str, repo: str = ROOT, campaign_dir: str | None = None, log=print, *,
           force=(), skip=(), machine_minutes: float | None = None) -> dict:
  """Puts a job's returned files in place (module docstring), then stores ``window.json`` and
  the log under ``docs/bench/windows/``, regenerates the tables and blocks, and keeps the compile
  cache in ``.gpu_cache/`` (git-ignored) for the next job. ``machine_minutes``: the host's count
  of the job's machine time, kept in the record's accounting. Returns a summary."""
  cdir = os.path.abspath(os.path.join(repo, campaign_dir or os.path.join('results', 'table1')))
  summary = read_window(src)
  if machine_minutes is not None:
    if not (machine_minutes > 0 and math.isfinite(machine_minutes)):
      raise CampaignError(f'--machine_minutes={machine_minutes}: give the positive minutes the '
                          'host counted for this job')
    summary.setdefault('accounting', {})['machine_min'] = round(machine_minutes, 2)
  tar = read_archive(archive_parts(src, summary), summary)
  done = {'replaced': [], 'kept': []}
  if tar is not None:
    os.makedirs(cdir, exist_ok=True)
    done = unpack_campaign(tar, cdir, set(force), set(skip), log)
  base = record_window(summary, src, repo)
  written = []
  if os.path.exists(os.path.join(cdir, 'campaign.json')):
    written = reports.write_reports(cdir, results_md=os.path.join(repo, 'docs', 'results.md'))
  written.append(reports.write_performance_block(repo))
  log(reports.format_window(summary))
  log(f"replaced runs: {done['replaced']}; kept here: {done['kept']}\n"
      f'wrote {base}.json/.log and {written}')
  return {**done, 'bench': base + '.json', 'written': written}
