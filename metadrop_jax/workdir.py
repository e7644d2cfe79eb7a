"""A training workdir: its run config, checkpoints, run log and provenance; the data splits a run
reads, checked against the config.

Layout: ``config.json`` (the run's config, written once the data checks pass; a resumed run,
or an evaluation, refuses one that would change its results), ``checkpoints/<step>/`` (orbax,
written synchronously, only from finite states) with their SHA-256 in
``checkpoint_hashes.json``, ``metrics_window.json`` (the metrics since the last logged row, at
the last checkpoint), ``data.json`` (shape and CRC-32 of the splits it trains on: a later
sitting on other data is refused), ``runs.jsonl`` (one line per sitting), ``metrics.jsonl`` +
``tb/`` (:class:`metrics.MetricWriter`), ``results*.json`` with ``episode_accs_*.npy``, and
``.lock`` (held by the run using it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from metadrop_jax import config as config_lib
from metadrop_jax import data as data_lib
from metadrop_jax import keys as keys_lib
from metadrop_jax import meta
from metadrop_jax import metrics as metrics_lib

# Fields that may change between sittings of one run (and at evaluation) without changing its
# results (the model.* ones are execution strategies, equal to float32 rounding:
# tests/test_fast_paths.py). data.sampler is not one: the host and device samplers draw different episodes.
LOOP_FIELDS = ('max_steps_per_run', 'max_minutes_per_run', 'progress_bar', 'log_every',
               'val_every', 'checkpoint_every', 'keep_checkpoints', 'num_steps', 'eval',
               'data.cache_dir', 'data.path', 'data.ilsvrc_path', 'data.source',
               'model.conv_impl', 'model.pool_impl', 'model.fuse_noise_conv', 'model.task_map',
               'model.inner_loop', 'model.dot_algorithm', 'model.bn_impl', 'name')


class WorkdirError(RuntimeError):
  """A workdir that cannot be used as asked; the message says why and what to do."""


def prepare(workdir: str) -> bool:
  """Creates ``workdir``; refuses a path that is a file or cannot be made. Returns whether it was
  created now (:func:`remove_if_unused` takes it away again after a run that did not start)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a folder: choose another path')
  existed = os.path.isdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM):
      raise      # the launcher names these (read-only, disk full, permission)
    raise WorkdirError(f'--workdir={workdir} cannot be created ({e.strerror}: {e.filename}): '
                       'choose a path under an existing folder') from e
  return not existed


def remove_if_unused(workdir: str) -> None:
  """Removes a workdir that a run created and left with nothing but its (empty) lock file: a run
  that stopped before it started (missing data, a bad config) leaves no trace."""
  try:
    names = os.listdir(workdir)
    if names == ['.lock'] and os.path.getsize(os.path.join(workdir, '.lock')) == 0:
      os.remove(os.path.join(workdir, '.lock'))
    if not os.listdir(workdir):
      os.rmdir(workdir)
  except OSError:
    pass       # in use, or already gone: leave it


@contextlib.contextmanager
def locked(workdir: str):
  """Holds ``workdir/.lock`` (an exclusive flock) for one run; a second run on the same workdir
  stops at once instead of interleaving checkpoints and logs."""
  path = os.path.join(workdir, '.lock')
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or '?'
      raise WorkdirError(f'{workdir} is in use by another run (pid {holder}); wait for it to '
                         'finish or use another --workdir') from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(workdir: str) -> str | None:
  """The pid of the run that holds ``workdir/.lock`` now (as :func:`locked` wrote it; '?' if it
  is not readable), or None when no run holds it."""
  try:
    f = open(os.path.join(workdir, '.lock'))
  except OSError:
    return None
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
      return f.read().strip() or '?'
    fcntl.flock(f, fcntl.LOCK_UN)
  return None


def identity(workdir: str) -> tuple[int, int]:
  """(device, inode) of ``workdir``: :func:`check_intact` compares it later."""
  st = os.stat(workdir)
  return st.st_dev, st.st_ino


