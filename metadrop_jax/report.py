"""Results table in the layout of the paper's Table 1, and learning curves.

  python -m metadrop_jax.cli.report --workdirs=workdirs/omni1_maml,workdirs/omni1_metadrop \\
      --out=table.md --curves=curves.png

Reads each workdir's ``results.json`` (written by ``evaluation.evaluate_checkpoint``). Columns are the
four settings of Table 1 (plus one per other setting found, e.g. synthetic smoke runs); rows are
MAML, Meta-dropout (always) and any other method present. Each cell holds our accuracy ± 95% CI,
the paper's figure, the authors' re-run of their released code, our difference to each, whether
the paper's figure lies inside our interval, and a "reduced budget" mark when the run did not
reach the full 60000 meta-iterations. A second table lists every run with its provenance.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from metadrop_jax import methods, metrics

# Table 1 of the paper (ICLR 2020), MAML and Meta-dropout rows, accuracy ± 95% CI in percent,
# 1000 episodes, as quoted by the authors' README; and the authors' re-run of their released code
# (README "The results from running this repo", final state, commit 525947c). Source:
# github.com/haebeom-lee/metadrop README; docs/paper.md. Keys: (method, dataset, way, shot).
PAPER_TABLE1: dict[tuple[str, str, int, int], tuple[float, float]] = {
    ('maml', 'omniglot', 20, 1): (95.23, 0.17),
    ('maml', 'omniglot', 20, 5): (98.38, 0.07),
    ('maml', 'miniimagenet', 5, 1): (49.58, 0.65),
    ('maml', 'miniimagenet', 5, 5): (64.55, 0.52),
    ('metadrop', 'omniglot', 20, 1): (96.63, 0.13),
    ('metadrop', 'omniglot', 20, 5): (98.73, 0.06),
    ('metadrop', 'miniimagenet', 5, 1): (51.93, 0.67),
    ('metadrop', 'miniimagenet', 5, 5): (67.42, 0.52),
}
AUTHORS_RERUN: dict[tuple[str, str, int, int], tuple[float, float]] = {
    ('maml', 'omniglot', 20, 1): (94.49, 0.16),
    ('maml', 'omniglot', 20, 5): (98.14, 0.07),
    ('maml', 'miniimagenet', 5, 1): (48.73, 0.64),
    ('maml', 'miniimagenet', 5, 5): (65.70, 0.52),
    ('metadrop', 'omniglot', 20, 1): (96.24, 0.14),
    ('metadrop', 'omniglot', 20, 5): (98.81, 0.06),
    ('metadrop', 'miniimagenet', 5, 1): (51.67, 0.64),
    ('metadrop', 'miniimagenet', 5, 5): (68.12, 0.53),
}
# The four columns of Table 1: (dataset, way, shot) -> header.
PAPER_COLUMNS: dict[tuple[str, int, int], str] = {
    ('omniglot', 20, 1): 'Omniglot 20-way 1-shot',
    ('omniglot', 20, 5): 'Omniglot 20-way 5-shot',
    ('miniimagenet', 5, 1): 'miniImageNet 5-way 1-shot',
    ('miniimagenet', 5, 5): 'miniImageNet 5-way 5-shot',
}
FULL_BUDGET_STEPS = 60000   # authors' final run scripts (docs/paper.md, "Hyperparameters")
PAPER_EPISODES = 1000
# Table rows: the baseline first, as in the paper's Table 1, then the method table's order.
_ROW_ORDER = ['maml'] + [m for m in methods.METHODS if m != 'maml']
# config.meta_gradient of a run (results.json, else the workdir's config.json): runs of the same
# setting computed with different meta-gradients get separate columns.
META_GRADIENT_LABELS = {
    'authors': "authors' meta-gradient",
    'exact': 'exact meta-gradient',
    'first_order': 'first-order meta-gradient',
}
_MG_ORDER = [None, 'authors', 'exact', 'first_order']


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

class ResultsError(ValueError):
  """A results.json that cannot be read; the message names it and the fix."""


def _read_results(path: str, wd: str) -> dict:
  r = metrics.read_json_object(path)
  if isinstance(r, str):
    raise ResultsError(f'{path} is unreadable ({r}): meta-test the run again (launch.py '
                       f'--mode=eval --workdir={wd}) or restore the file from a copy')
  return r


def load_results(workdirs: Sequence[str]) -> list[dict[str, Any]]:
  """Each workdir's ``results.json`` with ``workdir`` added; workdirs without one are skipped
  with a warning; an unreadable one (cut, emptied) is a :class:`ResultsError`."""
  runs = []
  for wd in workdirs:
    path = os.path.join(wd, 'results.json')
    if not os.path.exists(path):
      warnings.warn(f'{path} not found (evaluate first: launch.py --mode=eval --workdir={wd}); '
                    'skipped')
      continue
    r = _read_results(path, wd)
    if 'accuracy' not in r:
      warnings.warn(f'{path} has no "accuracy" field; skipped')
      continue
    r['workdir'] = wd
    for k, v in config_fields(wd).items():
      r.setdefault(k, v)
    runs.append(r)
  return runs


def config_fields(workdir: str) -> dict:
  """The training seed, meta-gradient and Omniglot split of ``workdir``'s config.json (for
  result files written before they recorded them); {} without a readable config.json."""
  cfg = metrics.read_json_object(os.path.join(workdir, 'config.json'))
  if isinstance(cfg, str):
    return {}
  data = cfg.get('data')
  return {'meta_gradient': cfg.get('meta_gradient'), 'seed': cfg.get('seed'),
          'omniglot_split': data.get('omniglot_split') if isinstance(data, dict) else None}


def setting_of(run: dict) -> tuple[str, int, int]:
  """(dataset, way, shot); an Omniglot split other than the paper's is part of the dataset
  ('omniglot/lake'), so such a run is never compared with the paper's numbers."""
  dataset = str(run.get('dataset', '?')).lower()
  if run.get('omniglot_split') not in (None, 'vinyals'):
    dataset += f"/{run['omniglot_split']}"
  return (dataset, int(run.get('way', 0)), int(run.get('shot', 0)))


