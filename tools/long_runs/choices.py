"""The decisions a GPU job takes from what it measured: which benchmark cells to run, and the
matmul precision and formulation the campaign's sitting trains with.
"""

from __future__ import annotations

import glob
import os

from tools.long_runs import runs as runs_lib
from tools.long_runs.procs import read_json
from tools.long_runs.gpu_check import overrides_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_SETTINGS = ('omniglot_20way1shot', 'omniglot_20way5shot', 'mimgnet_5way1shot',
                  'mimgnet_5way5shot')
TF32_MIN_SPEEDUP = 1.25   # TF32 trains the campaign only if it is at least this much faster
# The formulations cells a GPU job times where its card kind has no timing (benchmarks/
# formulations.py CELLS), in this order: the measuring cap may leave the last for the next job,
# so the levers most likely to reach the step-time target come first.
FORMULATION_CELLS = (
    'baseline', 'select', 'select_im2col', 'select_pallas', 'select_pallas_again',
    'select_im2col_bn1', 'select_im2col_tf32x3_triton_fill', 'select_im2col_tf32x3_triton',
    'select_im2col_tf32x3_triton_again', 'select_im2col_excl', 'select_im2col_excl_again',
    'select_im2col_triton', 'select_im2col_excl_triton', 'select_im2col_excl_triton_again',
    'select_nondet', 'select_nondet_again', 'select_im2col_nondet', 'baseline_nondet',
    'select_unfused', 'select_scan', 'select_map', 'select_no_cmd_buffer', 'select_im2col_scan')


def next_run_cell(cdir: str):
  """The benchmark cell of the campaign's next run (None if there is none)."""
  try:
    camp = runs_lib.load_campaign(cdir)
    nxt = next((r for r in runs_lib.plan(cdir, camp) if r['action'] == 'train' and
                r['data_here']), None)
  except Exception:  # noqa: BLE001 - no campaign here: the default first cell
    return None
  if nxt is None or nxt['setting'] not in PAPER_SETTINGS:
    return None
  prec = camp.get('matmul_precision')
  return (prec if prec in ('highest', 'default') else 'highest', nxt['setting'], nxt['method'],
          None, 1, nxt['meta_gradient'])


def cell_key(cell, window_flags=''):
  prec, cfg, method, xflags, seeds = cell[:5]
  det = runs_lib.DETERMINISTIC_OPS in (window_flags if xflags is None else xflags)
  return (cfg, method, prec, det, seeds)


def row_key(r):
  return (r.get('config'), r.get('method'), r.get('precision'),
          runs_lib.DETERMINISTIC_OPS in r.get('xla_flags', ''), r.get('seeds', 1))


def measured_cells(device_kind: str, repo: str = ROOT) -> set:
  """Benchmark cells with a committed row measured on this kind of card (docs/bench/windows)."""
  out = set()
  for p in glob.glob(os.path.join(repo, 'docs', 'bench', 'windows', '*.json')):
    s = read_json(p, {})
    if s.get('device_kind') != device_kind:
      continue
    for r in (s.get('phases', {}).get('bench', {}).get('result') or {}).get('rows', []):
      if 'error' not in r:
        out.add(row_key(r))
  return out


def measured_torch_cells(device_kind: str, repo: str = ROOT) -> set:
  out = set()
  for p in glob.glob(os.path.join(repo, 'docs', 'bench', 'windows', '*.json')):
    s = read_json(p, {})
    if s.get('device_kind') == device_kind:
      for r in (s.get('phases', {}).get('torch', {}).get('result') or {}).get('rows', []):
        if r.get('kind') == 'time':
          out.add((r['config'], r['method']))
  return out


def bench_plan(mode: str, cells: list, measured: set, window_flags: str, next_cell) -> tuple:
  """(mode, the cells of benchmarks/meta_step.py to run) for ``--bench=full|quick|skip``:
  'full' measures the cells not yet measured on this card kind (all of them again if none is
  left); 'quick' the campaign's next run (``next_cell()``, at the campaign's precision), or the
  first cell."""
  todo = [c for c in cells if cell_key(c, window_flags) not in measured]
  if mode == 'full':
    return mode, todo or cells
  if mode == 'quick':
    return mode, [next_cell() or cells[0]]
  return mode, []


def job_records(repo: str, suffix: str = '') -> list[tuple[str, dict]]:
  """(path, content) of the committed job records (docs/bench/windows/*<suffix>.json), oldest
  first; without a suffix, the jobs' own summaries only."""
  out = []
  for p in sorted(glob.glob(os.path.join(repo, 'docs', 'bench', 'windows', f'*{suffix}.json'))):
    if not suffix and (p.endswith('_formulations.json') or p.endswith('_profiles.json')):
      continue
    out.append((p, read_json(p, {})))
  return out


