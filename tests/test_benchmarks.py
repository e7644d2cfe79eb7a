"""benchmarks/meta_step.py's table: the authors' TF timings appear only beside rows measured
where those timings were (a 2-core AMD EPYC CPU), labelled with that place."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _meta_step():
  spec = importlib.util.spec_from_file_location('meta_step', ROOT / 'benchmarks' / 'meta_step.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _row(device, cpu_model, cpu_count=2):
  return {'config': 'omniglot_20way1shot', 'method': 'metadrop', 'variant': 'fast',
          'compile_s': 30.0, 's_per_iter': 5.1, 'xla_flops_per_iter': 2.9e11,
          'xla_gflops_per_s': 57.0, 'xla_temp_bytes': 2 ** 30, 'peak_mem_bytes': 2 ** 31,
          'device': device, 'num_devices': 1, 'cpu_model': cpu_model, 'cpu_count': cpu_count,
          'peak_mem_kind': 'process peak RSS', 'resolved': {}}


def test_tf_reference_only_where_it_was_measured(capsys):
  ms = _meta_step()
  for row in (_row('gpu:NVIDIA H100', 'AMD EPYC 9654'), _row('cpu:cpu', 'Intel(R) Xeon(R)'),
              _row('cpu:cpu', 'AMD EPYC 7B13', cpu_count=16)):
    assert ms.tf_reference(row) is None
    ms.print_table([row])
    out = capsys.readouterr().out
    assert 'TF' not in out and '2.27' not in out, out
  row = _row('cpu:cpu', 'AMD EPYC 7B13')
  assert ms.tf_reference(row) == 2.27
  ms.print_table([row])
  out = capsys.readouterr().out
  assert 'TF s/it*' in out and '2.27' in out
  assert "* TF s/it: authors' TF 1.x (oneDNN) code, 2-core AMD EPYC CPU" in out
