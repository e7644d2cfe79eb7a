"""The 95% confidence interval and the metric files."""

import json
import math
import os

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from metadrop_jax import metrics

samples = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=50)


def test_ci95_by_hand():
  # x = [0, 1]: std (ddof=0) = 0.5, n = 2 -> 1.96 * 0.5 / sqrt(2)
  assert metrics.ci95([0.0, 1.0]) == pytest.approx(1.96 * 0.5 / math.sqrt(2))
  s = metrics.summarize([1.0, 0.5, 0.0, 0.5])
  assert s['mean'] == pytest.approx(50.0) and s['n'] == 4
  assert s['ci95'] == pytest.approx(1.96 * np.std([100, 50, 0, 50]) / 2)


@hypothesis.given(samples)
def test_ci95_properties(x):
  ci = metrics.ci95(x)
  assert ci == pytest.approx(1.96 * np.std(x) / math.sqrt(len(x)), abs=1e-12)
  assert metrics.ci95(x[::-1]) == pytest.approx(ci, abs=1e-12)
  assert metrics.ci95(np.tile(x, 4)) == pytest.approx(ci / 2, abs=1e-9)  # std same, n x4


def test_ci95_constant_and_empty():
  assert metrics.ci95([0.7] * 10) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError):
    metrics.ci95([])


def test_writer_drops_rows_after_resume_step(tmp_path):
  w = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  for s in (10, 20, 30):
    w.write_scalars(s, {'a': s})
  w.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 40, "a": ')  # a line cut by a crash
  w = metrics.MetricWriter(str(tmp_path), resume_step=20, tensorboard=False)
  w.write_scalars(30, {'a': 31})
  w.close()
  rows = metrics.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [(r['step'], r['a']) for r in rows] == [(10, 10), (20, 20), (30, 31)]


def test_write_json_atomic(tmp_path):
  p = str(tmp_path / 'r.json')
  metrics.write_json_atomic(p, {'x': 1})
  assert json.load(open(p)) == {'x': 1}
  assert os.listdir(tmp_path) == ['r.json']
