"""The campaign's files read without trusting them, and two copies of them merged without losing
anything.

Read: ``campaign.json`` (missing, emptied, cut or of the wrong shape: a :class:`CampaignError`
naming the file and the fix) and each run folder's files (a cut ``config.json`` or
``results.json`` is reported for that run only, so that the other runs go on).

Merged (unpacking a GPU job's files over this folder, :mod:`tools.long_runs.unpack`): a run's
state is ranked by its newest checkpoint's step, then whether that step was meta-tested, then its
sittings logged, and the newer one is kept; ``sittings.jsonl`` rows of both are kept;
``campaign.json``'s matmul precision lock and per-device formulations are never lost or changed
unless ``--force`` names them.
"""

from __future__ import annotations

import json
import os

from metadrop_jax import metrics as metrics_lib

PRECISIONS = ('highest', 'default', 'auto')
RUN_FIELDS = ('name', 'setting', 'method', 'meta_gradient', 'group')
# what --force may name besides a run: the campaign-wide decisions of campaign.json
FORCE_FIELDS = ('matmul_precision', 'formulations')


class CampaignError(ValueError):
  """A campaign folder or command that cannot be used as asked; the message names the file and
  the fix (the command lines print it as one line, exit code 2)."""


def restore_hint(path: str) -> str:
  return (f'restore it (git checkout -- {path}, or from a copy of the campaign folder); a new '
          'one would drop the matmul precision lock and the recorded formulations')


def run_folders(cdir: str) -> list[str]:
  """The folders of ``cdir`` that hold a run's state (config, checkpoints or run log)."""
  if not os.path.isdir(cdir):
    return []
  return sorted(n for n in os.listdir(cdir) if any(
      os.path.exists(os.path.join(cdir, n, f)) for f in ('config.json', 'checkpoints',
                                                         'runs.jsonl')))


def read_campaign_file(path: str) -> dict:
  """``campaign.json`` at ``path``, of the shape new campaigns are written in."""
  if not os.path.exists(path):
    raise CampaignError(f'{path} not found: not a campaign folder (the first sitting, python -m '
                        'tools.long_runs.campaign sitting, creates it)')
  try:
    with open(path) as f:
      camp = json.load(f)
  except (OSError, ValueError) as e:
    why = 'is empty' if os.path.getsize(path) == 0 else f'is not readable JSON ({e})'
    raise CampaignError(f'{path} {why}: ' + restore_hint(path)) from None
  bad = _shape_problem(camp)
  if bad:
    raise CampaignError(f'{path} is not a campaign ({bad}): ' + restore_hint(path))
  return camp


def _shape_problem(camp) -> str:
  if not isinstance(camp, dict):
    return 'not a JSON object'
  runs = camp.get('runs')
  if not (isinstance(runs, list) and runs):
    return '"runs" is not a non-empty list'
  if not all(isinstance(r, dict) and all(isinstance(r.get(k), str) for k in RUN_FIELDS)
             for r in runs):
    return f'a run lacks one of {RUN_FIELDS}'
  if len({r['name'] for r in runs}) != len(runs):
    return 'two runs have the same name'
  for key in ('overrides', 'formulations'):
    if not isinstance(camp.get(key, {}), dict):
      return f'"{key}" is not an object'
  if camp.get('matmul_precision', 'auto') not in PRECISIONS:
    return f'"matmul_precision" is not one of {PRECISIONS}'
  return ''


# ------------------------------------------------------------------------------------------------
# a run folder
# ------------------------------------------------------------------------------------------------

def _read_object(path: str):
  """(the JSON object in ``path`` or None if absent, the problem reading it or None)."""
  if not os.path.exists(path):
    return None, None
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:
    return None, f'{path} is unreadable ({e})'
  return (obj, None) if isinstance(obj, dict) else (None, f'{path} is not a JSON object')


def read_run(wd: str) -> dict:
  """What a run folder holds: ``steps`` (its checkpoints), ``config`` and ``results`` (dicts or
  None), ``logged`` (rows of runs.jsonl), ``blocking``: what keeps it from training (a cut
  config.json), ``unread``: what was read as absent (a cut results.json: the run is meta-tested
  again), ``odd``: checkpoint folders that are not steps."""
  ck = os.path.join(wd, 'checkpoints')
  names = os.listdir(ck) if os.path.isdir(ck) else []
  steps = sorted(int(n) for n in names if n.isdigit())
  problems = [f'{os.path.join(ck, n)} is not a checkpoint step' for n in names
              if not n.isdigit() and 'tmp' not in n]
  config, bad_config = _read_object(os.path.join(wd, 'config.json'))
  results, bad_results = _read_object(os.path.join(wd, 'results.json'))
  return {'steps': steps, 'step': steps[-1] if steps else 0, 'config': config,
          'results': results, 'logged': metrics_lib.read_jsonl(os.path.join(wd, 'runs.jsonl'),
                                                               warn=False),
          'blocking': bad_config, 'unread': bad_results, 'odd': problems}


