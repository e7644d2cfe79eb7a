"""metadrop_jax.tuning: the choice reads validation results only and skips diverging inner loops."""

import json
import math

import hypothesis
import hypothesis.strategies as st
import pytest

from metadrop_jax import tuning
from metadrop_jax.cli import tuning as tuning_cli


def _workdir(root, beta, acc, losses, test_acc=None):
  wd = root / f'beta{beta:g}'
  wd.mkdir()
  (wd / 'config.json').write_text(json.dumps({'methods': {'vib_beta': beta}}))
  (wd / 'results_val.json').write_text(json.dumps(
      {'accuracy': acc, 'ci95': 1.0, 'episodes': 300, 'mc_samples': 10, 'step': 1000}))
  if test_acc is not None:      # a test result must not matter
    (wd / 'results.json').write_text(json.dumps({'accuracy': test_acc}))
  rows = [{'step': 50 * (i + 1), 'train/inner_loss_first': a, 'train/inner_loss_last': b}
          for i, (a, b) in enumerate(losses)]
  (wd / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(wd)


def test_choice_skips_a_diverging_inner_loop_and_ignores_test(tmp_path, capsys):
  wds = [_workdir(tmp_path, 1e-3, 90.0, [(10.2, 4.9e7), (40.0, 4.8e6)], test_acc=99.0),
         _workdir(tmp_path, 1e-4, 80.0, [(1.7, 0.3)], test_acc=10.0),
         _workdir(tmp_path, 1e-5, 85.0, [(1.7, 0.2), (1.6, 0.1)], test_acc=5.0),
         _workdir(tmp_path, 1e-6, 84.0, [(1.7, float('nan'))])]
  cands = [tuning.candidate(w, 'methods.vib_beta') for w in wds]
  assert [c['problem'] is None for c in cands] == [False, True, True, False]
  assert tuning.choose(cands)['value'] == 1e-5
  assert tuning_cli.main([f'--workdirs={",".join(wds)}', '--field=methods.vib_beta',
                      '--print_choice']) == 0
  assert capsys.readouterr().out.strip() == '1e-05'
  out = tmp_path / 't.md'
  assert tuning_cli.main([f'--workdirs={",".join(wds)}', '--field=methods.vib_beta',
                      f'--out={out}']) == 0
  text = out.read_text()
  assert text.count('**yes**') == 1 and '4.8e+06' in text and 'non-finite' in text


def test_a_candidate_without_validation_result_is_named(tmp_path, capsys):
  wd = _workdir(tmp_path, 1e-4, 80.0, [(1.7, 0.3)])
  (tmp_path / 'beta0.0001' / 'results_val.json').unlink()
  with pytest.raises(SystemExit) as e:
    tuning_cli.main([f'--workdirs={wd}', '--field=methods.vib_beta'])
  assert e.value.code == 2 and '--split=val' in capsys.readouterr().err


@hypothesis.given(st.lists(st.tuples(st.floats(0, 100), st.booleans()), min_size=1, max_size=8))
def test_choose_is_the_best_of_the_usable(specs):
  cands = [{'value': i, 'accuracy': a, 'problem': None if ok else 'diverges'}
           for i, (a, ok) in enumerate(specs)]
  best = tuning.choose(cands)
  usable = [c for c in cands if c['problem'] is None]
  if not usable:
    assert best is None
  else:
    assert best['problem'] is None and best['accuracy'] == max(c['accuracy'] for c in usable)
    assert best is next(c for c in usable if c['accuracy'] == best['accuracy'])   # first of equals


@pytest.mark.parametrize('first,last,bad', [(1.0, 9.9, False), (1.0, 10.1, True),
                                            (1.0, math.inf, True), (None, 5.0, False)])
def test_inner_loop_problem_threshold(first, last, bad):
  row = {'step': 1, 'train/inner_loss_first': first, 'train/inner_loss_last': last}
  assert (tuning.inner_loop_problem([row]) is not None) == bad