def check_intact(workdir: str, ident: tuple[int, int]) -> None:
  """Refuses to write on when ``workdir`` was deleted or replaced (another folder at its path)
  since :func:`identity` gave ``ident``, or lost its config.json: writing on would re-create
  parts of a run (a checkpoint folder, a run log) without its config, metrics or events."""
  try:
    same = identity(workdir) == ident
  except OSError:
    same = False
  if not same:
    raise WorkdirError(f'{workdir} was deleted or replaced while this run trained: nothing more '
                       'is written there (the steps since its last checkpoint are lost); rerun '
                       'the command to train afresh, or restore the workdir from a copy first')
  if not os.path.exists(os.path.join(workdir, 'config.json')):
    raise WorkdirError(f'{workdir}/config.json was deleted while this run trained: nothing more '
                       'is written there; restore config.json from a copy of the workdir and '
                       'rerun to resume')


def ensure_writable(workdir: str) -> None:
  """Refuses a workdir this process cannot write (before a long evaluation, not after it)."""
  probe = os.path.join(workdir, f'.write_probe.{os.getpid()}')
  try:
    with open(probe, 'w') as f:
      f.write('')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'{workdir} is not writable ({e.strerror}): the results could not be '
                       'saved; copy the workdir somewhere writable or fix its permissions') from e


def flatten(d: dict) -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  return traverse_util.flatten_dict(d, sep='.')


# ------------------------------------------------------------------------------------------------
# run config
# ------------------------------------------------------------------------------------------------

