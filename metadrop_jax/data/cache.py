"""Prepared-array cache: each data set is decoded once into ``<split>.npy`` files plus a manifest.

Layout::

    <cache_dir>/<dataset>-<key hash>/
        manifest.json     # source kind, path and file fingerprints, shapes, preprocessing version
        train.npy         # uint8 [classes, images, H, W, C]
        val.npy           # (miniImageNet only; Omniglot's val is carved from train at load time)
        test.npy

The directory name hashes (dataset, source kind, resolved source path, preprocessing version), so
a different source or a new preprocessing gets a fresh directory. Inside it the manifest must also
match the source files' fingerprints (size + mtime of every source file), so a source file that was
replaced in place triggers a rebuild. Writes are atomic: every file is written to a temporary name
in the same directory and moved into place with ``os.replace``; the manifest is written last and
removed first on a rebuild, so a directory without a matching manifest is never trusted.

Content check: the manifest records, per split, the CRC-32 of the array's bytes (``crc32``), and
every load recomputes it. zlib's CRC-32 of miniImageNet's 775 MiB train split took 0.33 s on this
project's 2-core CPU (about 1 s when the CPU is shared; ``np.load`` of the file: 0.7-5.9 s),
Omniglot's 72 MiB 0.08 s: cheap enough to check the whole array rather than a sample. It catches every change to the pixels of a cached array (classes or
images replaced, rows swapped, any single-bit or burst error up to 32 bits with certainty, other
changes with probability 1 - 2**-32); it is a check against accidents and disk corruption, not
against deliberate forgery (the source files' sha256 is recorded for provenance). A cache built
before this check existed (no CRC-32 in its manifest) is rebuilt from the source: its arrays
cannot be told intact, and recording the CRC of what is there would bless any damage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import zlib
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

MANIFEST = 'manifest.json'


class DataError(ValueError):
  """Data that is missing, corrupt or not what was expected. The message says what and how to fix."""


def read_error(e: OSError, path=None) -> DataError:
  """A one-line DataError for an OSError met while reading the user's data (source or cache)."""
  path = e.filename or path
  if isinstance(e, PermissionError):
    fix = ('make it readable for this user (e.g. chmod -R a+rX on the data folder) or point '
           '--config.data.path at a readable copy')
  elif isinstance(e, FileNotFoundError):
    fix = 'check --config.data.path (did the data move while being read?)'
  else:
    fix = 'check the file and the disk it is on, or get a fresh copy'
  return DataError(f'{path}: cannot read it ({e.strerror or one_line(e)}); {fix}')


def write_error(e: OSError, directory) -> DataError:
  """A one-line DataError for an OSError met while writing the cache ``directory``."""
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return DataError(f'disk full at {directory} while writing the data cache: free space or set '
                     '--config.data.cache_dir to a folder on another disk')
  return DataError(f'cannot write the data cache {e.filename or directory} ('
                   f'{e.strerror or one_line(e)}): set --config.data.cache_dir to a writable '
                   'folder')


def expand(path) -> Path:
  return Path(os.path.expanduser(os.path.expandvars(str(path)))).resolve()


