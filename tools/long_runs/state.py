"""The campaign's files read without trusting them.

``campaign.json`` (missing, emptied, cut or of the wrong shape: a :class:`CampaignError`
naming the file and the fix) and each run folder's files (a cut ``config.json`` or
``results.json`` is reported for that run only, so that the other runs go on).

"""

from __future__ import annotations

import json
import os

from metadrop_jax import metrics as metrics_lib

PRECISIONS = ('highest', 'default', 'auto')
RUN_FIELDS = ('name', 'setting', 'method', 'meta_gradient', 'group')


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
