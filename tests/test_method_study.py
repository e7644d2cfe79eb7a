"""metadrop_jax.method_study: columns of published runs, paired differences to MAML per column."""

import json

import numpy as np
import pytest

from metadrop_jax import method_study, metrics


def _run(root, name, method, accs, beta=1e-3, episodes=None):
  d = root / name
  d.mkdir(parents=True)
  s = metrics.summarize(accs)
  (d / 'results.json').write_text(json.dumps({
      'method': method, 'dataset': 'omniglot', 'way': 5, 'shot': 1, 'accuracy': s['mean'],
      'ci95': s['ci95'], 'episodes': episodes or len(accs), 'split': 'test', 'eval_seed': 0,
      'step': 1000, 'num_steps': 1000, 'mc_samples': 10}))
  (d / 'config.json').write_text(json.dumps({'method': method, 'meta_gradient': root.name,
                                             'methods': {'vib_beta': beta}}))
  np.save(d / 'episode_accs_test.npy', np.asarray(accs))


def test_columns_table_and_figure(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.uniform(0.6, 1.0, 50)
  cols = {}
  for comp, shift in (('authors', 0.05), ('exact', -0.1)):
    root = tmp_path / comp
    _run(root, 'maml', 'maml', base)
    _run(root, 'metadrop', 'metadrop', np.clip(base + shift + rng.normal(0, .02, 50), 0, 1))
    cols[comp] = root
  _run(tmp_path / 'authors', 'vib_beta1e-05', 'vib', base - 0.2, beta=1e-5)
  _run(tmp_path / 'exact', 'vib', 'vib', base[:40], episodes=40)     # other episodes: no pairing
  columns = {k: method_study.load_column(str(v)) for k, v in cols.items()}
  rows = method_study.compare_columns(columns)
  assert [r['name'] for r in rows] == ['maml', 'metadrop', 'vib', 'vib_beta1e-05']
  assert rows[3]['label'] == 'VIB (β = 1e-5)' and 'exact' not in rows[3]['cells']
  md = rows[1]['cells']
  for comp in ('authors', 'exact'):
    want = metrics.paired_difference(np.load(cols[comp] / 'metadrop' / 'episode_accs_test.npy'),
                                     base)
    assert md[comp]['paired']['mean'] == pytest.approx(want['mean'])
  assert md['authors']['paired']['mean'] > 0 > md['exact']['paired']['mean']
  assert rows[2]['cells']['exact']['paired'] is None
  text = method_study.markdown(rows, ['authors', 'exact'])
  assert '(reference)' in text and text.count('\n') == 2 + len(rows)
  out = tmp_path / 'fig.png'
  method_study.plot(rows, ['authors', 'exact'], str(out))
  assert out.stat().st_size > 5000


def test_parse_columns():
  assert method_study.parse_columns("authors'=a, exact=b") == {"authors'": 'a', 'exact': 'b'}
  with pytest.raises(ValueError, match='LABEL=FOLDER'):
    method_study.parse_columns('a')