def sha256_file(path, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()


def fingerprint(paths, sha256: bool = False) -> list[dict]:
  """Size and mtime (and optionally sha256) of every file in ``paths`` (folders are walked).

  Folders are fingerprinted by the sorted list of their files' (relative name, size, mtime), hashed
  into one entry so a manifest stays small even for 60,000 JPEGs.
  """
  out = []
  for p in sorted({expand(p) for p in paths}):
    if p.is_dir():
      h = hashlib.sha256()
      n = total = 0
      for root, dirs, files in os.walk(p, onerror=raise_error):
        dirs.sort()
        for name in sorted(files):
          f = Path(root) / name
          st = f.stat()
          h.update(f'{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
          n += 1
          total += st.st_size
      out.append({'path': str(p), 'kind': 'folder', 'files': n, 'bytes': total,
                  'listing_sha256': h.hexdigest()})
    elif p.is_file():
      st = p.stat()
      e = {'path': str(p), 'kind': 'file', 'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns}
      if sha256:
        e['sha256'] = sha256_file(p)
      out.append(e)
    else:
      raise DataError(f'{p}: source file or folder does not exist')
  return out


def raise_error(e: OSError):
  raise e


def _same_files(a: list[dict], b: list[dict]) -> bool:
  """Fingerprints match, ignoring the (recorded, not re-computed) sha256 fields."""
  strip = lambda fs: [{k: v for k, v in f.items() if k != 'sha256'} for f in fs]
  return strip(a) == strip(b)


def content_crc32(array: np.ndarray) -> str:
  """CRC-32 of an array's C-order bytes, as 8 hex digits (the per-split digest of a manifest)."""
  a = np.ascontiguousarray(array)
  return f'{zlib.crc32(memoryview(a.reshape(-1)).cast("B")) & 0xFFFFFFFF:08x}'


def cache_path(cache_dir, dataset: str, key: Mapping) -> Path:
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  return expand(cache_dir) / f'{dataset}-{digest}'


def _atomic_write_bytes(path: Path, data: bytes) -> None:
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      np.save(f, array, allow_pickle=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def read_manifest(directory: Path):
  try:
    with open(directory / MANIFEST) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _unchecked_splits(manifest) -> list[str]:
  """The splits of a manifest without a CRC-32 (a cache built before the content check)."""
  return sorted(s for s, e in (manifest or {}).get('splits', {}).items()
                if not (isinstance(e, dict) and e.get('crc32')))


def manifest_matches(manifest, key: Mapping, files: list[dict], directory: Path) -> bool:
  if not manifest or manifest.get('key') != dict(key):
    return False
  if not _same_files(manifest.get('source_files', []), files) or _unchecked_splits(manifest):
    return False
  return all((directory / f'{s}.npy').is_file() for s in manifest.get('splits', {}))


def prepare(*, dataset: str, cache_dir, key: Mapping, source_files: Callable[[], list[dict]],
            build: Callable[[], tuple[Mapping[str, np.ndarray], dict]], description: str,
            force: bool = False, log=print) -> tuple[Path, dict]:
  """Returns (cache directory, manifest), building the arrays with ``build()`` when needed.

  ``key``: JSON-able identity of the prepared data (source kind, path, preprocessing version,
  parameters); ``source_files()``: current fingerprints of the source (cheap: size + mtime);
  ``build()``: ``({split: uint8 array}, extra manifest fields)``.
  """
  directory = cache_path(cache_dir, dataset, key)
  try:
    files = source_files()
  except OSError as e:
    raise read_error(e) from e
  manifest = read_manifest(directory)
  if not force and manifest_matches(manifest, key, files, directory):
    return directory, manifest
  created = [d for d in (directory, *directory.parents) if not d.exists()]   # leaf first
  try:
    directory.mkdir(parents=True, exist_ok=True)   # now, so an unwritable cache_dir fails fast
    if (directory / MANIFEST).exists():
      (directory / MANIFEST).unlink()   # a rebuild in progress is never mistaken for a valid cache
  except OSError as e:
    raise write_error(e, directory) from e
  unchecked = _unchecked_splits(manifest) if not force and manifest else []
  if unchecked:
    log(f'{directory / MANIFEST} records no CRC-32 of {", ".join(unchecked)} (a cache built '
        'before the content check): rebuilt from the source, since its arrays cannot be told '
        'intact')
  log(f'preparing {dataset} into {directory} (done once; later runs load the arrays) ...')
  t0 = time.time()
  try:
    # Record sha256 of source files once per build (e.g. the 160 MB miniImageNet zip).
    files = fingerprint([f['path'] for f in files if f['kind'] == 'file'], sha256=True) + [
        f for f in files if f['kind'] != 'file']
    arrays, extra = build()
  except BaseException as e:
    for d in created:            # a build that failed leaves no folder it made behind
      if d.is_dir() and not any(d.iterdir()):
        d.rmdir()
    if isinstance(e, OSError):   # unreadable source files (permissions, I/O errors): name the file
      raise read_error(e) from e
    raise
  seconds = time.time() - t0
  for split, a in arrays.items():
    if a.dtype != np.uint8 or a.ndim != 5:
      raise AssertionError(f'{dataset}/{split}: builder returned {a.dtype} {a.shape}')
  try:
    for split, a in arrays.items():
      _atomic_save_npy(directory / f'{split}.npy', a)
  except OSError as e:
    raise write_error(e, directory) from e
  manifest = {
      'dataset': dataset,
      'key': dict(key),
      'description': description,
      'source_files': files,
      'splits': {s: {'shape': list(a.shape), 'classes': int(a.shape[0]),
                     'images_per_class': int(a.shape[1]), 'dtype': str(a.dtype),
                     'crc32': content_crc32(a)}
                 for s, a in arrays.items()},
      'build_seconds': round(seconds, 2),
      'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      **extra,
  }
  try:
    _atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
  except OSError as e:
    raise write_error(e, directory) from e
  return directory, manifest


def load(directory: Path, manifest: dict, split: str) -> np.ndarray:
  """Loads one prepared split and checks it against the manifest (shape, dtype, CRC-32)."""
  path = directory / f'{split}.npy'
  try:
    a = np.load(path, allow_pickle=False)
  except PermissionError as e:
    raise read_error(e, path) from e
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: cannot read the prepared array ({one_line(e)}); delete {directory} '
                    'to rebuild it') from e
  entry = manifest['splits'][split]
  want = entry['shape']
  if list(a.shape) != want or a.dtype != np.uint8:
    raise DataError(f'{path}: holds {a.dtype} {list(a.shape)}, manifest says uint8 {want}; '
                    f'delete {directory} to rebuild it')
  if not entry.get('crc32'):     # (prepare rebuilds such a cache; here it is refused)
    raise DataError(f'{path}: {directory / MANIFEST} records no CRC-32 of it, so it cannot be '
                    f'told intact; delete {directory} to rebuild it from the source')
  got = content_crc32(a)
  if got != entry['crc32']:
    raise DataError(f'{path}: contents changed since the cache was built (CRC-32 {got}, '
                    f'{MANIFEST} says {entry["crc32"]}): the prepared array was modified or '
                    f'corrupted; delete {directory} to rebuild it from the source')
  return a


def describe(e: BaseException) -> str:
  """``zlib.error``, ``zipfile.BadZipFile``, ``OSError``: the exception's type as a user can look it up."""
  t = type(e)
  return t.__name__ if t.__module__ == 'builtins' else f'{t.__module__}.{t.__name__}'


def one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())


def cache_size_bytes(directory: Path) -> int:
  return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
