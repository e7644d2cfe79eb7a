"""benchmarks/meta_step.py: the authors' TF step is timed at exactly the settings of their run
scripts, and its figure and ratio are printed only when measured in the same run."""

import importlib.util
import pathlib

import pytest

import configs

ROOT = pathlib.Path(__file__).resolve().parents[1]

# github.com/haebeom-lee/metadrop, runfiles/<method>_<dataset>_<shot>shot.sh (docs/paper.md)
THEIR_RUN_SCRIPTS = {
    ('omniglot_20way1shot', 'metadrop'): 'omniglot 20 1 15 4 5 0.1 0.0003',
    ('omniglot_20way1shot', 'maml'): 'omniglot 20 1 15 4 5 0.1 0.001',
    ('omniglot_20way5shot', 'metadrop'): 'omniglot 20 5 15 4 5 0.4 0.001',
    ('omniglot_20way5shot', 'maml'): 'omniglot 20 5 15 4 5 0.4 0.001',
    ('mimgnet_5way1shot', 'metadrop'): 'mimgnet 5 1 15 4 5 0.01 0.0001',
    ('mimgnet_5way1shot', 'maml'): 'mimgnet 5 1 15 4 5 0.01 0.0001',
    ('mimgnet_5way5shot', 'metadrop'): 'mimgnet 5 5 15 4 5 0.01 0.0001',
    ('mimgnet_5way5shot', 'maml'): 'mimgnet 5 5 15 4 5 0.01 0.0001',
}
FLAG_NAMES = ('dataset', 'way', 'shot', 'query', 'metabatch', 'n_steps', 'inner_lr', 'meta_lr')


def _meta_step():
  spec = importlib.util.spec_from_file_location('meta_step', ROOT / 'benchmarks' / 'meta_step.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize('key', sorted(THEIR_RUN_SCRIPTS))
def test_authors_tf_flags_are_their_run_scripts(key):
  name, method = key
  flags = _meta_step().authors_tf_flags(configs.get(name, method=method))
  got = dict(f[2:].split('=', 1) for f in flags if '=' in f)
  want = dict(zip(FLAG_NAMES, THEIR_RUN_SCRIPTS[key].split()))
  num = lambda d: {k: float(v) if k.endswith('lr') else v for k, v in d.items()}
  assert num(got) == num(want)
  assert ('--maml' in flags) == (method == 'maml')


@pytest.mark.parametrize('overrides', [{'meta_gradient': 'exact'}, {'method': 'vib'},
                                       {'model.channels': 32}])
def test_no_authors_tf_row_where_their_code_has_no_such_setting(overrides):
  from metadrop_jax.cli import parse_overrides
  ov = parse_overrides([f'{k}={v}' for k, v in overrides.items()])
  config = configs.get('omniglot_20way1shot', **{'method': 'metadrop', **ov})
  assert _meta_step().authors_tf_flags(config) is None
  assert _meta_step().authors_tf_flags(configs.get('tiny')) is None


def _row(variant, s_per_iter, **kw):
  return {'config': 'omniglot_20way1shot', 'method': 'metadrop', 'variant': variant,
          'compile_s': 30.0, 's_per_iter': s_per_iter, 'xla_flops_per_iter': 2.9e11,
          'xla_gflops_per_s': 57.0, 'xla_temp_bytes': 2 ** 30, 'peak_mem_bytes': 2 ** 31,
          'device': 'cpu:cpu', 'num_devices': 1, 'cpu_model': 'AMD EPYC 7B13', 'cpu_count': 2,
          'peak_mem_kind': 'process peak RSS', 'resolved': {}, **kw}


def test_tf_column_only_when_timed_in_the_same_run(capsys):
  ms = _meta_step()
  ms.print_table([_row('fast', 4.0), _row('naive', 20.0)])
  out = capsys.readouterr().out
  assert 'TF' not in out and '5.0' in out            # naive/fast
  tf = {'config': 'omniglot_20way1shot', 'method': 'metadrop', 'variant': 'authors_tf',
        's_per_iter': 2.0, 'tf': '2.21.0'}
  ms.print_table([_row('fast', 4.0), tf])
  out = capsys.readouterr().out
  fast, tf_line = [l.split() for l in out.splitlines() if l.startswith('omniglot_20way1shot')]
  assert fast[2] == 'fast' and fast[-1] == '0.50', fast          # TF / ours
  assert tf_line[2] == 'TF' and tf_line[-1] == '2.000', tf_line
  ms.print_table([_row('fast', 4.0), _row('exact', 6.0), tf])
  fast = capsys.readouterr().out.splitlines()
  assert 'exact/fast' in fast[0] and 'TF/fast' in fast[0]
  assert fast[2].split()[-2:] == ['1.50', '0.50'], fast[2]
  assert 'TensorFlow 2.21.0' in out and 'timed in this run' in out
  failed = {**tf, 'error': "not run: the authors' code has no such setting"}
  failed.pop('s_per_iter')
  ms.print_table([_row('fast', 4.0), failed])
  out = capsys.readouterr().out
  assert 'TF s/it' not in out and "the authors' code has no such setting" in out


def test_a_measuring_process_gives_its_result_or_its_error():
  ms = _meta_step()
  ok = ms._run_for_result(['python3', '-c', 'print("noise"); print(\'RESULT {"s_per_iter": 2.5}\')'],
                          timeout=60)
  assert ok == {'s_per_iter': 2.5}
  bad = ms._run_for_result(['python3', '-c', 'import sys; sys.exit("no such setting")'], timeout=60)
  assert bad == {'error': 'no such setting\n'}
  assert ms._run_for_result(['sleep', '5'], timeout=0.5) == {'error': 'timeout'}


def test_a_candidate_formulation_gets_its_ratio_column(capsys):
  """--candidate NAME=FIELD=VALUE times the fast step with those overrides in the same run and
  prints NAME/fast beside exact/fast and TF/fast; a malformed candidate is refused at once."""
  ms = _meta_step()
  tf = {'config': 'omniglot_20way1shot', 'method': 'metadrop', 'variant': 'authors_tf',
        's_per_iter': 2.0, 'tf': '2.21.0'}
  ms.print_table([_row('fast', 4.0), _row('exact', 6.0), _row('select', 3.0), tf])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split()[-3:] == ['exact/fast', 'select/fast', 'TF/fast']
  assert lines[2].split()[-3:] == ['1.50', '0.75', '0.50'], lines[2]
  assert [l.split()[2] for l in lines[2:6]] == ['fast', 'exact', 'select', 'TF']
  for bad in ('select', 'fast=model.pool_impl=select', 'select=model.pool_impl'):
    with pytest.raises(SystemExit):
      ms.main(['--configs=tiny', f'--candidate={bad}'])
    assert '--candidate' in capsys.readouterr().err


def test_every_benchmark_record_names_its_commit(monkeypatch):
  """A record says which code measured it: the job's METADROP_COMMIT (a copy without .git), else
  this checkout's commit; benchmark modules import no jax for it."""
  import subprocess
  _meta_step()     # puts benchmarks/ on sys.path, as running a benchmark does
  import provenance
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                        text=True).stdout.strip()
  monkeypatch.delenv('METADROP_COMMIT', raising=False)
  assert provenance.commit().split('-')[0] == head and head
  monkeypatch.setenv('METADROP_COMMIT', 'abc1234')
  assert provenance.commit() == 'abc1234'