def column_label(setting: tuple[str, int, int], meta_gradient: str | None = None) -> str:
  d, w, s = setting
  d, _, split = d.partition('/')          # 'omniglot/lake': another split than the paper's
  label = PAPER_COLUMNS.get((d, w, s), f'{d} {w}-way {s}-shot') + (
      f' ({split} split)' if split else '')
  if meta_gradient:
    label += f', {META_GRADIENT_LABELS.get(meta_gradient, meta_gradient)}'
  return label


def method_label(method: str) -> str:
  return methods.label(method)


def is_reduced_budget(run: dict) -> bool:
  """True when the evaluated checkpoint is short of the paper's 60000 meta-iterations."""
  step = run.get('step')
  num = run.get('num_steps')
  return (step is None or num is None or int(step) < FULL_BUDGET_STEPS
          or int(num) < FULL_BUDGET_STEPS)


# ------------------------------------------------------------------------------------------------
# comparison of one run with the paper
# ------------------------------------------------------------------------------------------------

def compare(run: dict) -> dict[str, Any]:
  """Our number vs the paper's and the authors' re-run for one results.json dict."""
  key = (run.get('method'),) + setting_of(run)
  acc = float(run['accuracy'])
  ci = run.get('ci95')
  ci = None if ci is None else float(ci)
  out = {'method': run.get('method'), 'setting': setting_of(run), 'accuracy': acc, 'ci95': ci,
         'paper': PAPER_TABLE1.get(key), 'rerun': AUTHORS_RERUN.get(key),
         'reduced_budget': is_reduced_budget(run), 'step': run.get('step'),
         'num_steps': run.get('num_steps'), 'episodes': run.get('episodes'),
         'mc_samples': run.get('mc_samples'), 'workdir': run.get('workdir', ''),
         'name': run.get('name', ''), 'commit': run.get('commit', ''),
         'device': run.get('device', ''), 'meta_gradient': run.get('meta_gradient'),
         'seed': run.get('seed'), 'split': run.get('split'), 'eval_seed': run.get('eval_seed')}
  for src in ('paper', 'rerun'):
    ref = out[src]
    out[f'diff_{src}'] = None if ref is None else acc - ref[0]
    out[f'{src}_in_ci'] = (None if ref is None or ci is None else abs(acc - ref[0]) <= ci)
  return out


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------

