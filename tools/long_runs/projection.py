"""What the campaign has cost so far and what is left, at the rates its GPU jobs measured.

Pure functions of the campaign's plan rows, its ``sittings.jsonl`` rows and the jobs' records
(``docs/bench/windows/*.json``); :mod:`tools.long_runs.reports` renders them in ``status.md``.

* A run's **rate** is steps per training minute in its newest sitting on an accelerator (its
  minutes include the compile and checkpoints, so it is what a sitting really gets); a run not
  yet trained on a card takes the rate of its group's other run if that one has a rate, else
  none ("not measured on a card yet": nothing is guessed).
* A **job's training minutes** are the newest job's share of training in its wall time (the job
  that trained for its whole budget, ``accounting``) times the budget of the jobs ahead
  (:data:`JOB_BUDGET_S`, the budget given to ``scripts/device_window.sh``).
"""

from __future__ import annotations

import math

# The budget of one GPU job (scripts/device_window.sh BUDGET_S) that jobs left are counted in.
JOB_BUDGET_S = 540.0


def run_rates(sittings: list[dict]) -> dict[str, dict]:
  """{run name: {'steps_per_min', 'device'}} from each run's newest sitting on an accelerator."""
  out = {}
  for row in filter(_on_accelerator, sittings):
    for r in row.get('runs', []):
      steps = (r.get('to') or 0) - (r.get('from') or 0)
      minutes = float(r.get('minutes') or 0.0)
      if steps > 0 and minutes > 0:
        out[r['name']] = {'steps_per_min': steps / minutes, 'device': row.get('device', '?')}
  return out


def job_totals(records: list[dict], sittings: list[dict]) -> dict:
  """GPU jobs so far: how many, their wall time (``accounting.job_s``; ``seconds_before_pack``
  in records older than the accounting), the host's machine minutes where a record has them
  (``unpack --machine_minutes``), and the minutes and steps the campaign's runs trained on
  accelerators (``sittings.jsonl``)."""
  acc = [r.get('accounting') or {} for r in records]
  gpu = [row for row in sittings if _on_accelerator(row)]
  runs = [r for row in gpu for r in row.get('runs', [])]
  return {'jobs': len(records),
          'job_min': sum(float(a.get('job_s') or r.get('seconds_before_pack') or 0.0)
                         for r, a in zip(records, acc)) / 60.0,
          'machine_min': sum(float(a['machine_min']) for a in acc if 'machine_min' in a),
          'machine_min_jobs': sum('machine_min' in a for a in acc),
          'sittings': len(gpu),
          'training_min': sum(float(r.get('minutes') or 0.0) for r in runs),
          'steps': sum(max(0, (r.get('to') or 0) - (r.get('from') or 0)) for r in runs)}


def _on_accelerator(row: dict) -> bool:
  return row.get('backend', 'gpu') != 'cpu' and str(row.get('device', 'cpu')).lower() != 'cpu'


def training_share(records: list[dict]) -> float | None:
  """The newest job's training minutes over its wall time (None before any job trained)."""
  for r in reversed(records):
    a = r.get('accounting') or {}
    if a.get('job_s') and a.get('training_min'):
      return 60.0 * float(a['training_min']) / float(a['job_s'])
  return None


def project(rows: list[dict], sittings: list[dict], records: list[dict],
            job_budget_s: float = JOB_BUDGET_S) -> dict:
  """Per group in campaign order (a setting in one meta-gradient): steps left, the measured
  rates, training minutes left and GPU jobs left (None where a rate is missing), and the
  running total of jobs to finish it and every group before it."""
  rates = run_rates(sittings)
  share = training_share(records)
  per_job = share * job_budget_s / 60.0 if share else None
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(r['group'], []).append(r)
  out, total, known = [], 0.0, True
  for group, members in groups.items():
    left = {r['name']: max(0, r['num_steps'] - r['step']) for r in members}
    measured = [rates[r['name']] for r in members if r['name'] in rates]
    minutes = 0.0
    for r in members:
      rate = rates.get(r['name'], measured[0] if measured else None)
      if left[r['name']] and rate is None:
        minutes = None
        break
      minutes += left[r['name']] / rate['steps_per_min'] if left[r['name']] else 0.0
    jobs = None if minutes is None or per_job is None else minutes / per_job
    known = known and jobs is not None
    total = total + jobs if known else total
    out.append({'group': group, 'steps_left': sum(left.values()),
                'rates': {r['name']: rates[r['name']] for r in members if r['name'] in rates},
                'training_min_left': minutes, 'jobs_left': jobs,
                'jobs_to_here': math.ceil(total - 1e-9) if known else None})
  return {'groups': out, 'training_min_per_job': per_job, 'training_share': share,
          'job_budget_s': job_budget_s}