def _stored_config(workdir: str) -> dict | None:
  """workdir/config.json as a dict (None if absent); a ConfigError naming the file if unreadable."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(
        f'{path} is not a readable config ({e}). Restore it from a copy of the workdir, or move '
        'it away to start the run afresh in this workdir.') from e
  if not isinstance(stored, dict):
    raise config_lib.ConfigError(f'{path} is not a config (a JSON object was expected)')
  return _upgrade(stored)


# What 'auto' (or a missing field) meant in a config.json written before runs recorded the
# values their 'auto' fields resolved to (meta.resolve_auto): the rules such runs were resumed
# and evaluated with until then, on the backend of the process reading it (as they were applied
# then). On the CPU they never changed: every committed CPU run in results/ holds 'auto' and
# reads as im2col, reduce_window and vmap, what it trained with (tests/test_train.py checks each
# one). (On a GPU, 'auto' meant lax.conv before 2026-12-04; no committed run says 'auto' there.)
LEGACY_AUTO = {
    'model.conv_impl': lambda backend: 'im2col',
    'model.pool_impl': lambda backend: 'reduce_window' if backend == 'cpu' else 'select',
    'model.task_map': lambda backend: 'vmap',
}


def _upgrade(stored: dict) -> dict:
  """A config.json written by an earlier version in today's form: ``meta_lr`` became one field
  (it was ``meta_lr``, None meaning ``meta_lr_by_method[method]``: the rate the run trained
  with); ``data.omniglot_split`` did not exist (every such run used 'vinyals'); an 'auto' (or
  missing) execution field is what it resolved to then (:data:`LEGACY_AUTO`)."""
  by_method = stored.pop('meta_lr_by_method', None)
  if by_method is not None and stored.get('meta_lr') is None:
    stored['meta_lr'] = by_method.get(stored.get('method'))
  if isinstance(stored.get('data'), dict):   # written before data.omniglot_split existed
    stored['data'].setdefault('omniglot_split', 'vinyals')
  model = stored.get('model')
  if isinstance(model, dict):
    for field, rule in LEGACY_AUTO.items():
      name = field.split('.', 1)[1]
      if model.get(name, 'auto') == 'auto':
        model[name] = rule(jax.default_backend())
  return stored


def run_config(workdir: str, config) -> ml_collections.ConfigDict:
  """``config`` with its 'auto' execution fields resolved for the run in ``workdir``
  (:func:`meta.resolve_auto`): a run keeps what its config.json records (so a resumed or
  evaluated run computes what it trained with, bit for bit), a new run gets today's rules on
  this backend, and its config.json then records the values (:func:`write_run_config`)."""
  stored = _stored_config(workdir)
  return meta.resolve_auto(config, flatten(stored) if stored else None)


def check_run_config(workdir: str, config, doing: str = 'resuming') -> None:
  """Refuses ``config`` when the workdir's config.json differs in a field that changes results
  (any field but :data:`LOOP_FIELDS`); nothing to check in a workdir without one."""
  stored = _stored_config(workdir)
  if stored is None:
    ckpt = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
      raise config_lib.ConfigError(
          f'{workdir} has checkpoints but no config.json: the config they were trained with is '
          'unknown, and training on would record this one for the whole run. Restore '
          'config.json from a copy of the workdir (runs.jsonl names the commit that wrote it), '
          'or use a fresh --workdir.')
    return
  a, b = flatten(stored), flatten(json.loads(config.to_json_best_effort()))
  ignore = lambda k: any(k == f or k.startswith(f + '.') for f in LOOP_FIELDS)
  diff = sorted(k for k in set(a) | set(b) if not ignore(k) and a.get(k) != b.get(k))
  if diff:
    shown = '; '.join(f'{k}: workdir has {a.get(k)!r}, now {b.get(k)!r}' for k in diff[:4])
    more = f'; and {len(diff) - 4} more' if len(diff) > 4 else ''
    raise config_lib.ConfigError(
        f'{workdir} holds a run with a different config ({shown}{more}); {doing} would mix two '
        'experiments: use a new --workdir, or the workdir\'s config (leave out --config to use '
        'its config.json)')


def write_run_config(workdir: str, config) -> None:
  metrics_lib.write_json_atomic(os.path.join(workdir, 'config.json'),
                                json.loads(config.to_json_best_effort()))


def check_num_steps(workdir: str, config, step: int) -> str | None:
  """A ``num_steps`` below the step of the checkpoint a run resumes from is refused (the run is
  past it; nothing is written); one lower than config.json's but not below the checkpoint is
  returned as a message to say (the run now ends there, and config.json records it)."""
  stored = (_stored_config(workdir) or {}).get('num_steps')
  if step > config.num_steps:
    raise config_lib.ConfigError(
        f'num_steps={config.num_steps} is below the step of {workdir}\'s checkpoint ({step}; '
        f'config.json says num_steps={stored}): the run is past it and nothing was changed; '
        f'evaluate that checkpoint (launch.py --mode=eval --workdir={workdir}), or give '
        f'--config.num_steps={stored if isinstance(stored, int) and stored >= step else step} '
        'or more to train on')
  if isinstance(stored, int) and config.num_steps < stored:
    return (f'num_steps lowered from {stored} to {config.num_steps}: this run now ends at step '
            f'{config.num_steps} (config.json records it; a later --config.num_steps={stored} '
            'continues it)')
  return None


def check_or_write_run_config(workdir: str, config) -> None:
  """:func:`check_run_config`, then stores config.json (its 'auto' fields resolved:
  :func:`run_config`)."""
  check_run_config(workdir, config)
  write_run_config(workdir, run_config(workdir, config))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json over the current defaults)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a training workdir')
  stored = _stored_config(workdir)
  if stored is None:
    path = os.path.join(workdir, 'config.json')
    if os.path.isdir(os.path.join(workdir, 'checkpoints')):
      raise FileNotFoundError(f'{path} not found, but {workdir} has checkpoints: restore its '
                              'config.json from a copy of the workdir (or git checkout -- '
                              f'{path}); the checkpoints cannot be read without it')
    raise FileNotFoundError(f'{path} not found: {workdir} is not a training workdir (train '
                            'first with launch.py --config=... --workdir=...)')
  cfg = config_lib.base_config()
  try:
    cfg.update_from_flattened_dict(flatten(stored))
  except (KeyError, TypeError, ValueError) as e:
    raise config_lib.ConfigError(f'{workdir}/config.json does not fit this version\'s config '
                                 f'({e}); evaluate it with the commit that wrote it '
                                 '(runs.jsonl names it)') from e
  return cfg


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=opts)


_HASHES = 'checkpoint_hashes.json'


def _checkpoint_digest(step_dir: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in sorted(files):
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
          h.update(chunk)
      out[os.path.relpath(path, step_dir)] = h.hexdigest()
  return out


def _checkpoint_bytes(mgr: ocp.CheckpointManager, state) -> int:
  """About what one more checkpoint takes on disk: the newest one's blocks, or (none yet) twice
  the state's bytes and the metadata orbax writes beside them."""
  latest = mgr.latest_step()
  if latest is not None:
    step_dir = os.path.join(str(mgr.directory), str(latest))
    return sum(os.stat(os.path.join(r, f)).st_blocks * 512
               for r, _, fs in os.walk(step_dir) for f in fs)
  return 2 * sum(getattr(x, 'nbytes', 0) for x in jax.tree.leaves(state)) + (256 << 10)