def _pm(v) -> str:
  return f'{v[0]:.2f} ± {v[1]:.2f}'


def _yes_no(b) -> str:
  return 'n/a' if b is None else ('yes' if b else 'no')


def _cell(c: dict | None, method: str, setting) -> str:
  key = (method,) + setting
  paper, rerun = PAPER_TABLE1.get(key), AUTHORS_RERUN.get(key)
  lines = []
  if c is None:
    lines.append('—')
    if paper:
      lines.append(f'paper {_pm(paper)}')
    if rerun:
      lines.append(f're-run {_pm(rerun)}')
    return '<br>'.join(lines)
  ours = f"**{c['accuracy']:.2f}" + (f" ± {c['ci95']:.2f}**" if c['ci95'] is not None else '**')
  lines.append(ours)
  if paper:
    lines.append(f"paper {_pm(paper)} (Δ {c['diff_paper']:+.2f}; paper in our CI: "
                 f"{_yes_no(c['paper_in_ci'])})")
  else:
    lines.append('paper: n/a')
  if rerun:
    lines.append(f"re-run {_pm(rerun)} (Δ {c['diff_rerun']:+.2f})")
  if c['reduced_budget']:
    lines.append(f"reduced budget ({c['step']}/{c['num_steps']} steps)")
  if c['episodes'] is not None and int(c['episodes']) != PAPER_EPISODES:
    lines.append(f"{c['episodes']} episodes")
  return '<br>'.join(lines)


