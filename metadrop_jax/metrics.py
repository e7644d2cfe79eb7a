"""Summary statistics and the metric writer (JSONL always, TensorBoard when available)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np


def ci95(x) -> float:
  """Half-width of the 95% interval of the mean: ``1.96 * std(x, ddof=0) / sqrt(n)``.

  The authors' formula (``main.py``: ``1.96 * np.std(acc) / sqrt(n_test_iters)``); ddof=0.
  """
  x = np.asarray(x, np.float64)
  if x.size == 0:
    raise ValueError('ci95 of an empty sample')
  return float(1.96 * x.std() / math.sqrt(x.size))


def summarize(accs) -> dict:
  """Accuracy in percent: mean, ci95, n (as the paper reports)."""
  a = 100.0 * np.asarray(accs, np.float64)
  return {'mean': float(a.mean()), 'ci95': ci95(a), 'n': int(a.size)}


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON through a temp file and os.replace: never a half-written file."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a line cut by a crash: everything before it is good
  return rows


class MetricWriter:
  """``write_scalars(step, {name: value})`` (clu's interface) to ``metrics.jsonl`` and, when
  tensorboardX is installed, TensorBoard event files in ``workdir/tb``.

  On resume, rows past the restored step (written after the last checkpoint of a killed run)
  are dropped, so the log matches an uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    rows = [r for r in read_jsonl(self.path) if r.get('step', 0) <= resume_step]
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
    os.replace(tmp, self.path)
    self._f = open(self.path, 'a')
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'), purge_step=resume_step + 1)
      except ImportError:
        pass

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._f.write(json.dumps(row) + '\n')
    self._f.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    self._f.close()
    if self._tb is not None:
      self._tb.close()
