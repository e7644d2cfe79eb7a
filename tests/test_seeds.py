"""Claims across training seeds (metadrop_jax/seeds.py), the report's section and figure, and the
robustness curves across seeds; hand-made result files of fake runs (no training)."""

import json
import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from PIL import Image

from metadrop_jax import metrics, report, seeds
from metadrop_jax.cli import report as report_cli

T2 = 4.302652729911275        # Student t, 2 degrees of freedom, 97.5% quantile (tables: 4.303)
RADII = [0.0, 0.05, 0.1]


def _run(root, name, *, method, seed, accs, mg='authors', eval_seed=0, robust=None):
  """A published run as the tools write it: results.json and config.json (the seed only in the
  config, as in the committed runs), episode_accs_test.npy, and with ``robust`` ([R, n]
  per-episode accuracies) a robustness_linf.json."""
  wd = root / name
  wd.mkdir(parents=True)
  accs = np.asarray(accs, np.float64)
  s = metrics.summarize(accs)
  common = {'name': 'omniglot_5way1shot_cpu', 'method': method, 'dataset': 'omniglot', 'way': 5,
            'shot': 1, 'step': 2000, 'num_steps': 2000, 'split': 'test', 'eval_seed': eval_seed,
            'meta_gradient': mg}
  (wd / 'results.json').write_text(json.dumps({
      **common, 'accuracy': s['mean'], 'ci95': s['ci95'], 'episodes': int(accs.size),
      'mc_samples': 1 if method == 'maml' else 10, 'omniglot_split': 'lake'}))
  (wd / 'config.json').write_text(json.dumps({'seed': seed, 'meta_gradient': mg, 'method': method,
                                              'data': {'omniglot_split': 'lake'}}))
  np.save(wd / 'episode_accs_test.npy', accs)
  if robust is not None:
    rows = [metrics.summarize(r) for r in robust]
    (wd / 'robustness_linf.json').write_text(json.dumps({
        **common, 'norm': 'linf', 'radii': RADII, 'accuracy': [r['mean'] for r in rows],
        'ci95': [r['ci95'] for r in rows], 'episodes': int(np.shape(robust)[1]), 'mc_samples': 30,
        'attack': {'algorithm': 'pgd', 'steps': 20, 'step_size': 0.125, 'restarts': 1,
                   'rand_init': True, 'l1_sparsity': 0.05},
        'episode_accs': [list(map(float, r)) for r in robust]}))
  return str(wd)


def _episodes(rng, n, gain):
  """Two models' per-episode accuracies (multiples of 0.2, as a 5-query episode gives) on the
  same episodes: a shared difficulty, a − b near ``gain``."""
  hard = rng.uniform(0.4, 1.0, n)
  b = np.clip(np.round((hard + rng.normal(0, 0.05, n)) * 5) / 5, 0, 1)
  a = np.clip(np.round((hard + gain + rng.normal(0, 0.05, n)) * 5) / 5, 0, 1)
  return a, b


def _study(root, gains, *, n=100, robust_gains=None, tweak=None):
  """Meta-dropout and MAML at seeds 0.. with Meta-dropout − MAML about ``gains[seed]``; returns
  (workdirs, {seed: (a, b)}). ``tweak``: {(method, seed): {field: value}} for config-like
  differences (eval seed)."""
  rng = np.random.default_rng(0)
  wds, accs = [], {}
  for seed, g in enumerate(gains):
    a, b = _episodes(rng, n, g)
    accs[seed] = (a, b)
    for method, x in (('metadrop', a), ('maml', b)):
      robust = None
      if robust_gains is not None:
        shift = robust_gains[seed] if method == 'metadrop' else 0.0
        robust = np.stack([np.clip(x - 0.3 * j + shift * j, 0, 1) for j in range(len(RADII))])
      kw = (tweak or {}).get((method, seed), {})
      wds.append(_run(root, f'seed{seed}/{method}', method=method, seed=seed, accs=x,
                      robust=robust, **kw))
  return wds, accs


def _row(table, first):
  for line in table.splitlines():
    if line.startswith(f'| {first} |'):
      return [c.strip() for c in line.strip().strip('|').split(' | ')][1:]
  raise AssertionError(f'no row {first!r} in\n{table}')


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------

