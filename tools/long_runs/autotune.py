"""XLA's per-fusion autotune cache of the formulations that name it: the flag, the environment of
a process that uses it, and its way from one GPU job to the next.

A compile looks every fusion up in the cache first, before it autotunes or, under deterministic
ops, takes the first candidate; a compile that autotunes (no deterministic ops) writes what it
chose (XLA's docs/persisted_autotuning.md; the flag in xla/debug_options_flags.cc). So a cache
filled once without deterministic ops lets deterministic compiles use tuned kernels.

Between jobs: the job packs the folder into ``$OUT/autotune_cache.tgz`` (records.pack_cache),
unpacking keeps it as ``.gpu_cache/autotune_cache.tgz`` beside the jax version and card it was
tuned with (``autotune_cache.json``), tools/long_runs/device_window.sh unpacks it into
:data:`CACHE_DIR` on the next machine, and the job there empties the folder if either differs
(tile configs are valid for one XLA version and one card).
"""

from __future__ import annotations

import json
import os
import shutil

from tools.long_runs.procs import copy_atomic, read_json, write_atomic

CACHE_DIR = os.environ.get('METADROP_AUTOTUNE_CACHE_DIR', '/tmp/metadrop_autotune_cache')
FLAG = '--xla_gpu_per_fusion_autotune_cache_dir'
CACHE = f'{FLAG}={CACHE_DIR}'         # the XLA flag of a formulation that uses it
ARCHIVE = 'autotune_cache.tgz'
META = 'autotune_cache.json'


def named_cache(flags: str) -> str | None:
  """The autotune cache folder that XLA flags name, or None."""
  for f in flags.split():
    if f.startswith(FLAG + '='):
      return f.split('=', 1)[1]
  return None


def xla_env(flags: str) -> dict:
  """The environment entries of a process that runs under XLA_FLAGS ``flags``. Where the flags
  name an autotune cache (created here: XLA wants it to exist), jax is told not to replace it:
  with a compilation cache (JAX_COMPILATION_CACHE_DIR) jax points XLA's autotune cache at a
  folder inside that one (``jax_persistent_cache_enable_xla_caches``, on by default:
  jax/_src/compiler.py, get_compile_options), which would hide the folder the flags name."""
  env = {'XLA_FLAGS': flags}
  cache = named_cache(flags)
  if cache:
    os.makedirs(cache, exist_ok=True)
    env['JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'] = 'none'
  return env


def identity(jax_version: str, device_kind: str) -> dict:
  """What a cache's tile configs are valid for."""
  return {'jax': jax_version, 'device_kind': device_kind}


def check(folder: str, meta_path: str, ident: dict, log=print) -> int:
  """Empties the autotune cache ``folder`` (unpacked from the last job) when the job that tuned
  it (``meta_path``) ran another jax version or card than this one (``ident``); returns how
  many entries are left for this job."""
  if not os.path.isdir(folder):
    return 0
  names = os.listdir(folder)
  meta = read_json(meta_path)
  if names and meta is not None and meta != ident:
    log(f'autotune cache: tuned with {meta}, this job runs {ident}: emptied')
    for n in names:
      path = os.path.join(folder, n)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return 0
  return len(names)


def keep(src: str, repo: str, ident: dict) -> bool:
  """A returned :data:`ARCHIVE` into ``.gpu_cache/`` beside the jax version and card it was
  tuned with (:data:`META`); False when the job brought none back."""
  archive = os.path.join(src, ARCHIVE)
  if not os.path.exists(archive):
    return False
  os.makedirs(os.path.join(repo, '.gpu_cache'), exist_ok=True)
  copy_atomic(archive, os.path.join(repo, '.gpu_cache', ARCHIVE))
  write_atomic(os.path.join(repo, '.gpu_cache', META), json.dumps(ident))
  return True
