r"""Copies what a finished training workdir's results rest on into a small folder that can be
committed: config, metrics, sittings log, results, per-episode accuracies and the latest
checkpoint (with its SHA-256), nothing else (no TensorBoard events, older checkpoints, lock).

The copy is itself a workdir: ``python launch.py --mode=eval --workdir=OUT`` restores and
meta-tests it.

  python -m metadrop_jax.cli.publish --workdir=workdirs/method_study/authors/maml \
      --out=results/method_study/authors/maml
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile

# Files of a workdir that a published copy keeps (fnmatch patterns, top level only).
KEPT_FILES = ('config.json', 'metrics.jsonl', 'runs.jsonl', 'results*.json', 'episode_accs_*.npy',
              'metrics_window.json')


def latest_checkpoint(workdir: str) -> int | None:
  """The highest step under ``workdir/checkpoints`` whose folder orbax finished writing."""
  root = os.path.join(workdir, 'checkpoints')
  steps = [int(d) for d in (os.listdir(root) if os.path.isdir(root) else []) if d.isdigit()
           and os.path.exists(os.path.join(root, d, 'commit_success.txt'))]
  return max(steps) if steps else None


def kept_files(names) -> list[str]:
  """The names among ``names`` that a published copy keeps (:data:`KEPT_FILES`), sorted."""
  return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in KEPT_FILES))


def publish(workdir: str, out: str) -> dict:
  """Copies ``workdir``'s kept files and latest checkpoint to ``out`` (replacing it as a whole,
  through a temporary sibling folder and a rename). Returns ``{'step', 'files', 'bytes'}``."""
  step = latest_checkpoint(workdir)
  if step is None:
    raise FileNotFoundError(f'no finished checkpoint in {workdir}/checkpoints: nothing to publish')
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.publish_', dir=parent)
  try:
    files = kept_files(f for f in os.listdir(workdir) if os.path.isfile(os.path.join(workdir, f)))
    for name in files:
      shutil.copy2(os.path.join(workdir, name), os.path.join(tmp, name))
    shutil.copytree(os.path.join(workdir, 'checkpoints', str(step)),
                    os.path.join(tmp, 'checkpoints', str(step)))
    hashes_path = os.path.join(workdir, 'checkpoint_hashes.json')
    if os.path.exists(hashes_path):
      with open(hashes_path) as f:
        hashes = json.load(f)
      if str(step) in hashes:
        with open(os.path.join(tmp, 'checkpoint_hashes.json'), 'w') as f:
          json.dump({str(step): hashes[str(step)]}, f, indent=2, sort_keys=True)
        files.append('checkpoint_hashes.json')
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(tmp) for n in ns)
    old = None
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix='.replaced_', dir=parent)
      os.rename(out, os.path.join(old, 'x'))
    os.rename(tmp, out)
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'step': step, 'files': sorted(files), 'bytes': size}