def test_t_interval_against_a_hand_computed_value():
  # [1, 2, 6]: mean 3, s^2 = (4 + 1 + 9) / 2 = 7, half = t_{2, 0.975} * sqrt(7) / sqrt(3)
  t = seeds.t_interval([1.0, 2.0, 6.0])
  assert t['mean'] == pytest.approx(3.0)
  assert t['half'] == pytest.approx(T2 * math.sqrt(7.0 / 3.0), rel=1e-9)
  assert t['half'] == pytest.approx(6.5724, abs=1e-4)
  # two seeds: t_{1, 0.975} = 12.706; [1, 3] -> s = sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
  assert seeds.t_interval([1.0, 3.0])['half'] == pytest.approx(12.7062, abs=1e-4)
  with pytest.raises(ValueError, match='at least 2'):
    seeds.t_interval([1.0])


@hypothesis.given(st.lists(st.floats(-20, 20).filter(lambda v: abs(v) > 1e-3), min_size=2,
                           max_size=6),
                  st.floats(0.1, 10.0))
def test_verdict_is_sign_and_interval(diffs, scale):
  s = seeds.across_seeds(diffs)
  d = np.array(diffs)
  assert s['same_sign'] == bool((d > 0).all() or (d < 0).all())
  assert s['holds'] == (s['same_sign'] and abs(d.mean()) > s['half'])
  assert s['words'].startswith('holds' if s['holds'] else ('not established' if s['same_sign']
                                                          else 'does not hold'))
  # the interval scales with the differences, and the verdict does not change
  z = seeds.across_seeds(d * scale)
  assert z['half'] == pytest.approx(scale * s['half'], rel=1e-9, abs=1e-12)
  assert z['holds'] == s['holds']


def test_one_seed_has_no_interval():
  s = seeds.across_seeds([1.5])
  assert s['half'] is None and not s['holds'] and s['words'].startswith('one seed')


# ------------------------------------------------------------------------------------------------
# comparisons of accuracies
# ------------------------------------------------------------------------------------------------

def test_seeds_that_agree_hold_and_seeds_that_disagree_do_not(tmp_path):
  wds, accs = _study(tmp_path / 'agree', [0.08, 0.06, 0.1])
  (c,) = [c for c in seeds.comparisons(report.load_results(wds)) if c.field == 'method']
  assert c.seeds == [0, 1, 2] and c.title == 'Meta-dropout − MAML'
  for r in c.rows:
    want = metrics.paired_difference(*accs[r['seed']])
    assert r['diff'] == pytest.approx(want['mean']) and r['ci95'] == pytest.approx(want['ci95'])
  x = c.across()
  want = seeds.t_interval([r['diff'] for r in c.rows])
  assert (x['mean'], x['half']) == pytest.approx((want['mean'], want['half']))
  assert x['holds'] and x['words'].startswith('holds: above 0 at all 3 seeds')

  wds, _ = _study(tmp_path / 'disagree', [0.08, -0.06, 0.1])
  (c,) = [c for c in seeds.comparisons(report.load_results(wds)) if c.field == 'method']
  assert c.across()['positive'] == 2 and c.across()['negative'] == 1
  assert not c.across()['holds']
  table = '\n'.join(seeds.markdown([c]))
  row = _row(table, 'Meta-dropout − MAML')
  assert row[-1].startswith('does not hold: the sign changes across seeds (+ at 2, − at 1 of 3)')
  assert row[0] == ("omniglot 5-way 1-shot (lake split), authors' meta-gradient, 2000 steps, "
                    '100 test episodes (eval seed 0)')
  # per seed: both accuracies and the paired difference ± its episode CI
  r1 = c.rows[1]
  assert row[2] == (f"{r1['a']['accuracy']:.2f} / {r1['b']['accuracy']:.2f}<br>"
                    f"**{r1['diff']:+.2f} ± {r1['ci95']:.2f}**")


def test_meta_gradient_comparison_authors_minus_exact(tmp_path):
  rng = np.random.default_rng(1)
  wds = []
  for seed in (0, 1):
    a, b = _episodes(rng, 50, 0.05)
    wds += [_run(tmp_path, f's{seed}_authors', method='maml', seed=seed, accs=a, mg='authors'),
            _run(tmp_path, f's{seed}_exact', method='maml', seed=seed, accs=b, mg='exact')]
  (c,) = seeds.comparisons(report.load_results(wds))
  assert c.field == 'meta_gradient' and c.title == "authors' − exact meta-gradient, MAML"
  assert c.seeds == [0, 1] and 'exact' not in c.where


