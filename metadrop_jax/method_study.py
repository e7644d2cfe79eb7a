r"""The method study side by side in several meta-gradient computations: accuracy ± 95% CI of every
run, and its paired difference to MAML on the same test episodes, per computation.

A column is a folder of published runs (``results/method_study/<computation>/<run>/``, each with
``results.json`` and ``episode_accs_test.npy``: ``scripts/run_method_study.sh``); rows are the
runs' names across columns, in the method table's order.

  python -m metadrop_jax.cli.method_study \
      --columns="authors'=results/method_study/authors,exact=results/method_study/exact" \
      --out=results/method_study/table.md --figure=docs/images/method_study.png
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from metadrop_jax import methods
from metadrop_jax import report

REFERENCE = 'maml'


def load_column(root: str) -> dict[str, dict]:
  """{run name: results.json row (report.load_results, with its config)} of every run folder
  under ``root`` that has a results.json."""
  names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d,
                                                                            'results.json')))
  runs = report.load_results([os.path.join(root, n) for n in names])
  out = {}
  for name, run in zip(names, runs):
    with open(os.path.join(root, name, 'config.json')) as f:
      run['config'] = json.load(f)
    out[name] = run
  return out


def row_label(name: str, run: dict) -> str:
  """The method's label; a run that is not the method at its defaults says what differs (the
  KL weight of VIB / information dropout)."""
  import numpy as np
  method = run['method']
  label = methods.label(method)
  if name != method:
    beta = run.get('config', {}).get('methods', {}).get('vib_beta')
    label += (f' (β = {np.format_float_scientific(beta, trim="-", exp_digits=1)})'
              if method in ('vib', 'infodrop') and beta is not None else f' [{name}]')
  return label


def row_order(names) -> list[str]:
  """Run names in the method table's order (MAML first), a method's variants after it."""
  order = [REFERENCE] + [m for m in methods.METHODS if m != REFERENCE]
  rank = lambda n: (order.index(n.split('_beta')[0]) if n.split('_beta')[0] in order
                    else len(order), n)
  return sorted(names, key=rank)


def compare_columns(columns: Mapping[str, Mapping[str, dict]]) -> list[dict]:
  """One row per run name: per column its accuracy, CI, MC samples and the paired difference to
  that column's MAML run (None where the two were not meta-tested on the same episodes)."""
  names = row_order({n for col in columns.values() for n in col})
  rows = []
  for n in names:
    row = {'name': n, 'cells': {}}
    for label, col in columns.items():
      run = col.get(n)
      if run is None:
        continue
      row.setdefault('label', row_label(n, run))
      ref = col.get(REFERENCE)
      paired = None if ref is None or n == REFERENCE else report.paired_gain(run, ref)
      row['cells'][label] = {'accuracy': run['accuracy'], 'ci95': run['ci95'],
                             'mc_samples': run.get('mc_samples'), 'episodes': run.get('episodes'),
                             'paired': paired, 'commit': run.get('commit')}
    rows.append(row)
  return rows


def markdown(rows: Sequence[dict], labels: Sequence[str]) -> str:
  """Table: method, then per column accuracy ± CI and the paired difference to MAML ± CI."""
  head = ['Method'] + [h for l in labels for h in (f'{l}: accuracy', f'{l}: − MAML (paired)')]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['label']]
    for l in labels:
      c = r['cells'].get(l)
      if c is None:
        cells += ['—', '—']
        continue
      cells.append(f"**{c['accuracy']:.2f} ± {c['ci95']:.2f}**")
      p = c['paired']
      cells.append('(reference)' if r['name'] == REFERENCE else
                   '—' if p is None else f"{p['mean']:+.2f} ± {p['ci95']:.2f}")
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


_COLORS = ('tab:red', 'tab:gray', 'tab:blue', 'tab:green')


def plot(rows: Sequence[dict], labels: Sequence[str], out: str, *, title: str | None = None,
         dpi: int = 100) -> str:
  """Two panels, one row per method, one bar per column: accuracy ± 95% CI, and the paired
  difference to MAML ± its 95% CI."""
  import numpy as np
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  n, k = len(rows), len(labels)
  fig = Figure(figsize=(11.0, 1.2 + 0.42 * n), dpi=dpi)
  FigureCanvasAgg(fig)
  ax_acc, ax_diff = fig.subplots(1, 2, sharey=True)
  y = np.arange(n)[::-1]
  h = 0.8 / k
  for j, l in enumerate(labels):
    off = (k - 1) / 2 * h - j * h
    for ax, get in ((ax_acc, lambda c: (c['accuracy'], c['ci95'])),
                    (ax_diff, lambda c: ((c['paired']['mean'], c['paired']['ci95'])
                                         if c['paired'] else None))):
      pts = [(yi + off, get(r['cells'][l])) for yi, r in zip(y, rows)
             if l in r['cells'] and get(r['cells'][l]) is not None]
      if not pts:
        continue
      ys, vals = zip(*pts)
      v, e = zip(*vals)
      ax.barh(ys, v, height=h, xerr=e, color=_COLORS[j % len(_COLORS)], alpha=0.85,
              capsize=2, label=l)
      if ax is ax_acc:
        for yy, vv, ee in zip(ys, v, e):
          ax.text(vv + ee + 0.4, yy, f'{vv:.1f}', va='center', fontsize=7)
  ax_acc.set_yticks(y, [r['label'] for r in rows], fontsize=8)
  lo = min(c['accuracy'] - c['ci95'] for r in rows for c in r['cells'].values())
  ax_acc.set_xlim(max(0.0, lo - 5.0), 100.0)
  ax_acc.set_xlabel('meta-test accuracy (%), mean ± 95% CI')
  ax_diff.axvline(0.0, color='k', lw=0.8)
  ax_diff.set_xlabel('accuracy − MAML on the same episodes (points), paired 95% CI')
  for ax in (ax_acc, ax_diff):
    ax.grid(axis='x', alpha=0.3)
  ax_acc.legend(fontsize=8, loc='lower right', title='meta-gradient', title_fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  from metadrop_jax import visualize
  return visualize.save_figure(fig, out, dpi)


def parse_columns(spec: str) -> dict[str, str]:
  """``"authors'=dir1,exact=dir2"`` -> ``{"authors'": 'dir1', 'exact': 'dir2'}`` (in order)."""
  out = {}
  for item in (s for s in spec.split(',') if s.strip()):
    label, sep, path = item.partition('=')
    if not sep or not label or not path:
      raise ValueError(f'--columns item {item!r}: write LABEL=FOLDER')
    out[label.strip()] = path.strip()
  return out
