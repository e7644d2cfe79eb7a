"""A training workdir: its run config, checkpoints, run log and provenance; the data splits a run
reads, checked against the config.

Layout: ``config.json`` (the run's config; a resumed run refuses one that would change its
results), ``checkpoints/<step>/`` (orbax, written synchronously), ``runs.jsonl`` (one line per
sitting), ``metrics.jsonl`` + ``tb/`` (:class:`metrics.MetricWriter`), ``results*.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from metadrop_jax import config as config_lib
from metadrop_jax import data as data_lib
from metadrop_jax import keys as keys_lib
from metadrop_jax import meta
from metadrop_jax import metrics as metrics_lib

# Fields that may change between sittings of one run without changing its results.
LOOP_FIELDS = ('max_steps_per_run', 'max_minutes_per_run', 'progress_bar', 'log_every',
               'val_every', 'checkpoint_every', 'keep_checkpoints', 'num_steps', 'eval',
               'data.cache_dir', 'data.path', 'data.ilsvrc_path', 'data.source', 'data.sampler',
               'model.conv_impl', 'name')


def flatten(d: dict) -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  return traverse_util.flatten_dict(d, sep='.')


# ------------------------------------------------------------------------------------------------
# run config
# ------------------------------------------------------------------------------------------------

def check_or_write_run_config(workdir: str, config) -> None:
  """Stores config.json; on resume refuses a config that would change the run's results."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    a, b = flatten(stored), flatten(current)
    ignore = lambda k: any(k == f or k.startswith(f + '.') for f in LOOP_FIELDS)
    diff = sorted(k for k in set(a) | set(b) if not ignore(k) and a.get(k) != b.get(k))
    if diff:
      lines = [f'    {k}: workdir has {a.get(k)!r}, now {b.get(k)!r}' for k in diff]
      raise config_lib.ConfigError(
          f'{workdir} holds a run with a different config; resuming would mix two '
          'experiments:\n' + '\n'.join(lines) + '\n  Use a new --workdir, or the same config.')
  metrics_lib.write_json_atomic(path, current)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json over the current defaults)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not a training workdir '
                            '(train first with launch.py --config=... --workdir=...)')
  with open(path) as f:
    cfg = config_lib.base_config()
    cfg.update_from_flattened_dict(flatten(json.load(f)))
  return cfg


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=opts)


def restore_latest(mgr: ocp.CheckpointManager, template: meta.TrainState):
  """The latest checkpoint restored into ``template``'s structure, or None if there is none."""
  step = mgr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  try:
    restored = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f'checkpoint {mgr.directory}/{step} cannot be restored into this config ({e}). It was '
        'written by a different method or model size; use a fresh --workdir, or the config that '
        'wrote it (workdir/config.json).') from e
  return meta.TrainState(*restored)


def restore(workdir: str, config=None) -> tuple[Any, meta.TrainState]:
  """(config, latest TrainState) of a training workdir; config defaults to its config.json."""
  config = config or load_run_config(workdir)
  config_lib.validate(config)
  init_key, _ = keys_lib.run_keys(config)
  template, _ = meta.create_state(init_key, config)
  state = restore_latest(checkpoint_manager(workdir, config), template)
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first '
                            f'(launch.py --config=... --workdir={workdir})')
  return config, state


# ------------------------------------------------------------------------------------------------
# run log and provenance
# ------------------------------------------------------------------------------------------------

def provenance() -> dict:
  """Commit, jax version and device of this process (stored with every sitting and result)."""
  # METADROP_COMMIT: set where the code runs from a copy without .git (a GPU window's device)
  commit = os.environ.get('METADROP_COMMIT', '')
  try:
    commit = commit or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                                      capture_output=True, text=True,
                                      cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    commit = ''
  dev = jax.devices()[0]
  return {'commit': commit or 'unknown', 'jax': jax.__version__, 'backend': jax.default_backend(),
          'device': getattr(dev, 'device_kind', str(dev)), 'device_count': jax.device_count()}


def append_run_log(workdir: str, row: dict) -> None:
  with open(os.path.join(workdir, 'runs.jsonl'), 'a') as f:
    f.write(json.dumps(row) + '\n')


# ------------------------------------------------------------------------------------------------
# data splits of a run
# ------------------------------------------------------------------------------------------------

def check_split(images, config, split: str) -> None:
  """Refuses a split too small for the config's episodes, naming the knob to lower."""
  if images.shape[0] < config.way:
    raise ValueError(f'{split} split has {images.shape[0]} classes; a {config.way}-way task '
                     'needs at least that many (lower --config.way)')
  if images.shape[1] < config.shot + config.query:
    raise ValueError(f'{split} split has {images.shape[1]} images per class; shot+query = '
                     f'{config.shot + config.query} (lower --config.query or --config.shot)')


def require_split(config, split: str):
  """The split's images; a clear error if the data set has no such split with this config."""
  images = data_lib.load_split(config.data, split)
  if images is None:
    raise ValueError(f'data set {config.data.name} has no {split!r} split with this config')
  return images


def load_eval_split(config, split: str):
  """:func:`require_split`, checked against the config's episode shape."""
  images = require_split(config, split)
  check_split(images, config, split)
  return images