def test_different_eval_seeds_or_episode_counts_are_not_paired(tmp_path):
  # MAML's seed 2 meta-tested on other episodes (eval seed 1): seed 2 drops out, with a warning
  wds, _ = _study(tmp_path / 'eval', [0.08, 0.06, 0.1], tweak={('maml', 2): {'eval_seed': 1}})
  with pytest.warns(UserWarning, match='eval_seed 0 vs 1') as w:
    comps = seeds.comparisons(report.load_results(wds))
  assert any('not paired' in str(x.message) for x in w)
  assert any('not pooled' in str(x.message) for x in w)
  (c,) = [c for c in comps if c.field == 'method' and len(c.rows) > 1]
  assert c.seeds == [0, 1] and c.unpaired == [2]
  assert all(r['a']['eval_seed'] == r['b']['eval_seed'] == 0 for r in c.rows)
  # Meta-dropout's seed 1 meta-tested on 60 episodes: never paired with MAML's 100
  rng = np.random.default_rng(2)
  wds, _ = _study(tmp_path / 'episodes', [0.08, 0.06, 0.1])
  short = _run(tmp_path / 'episodes', 'seed1_short/metadrop', method='metadrop', seed=1,
               accs=rng.uniform(0, 1, 60))
  wds = [w for w in wds if not w.endswith('seed1/metadrop')] + [short]
  with pytest.warns(UserWarning, match='episodes 60 vs 100|episodes 100 vs 60'):
    comps = seeds.comparisons(report.load_results(wds))
  (c,) = [c for c in comps if len(c.rows) > 1]
  assert c.seeds == [0, 2]
  assert all(r['a']['episodes'] == r['b']['episodes'] == 100 for r in c.rows)


def test_duplicate_seed_and_missing_seed_are_left_out_with_a_warning(tmp_path):
  wds, _ = _study(tmp_path, [0.08, 0.06])
  dup = _run(tmp_path, 'again/maml', method='maml', seed=1, accs=np.ones(100))
  runs = report.load_results(wds + [dup])
  noseed = dict(runs[0], seed=None, workdir='noseed')
  with pytest.warns(UserWarning) as w:
    (c,) = seeds.comparisons(runs + [noseed])
  text = ' '.join(str(x.message) for x in w)
  assert 'a second run of the same group at seed 1' in text and 'noseed: no training seed' in text
  assert c.rows[1]['b']['workdir'].endswith('seed1/maml')


# ------------------------------------------------------------------------------------------------
# the report's command line
# ------------------------------------------------------------------------------------------------

def _cli_error(capsys, main, *args):
  with pytest.raises(SystemExit) as e:
    main(list(args))
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith('error: ')]
  assert e.value.code == 2 and 'Traceback' not in err and len(lines) == 1, err
  return lines[0]


def test_report_cli_section_and_seeds_figure(tmp_path, capsys):
  wds, _ = _study(tmp_path / 'runs', [0.08, -0.02, 0.1])
  out, fig = tmp_path / 'table.md', tmp_path / 'figs' / 'seeds.png'
  assert report_cli.main([f'--workdirs={",".join(wds)}', f'--out={out}',
                          f'--seeds_figure={fig}', '--seeds_title=t']) == 0
  printed = capsys.readouterr().out
  assert '### Across training seeds' in printed and out.read_text() in printed
  assert '### Over seeds' in printed                       # the per-method view stays
  row = _row(out.read_text(), 'Meta-dropout − MAML')
  assert [h for h in out.read_text().splitlines() if h.startswith('| Comparison')][0].count(
      'seed ') == 3
  assert row[-1].startswith('does not hold')
  # the Table-1 layout names a method's extra rows by their training seed
  for seed in (0, 1, 2):
    assert _row(out.read_text(), f'Meta-dropout (seed {seed})')[-1].startswith('**')
  assert '| MAML (2) |' not in out.read_text()
  with Image.open(fig) as im:
    assert im.size == (1000, 215)
    assert len(im.convert('RGB').getcolors(maxcolors=1 << 16)) > 20


