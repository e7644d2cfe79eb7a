r"""Claims across training seeds: a comparison of two runs that differ in one field, repeated at
several training seeds (``config.seed``).

A comparison is a − b of two groups of runs: Meta-dropout (or any other method) − MAML of the
same setting and meta-gradient, or one meta-gradient − the exact one for the same method (e.g.
authors' − exact). A group is the runs that share the setting (Omniglot split included), method,
meta-gradient, steps, MC samples and test episodes (split, evaluation seed, number of episodes)
and differ only in their seed; the two groups of a comparison share everything but the field
compared (and the MC samples, a per-method part of the protocol).

* Per seed: both accuracies and the paired difference a − b with its 95% CI over the test episodes
  both runs were meta-tested on (:func:`metadrop_jax.report.paired_gain`; without per-episode
  accuracies, the difference of the two accuracies, unpaired).
* Across seeds: the mean of the per-seed differences with a Student-t 95% interval over seeds
  (n − 1 degrees of freedom, the seeds' standard deviation), and the verdict in words: whether the
  difference has the same sign at every seed and whether the t-interval excludes zero. The episode
  CI says how well one trained model was measured; the t-interval says how far a new training
  seed moves the difference, which is what a claim about the method needs.

The same holds for robustness curves (``robustness_<norm>.json``, per-episode accuracies at every
radius): Meta-dropout − MAML per seed and radius on the same attacked episodes, and across seeds
per radius.

  python -m metadrop_jax.cli.report --workdirs=... --seeds_figure=seeds.png
  python -m metadrop_jax.cli.robustness --plot_only --norms=linf --workdirs=... \
      --seeds_figure=robustness_seeds.png --seeds_table=robustness_seeds.md
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Sequence

import numpy as np

from metadrop_jax import metrics, report

# The test episodes: runs paired per episode must agree on these (report.paired_gain).
EPISODES = ('split', 'eval_seed', 'episodes')
# A group: runs that agree on all of these and differ only in their seed.
GROUP = ('setting', 'method', 'meta_gradient', 'step', 'num_steps', 'mc_samples') + EPISODES
# The fields a comparison varies, each with its reference (the b of a − b).
VARIED = {'method': 'maml', 'meta_gradient': 'exact'}
NORM_NAMES = {'l1': 'ℓ1', 'l2': 'ℓ2', 'linf': 'ℓ∞'}
MEAN_COLOR = 'black'


class SeedsError(ValueError):
  """Nothing to compare across seeds; the message says what to pass."""


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------

def t_interval(x, confidence: float = 0.95) -> dict:
  """Mean of ``x`` and the half-width of its Student-t interval,
  ``t_{n-1}((1 + confidence) / 2) * std(x, ddof=1) / sqrt(n)``."""
  from scipy import stats
  x = np.asarray(x, np.float64)
  if x.size < 2:
    raise ValueError(f'a t-interval needs at least 2 values, got {x.size}')
  s = float(x.std(ddof=1))
  q = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1))
  return {'mean': float(x.mean()), 'half': q * s / math.sqrt(x.size), 'std': s, 'n': int(x.size),
          't': q}


def across_seeds(diffs, episode_ci=None) -> dict:
  """The per-seed differences ``diffs`` summarised across seeds: ``mean``, ``half`` (t-interval;
  None for one seed), ``n``, ``positive`` / ``negative`` (seeds above / below 0), ``same_sign``,
  ``excludes_zero`` (None for one seed), ``holds`` (both) and ``words`` (the verdict).
  ``episode_ci``: the per-seed episode CIs (None where unpaired), counted in the words."""
  d = np.asarray(diffs, np.float64)
  if d.size == 0:
    raise ValueError('no seeds to summarise')
  out = {'n': int(d.size), 'positive': int((d > 0).sum()), 'negative': int((d < 0).sum()),
         'same_sign': bool((d > 0).all() or (d < 0).all())}
  if d.size >= 2:
    t = t_interval(d)
    out.update(mean=t['mean'], half=t['half'], excludes_zero=abs(t['mean']) > t['half'])
  else:
    out.update(mean=float(d[0]), half=None, excludes_zero=None)
  out['holds'] = bool(out['same_sign'] and out['excludes_zero'])
  out['words'] = _verdict_words(out, d, episode_ci)
  return out


def _verdict_words(s: dict, d, episode_ci) -> str:
  n = s['n']
  if n < 2:
    words = 'one seed: no interval across seeds'
  elif s['same_sign']:
    side = 'above' if s['positive'] else 'below'
    words = (f'holds: {side} 0 at all {n} seeds, t-interval excludes 0' if s['excludes_zero'] else
             f'not established: {side} 0 at all {n} seeds, but the t-interval includes 0')
  else:
    zero = n - s['positive'] - s['negative']
    words = (f"does not hold: the sign changes across seeds (+ at {s['positive']}, − at "
             f"{s['negative']}{f', 0 at {zero}' if zero else ''} of {n}); the t-interval "
             f"{'excludes' if s['excludes_zero'] else 'includes'} 0")
  if episode_ci is not None and n >= 2:
    ci = [c for c in episode_ci if c is not None]
    if ci:
      k = sum(abs(x) > c for x, c in zip(d, episode_ci) if c is not None)
      words += f'; the episode CI excludes 0 at {k} of {len(ci)} seeds'
  return words


# ------------------------------------------------------------------------------------------------
# grouping
# ------------------------------------------------------------------------------------------------

def _hashable(v):
  if isinstance(v, dict):
    return json.dumps(v, sort_keys=True)
  if isinstance(v, list):
    return tuple(_hashable(x) for x in v)
  return v


def _name(run: dict) -> str:
  return run.get('workdir') or run.get('name') or '?'


def group_by_seed(rows: Sequence[dict], fields: Sequence[str]) -> dict[tuple, dict[int, dict]]:
  """``{key: {seed: row}}``: rows that agree on ``fields`` (the key) and differ in ``seed``. A
  row without a seed, or a second row of a group at the same seed, is left out with a warning."""
  groups: dict[tuple, dict[int, dict]] = {}
  for r in rows:
    if r.get('seed') is None:
      warnings.warn(f'{_name(r)}: no training seed in results.json or config.json; left out of '
                    'the view across seeds')
      continue
    g = groups.setdefault(tuple(_hashable(r.get(f)) for f in fields), {})
    seed = int(r['seed'])
    if seed in g:
      warnings.warn(f'{_name(r)}: a second run of the same group at seed {seed} (the first: '
                    f'{_name(g[seed])}); left out of the view across seeds')
      continue
    g[seed] = r
  return groups


def _warn_split_groups(groups, fields) -> None:
  """A warning for two groups of the same setting, method and meta-gradient (and norm) at
  different seeds that differ in another field (steps, MC samples, test episodes, attack): their
  seeds, meant to be pooled, are not. (Groups that share a seed are other studies.)"""
  ident = [i for i, f in enumerate(fields) if f in ('setting', 'method', 'meta_gradient', 'norm')]
  keys = list(groups)
  for i, ka in enumerate(keys):
    for kb in keys[i + 1:]:
      if all(ka[j] == kb[j] for j in ident) and not set(groups[ka]) & set(groups[kb]):
        diff = [f'{f} {ka[j]} vs {kb[j]}' for j, f in enumerate(fields) if ka[j] != kb[j]]
        first = lambda k: _name(next(iter(groups[k].values())))
        warnings.warn(f'{first(ka)} (seed(s) {", ".join(map(str, sorted(groups[ka])))}) and '
                      f'{first(kb)} (seed(s) {", ".join(map(str, sorted(groups[kb])))}) differ in '
                      f'{"; ".join(diff)}: not pooled across seeds')


def _partners(groups, fields, field, ref):
  """(a group, b group) pairs: a's ``field`` is not ``ref``, b's is; both agree on every other
  field of ``fields`` but the MC samples."""
  same = [i for i, f in enumerate(fields) if f not in (field, 'mc_samples')]
  at = fields.index(field)
  for ka, ga in groups.items():
    if ka[at] in (None, ref):
      continue
    for kb, gb in groups.items():
      if kb[at] == ref and all(ka[i] == kb[i] for i in same):
        yield ga, gb


def _warn_unpaired_protocols(rows: Sequence[dict], fields: Sequence[str], what: str) -> None:
  """A warning for each two runs of one seed that would form a comparison but were not tested on
  the same episodes (split, evaluation seed or number of episodes differ): never paired."""
  ep = [f for f in fields if f in EPISODES or f in ('radii', 'attack')]
  rest = [f for f in fields if f not in ep and f != 'mc_samples']
  for field, ref in VARIED.items():
    for a in rows:
      if a.get(field) in (None, ref) or a.get('seed') is None:
        continue
      for b in rows:
        if (b.get(field) != ref or b.get('seed') != a.get('seed') or
            any(_hashable(a.get(f)) != _hashable(b.get(f)) for f in rest if f != field)):
          continue
        diff = [f'{f} {a.get(f)} vs {b.get(f)}' for f in ep
                if _hashable(a.get(f)) != _hashable(b.get(f))]
        if diff:
          warnings.warn(f'{_name(a)} and {_name(b)} (seed {a["seed"]}): not {what} alike '
                        f'({", ".join(diff)}); not paired')


# ------------------------------------------------------------------------------------------------
# accuracy comparisons
# ------------------------------------------------------------------------------------------------

def _mg_short(mg) -> str:
  return report.META_GRADIENT_LABELS.get(mg, str(mg)).replace(' meta-gradient', '')


@dataclasses.dataclass
class Comparison:
  """a − b at each seed both groups have. ``rows``: per seed ``{'seed', 'a', 'b' (report.compare
  rows), 'diff' (points), 'ci95' (paired episode CI; None when not paired)}``; ``unpaired``: seeds
  with a run on one side only."""
  field: str
  a_value: str
  b_value: str
  context: dict
  rows: list
  unpaired: list

  @property
  def seeds(self) -> list[int]:
    return [r['seed'] for r in self.rows]

  def across(self) -> dict:
    """:func:`across_seeds` of the per-seed differences."""
    return across_seeds([r['diff'] for r in self.rows], [r['ci95'] for r in self.rows])

  def warn_unpaired(self) -> None:
    if self.unpaired:
      warnings.warn(f'{self.title}, {self.where}: seed(s) '
                    f'{", ".join(map(str, self.unpaired))} on one side only; left out')

  def labels(self) -> tuple[str, str]:
    if self.field == 'method':
      return report.method_label(self.a_value), report.method_label(self.b_value)
    return _mg_short(self.a_value), _mg_short(self.b_value)

  @property
  def title(self) -> str:
    a, b = self.labels()
    if self.field == 'method':
      return f'{a} − {b}'
    return f'{a} − {b} meta-gradient, {report.method_label(self.context["method"])}'

  @property
  def where(self) -> str:
    c = self.context
    mg = c.get('meta_gradient') if self.field == 'method' else None
    return (f"{report.column_label(c['setting'], mg)}, {c['step']} steps, {c['episodes']} "
            f"{c['split']} episodes (eval seed {c['eval_seed']})")


def comparisons(runs: Sequence[dict]) -> list[Comparison]:
  """Every comparison the runs (``report.load_results`` rows) hold: each method other than MAML −
  MAML, and each meta-gradient other than the exact one − the exact one, per group; comparisons
  with at least one seed on both sides, in the order found."""
  rows = [report.compare(r) for r in runs]
  groups = group_by_seed(rows, GROUP)
  _warn_split_groups(groups, GROUP)
  _warn_unpaired_protocols([r for g in groups.values() for r in g.values()], GROUP, 'meta-tested')
  out = []
  for field, ref in VARIED.items():
    for ga, gb in _partners(groups, GROUP, field, ref):
      common = sorted(set(ga) & set(gb))
      if not common:
        continue
      per = []
      for s in common:
        a, b = ga[s], gb[s]
        p = report.paired_gain(a, b)
        per.append({'seed': s, 'a': a, 'b': b, 'ci95': None if p is None else p['ci95'],
                    'diff': a['accuracy'] - b['accuracy'] if p is None else p['mean']})
      first = ga[common[0]]
      context = {f: first[f] for f in GROUP if f not in (field, 'mc_samples')}
      comp = Comparison(field, first[field], gb[common[0]][field], context, per,
                        sorted(set(ga) ^ set(gb)))
      comp.warn_unpaired()
      out.append(comp)
  return out


def _signed(v, ci=None, bold=True) -> str:
  s = f'{v:+.2f}' + ('' if ci is None else f' ± {ci:.2f}')
  return f'**{s}**' if bold else s


def markdown(comps: Sequence[Comparison]) -> list[str]:
  """The report's section "Across training seeds": one row per comparison with two or more
  seeds, one column per seed (both accuracies and the paired difference ± its episode CI), the
  mean ± t-interval over seeds and the verdict; [] when no comparison has two seeds."""
  multi = [c for c in comps if len(c.rows) >= 2]
  if not multi:
    return []
  seeds = sorted({s for c in multi for s in c.seeds})
  head = ['Comparison (a − b)', 'Setting'] + [f'seed {s}' for s in seeds] + [
      'Mean over seeds ± t-interval', 'Verdict']
  lines = ['', '### Across training seeds', '',
           'Two groups of runs that differ in one field (the method, or the meta-gradient), '
           'trained at several seeds. Per seed: accuracy a / b and the paired difference a − b ± '
           'its 95% CI over the test episodes both were meta-tested on ("not paired": no '
           'per-episode accuracies, the difference of the two accuracies). Across seeds: the mean '
           'of the per-seed differences ± the 95% Student-t interval over seeds (n − 1 degrees of '
           'freedom). "holds": the same sign at every seed and a t-interval that excludes 0.', '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for c in multi:
    by_seed = {r['seed']: r for r in c.rows}
    cells = [c.title, c.where]
    for s in seeds:
      r = by_seed.get(s)
      cells.append('—' if r is None else
                   f"{r['a']['accuracy']:.2f} / {r['b']['accuracy']:.2f}<br>"
                   f"{_signed(r['diff'], r['ci95'])}" + (' (not paired)' if r['ci95'] is None
                                                         else ''))
    x = c.across()
    cells += [f"{_signed(x['mean'], x['half'])} ({x['n']} seeds)", x['words']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  single = [c for c in comps if len(c.rows) < 2]
  if single:
    lines += ['', 'One seed only (no interval across seeds): ' + '; '.join(
        f'{c.title}, {c.where} (seed {c.seeds[0]})' for c in single) + '.']
  return lines


def with_two_seeds(comps: Sequence, flag: str) -> list:
  """The comparisons with two or more seeds; :class:`SeedsError` (naming ``flag``) if none."""
  multi = [c for c in comps if len(c.rows) >= 2]
  if not multi:
    found = ('; '.join(f'{c.title}, {c.where}: seed {", ".join(map(str, c.seeds))}'
                       for c in comps) or 'no pair of runs to compare')
    raise SeedsError(f'{flag}: no comparison has runs at 2 or more training seeds ({found}): '
                     'pass the workdirs of both runs at every seed')
  return multi


def plot(comps: Sequence[Comparison], out: str, *, title: str | None = None,
         dpi: int = 100) -> str:
  """One row per comparison (two or more seeds): each seed's paired difference a − b with its
  episode 95% CI as an error bar, and the mean over seeds with its t-interval (black diamond),
  zero line marked. Returns ``out``."""
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  import textwrap
  comps = with_two_seeds(comps, 'seeds figure')
  seeds = sorted({s for c in comps for s in c.seeds})
  n = len(comps)
  fig = Figure(figsize=(10.0, 1.3 + 0.85 * n), dpi=dpi)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  y = np.arange(n)[::-1].astype(float)
  step = 0.5 / max(len(seeds), 1)
  for yi, c in zip(y, comps):
    for r in c.rows:
      k = seeds.index(r['seed'])
      yy = yi + 0.3 - k * step
      ax.errorbar(r['diff'], yy, xerr=r['ci95'] if r['ci95'] is not None else None,
                  fmt='o' if r['ci95'] is not None else 'x', color=f'C{k % 10}', ms=5,
                  capsize=2, lw=1.0, label=f"seed {r['seed']} (episode CI)")
    x = c.across()
    ax.errorbar(x['mean'], yi - 0.3, xerr=x['half'], fmt='D', color=MEAN_COLOR, ms=6,
                capsize=4, lw=2.0, label='mean over seeds ± t-interval')
  handles, labels = ax.get_legend_handles_labels()
  uniq = dict(zip(labels, handles))
  order = [f'seed {s} (episode CI)' for s in seeds] + ['mean over seeds ± t-interval']
  # outside the axes, to the right: inside, it can hide a seed's interval
  ax.legend([uniq[l] for l in order if l in uniq], [l for l in order if l in uniq], fontsize=7,
            loc='center left', bbox_to_anchor=(1.01, 0.5))
  ax.axvline(0.0, color='k', lw=0.9, ls='--')
  ax.set_yticks(y, ['\n'.join(textwrap.wrap(f'{c.title}: {c.where}', 55)) for c in comps],
                fontsize=7)
  ax.set_ylim(y.min() - 0.6, y.max() + 0.6)
  ax.set_xlabel('a − b, accuracy points on the same test episodes')
  ax.grid(axis='x', alpha=0.3)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  from metadrop_jax import visualize
  return visualize.save_figure(fig, out, dpi)


# ------------------------------------------------------------------------------------------------
# robustness curves
# ------------------------------------------------------------------------------------------------

# A robustness group: its attack (norm, radii, PGD settings) is part of it.
ROBUSTNESS_GROUP = GROUP + ('norm', 'radii', 'attack')


def load_robustness(workdirs: Sequence[str], norm: str, split: str = 'test') -> list[dict]:
  """Each workdir's ``robustness_<norm>.json`` (``_<split>`` for splits other than test) with
  ``workdir``, ``setting`` and the seed, meta-gradient and Omniglot split of its config.json
  added; a workdir without one is skipped with a warning; an unreadable one is a
  :class:`report.ResultsError`."""
  suffix = '' if split == 'test' else f'_{split}'
  out = []
  for wd in workdirs:
    path = os.path.join(wd, f'robustness_{norm}{suffix}.json')
    if not os.path.exists(path):
      warnings.warn(f'{path} not found (python -m metadrop_jax.cli.robustness --workdirs={wd} '
                    f'--norms={norm}); skipped')
      continue
    r = metrics.read_json_object(path)
    why = r if isinstance(r, str) else None if 'episode_accs' in r else 'no per-episode accuracies'
    if why:
      raise report.ResultsError(f'{path} is unreadable ({why}): attack the run again '
                                f'(python -m metadrop_jax.cli.robustness --workdirs={wd} '
                                f'--norms={norm})')
    for k, v in report.config_fields(wd).items():
      r.setdefault(k, v)
    r['workdir'] = wd
    r['setting'] = report.setting_of(r)
    out.append(r)
  return out


@dataclasses.dataclass
class RobustnessComparison(Comparison):
  """A method − MAML (per radius) at each seed both have. ``rows``: per seed ``{'seed', 'a', 'b'
  (robustness results), 'diff' [R] and 'ci95' [R] (points, paired over the attacked episodes)}``."""

  @property
  def radii(self) -> list[float]:
    return list(self.context['radii'])

  def across(self) -> list[dict]:
    """:func:`across_seeds` at each radius."""
    d = np.array([r['diff'] for r in self.rows])
    ci = np.array([r['ci95'] for r in self.rows])
    return [across_seeds(d[:, j], list(ci[:, j])) for j in range(d.shape[1])]

  @property
  def title(self) -> str:
    a, b = self.labels()
    return f"{a} − {b} under {NORM_NAMES.get(self.context['norm'], self.context['norm'])} PGD"

  @property
  def where(self) -> str:
    c = self.context
    return (f"{report.column_label(c['setting'], c.get('meta_gradient'))}, {c['step']} steps, "
            f"{c['episodes']} {c['split']} episodes (eval seed {c['eval_seed']}), "
            f"{c['attack'].get('steps', '?')} PGD steps")


def robustness_comparisons(results: Sequence[dict]) -> list[RobustnessComparison]:
  """Each method other than MAML − MAML of the same setting, meta-gradient and attack, per seed
  and radius on the same attacked episodes (``results``: :func:`load_robustness` rows)."""
  groups = group_by_seed(results, ROBUSTNESS_GROUP)
  _warn_split_groups(groups, ROBUSTNESS_GROUP)
  _warn_unpaired_protocols([r for g in groups.values() for r in g.values()], ROBUSTNESS_GROUP,
                           'attacked')
  out = []
  for ga, gb in _partners(groups, ROBUSTNESS_GROUP, 'method', VARIED['method']):
    per = []
    for s in sorted(set(ga) & set(gb)):
      a, b = ga[s], gb[s]
      try:
        p = [metrics.paired_difference(x, y) for x, y in zip(a['episode_accs'],
                                                              b['episode_accs'])]
      except ValueError as e:
        warnings.warn(f"{a['workdir']} and {b['workdir']} (seed {s}): {e}; not paired")
        continue
      per.append({'seed': s, 'a': a, 'b': b, 'diff': [x['mean'] for x in p],
                  'ci95': [x['ci95'] for x in p]})
    if not per:
      continue
    first = per[0]['a']
    context = {f: first[f] for f in ROBUSTNESS_GROUP if f not in ('method', 'mc_samples')}
    comp = RobustnessComparison('method', first['method'], per[0]['b']['method'], context, per,
                                sorted(set(ga) ^ set(gb)))
    comp.warn_unpaired()
    out.append(comp)
  return out


def robustness_markdown(comps: Sequence[RobustnessComparison]) -> str:
  """Per comparison a table: per radius each seed's paired difference ± its episode CI, both
  methods' accuracy averaged over seeds, the mean difference ± t-interval and the verdict."""
  lines = []
  for c in comps:
    a, b = c.labels()
    head = ['radius'] + [f'seed {s}' for s in c.seeds] + [
        f'{b} (mean over seeds)', f'{a} (mean over seeds)', 'mean over seeds ± t-interval',
        'verdict']
    lines += [f'### {c.title}: {c.where}', '',
              f'{a} − {b} in accuracy points on the same attacked episodes: per seed ± the 95% CI '
              f'over episodes; across {len(c.rows)} seeds ± the 95% Student-t interval.', '',
              '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for j, (eps, x) in enumerate(zip(c.radii, c.across())):
      cells = [f'{eps:g}' + (' (clean)' if eps == 0 else '')]
      cells += [_signed(r['diff'][j], r['ci95'][j], bold=False) for r in c.rows]
      cells += [f"{np.mean([r[k]['accuracy'][j] for r in c.rows]):.2f}" for k in ('b', 'a')]
      cells += [_signed(x['mean'], x['half']), x['words']]
      lines.append('| ' + ' | '.join(cells) + ' |')
    lines.append('')
  return '\n'.join(lines)