def smoke_on_record(device_kind: str, fingerprint: str, repo: str = ROOT) -> dict | None:
  """The newest committed smoke result of this kind of card whose numerics fingerprint
  (fingerprint.numerics_fingerprint: the code of the library's numerics files and the jax version;
  records made before it read code only carry it as ``code_fingerprint``) is this one, or None:
  while neither changed, the check need not run again."""
  found = None
  for p, s in job_records(repo):
    sm = (s.get('phases', {}).get('smoke', {}).get('result') or {})
    if s.get('device_kind') == device_kind and sm.get('rows') and \
        fingerprint in (sm.get('fingerprint'), sm.get('code_fingerprint')):
      found = {**sm, 'on_record': os.path.relpath(p, repo)}
  return found


def measured_formulations(device_kind: str, config: str, method: str, repo: str = ROOT) -> set:
  """The formulation cells with a committed timing for this card kind, config and method."""
  out = set()
  for _, rec in job_records(repo, '_formulations'):
    for d in [rec] + list(rec.get('also', [])):
      if (d.get('device', '').split(':', 1)[-1] == device_kind and d.get('config') == config and
          d.get('method') == method):
        out |= {r['cell'] for r in d.get('rows', []) if 'error' not in r}
  return out


def pending_pairs(cdir: str) -> list[tuple[str, str]]:
  """(setting, method) of the runs the campaign's next sitting trains (its first unfinished
  group with data here), paper settings only."""
  try:
    rows = [r for r in runs_lib.plan(cdir) if r['action'] == 'train' and r['data_here']]
  except Exception:  # noqa: BLE001 - no campaign here
    return []
  group = rows[0]['group'] if rows else None
  return [(r['setting'], r['method']) for r in rows
          if r['group'] == group and r['setting'] in PAPER_SETTINGS]


def formulation_runs(mode: str, first: str, cells: list, reference: str | None,
                     measured, pending) -> list[tuple[str, str, list]]:
  """The formulations benchmark's runs, ``[(config, method, cells)]``. 'formulations': ``cells``
  of (``first``, Meta-dropout). 'auto': those of them without a committed timing on this card
  kind (after the ``reference``), then the reference cell for every (setting, method) of
  ``pending`` that has none: every setting and method the campaign trains gets its row when it
  is reached. ``measured(config, method)`` is the set of timed cells."""
  if mode == 'formulations':
    return [(first, 'metadrop', list(cells))]
  runs = []
  _, todo = formulation_plan(mode, cells, measured(first, 'metadrop'), reference)
  if todo:
    runs.append((first, 'metadrop', todo))
  for setting, method in pending:
    if reference and (setting, method) != (first, 'metadrop') and \
        reference not in measured(setting, method):
      runs.append((setting, method, [reference]))
  return runs


def formulation_plan(mode: str, cells: list, measured: set, reference: str | None) -> tuple:
  """(mode, cells) of the formulations benchmark. 'formulations': ``cells`` as given. 'auto':
  the cells not yet measured on this card kind, after the ``reference`` cell (the formulation
  the campaign trains with now, timed again so that the new ones compare within one job) and its
  second process where ``cells`` has one (a cell judged reproducible by its pair is judged so
  in this job only with it); when every cell has a committed timing, 'skip': the job only
  trains."""
  if mode == 'formulations':
    return mode, list(cells)
  todo = [c for c in cells if c not in measured]
  if not todo:
    return 'skip', []
  first = [reference] if reference else []
  if reference and f'{reference}_again' in cells:
    first.append(f'{reference}_again')
  return 'formulations', [c for c in first if c not in todo] + todo


def cell_xla_flags(deterministic_ops: bool, extra: str) -> str:
  """The XLA flags a formulations cell runs under: deterministic ops or not, and its extras."""
  return ' '.join(x for x in (runs_lib.DETERMINISTIC_OPS if deterministic_ops else '', extra) if x)


def reference_cell(overrides: dict, cells: dict, xla_flags: str | None = None) -> str | None:
  """The name of the cell of ``cells`` (formulations.CELLS) that sets exactly the formulation
  ``overrides`` with the XLA flags ``xla_flags`` (None: deterministic ops and nothing else, as
  formulations recorded before their flags were), not a second-process cell; or None."""
  want = set((xla_flags if xla_flags is not None else runs_lib.DETERMINISTIC_OPS).split())
  for name, (ov, det, extra) in cells.items():
    flags = set(cell_xla_flags(det, extra).split())
    if ov == overrides and flags == want and not name.endswith('_again'):
      return name
  return None


def smoke_keys(given: str, runs: list, cells: dict) -> str:
  """The formulations the smoke test checks (gpu_check --conv_impls): ``given`` and what every
  cell of the planned formulation ``runs`` computes (:func:`gpu_check.overrides_key`), so that
  a new cell can train in the job that times it."""
  keys = [k for k in given.split(',') if k]
  keys += [overrides_key(cells[c][0]) for _, _, names in runs for c in names if c in cells]
  return ','.join(dict.fromkeys(keys))