def test_report_cli_one_seed_or_missing_results(tmp_path, capsys):
  wds, _ = _study(tmp_path / 'runs', [0.08])
  # without --seeds_figure: the table, no section, no error
  assert report_cli.main([f'--workdirs={",".join(wds)}']) == 0
  assert 'Across training seeds' not in capsys.readouterr().out
  fig = tmp_path / 'seeds.png'
  line = _cli_error(capsys, report_cli.main, f'--workdirs={",".join(wds)}',
                    f'--seeds_figure={fig}')
  assert '2 or more training seeds' in line and 'seed 0' in line and not fig.exists()
  # a workdir without results.json: a warning, the rest is used
  (tmp_path / 'empty').mkdir()
  wds2, _ = _study(tmp_path / 'two', [0.08, 0.05])
  with pytest.warns(UserWarning, match='results.json not found'):
    assert report_cli.main([f'--workdirs={",".join(wds2)},{tmp_path / "empty"}',
                            f'--seeds_figure={fig}']) == 0
  assert fig.exists()


# ------------------------------------------------------------------------------------------------
# robustness across seeds
# ------------------------------------------------------------------------------------------------

def test_robustness_cli_seeds_table_and_figure(tmp_path, capsys):
  from metadrop_jax.cli import robustness as robustness_cli
  gains = [0.04, 0.02, 0.05]
  wds, _ = _study(tmp_path / 'runs', [0.0, 0.0, 0.0], robust_gains=gains)
  fig, table = tmp_path / 'rs.png', tmp_path / 'md' / 'rs.md'
  robustness_cli.main(['--plot_only', '--norms=linf', f'--workdirs={",".join(wds)}',
                       f'--seeds_figure={fig}', f'--seeds_table={table}'])
  printed = capsys.readouterr().out
  text = table.read_text()
  assert text in printed and '### Meta-dropout − MAML under ℓ∞ PGD' in text
  results = seeds.load_robustness(wds, 'linf')
  (c,) = seeds.robustness_comparisons(results)
  assert c.seeds == [0, 1, 2] and c.radii == RADII
  for r in c.rows:       # per seed and radius: the paired difference over the attacked episodes
    for j in range(len(RADII)):
      want = metrics.paired_difference(r['a']['episode_accs'][j], r['b']['episode_accs'][j])
      assert r['diff'][j] == pytest.approx(want['mean'])
  x = c.across()[2]
  want = seeds.t_interval([r['diff'][2] for r in c.rows])
  assert (x['mean'], x['half']) == pytest.approx((want['mean'], want['half']))
  row = _row(text, '0.1')
  assert row[:3] == [f"{r['diff'][2]:+.2f} ± {r['ci95'][2]:.2f}" for r in c.rows]
  assert row[5] == f"**{x['mean']:+.2f} ± {x['half']:.2f}**"
  with Image.open(fig) as im:
    assert im.size == (550, 700)
    assert len(im.convert('RGB').getcolors(maxcolors=1 << 16)) > 20


def test_robustness_cli_seeds_bad_input(tmp_path, capsys):
  from metadrop_jax.cli import robustness as robustness_cli
  wds, _ = _study(tmp_path / 'runs', [0.0], robust_gains=[0.03])
  fig = tmp_path / 'rs.png'
  line = _cli_error(capsys, robustness_cli.main, '--plot_only', '--norms=linf',
                    f'--workdirs={",".join(wds)}', f'--seeds_figure={fig}')
  assert '2 or more training seeds' in line and not fig.exists()
  line = _cli_error(capsys, robustness_cli.main, '--plot_only', '--norms=linf',
                    f'--workdirs={wds[0]},{tmp_path / "typo"}', f'--seeds_figure={fig}')
  assert 'typo' in line and 'no such folder' in line
  # a workdir without robustness_linf.json: skipped with a warning; a cut one: one line
  (tmp_path / 'bare').mkdir()
  with pytest.warns(UserWarning, match='robustness_linf.json not found'):
    _cli_error(capsys, robustness_cli.main, '--plot_only', '--norms=linf',
               f'--workdirs={wds[0]},{tmp_path / "bare"}', f'--seeds_table={tmp_path / "t.md"}')
  path = tmp_path / 'runs' / 'seed0' / 'maml' / 'robustness_linf.json'
  path.write_text(path.read_text()[:50])
  line = _cli_error(capsys, robustness_cli.main, '--plot_only', '--norms=linf',
                    f'--workdirs={",".join(wds)}', f'--seeds_table={tmp_path / "t.md"}')
  assert str(path) in line and 'attack the run again' in line
