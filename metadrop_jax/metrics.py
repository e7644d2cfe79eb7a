"""Summary statistics and the metric writer (JSONL always, TensorBoard when available)."""

from __future__ import annotations

import json
import math
import os
import warnings
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


def paired_difference(accs_a, accs_b) -> dict:
  """``summarize`` of the per-episode differences a − b of two models meta-tested on the same
  episodes: the gain with its paired 95% CI, much narrower than the two intervals side by side
  since the episode difficulty cancels."""
  a, b = np.asarray(accs_a, np.float64), np.asarray(accs_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'paired difference of {a.shape} and {b.shape} episode accuracies')
  return summarize(a - b)


def episode_accs_path(workdir: str, split: str) -> str:
  """Where a meta-test writes its per-episode accuracies (``evaluation.evaluate_checkpoint``)."""
  return os.path.join(workdir, f'episode_accs_{split}.npy')


def write_atomic(path: str, write) -> None:
  """``write(f)`` into a temp file beside ``path`` (binary), fsync, os.replace: a write cut at
  any point (a full disk, a kill) leaves the old file or none, never half of the new one, and no
  temp file behind."""
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path: str, obj, before_replace=None) -> None:
  """Writes JSON through a temp file and os.replace (:func:`write_atomic`). ``before_replace()``,
  if given, runs once the temp file is written and before it replaces ``path``: a companion file
  written there (atomically) lands first, and if it fails ``path`` is left as it was."""
  text = json.dumps(obj, indent=2, sort_keys=True).encode()

  def write(f):
    f.write(text)
    if before_replace is not None:
      before_replace()
  write_atomic(path, write)


def save_npy_atomic(path: str, array) -> None:
  """``np.save`` through a temp file and os.replace (:func:`write_atomic`)."""
  write_atomic(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def read_json_object(path: str) -> dict | str:
  """The JSON object in ``path``, or why it cannot be read (a short reason, for the caller's
  one-line error): unreadable, cut, or not an object."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError) as e:
    return str(e)
  return obj if isinstance(obj, dict) else 'not a JSON object'


def append_jsonl(path: str, row: dict) -> None:
  """Appends ``row`` as one JSON line, durably (flush + fsync), always on a line of its own: if
  the file's last line was cut by a crash (no trailing newline), a newline ends it first, so the
  cut line stays one unreadable line (read_jsonl skips it) and the new row stays readable."""
  with open(path, 'ab+') as f:
    f.seek(0, os.SEEK_END)
    if f.tell() > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')
    f.write((json.dumps(row) + '\n').encode())
    f.flush()
    os.fsync(f.fileno())


def read_jsonl(path: str, *, skipped: list | None = None, warn: bool = True) -> list[dict]:
  """The JSON-object rows of a JSONL file; [] if it does not exist.

  A line that is not a JSON object (garbage, or the last line cut by a crash) is skipped with a
  warning naming ``path:line``; every other row is kept, before and after it. ``skipped``, if
  given, receives ``(line number, raw bytes of the line)`` of each skipped line.
  """
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, 'rb') as f:
    for i, raw in enumerate(f, start=1):
      line = raw.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if not isinstance(row, dict):
        if skipped is not None:
          skipped.append((i, raw))
        if warn:
          warnings.warn(f'{path}:{i}: not a JSON object, line skipped ({_clip(line)})',
                        RuntimeWarning, stacklevel=2)
        continue
      rows.append(row)
  return rows


def _clip(line: bytes, n: int = 60) -> str:
  text = line.decode('utf-8', errors='replace')
  return repr(text if len(text) <= n else text[:n] + '...')


class MetricWriter:
  """``write_scalars(step, {name: value})`` (clu's interface) to ``metrics.jsonl`` and, when
  tensorboardX is installed, TensorBoard event files in ``workdir/tb``.

  On resume, rows past the restored step (written after the last checkpoint of a killed run)
  are dropped, so the log matches an uninterrupted run. Every other row is kept: a line that is
  not a JSON row (a garbage line, a line cut by a crash) is skipped with a warning naming
  ``metrics.jsonl:<line>`` and appended, as it was, to ``metrics.jsonl.skipped``.
  """

  def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    skipped = []
    rows = read_jsonl(self.path, skipped=skipped, warn=False)
    keep = []
    for r in rows:
      step = r.get('step')
      if not isinstance(step, (int, float)) or isinstance(step, bool):
        skipped.append((None, (json.dumps(r) + '\n').encode()))
      elif step <= resume_step:
        keep.append(r)
    if skipped:
      side = self.path + '.skipped'
      with open(side, 'ab') as f:
        for _, raw in skipped:
          f.write(raw if raw.endswith(b'\n') else raw + b'\n')
      where = [f'{self.path}:{i}' if i else f'{self.path} (a row without a step)'
               for i, _ in skipped]
      where = ', '.join(where[:5]) + (f' and {len(where) - 5} more' if len(where) > 5 else '')
      warnings.warn(f'{where}: not a metrics row, skipped and kept in {side}; the other rows '
                    'are kept', RuntimeWarning, stacklevel=2)
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      for r in keep:
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
