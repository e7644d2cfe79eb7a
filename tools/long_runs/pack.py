"""Packing a GPU job's results into the few files the host lets it bring back, and unpacking
them here.

Hosts limit what a job returns (how many files, how large each): :class:`TransferLimits`,
flags of ``python -m tools.long_runs.window run``. The campaign's changed state travels as
``campaign.tgz`` (split into ``campaign.tgz.N`` parts when larger than one part), the compile
cache as ``jax_cache.tgz`` when it fits, beside ``window.json`` and ``window.log``.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import shutil
import tarfile

from tools.long_runs import reports
from tools.long_runs.procs import read_json

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
  with open(dst, 'wb') as f:
    f.write(b'[... log truncated ...]\n' + data)


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


def pack(out_dir, work, cdir, *, since, summary, log=print, cache_dir='', extra=None,
         limits: TransferLimits = TransferLimits()) -> dict[str, int]:
  """Writes ``extra`` (name -> a file, copied, or a folder, packed as .tgz), the campaign archive
  (split if needed) and the compile cache into ``out_dir``. window.json and window.log are
  written by the caller. ``limits``: what the host lets a job bring back. Returns {file name:
  bytes}."""
  files: dict[str, int] = {}
  budget_files = limits.max_files - 2     # window.json, window.log
  for name, src in (extra or {}).items():
    dst = os.path.join(out_dir, name)
    if os.path.isdir(src):
      with tarfile.open(dst, 'w:gz') as tar:
        tar.add(src, arcname=os.path.basename(src))
    else:
      shutil.copy(src, dst)
    if os.path.getsize(dst) > limits.max_file_bytes - 2**20:
      log(f'{name} is {os.path.getsize(dst)} bytes: too large to bring back')
      os.remove(dst)
      continue
    files[name] = os.path.getsize(dst)
    budget_files -= 1
  if os.path.isdir(cdir):
    buf = io.BytesIO()
    members = campaign_members(cdir, since)
    with tarfile.open(fileobj=buf, mode='w:gz', compresslevel=6) as tar:
      for rel in members:
        tar.add(os.path.join(cdir, rel), arcname=rel, recursive=False)
    data = buf.getvalue()
    summary['campaign_members'] = len(members)
    summary['campaign_runs_packed'] = sorted({m.split(os.sep)[0] for m in members
                                              if os.sep in m})
    step = limits.part_bytes
    parts = [data[i:i + step] for i in range(0, len(data), step)] or [b'']
    if len(parts) > budget_files:
      log(f'campaign archive is {len(data)} bytes: more than {budget_files} parts; packing the '
          'first runs only is not implemented, so the tail is lost')
      parts = parts[:budget_files]
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


def unpack(src: str, repo: str = ROOT, campaign_dir: str | None = None, log=print) -> dict:
  """Puts a job's returned files in place: the campaign state (each returned run directory
  replaces the local one), ``window.json`` and the log under ``docs/bench/windows/``, the
  regenerated tables and blocks, the compile cache in ``.gpu_cache/`` (git-ignored) for the next
  job. Returns a summary."""
  cdir = os.path.join(repo, campaign_dir or os.path.join('results', 'table1'))
  summary = read_json(os.path.join(src, 'window.json'))
  if summary is None:
    raise FileNotFoundError(f'{src}/window.json missing: not a window\'s returned files')
  parts = sorted(glob.glob(os.path.join(src, 'campaign.tgz.*')),
                 key=lambda p: int(p.rsplit('.', 1)[1]))
  if os.path.exists(os.path.join(src, 'campaign.tgz')):
    parts = [os.path.join(src, 'campaign.tgz')]
  data = b''.join(open(p, 'rb').read() for p in parts)
  replaced = []
  if data:
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
      members = tar.getmembers()
      for m in members:
        if m.name.startswith('/') or '..' in m.name.split('/') or not (m.isfile() or m.isdir()):
          raise ValueError(f'unsafe member in the campaign archive: {m.name}')
      runs = sorted({m.name.split('/')[0] for m in members if '/' in m.name})
      os.makedirs(cdir, exist_ok=True)
      for r in runs:
        shutil.rmtree(os.path.join(cdir, r), ignore_errors=True)
        replaced.append(r)
      safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
      for m in members:
        tar.extract(m, cdir, **safe)
  stamp = summary['start'].replace(':', '').replace('-', '')
  kind = (summary['phases'].get('info', {}).get('result', {}).get('device_kind', 'unknown')
          .replace(' ', '_'))
  bench_dir = os.path.join(repo, 'docs', 'bench', 'windows')
  os.makedirs(bench_dir, exist_ok=True)
  base = os.path.join(bench_dir, f'{stamp}_{kind}')
  summary['device_kind'] = summary['phases'].get('info', {}).get('result', {}).get('device_kind')
  with open(base + '.json', 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  if os.path.exists(os.path.join(src, 'window.log')):
    tail_copy(os.path.join(src, 'window.log'), base + '.log', limit=512 * 1024)
  if os.path.exists(os.path.join(src, 'jax_cache.tgz')):
    os.makedirs(os.path.join(repo, '.gpu_cache'), exist_ok=True)
    shutil.copy(os.path.join(src, 'jax_cache.tgz'), os.path.join(repo, '.gpu_cache'))
  written = []
  if os.path.exists(os.path.join(cdir, 'campaign.json')):
    written = reports.write_reports(cdir, results_md=os.path.join(repo, 'docs', 'results.md'))
  written.append(reports.write_performance_block(repo))
  log(reports.format_window(summary))
  log(f'replaced runs: {replaced}\nwrote {base}.json/.log and {written}')
  return {'replaced': replaced, 'bench': base + '.json', 'written': written}