def build_table(runs: Sequence[dict], detail: bool = True) -> str:
  """The markdown report: Table-1 layout, a gain row, and a per-run detail table (``detail``
  False: the Table-1 layout and its gain row only, as the README shows them)."""
  comps = [compare(r) for r in runs]
  base = list(PAPER_COLUMNS)
  for c in comps:
    if c['setting'] not in base:
      base.append(c['setting'])
  # one column per (setting, meta-gradient) that has runs; a setting without runs keeps one
  settings = []
  for s in base:
    mgs = {c['meta_gradient'] for c in comps if c['setting'] == s}
    order = sorted(mgs, key=lambda m: _MG_ORDER.index(m) if m in _MG_ORDER else len(_MG_ORDER))
    settings += [(s, m) for m in (order or [None])]
  # cells[method] = list of {column: comparison}; a second run of the same method and column
  # opens a second row for that method.
  cells: dict[str, list[dict]] = {'maml': [{}], 'metadrop': [{}]}
  for c in comps:
    col = (c['setting'], c['meta_gradient'])
    rows = cells.setdefault(c['method'], [{}])
    for row in rows:
      if col not in row:
        row[col] = c
        break
    else:
      rows.append({col: c})
  order = sorted(cells, key=lambda m: (_ROW_ORDER.index(m) if m in _ROW_ORDER else len(_ROW_ORDER),
                                       m))
  header = ['Method'] + [column_label(s, m) for s, m in settings]
  lines = ['## Few-shot classification (layout of the paper\'s Table 1)', '',
           'Accuracy (%) ± 95% CI over meta-test episodes. "paper": the paper\'s Table 1; '
           '"re-run": the authors\' re-run of their released code (docs/paper.md); '
           'Δ = ours − reference; "paper in our CI": |ours − paper| ≤ our CI. "reduced budget": '
           f'the evaluated checkpoint is short of {FULL_BUDGET_STEPS} meta-iterations. Gain: '
           '"paired ±" is the 95% CI of the per-episode difference, where both runs were '
           'meta-tested on the same episodes.', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for m in order:
    for row, name in zip(cells[m], _row_names(cells[m])):
      label = method_label(m) + (f' ({name})' if name else '')
      lines.append('| ' + ' | '.join([label] + [_cell(row.get(col), m, col[0])
                                                for col in settings]) + ' |')
  # gain row: Meta-dropout − MAML (first run of each)
  gains = []
  for col in settings:
    s = col[0]
    a, b = cells['metadrop'][0].get(col), cells['maml'][0].get(col)
    parts = []
    if a and b:
      paired = paired_gain(a, b)
      parts.append(f"**{a['accuracy'] - b['accuracy']:+.2f}**" +
                   (f" (paired ± {paired['ci95']:.2f})" if paired else ''))
    else:
      parts.append('—')
    pa, pb = PAPER_TABLE1.get(('metadrop',) + s), PAPER_TABLE1.get(('maml',) + s)
    if pa and pb:
      parts.append(f'paper {pa[0] - pb[0]:+.2f}')
    ra, rb = AUTHORS_RERUN.get(('metadrop',) + s), AUTHORS_RERUN.get(('maml',) + s)
    if ra and rb:
      parts.append(f're-run {ra[0] - rb[0]:+.2f}')
    gains.append('<br>'.join(parts))
  lines.append('| Gain (Meta-dropout − MAML) | ' + ' | '.join(gains) + ' |')
  if not detail:
    return '\n'.join(lines[lines.index('| ' + ' | '.join(header) + ' |'):]) + '\n'
  lines += ['', '### Runs', '',
            '| Method | Setting | Workdir | Accuracy | Paper | Δ paper | Paper in CI | Re-run | '
            'Δ re-run | Steps | Budget | Episodes | MC | Commit | Device |',
            '|' + '---|' * 15]
  if not comps:
    lines.append('| (no results.json found) |' + ' |' * 14)
  for c in comps:
    f = lambda v: 'n/a' if v is None else f'{v:+.2f}'
    lines.append('| ' + ' | '.join([
        method_label(c['method']), column_label(c['setting'], c['meta_gradient']),
        f"`{c['workdir']}`",
        f"{c['accuracy']:.2f}" + (f" ± {c['ci95']:.2f}" if c['ci95'] is not None else ''),
        _pm(c['paper']) if c['paper'] else 'n/a', f(c['diff_paper']), _yes_no(c['paper_in_ci']),
        _pm(c['rerun']) if c['rerun'] else 'n/a', f(c['diff_rerun']),
        f"{c['step']}/{c['num_steps']}", 'reduced budget' if c['reduced_budget'] else 'full',
        str(c['episodes']), str(c['mc_samples']), str(c['commit']), str(c['device'])]) + ' |')
  lines += seeds_section(comps)
  return '\n'.join(lines) + '\n'


RESULT_HEADER = ('| Method | Setting | Meta-gradient | Split | Steps | Episodes | MC samples | '
                 'Accuracy ± 95% CI | Paper |\n|' + '---|' * 9)


def result_row(run: dict) -> str:
  """One results.json as a markdown row under :data:`RESULT_HEADER` (what ``launch.py
  --mode=eval`` prints)."""
  c = compare(run)
  setting = column_label(c['setting'])
  acc = f"**{c['accuracy']:.2f}" + (f" ± {c['ci95']:.2f}**" if c['ci95'] is not None else '**')
  mg = c['meta_gradient']
  return '| ' + ' | '.join([
      method_label(c['method']), setting, 'n/a' if mg is None else
      META_GRADIENT_LABELS.get(mg, mg).replace(' meta-gradient', ''), str(c['split']),
      f"{c['step']}/{c['num_steps']}", str(c['episodes']), str(c['mc_samples']), acc,
      _pm(c['paper']) if c['paper'] else 'n/a']) + ' |'


def paired_gain(a: dict, b: dict) -> dict | None:
  """Meta-dropout − MAML over the episodes both were meta-tested on (``metrics.paired_difference``
  of their ``episode_accs_<split>.npy``), or None unless both were meta-tested on the same
  episodes: same split, evaluation seed and number of episodes (the episode sampler is a
  function of these and the data)."""
  same = ('split', 'eval_seed', 'episodes')
  if any(a.get(k) is None or a.get(k) != b.get(k) for k in same):
    return None
  try:
    accs = [np.load(metrics.episode_accs_path(c['workdir'], c['split'])) for c in (a, b)]
    return metrics.paired_difference(*accs)
  except (OSError, ValueError):
    return None


def _row_names(rows: Sequence[Mapping]) -> list[str]:
  """Names of one method's rows: 'seed S' for each where every row's runs share a training seed
  and the rows' seeds differ; else none for the first and its number for the others."""
  seeds = [{c.get('seed') for c in row.values()} for row in rows]
  by_seed = [s.pop() if len(s) == 1 else None for s in seeds]
  if len(rows) > 1 and None not in by_seed and len(set(by_seed)) == len(rows):
    return [f'seed {s}' for s in by_seed]
  return [''] + [str(i + 1) for i in range(1, len(rows))]


def seeds_section(comps: Sequence[dict]) -> list[str]:
  """Runs that differ only in their seed (same method, setting, meta-gradient, steps): mean ±
  std over seeds (ddof=1) beside each seed's own 95% CI. Empty when no group has 2 seeds."""
  groups: dict[tuple, list[dict]] = {}
  for c in comps:
    if c.get('seed') is not None:
      key = (c['method'], c['setting'], c['meta_gradient'], c['step'], c['episodes'])
      groups.setdefault(key, []).append(c)
  rows = []
  for (method, setting, mg, step, _), cs in groups.items():
    seeds = {c['seed'] for c in cs}
    if len(seeds) < 2 or len(seeds) != len(cs):
      continue
    cs = sorted(cs, key=lambda c: c['seed'])
    acc = np.array([c['accuracy'] for c in cs])
    per = ', '.join(f"{c['seed']}: {c['accuracy']:.2f}" + (f" ± {c['ci95']:.2f}" if c['ci95']
                                                           is not None else '') for c in cs)
    rows.append(f"| {method_label(method)} | {column_label(setting, mg)} | {step} | {len(cs)} | "
                f"**{acc.mean():.2f} ± {acc.std(ddof=1):.2f}** | {per} |")
  if not rows:
    return []
  return ['', '### Over seeds', '', 'Runs that differ only in their seed: mean ± standard '
          'deviation of the seeds\' accuracies, beside each seed\'s own 95% CI over episodes.', '',
          '| Method | Setting | Steps | Seeds | Mean ± std over seeds | Per seed (accuracy ± 95% CI) |',
          '|' + '---|' * 6] + rows


def write_atomic(path: str, text: str) -> str:
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, f'.{os.path.basename(path)}.tmp.{os.getpid()}')
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


