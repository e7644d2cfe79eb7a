"""What a GPU job brings back besides the campaign's state: the newest entries of the sittings'
compile cache (packed on the GPU machine; XLA's autotune cache too: tools/long_runs/autotune.py),
and, unpacked here, its formulation timings and the profile tables of its traces beside the job's
record in docs/bench/windows/."""

from __future__ import annotations

import io
import json
import os
import tarfile

from tools.long_runs.procs import ROOT, copy_atomic, read_json, write_atomic


def pack_cache(cache_dir: str, dest: str, limit: int) -> int:
  """The compile cache's newest entries, as many as fit in ``limit`` bytes compressed, into the
  archive ``dest``; returns how many. The campaign's sittings are the only ones compiling into
  this cache (the measuring phases have their own), so next time the sittings start compiled;
  an entry left out is compiled again and, being new then, comes back."""
  names = sorted(os.listdir(cache_dir), key=lambda n: -os.path.getmtime(os.path.join(cache_dir, n)))
  n = len(names)
  while n > 0:
    data = _tgz_bytes(cache_dir, names[:n])
    if len(data) <= limit:
      write_atomic(dest, data)
      return n
    n = min(n - 1, int(n * limit / len(data)))
  return 0


def _tgz_bytes(folder: str, names: list) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w:gz', compresslevel=1) as tar:
    for name in names:
      tar.add(os.path.join(folder, name), arcname=name)
  return buf.getvalue()


def store_measurements(src: str, base: str) -> list[str]:
  """Beside a job's record ``<base>.json``: its formulations timings
  (``<base>_formulations.json``, what later jobs read to skip measured cells) and the profile
  tables of its traces (``<base>_profiles.json``, parsed here from ``traces.tgz``; the traces
  themselves are not kept)."""
  import importlib.util
  import tempfile
  out = []
  form = read_json(os.path.join(src, 'formulations.json'))
  if form is not None:
    copy_atomic(os.path.join(src, 'formulations.json'), base + '_formulations.json')
    out.append(base + '_formulations.json')
  traces = os.path.join(src, 'traces.tgz')
  if form is None or not os.path.exists(traces):
    return out
  spec = importlib.util.spec_from_file_location(
      'profile_step', os.path.join(ROOT, 'benchmarks', 'profile_step.py'))
  profile_step = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(profile_step)
  wall = {r['cell']: r['ms_per_iter_pipelined'] / 1e3 for r in form.get('rows', [])
          if 'error' not in r}
  profiles = {}
  with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(traces, 'r:gz') as tar:
      tar.extractall(tmp, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    for cell in sorted(os.listdir(os.path.join(tmp, 'traces'))):
      try:
        profiles[cell] = profile_step.parse(os.path.join(tmp, 'traces', cell), 3, wall.get(cell))
        profiles[cell]['trace'] = f'traces.tgz: traces/{cell}'
      except (OSError, ValueError) as e:
        profiles[cell] = {'error': repr(e)}
  write_atomic(base + '_profiles.json', json.dumps(
      {'config': form.get('config'), 'method': form.get('method'), 'device': form.get('device'),
       'jax': form.get('jax'), 'profiles': profiles}, indent=1))
  out.append(base + '_profiles.json')
  return out
