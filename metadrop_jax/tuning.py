r"""Choosing one hyperparameter on validation classes only.

Each candidate is a training workdir that differs from the others in one config field (e.g.
``methods.vib_beta``), trained with a validation split held out of the meta-train classes
(``data.val_classes > 0``) and meta-tested on it (``launch.py --mode=eval --split=val`` writes
``results_val.json``). The rule: among candidates whose inner loop stayed finite and did not
diverge (:func:`metadrop_jax.train.inner_loop_diverging` on every logged row), the highest
validation accuracy; the test split is never read.

  python -m metadrop_jax.cli.tuning --field=methods.vib_beta \
      --workdirs=wd/vib_beta1e-4,wd/vib_beta1e-5,wd/vib_beta1e-6 [--out=table.md] [--print_choice]
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

DIVERGENCE_FACTOR = 10.0   # support loss after the inner steps / before them, as train.py warns


def _get(d: dict, dotted: str):
  for p in dotted.split('.'):
    d = d[p]
  return d


def inner_loop_problem(rows: Sequence[dict], factor: float = DIVERGENCE_FACTOR) -> str | None:
  """Why the logged inner loop of a run is not usable (a non-finite loss, or a support loss that
  grows ``factor``-fold over the inner steps in some logged window), else None."""
  for r in rows:
    first, last = r.get('train/inner_loss_first'), r.get('train/inner_loss_last')
    if first is None or last is None:
      continue
    if not (math.isfinite(first) and math.isfinite(last)):
      return f'non-finite support loss at step {r.get("step")}'
    if first > 0 and last > factor * first:
      return (f'support loss {first:.3g} -> {last:.3g} over the inner steps at step '
              f'{r.get("step")}')
  return None


def candidate(workdir: str, field: str) -> dict:
  """One candidate: its value of ``field``, validation accuracy ± CI, last logged support losses
  and :func:`inner_loop_problem`. Raises FileNotFoundError without ``results_val.json``."""
  from metadrop_jax import metrics as metrics_lib
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  path = os.path.join(workdir, 'results_val.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: meta-test the validation split first '
                            f'(launch.py --mode=eval --split=val --workdir={workdir})')
  with open(path) as f:
    val = json.load(f)
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  last = next((r for r in reversed(rows) if 'train/inner_loss_last' in r), {})
  return {'workdir': workdir, 'value': _get(config, field), 'accuracy': val['accuracy'],
          'ci95': val['ci95'], 'episodes': val['episodes'], 'mc_samples': val['mc_samples'],
          'step': val['step'], 'loss_first': last.get('train/inner_loss_first'),
          'loss_last': last.get('train/inner_loss_last'), 'problem': inner_loop_problem(rows)}


def choose(candidates: Sequence[dict]) -> dict | None:
  """The candidate with the highest validation accuracy among those without an inner-loop
  problem (the first of equals); None if every one has a problem."""
  ok = [c for c in candidates if c['problem'] is None and math.isfinite(c['accuracy'])]
  return max(ok, key=lambda c: c['accuracy']) if ok else None


def table(candidates: Sequence[dict], field: str) -> str:
  """Markdown: one row per candidate, the chosen one marked."""
  best = choose(candidates)
  lines = [f'| {field} | validation accuracy ± 95% CI | support loss before / after the inner '
           'steps (last log) | inner loop | chosen |', '|---|---|---|---|---|']
  for c in candidates:
    fmt = lambda v: 'n/a' if v is None else f'{v:.3g}'
    lines.append(f"| {c['value']:g} | {c['accuracy']:.2f} ± {c['ci95']:.2f} | "
                 f"{fmt(c['loss_first'])} / {fmt(c['loss_last'])} | "
                 f"{c['problem'] or 'finite'} | {'**yes**' if c is best else ''} |")
  return '\n'.join(lines) + '\n'
