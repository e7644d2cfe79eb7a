"""Packing a GPU job's results into the few files the host lets it bring back (unpacking them
here: :mod:`tools.long_runs.unpack`).

Hosts limit what a job returns (how many files, how large each): :class:`TransferLimits`,
flags of ``python -m tools.long_runs.window run``. The campaign's changed state travels as
``campaign.tgz`` (split into ``campaign.tgz.N`` parts when larger than one part; when the whole
does not fit, whole runs are left out, never part of the archive), the compile cache as
``jax_cache.tgz`` when it fits, beside ``window.json`` (which lists every file and its size) and
``window.log``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tarfile

from tools.long_runs.procs import read_json, write_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class TransferLimits:
  """What a job may bring back: at most ``max_files`` files of at most ``max_file_bytes`` each;
  the campaign archive is cut into parts of ``part_bytes``."""
  max_files: int = 8
  max_file_bytes: int = 16 * MiB
  part_bytes: int = 15 * MiB

  def __post_init__(self):
    if self.max_files < 3:
      raise ValueError(f'max_files={self.max_files}: a job brings back at least window.json, '
                       'window.log and the campaign archive')
    if not 0 < self.part_bytes <= self.max_file_bytes:
      raise ValueError(f'part_bytes={self.part_bytes} must be in (0, max_file_bytes='
                       f'{self.max_file_bytes}]')


def tail_copy(src, dst, limit):
  """Copies the last ``limit`` bytes of ``src`` to ``dst``."""
  with open(src, 'rb') as f:
    f.seek(max(0, os.path.getsize(src) - limit))
    data = f.read()
  write_atomic(dst, b'[... log truncated ...]\n' + data)


SKIP_PARTS = ('tb', '__pycache__', '.lock')   # .lock: held by a running train() only


def _skip(rel: str) -> bool:
  parts = rel.split(os.sep)
  return (any(p in SKIP_PARTS for p in parts) or any('.tmp' in p or 'orbax-checkpoint-tmp' in p
                                                     for p in parts))


def campaign_members(cdir: str, since: float) -> list[str]:
  """Relative paths to pack: every top-level file, and every file of each run directory that
  changed since ``since`` (the whole directory, so that unpacking can replace it)."""
  out = []
  for name in sorted(os.listdir(cdir)):
    p = os.path.join(cdir, name)
    if os.path.isfile(p):
      if not _skip(name):        # not a temp file a cut write left behind
        out.append(name)
      continue
    files = []
    newest = 0.0
    for root, dirs, fs in os.walk(p):
      dirs.sort()
      for fn in sorted(fs):
        full = os.path.join(root, fn)
        rel = os.path.relpath(full, cdir)
        if _skip(rel):
          continue
        files.append(rel)
        newest = max(newest, os.path.getmtime(full))
    if files and newest >= since - 1.0:
      out += files
  return out


def _archive(cdir: str, members: list[str]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w:gz', compresslevel=6) as tar:
    for rel in members:
      tar.add(os.path.join(cdir, rel), arcname=rel, recursive=False)
  return buf.getvalue()


def _run_order(cdir: str, runs: list[str]) -> list[str]:
  """``runs`` in the campaign's order (its priority), then any others."""
  camp = read_json(os.path.join(cdir, 'campaign.json'), {}) or {}
  order = [r.get('name') for r in camp.get('runs', []) if isinstance(r, dict)]
  return sorted(runs, key=lambda r: (order.index(r) if r in order else len(order), r))