def save_checkpoint(mgr: ocp.CheckpointManager, workdir: str, step: int, state) -> None:
  """Saves ``state`` at ``step`` (synchronously) and records the files' SHA-256, so a later
  restore can tell a truncated or altered checkpoint from an intact one. A checkpoint that does
  not fit on the disk is refused before anything is written (orbax's threads would each log a
  traceback of the full disk and leave a half-written folder)."""
  usage, need = shutil.disk_usage(workdir), _checkpoint_bytes(mgr, state)
  if usage.total and usage.free < need:      # (a file system that reports no sizes: not judged)
    raise OSError(errno.ENOSPC, f'No space left on device (checkpoint {step} needs about '
                  f'{need >> 10} KiB, {usage.free >> 10} KiB are free)', workdir)
  try:
    mgr.save(step, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()
  except BaseException:
    # a save that failed (a full disk) leaves no half-written temporary folder taking space
    pattern = os.path.join(glob.escape(str(mgr.directory)), f'{step}.orbax-checkpoint-tmp*')
    for tmp in glob.glob(pattern):
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  path = os.path.join(workdir, _HASHES)
  hashes = _read_hashes(workdir)
  kept = {str(s) for s in mgr.all_steps()}
  hashes = {s: h for s, h in hashes.items() if s in kept}
  hashes[str(step)] = _checkpoint_digest(os.path.join(mgr.directory, str(step)))
  metrics_lib.write_json_atomic(path, hashes)


def _read_hashes(workdir: str) -> dict:
  """The recorded checkpoint hashes ({} if the file does not exist). An unreadable file is an
  error: reading it as empty would switch verification off and the next save would drop the
  hashes of the older checkpoints."""
  path = os.path.join(workdir, _HASHES)
  if not os.path.exists(path):
    return {}
  hashes = metrics_lib.read_json_object(path)
  if isinstance(hashes, str):
    raise WorkdirError(f'{path} is unreadable ({hashes}): the checkpoints cannot be verified. '
                       'Restore it from a copy of the workdir, or move it away to resume without '
                       'verifying the existing checkpoints.')
  return hashes


def _mismatch(step_dir: str, recorded: dict) -> str | None:
  now = _checkpoint_digest(step_dir)
  bad = sorted(f for f in set(recorded) | set(now) if recorded.get(f) != now.get(f))
  return (f'{len(bad)} of its files are missing or differ from what was written '
          f'({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})') if bad else None


def _damage(mgr, workdir: str | None, step: int) -> str | None:
  """Why checkpoint ``step`` cannot be trusted (files missing, truncated or altered since they
  were written), or None. Checkpoints without recorded hashes are not judged here."""
  if workdir is None:
    return None
  recorded = _read_hashes(workdir).get(str(step))
  if recorded is None:
    return None
  return _mismatch(os.path.join(mgr.directory, str(step)), recorded)


def checkpoint_problem(workdir: str, step: int) -> str | None:
  """Why ``workdir/checkpoints/<step>`` cannot be trusted as a copy of what training wrote: no
  SHA-256 recorded for it, an unreadable checkpoint_hashes.json, or files missing, truncated or
  altered; None when it matches. (For copies brought from elsewhere, which must be verified.)"""
  try:
    recorded = _read_hashes(workdir).get(str(step))
  except WorkdirError as e:
    return str(e)
  if not isinstance(recorded, dict):
    return f'no SHA-256 of its files is recorded in {os.path.join(workdir, _HASHES)}'
  return _mismatch(os.path.join(workdir, 'checkpoints', str(step)), recorded)


def restore_latest(mgr: ocp.CheckpointManager, template: meta.TrainState,
                   workdir: str | None = None, set_aside: bool = False):
  """The newest intact checkpoint restored into ``template``'s structure, or None if there is
  none. A damaged checkpoint (hash mismatch, or orbax cannot read it) is skipped, with a warning,
  for the one before it; ``set_aside`` then moves the damaged ones to
  ``workdir/damaged_checkpoints/`` so that the resumed run can write those steps again. When no
  checkpoint can be restored nothing is moved (they may belong to another config)."""
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    return None
  if workdir is not None and not os.path.exists(os.path.join(workdir, _HASHES)):
    warnings.warn(f'{workdir}: no {_HASHES}: checkpoints {sorted(steps)} are restored without '
                  'verifying their files', RuntimeWarning)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  problems, damaged = [], []
  for step in steps:
    problem = _damage(mgr, workdir, step)
    if problem is None:
      try:
        restored = meta.TrainState(*mgr.restore(step, args=ocp.args.StandardRestore(abstract)))
      except Exception as e:  # pylint: disable=broad-except
        problem = f'orbax cannot read it ({type(e).__name__}: {str(e)[:300]})'
    if problem is not None:
      problems.append(f'checkpoint {step} is damaged: {problem}')
      damaged.append(step)
      continue
    if damaged and set_aside and workdir is not None:
      for bad in damaged:
        dest = os.path.join(workdir, 'damaged_checkpoints', f'{bad}.{int(time.time())}')
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(os.path.join(mgr.directory, str(bad)), dest)
        problems.append(f'moved {bad} to {dest}')
      mgr.reload()
    if problems:
      warnings.warn(f'{mgr.directory}: ' + '; '.join(problems) + f'. Resuming from the intact '
                    f'checkpoint {step}.', RuntimeWarning)
    return restored
  raise WorkdirError(
      f'no checkpoint in {mgr.directory} can be restored ({"; ".join(problems)}): if every one '
      'fails to fit, the workdir was written by another config or version; use a fresh '
      '--workdir, or the config and commit that wrote it (config.json, runs.jsonl)')


def restore(workdir: str, config=None) -> tuple[Any, meta.TrainState]:
  """(config, latest intact TrainState) of a training workdir. ``config`` defaults to the
  workdir's config.json; a given one must not differ from it in a field that changes results."""
  if not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is ' + ('a file, not a training workdir'
                       if os.path.exists(workdir) else 'not there: train first'))
  if config is None:
    config = load_run_config(workdir)
  else:
    check_run_config(workdir, config, doing='evaluating it with this config')
    config = run_config(workdir, config)
  config_lib.validate(config)
  init_key, _ = keys_lib.run_keys(config)
  template, _ = meta.create_state(init_key, config)
  state = None
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):   # (a manager would make the folder)
    state = restore_latest(checkpoint_manager(workdir, config), template, workdir)
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first '
                            f'(launch.py --config=... --workdir={workdir})')
  return config, state