def rank(run: dict) -> tuple[int, bool, int]:
  """How far a run's state is: (newest checkpoint step, meta-tested at that step, sittings
  logged). Of two states of one run, the larger is the newer."""
  res = run['results'] or {}
  return run['step'], res.get('step') == run['step'] and run['step'] > 0, len(run['logged'])


# ------------------------------------------------------------------------------------------------
# merging two copies
# ------------------------------------------------------------------------------------------------

def _key(row: dict) -> str:
  return json.dumps(row, sort_keys=True)


def merge_rows(here: list[dict], back: list[dict]) -> tuple[list[dict], int, bool]:
  """(every row of both, in order of 'start'; how many came from ``back`` only; whether ``back``
  continues this copy: it holds every row of ``here`` and at least one more. Two copies with the
  same rows continue neither each other: which decision is newer is then not known.)"""
  seen = {_key(r) for r in here}
  new = [r for r in back if _key(r) not in seen]
  back_keys = {_key(r) for r in back}
  rows = sorted(here + new, key=lambda r: str(r.get('start', '')))
  return rows, len(new), bool(new) and all(_key(r) in back_keys for r in here)


def merge_campaign(here: dict | None, back: dict | None, force, continues: bool,
                   path: str) -> tuple[dict | None, list[str]]:
  """(the campaign.json to keep, notes). ``here`` is the base; from ``back`` come a precision
  lock this copy lacks and formulations of device kinds it lacks (or, when ``back`` continues
  this copy, newer measurements). A change of either decision is refused unless ``force`` names
  it."""
  if here is None or back is None:
    return here or back, []
  if here['runs'] != back['runs'] or here.get('overrides', {}) != back.get('overrides', {}):
    raise CampaignError(f'the returned campaign.json is another campaign than {path} (its runs or '
                        'overrides differ): unpack it into another --campaign_dir')
  merged, notes = dict(here), []
  _merge_precision(merged, here, back, 'matmul_precision' in force, notes)
  kinds = dict(here.get('formulations') or {})
  # a formulation is its fields and the XLA flags it trains under (runs.formulation_xla_flags)
  what = lambda r: r.get('overrides') if r.get('xla_flags') is None else \
      f"{r.get('overrides')} with XLA_FLAGS {r['xla_flags']!r}"
  for kind, rec in (back.get('formulations') or {}).items():
    mine = kinds.get(kind)
    if mine is None or (mine.get('overrides'), mine.get('xla_flags')) == \
        (rec.get('overrides'), rec.get('xla_flags')):
      kinds[kind] = mine or rec
    elif 'formulations' in force or continues:
      kinds[kind] = rec
      notes.append(f'formulation for {kind}: {what(rec)} (was {what(mine)})')
    else:
      raise CampaignError(
          f'{path} records the formulation {what(mine)} for {kind} ({mine.get("date")}), '
          f'the returned copy {what(rec)} ({rec.get("date")}), and the returned copy '
          'does not continue this one (its sittings.jsonl adds no row to this one\'s): '
          '--force=formulations takes the returned one, right only if it is the newer decision '
          '(compare the dates); without it nothing is changed')
  if kinds:
    merged['formulations'] = kinds
  return merged, notes


def _merge_precision(merged, here, back, forced: bool, notes) -> None:
  mine = (here.get('matmul_precision', 'auto'), here.get('matmul_precision_locked_by'))
  theirs = (back.get('matmul_precision', 'auto'), back.get('matmul_precision_locked_by'))
  if mine == theirs:
    return
  take = forced or mine == ('auto', None)
  if not take and theirs == ('auto', None):
    notes.append(f'kept the matmul precision {mine[0]} locked by {mine[1]} (the returned copy is '
                 'not locked)')
    return
  if not take:
    raise CampaignError(
        f'the matmul precision differs: here {mine[0]} (locked by {mine[1]}), returned '
        f'{theirs[0]} (locked by {theirs[1]}); a campaign\'s precision never changes: '
        '--force=matmul_precision takes the returned one; without it nothing is changed')
  merged['matmul_precision'] = theirs[0]
  merged.pop('matmul_precision_locked_by', None)
  if theirs[1] is not None:
    merged['matmul_precision_locked_by'] = theirs[1]
  notes.append(f'matmul precision {theirs[0]} (locked by {theirs[1]}) from the returned copy')