def campaign_archive(cdir: str, since: float, capacity: int, log=print):
  """(archive bytes, members, runs left out): the campaign's changed state within ``capacity``
  bytes. When everything does not fit, whole runs are packed in the campaign's order while they
  fit and the others are left out (named in the log: the next job trains them again from the
  repository's state); an archive is never cut."""
  members = campaign_members(cdir, since)
  data = _archive(cdir, members)
  if len(data) <= capacity:
    return data, members, []
  whole = len(data)
  by_run: dict[str, list[str]] = {}
  for m in members:
    if os.sep in m:
      by_run.setdefault(m.split(os.sep)[0], []).append(m)
  chosen = [m for m in members if os.sep not in m]
  used = len(_archive(cdir, chosen))
  left = []
  for run in _run_order(cdir, list(by_run)):
    size = len(_archive(cdir, by_run[run]))   # gzip keeps no dictionary across runs: sizes add up
    if used + size <= capacity:
      chosen, used = chosen + by_run[run], used + size
    else:
      left.append(run)
  data = _archive(cdir, chosen)
  while len(data) > capacity and any(os.sep in m for m in chosen):
    last = [m for m in chosen if os.sep in m][-1].split(os.sep)[0]
    left.append(last)
    chosen = [m for m in chosen if m.split(os.sep)[0] != last or os.sep not in m]
    data = _archive(cdir, chosen)
  log(f'WARNING: the campaign archive would be {whole} bytes, more than the {capacity} bytes this '
      f'job may bring back: runs {left} are left out (their progress in this job is lost; the '
      "next job trains them again from the repository's state), "
      f'{sorted(by_run.keys() - set(left))} are packed whole' +
      ('' if len(data) <= capacity else f'; even without runs it is {len(data)} bytes: the host '
       'may drop its last parts'))
  return data, chosen, left


def pack(out_dir, work, cdir, *, since, summary, log=print, cache_dir='', extra=None,
         limits: TransferLimits = TransferLimits()) -> dict[str, int]:
  """Writes ``extra`` (name -> a file, copied, or a folder, packed as .tgz), the campaign archive
  (split if needed; whole runs only, :func:`campaign_archive`) and the compile cache into
  ``out_dir``. window.json and window.log are written by the caller. ``limits``: what the host
  lets a job bring back. Returns {file name: bytes}."""
  files: dict[str, int] = {}
  budget_files = limits.max_files - 2     # window.json, window.log
  for name, src in (extra or {}).items():
    dst = os.path.join(out_dir, name)
    if os.path.isdir(src):
      with tarfile.open(dst, 'w:gz') as tar:
        tar.add(src, arcname=os.path.basename(src))
    else:
      shutil.copy(src, dst)
    if os.path.getsize(dst) > limits.max_file_bytes - 2**20 or budget_files <= 1:
      log(f'{name} is {os.path.getsize(dst)} bytes: not brought back (too large, or the last '
          'file left is the campaign\'s)')
      os.remove(dst)
      continue
    files[name] = os.path.getsize(dst)
    budget_files -= 1
  if os.path.isdir(cdir):
    data, members, left = campaign_archive(cdir, since, budget_files * limits.part_bytes, log)
    summary['campaign_members'] = len(members)
    summary['campaign_runs_packed'] = sorted({m.split(os.sep)[0] for m in members
                                              if os.sep in m})
    summary['campaign_runs_left'] = left
    step = limits.part_bytes
    parts = [data[i:i + step] for i in range(0, len(data), step)] or [b'']
    names = ['campaign.tgz'] if len(parts) == 1 else [f'campaign.tgz.{i}' for i in range(len(parts))]
    for n, d in zip(names, parts):
      with open(os.path.join(out_dir, n), 'wb') as f:
        f.write(d)
      files[n] = len(d)
    budget_files -= len(parts)
  if cache_dir and os.path.isdir(cache_dir) and budget_files >= 1:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz', compresslevel=1) as tar:
      for fn in sorted(os.listdir(cache_dir)):
        tar.add(os.path.join(cache_dir, fn), arcname=fn)
    if 0 < len(buf.getvalue()) <= limits.max_file_bytes - 2**20:
      with open(os.path.join(out_dir, 'jax_cache.tgz'), 'wb') as f:
        f.write(buf.getvalue())
      files['jax_cache.tgz'] = len(buf.getvalue())
    else:
      log(f'compile cache is {len(buf.getvalue())} bytes compressed: not brought back')
  return files