def all_finite(tree) -> bool:
  """Whether every leaf of ``tree`` is finite (one reduction on the device)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return bool(jnp.all(jnp.stack(leaves))) if leaves else True


_WINDOW = 'metrics_window.json'


def save_metrics_window(workdir: str, step: int, window: list) -> None:
  """The per-step metrics logged since the last metrics row, at checkpoint ``step``: a resumed
  run starts its first row's average from them, as an uninterrupted run would."""
  rows = [{k: float(v) for k, v in m.items()} for m in jax.device_get(window)]
  metrics_lib.write_json_atomic(os.path.join(workdir, _WINDOW), {'step': int(step), 'rows': rows})


def load_metrics_window(workdir: str, step: int) -> list:
  """The window saved with checkpoint ``step`` (float32 scalars), or [] if there is none. A file
  that cannot be read, or that is older than the checkpoint (a run killed between the two
  writes), is [] with a warning: the first metrics row after the resume then averages fewer
  steps than an uninterrupted run's. (A newer one is of a damaged checkpoint that the restore
  skipped, with its own warning.)"""
  path = os.path.join(workdir, _WINDOW)
  if step == 0 or not os.path.exists(path):
    return []
  saved = metrics_lib.read_json_object(path)
  if isinstance(saved, str):
    problem = f'is unreadable ({saved})'
  elif not isinstance(saved.get('step'), int) or not isinstance(saved.get('rows', []), list):
    problem = 'is not a metrics window'
  elif saved['step'] > step:
    return []
  elif saved['step'] < step:
    problem = f'is of step {saved["step"]}, older than the checkpoint resumed from'
  else:
    try:
      return [{k: np.float32(v) for k, v in m.items()} for m in saved.get('rows', [])]
    except (AttributeError, TypeError, ValueError) as e:
      problem = f'holds rows that are not metrics ({e})'
  warnings.warn(f'{path} {problem}: the metrics logged since the last row before step {step} '
                'are lost, so the first row after this resume averages only the steps from '
                f'{step + 1} on; training goes on (the checkpoint is intact)', RuntimeWarning)
  return []