# ------------------------------------------------------------------------------------------------
# learning curves
# ------------------------------------------------------------------------------------------------

def read_metrics(workdir: str) -> list[dict]:
  from metadrop_jax import metrics as metrics_lib
  return metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def _run_label(workdir: str) -> str:
  """``method (name[, meta-gradient])`` from results.json / config.json, else the workdir's
  basename; the meta-gradient is named unless it is the exact one."""
  d = {}
  for fn in ('config.json', 'results.json'):
    p = os.path.join(workdir, fn)
    try:
      with open(p) as f:
        d.update(json.load(f))
    except (OSError, json.JSONDecodeError):
      pass
  if not d:
    return os.path.basename(os.path.normpath(workdir))
  name = d.get('name', os.path.basename(os.path.normpath(workdir)))
  mg = d.get('meta_gradient', 'exact')
  if mg != 'exact':
    name += f', {META_GRADIENT_LABELS.get(mg, mg)}'
  return f"{method_label(d.get('method', '?'))} ({name})"


def _color(i: int, n: int):
  """Colour of run ``i`` of ``n``: matplotlib's default cycle, tab20 beyond 10 runs."""
  if n <= 10:
    return f'C{i}'
  from matplotlib import colormaps
  return colormaps['tab20'](i % 20)


def _smooth(y, window: int):
  y = np.asarray(y, np.float64)
  if window <= 1 or len(y) < window:
    return y
  k = np.ones(window) / window
  head = np.cumsum(y[:window - 1]) / np.arange(1, window)
  return np.concatenate([head, np.convolve(y, k, mode='valid')])