def choose_formulation(form: dict | None, smoke: dict | None) -> dict:
  """The formulation a sitting trains with: the fastest reproducible cell of the formulations
  benchmark (steps dispatched back to back) whose conv formulation passed the smoke test, if it
  is faster than the baseline; else the configs' default. Reproducible: the benchmark's
  ``determinism`` (deterministic ops, or a cell whose two processes ended in the same state; a
  Pallas cell only the latter); records without it, deterministic ops.
  Returns {'overrides', 'xla_flags', 'cell', 'why'}: ``xla_flags`` the determinism flag and
  any other flag the cell was measured with (:func:`runs.formulation_xla_flags`)."""
  none = {'overrides': {}, 'xla_flags': None, 'cell': None}
  rows = [r for r in (form or {}).get('rows', []) if 'error' not in r]
  if not rows:
    return {**none, 'why': 'no formulation measured'}
  judged = (form.get('determinism') or {}).get('reproducible')

  def reproducible(r):
    # the benchmark's judgement where it made one (a Pallas cell only with its pair's
    # agreement); records from before it: deterministic ops
    return r['cell'] in judged if judged is not None else bool(r.get('deterministic_ops'))
  passed = (smoke or {}).get('pass_highest_by_conv_impl') or {}
  ok = [r for r in rows if reproducible(r) and passed.get(overrides_key(r['overrides']), False)]
  if not ok:
    return {**none, 'why': 'no reproducible cell whose conv formulation passed the smoke test'}
  best = min(ok, key=lambda r: r['ms_per_iter_pipelined'])
  base = next((r for r in rows if r['cell'] == 'baseline'), None)
  if base is not None and best['ms_per_iter_pipelined'] >= base['ms_per_iter_pipelined']:
    return {**none, 'why': 'no cell faster than the baseline'}
  overrides = {k: v for k, v in best['overrides'].items() if k in runs_lib.FORMULATION_FIELDS}
  why = f"{best['cell']}: {best['ms_per_iter_pipelined']:.2f} ms/iter"
  if base is not None:
    why += (f" vs baseline {base['ms_per_iter_pipelined']:.2f} "
            f"({base['ms_per_iter_pipelined'] / best['ms_per_iter_pipelined']:.2f}x)")
  return {'overrides': overrides, 'cell': best['cell'], 'why': why,
          'xla_flags': cell_xla_flags(best.get('deterministic_ops'), best.get('extra_flags', ''))}


def formulation_checked(smoke: dict | None, overrides: dict):
  """Whether the smoke test passed the conv formulation that ``overrides`` (on top of the
  configs' defaults) trains with, at 'highest' precision: True, False, or None (not run)."""
  from metadrop_jax import nets
  if not smoke or not smoke.get('rows'):
    return None
  key = overrides_key({**overrides, 'model.conv_impl': nets.resolve_conv_impl(
      overrides.get('model.conv_impl', 'auto'))})
  by = smoke.get('pass_highest_by_conv_impl') or {}
  return bool(by.get(key, False))


def recorded(cdir: str, kind: str) -> dict:
  """The formulation the campaign in ``cdir`` recorded for this kind of device ({} if none)."""
  try:
    return runs_lib.recorded_formulation(runs_lib.load_campaign(cdir), kind)
  except (OSError, ValueError):
    return {}


def recorded_flags(cdir: str, kind: str) -> str | None:
  """The XLA flags of that formulation (None if none were recorded)."""
  try:
    return runs_lib.recorded_xla_flags(runs_lib.load_campaign(cdir), kind)
  except (OSError, ValueError):
    return None


def choose_precision(smoke: dict | None, bench_rows: list[dict]) -> tuple[str, str]:
  """('highest' | 'default', why). TF32 ('default') only where the smoke test passed it and the
  benchmark measured it at least TF32_MIN_SPEEDUP faster on the same cell; else 'highest'."""
  if not smoke or not smoke.get('pass_default'):
    return 'highest', 'TF32 meta-gradient check failed or missing'
  ok = [r for r in bench_rows if 'error' not in r and r.get('s_per_iter')]
  for h in ok:
    if h.get('precision') != 'highest':
      continue
    for d in ok:
      if (d.get('precision') == 'default' and d['config'] == h['config'] and
          d['method'] == h['method'] and d.get('xla_flags') == h.get('xla_flags')):
        speed = h['s_per_iter'] / d['s_per_iter']
        if speed >= TF32_MIN_SPEEDUP:
          return 'default', f"TF32 passed the check and was {speed:.2f}x faster ({h['config']})"
        return 'highest', f"TF32 only {speed:.2f}x faster ({h['config']}): not worth it"
  return 'highest', 'no TF32 timing to compare'
