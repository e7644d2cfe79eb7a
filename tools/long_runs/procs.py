"""Child processes of a GPU job: each in its own process group, its output in the job's log,
killed with everything it started at its deadline (and all of them if the job is terminated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Log:
  """Timestamped lines to stdout and a log file; subprocess output is appended to the file."""

  def __init__(self, path):
    self.path = path
    self.t0 = time.time()
    self.f = open(path, 'a')

  def __call__(self, msg):
    line = f'[{time.time() - self.t0:7.1f}s] {msg}'
    print(line, flush=True)
    self.f.write(line + '\n')
    self.f.flush()

  def run(self, cmd, timeout, env=None):
    """Runs ``cmd`` (list), its output into the log; returns (rc, seconds). Never raises."""
    self(f"$ {' '.join(cmd)}   (timeout {timeout:.0f} s)")
    t = time.time()
    if timeout <= 1:
      self('  skipped: no time left')
      return None, 0.0
    self.f.flush()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.f, stderr=subprocess.STDOUT,
                         start_new_session=True)
    _CHILDREN.append(p)
    try:
      rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      kill_group(p)
      rc = 'timeout'
    self(f'  -> rc {rc} in {time.time() - t:.1f} s')
    return rc, time.time() - t


_CHILDREN: list = []   # process groups to end if this process is terminated (timeout in the .sh)


def on_term(signum, frame):
  """SIGTERM handler of the job: ends every child's process group, then this process."""
  for p in _CHILDREN:
    if p.poll() is None:
      kill_group(p)
  sys.exit(128 + signum)


def kill_group(p):
  """Kills a child started with start_new_session=True and everything it started."""
  import signal
  try:
    os.killpg(p.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    p.kill()
  p.wait()


class Background:
  """A subprocess running beside the main sequence (its output in its own log file)."""

  def __init__(self, log, cmd, logfile, env):
    log(f"$ {' '.join(cmd)}   (in the background)")
    self.log, self.logfile, self.t = log, logfile, time.time()
    self.f = open(logfile, 'w')
    self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.f, stderr=subprocess.STDOUT,
                              start_new_session=True)
    _CHILDREN.append(self.p)

  def wait(self, deadline):
    try:
      rc = self.p.wait(timeout=max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      kill_group(self.p)
      rc = 'timeout'
    self.f.close()
    with open(self.logfile) as f:
      self.log.f.write(f.read())
    self.log(f'  -> background rc {rc} in {time.time() - self.t:.1f} s')
    return rc


def read_json(path, default=None):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def read_jsonl_tail(path):
  """The last row of a .jsonl file, or None."""
  from metadrop_jax import metrics as metrics_lib
  rows = metrics_lib.read_jsonl(path)
  return rows[-1] if rows else None


def write_atomic(path: str, data) -> None:
  """Writes ``data`` (bytes or text) to ``path`` through a temp file beside it and os.replace:
  a write cut at any point leaves the old file or none, never half of the new one."""
  from metadrop_jax import metrics
  data = data.encode() if isinstance(data, str) else data
  metrics.write_atomic(path, lambda f: f.write(data))


def copy_atomic(src: str, dst: str) -> None:
  """``shutil.copy`` that a cut cannot leave half done (:func:`write_atomic`)."""
  with open(src, 'rb') as f:
    write_atomic(dst, f.read())