# ------------------------------------------------------------------------------------------------
# run log and provenance
# ------------------------------------------------------------------------------------------------

def git_commit(path: str = os.path.dirname(os.path.abspath(__file__))) -> str:
  """The short commit of the git checkout that holds ``path``, read from its ``.git`` (HEAD, the
  ref it names, packed-refs; worktrees too) without running git; '' outside a checkout."""
  d = os.path.abspath(path)
  while not os.path.exists(os.path.join(d, '.git')):
    if os.path.dirname(d) == d:
      return ''
    d = os.path.dirname(d)
  git = os.path.join(d, '.git')
  try:
    if os.path.isfile(git):                 # a worktree: "gitdir: <its folder>"
      with open(git) as f:
        git = os.path.join(d, f.read().split('gitdir:', 1)[1].strip())
    common = git
    if os.path.isfile(os.path.join(git, 'commondir')):
      with open(os.path.join(git, 'commondir')) as f:
        common = os.path.join(git, f.read().strip())
    with open(os.path.join(git, 'HEAD')) as f:
      head = f.read().strip()
    if head.startswith('ref:'):
      ref, head = head.split(':', 1)[1].strip(), ''
      for base in (git, common):
        if os.path.isfile(os.path.join(base, ref)):
          with open(os.path.join(base, ref)) as f:
            head = f.read().strip()
          break
      else:
        with open(os.path.join(common, 'packed-refs')) as f:
          head = next((l.split()[0] for l in f if l.rstrip().endswith(' ' + ref)), '')
  except (OSError, IndexError):
    return ''
  return head[:7] if re.fullmatch('[0-9a-f]{40}', head) else ''


def provenance() -> dict:
  """Commit, jax version and device of this process (stored with every sitting and result). The
  commit is the checkout's when this module was imported: the code the process loaded, even when
  the checkout moves on while a long run trains."""
  commit = _COMMIT_AT_IMPORT
  dev = jax.devices()[0]
  return {'commit': commit or 'unknown', 'jax': jax.__version__, 'backend': jax.default_backend(),
          'device': getattr(dev, 'device_kind', str(dev)), 'device_count': jax.device_count()}


# METADROP_COMMIT: set where the code runs from a copy without .git (a GPU job's machine)
_COMMIT_AT_IMPORT = os.environ.get('METADROP_COMMIT', '') or git_commit()


def append_run_log(workdir: str, row: dict) -> None:
  metrics_lib.append_jsonl(os.path.join(workdir, 'runs.jsonl'), row)


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


_DATA = 'data.json'


def data_record(splits: dict) -> dict:
  """``{split: {'shape', 'crc32'}}`` of the arrays a run trains on (None: a split it does not
  use): what :func:`check_data` compares at every later sitting."""
  from metadrop_jax.data import cache
  return {s: {'shape': list(a.shape), 'crc32': cache.content_crc32(a)}
          for s, a in splits.items() if a is not None}


def check_data(workdir: str, record: dict, config) -> dict:
  """Refuses data that differs from what the run trained on so far (workdir/data.json): a
  data.path or cache moved to another copy between two sittings must hold the same arrays.
  Returns the record to store (the earlier one with any split it lacked)."""
  path = os.path.join(workdir, _DATA)
  if not os.path.exists(path):
    return record
  stored = metrics_lib.read_json_object(path)
  if isinstance(stored, str):
    raise WorkdirError(f'{path} is unreadable ({stored}): the data this run trained on cannot be '
                       'checked. Restore it from a copy of the workdir, or move it away to resume '
                       'without checking the data.')
  for split, now in record.items():
    then = stored.get(split)
    if then is not None and then != now:
      where = data_lib.with_default_path(config.data).path or config.data.source
      raise WorkdirError(
          f'the {split} data of {config.data.name} at {where} is not what {workdir} trained on '
          f'(now CRC-32 {now["crc32"]}, shape {now["shape"]}; {_DATA} records CRC-32 '
          f'{then.get("crc32")}, shape {then.get("shape")}): resuming would train one run on two '
          'data sets; point --config.data.path at the data the run started with, or use a new '
          f'--workdir (the same files decoded by another image library version differ too: then '
          f'move {path} away to accept them)')
  return {**stored, **record}


def write_data_record(workdir: str, record: dict) -> None:
  metrics_lib.write_json_atomic(os.path.join(workdir, _DATA), record)