def plot_learning_curves(workdirs: Sequence[str], out: str, *, labels: Sequence[str] | None = None,
                         smooth: int = 1, size=(11.0, 4.0), dpi: int = 100) -> str:
  """Training and validation accuracy (%) and loss against meta-iteration, all workdirs on the
  same two axes (colour per run; solid = train, dashed with dots = val). Pixel size
  ``size * dpi`` (default 1100 x 400). ``smooth``: moving-average window on the train curves.
  """
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  fig = Figure(figsize=size, dpi=dpi)
  FigureCanvasAgg(fig)
  ax_acc, ax_loss = fig.subplots(1, 2)
  labels = list(labels) if labels else []
  seen_labels: dict[str, int] = {}
  any_rows = False
  for i, wd in enumerate(workdirs):
    rows = read_metrics(wd)
    if not rows:
      warnings.warn(f'{wd}/metrics.jsonl missing or empty; skipped in the curves')
      continue
    any_rows = True
    label = labels[i] if i < len(labels) else _run_label(wd)
    if label in seen_labels:   # two runs with the same method/name: add the workdir
      label = f'{label} [{os.path.basename(os.path.normpath(wd))}]'
    seen_labels[label] = i
    color = _color(i, len(workdirs))
    for prefix, style in (('train', dict(ls='-', lw=1.3)),
                          ('val', dict(ls='--', lw=1.3, marker='o', ms=3))):
      for ax, key, scale in ((ax_acc, 'acc', 100.0), (ax_loss, 'loss', 1.0)):
        pts = [(r['step'], r[f'{prefix}/{key}']) for r in rows if f'{prefix}/{key}' in r]
        if not pts:
          continue
        st, v = zip(*pts)
        v = [x * scale for x in v]
        if prefix == 'train':
          v = _smooth(v, smooth)
        ax.plot(st, v, color=color, label=f'{label} {prefix}', **style)
  if not any_rows:
    raise FileNotFoundError(f'no metrics.jsonl rows in any of {list(workdirs)}')
  ax_acc.set_ylabel('accuracy (%)')
  ax_loss.set_ylabel('query cross-entropy')
  for ax, t in ((ax_acc, 'accuracy'), (ax_loss, 'loss')):
    ax.set_xlabel('meta-iteration')
    ax.set_title(f'{t}: train (solid) and validation (dashed)', fontsize=10)
    ax.grid(alpha=0.3)
  ax_loss.legend(fontsize=7, loc='upper right')
  fig.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.92, wspace=0.18)
  from metadrop_jax import visualize
  return visualize.save_figure(fig, out, dpi)


def plot_accuracy_bars(runs: Sequence[dict], out: str, *, title: str | None = None,
                       dpi: int = 100) -> str:
  """Meta-test accuracy ± 95% CI of each run as a horizontal bar, one panel per setting
  (dataset, way, shot), runs in the given order; the paper's figure, where it has one for the
  method and setting, as a black tick with its interval. ``runs``: :func:`load_results` rows."""
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  if not runs:
    raise ValueError('no results to plot (no workdir had a results.json)')
  groups: dict[tuple, list[dict]] = {}
  for r in runs:
    groups.setdefault(setting_of(r), []).append(r)
  height = 0.9 + 0.32 * max(len(g) for g in groups.values())
  fig = Figure(figsize=(5.5 * len(groups), height), dpi=dpi)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(groups), squeeze=False)[0]
  for ax, (setting, rs) in zip(axes, groups.items()):
    y = list(range(len(rs)))[::-1]
    acc = [r['accuracy'] for r in rs]
    ax.barh(y, acc, xerr=[r['ci95'] for r in rs], color=[_color(i, len(rs)) for i in range(len(rs))],
            alpha=0.8, capsize=3)
    for yi, r in zip(y, rs):
      ax.text(r['accuracy'] + r['ci95'] + 0.3, yi, f"{r['accuracy']:.1f}", va='center', fontsize=8)
      paper = PAPER_TABLE1.get((r['method'], *setting))
      if paper:
        ax.errorbar(paper[0], yi, xerr=paper[1], fmt='|', color='k', ms=14, capsize=2)
    ax.set_yticks(y, [method_label(r['method']) for r in rs], fontsize=8)
    lo = min(a - r['ci95'] for a, r in zip(acc, rs))
    ax.set_xlim(max(0.0, lo - 5.0), min(100.0, max(acc) + 6.0))
    steps = sorted({int(r.get('step', 0)) for r in rs})
    ax.set_title(f'{column_label(setting)}, {"/".join(map(str, steps))} meta-iterations',
                 fontsize=9)
    ax.set_xlabel('meta-test accuracy (%), mean ± 95% CI')
    ax.grid(axis='x', alpha=0.3)
  if title:
    import textwrap
    fig.suptitle('\n'.join(textwrap.wrap(title, int(11 * fig.get_figwidth()))), fontsize=9)
  fig.tight_layout()
  from metadrop_jax import visualize
  return visualize.save_figure(fig, out, dpi)
