"""The meta-training loop, evaluation with the paper's protocol, checkpoints and results files.

Random numbers (one discipline): ``root = PRNGKey(config.seed)``; ``init = fold_in(root, 0)``,
``train = fold_in(root, 1)``; step ``s`` uses ``fold_in(train, s)`` for its episodes and noise,
so a resumed run repeats exactly what an uninterrupted one would do. Evaluation keys depend on
``config.eval.seed`` and the split only: every method and every checkpoint sees the same
validation / test episodes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
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
from metadrop_jax import episodes as episodes_lib
from metadrop_jax import meta
from metadrop_jax import methods
from metadrop_jax import metrics as metrics_lib

_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
# Fields that may change between sittings of one run without changing its results.
_LOOP_FIELDS = ('max_steps_per_run', 'max_minutes_per_run', 'progress_bar', 'log_every',
                'val_every', 'checkpoint_every', 'keep_checkpoints', 'num_steps', 'eval',
                'data.cache_dir', 'data.path', 'data.ilsvrc_path', 'data.source', 'data.sampler',
                'model.conv_impl', 'name')


# Compiled steps, reused by later train() / evaluate() calls of this process with an equivalent
# config (a resumed run in a notebook or test does not pay the compile twice).
_STEP_CACHE: dict = {}
_NOT_COMPILED = ('max_steps_per_run', 'max_minutes_per_run', 'progress_bar', 'log_every',
                 'val_every', 'checkpoint_every', 'keep_checkpoints', 'num_steps', 'name',
                 'data.cache_dir', 'data.path', 'data.ilsvrc_path', 'data.source')


def _cached(kind, config, build, *extra):
  flat = _flatten(json.loads(config.to_json_best_effort()))
  key = (kind, extra, tuple(sorted((k, repr(v)) for k, v in flat.items()
                                   if k not in _NOT_COMPILED)))
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = build()
  return _STEP_CACHE[key]


def run_keys(config):
  root = jax.random.PRNGKey(config.seed)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def eval_keys(config, split: str):
  """(episode key, noise key) for evaluating on ``split``: fixed by ``eval.seed`` and split."""
  root = jax.random.fold_in(jax.random.PRNGKey(config.eval.seed), 1000 + _SPLIT_IDS[split])
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

def evaluate(params, images, config, *, split: str = 'test', num_episodes: int | None = None,
             mc_samples: int | None = None, eval_step=None) -> dict[str, Any]:
  """The paper's meta-test protocol: adapt on each episode's support set with ``mc_samples``
  MC samples of the perturbed inner loss, score the query set; mean and 95% CI over episodes.

  Returns ``{'mean', 'ci95', 'n'}`` in percent plus ``'loss'`` and the per-episode ``'accs'``.
  """
  n = num_episodes or config.eval.num_episodes
  mc = mc_samples or config.eval.mc_samples
  bt = min(config.eval.batch_tasks, n)
  step = eval_step or _cached('eval', config, lambda: meta.make_eval_step(config, mc, bt), mc, bt)
  ep_key, noise_key = eval_keys(config, split)
  images = jnp.asarray(images)
  accs, losses = [], []
  for i in range(math.ceil(n / bt)):
    a, l = step(params, images, jax.random.fold_in(ep_key, i), jax.random.fold_in(noise_key, i))
    accs.append(a)
    losses.append(l)
  accs = np.concatenate(jax.device_get(accs))[:n]
  losses = np.concatenate(jax.device_get(losses))[:n]
  return {**metrics_lib.summarize(accs), 'loss': float(losses.mean()), 'accs': accs,
          'mc_samples': mc if methods.get(config.method).stochastic_support else 1, 'split': split}


# ------------------------------------------------------------------------------------------------
# checkpoints and run metadata
# ------------------------------------------------------------------------------------------------

def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=opts)


def restore_latest(mgr: ocp.CheckpointManager, template: meta.TrainState):
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


def _flatten(d):
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  return traverse_util.flatten_dict(d, sep='.')


def check_or_write_run_config(workdir: str, config) -> None:
  """Stores config.json; on resume refuses a config that would change the run's results."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    a, b = _flatten(stored), _flatten(current)
    ignore = lambda k: any(k == f or k.startswith(f + '.') for f in _LOOP_FIELDS)
    diff = sorted(k for k in set(a) | set(b) if not ignore(k) and a.get(k) != b.get(k))
    if diff:
      lines = [f'    {k}: workdir has {a.get(k)!r}, now {b.get(k)!r}' for k in diff]
      raise config_lib.ConfigError(
          f'{workdir} holds a run with a different config; resuming would mix two '
          'experiments:\n' + '\n'.join(lines) + '\n  Use a new --workdir, or the same config.')
  metrics_lib.write_json_atomic(path, current)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} is not a training workdir '
                            '(train first with launch.py --config=... --workdir=...)')
  with open(path) as f:
    cfg = config_lib.base_config()
    cfg.update_from_flattened_dict(_flatten(json.load(f)))
  return cfg


def provenance() -> dict:
  # METADROP_COMMIT: set where the code runs from a copy without .git (a GPU window's device)
  commit = os.environ.get('METADROP_COMMIT', '')
  try:
    commit = commit or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True, cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    commit = ''
  dev = jax.devices()[0]
  return {'commit': commit or 'unknown', 'jax': jax.__version__, 'backend': jax.default_backend(),
          'device': getattr(dev, 'device_kind', str(dev)), 'device_count': jax.device_count()}


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------

def _progress(total, initial, enabled):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc='meta-train', unit='it', dynamic_ncols=True)


def train(config, workdir: str) -> dict[str, Any]:
  """Meta-trains (resuming from ``workdir`` if it holds a checkpoint) and returns a status dict.

  Stops early, checkpointed, after ``max_steps_per_run`` steps or ``max_minutes_per_run``.
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  check_or_write_run_config(workdir, config)
  init_key, train_key = run_keys(config)
  state, tx = meta.create_state(init_key, config)
  mgr = checkpoint_manager(workdir, config)
  restored = restore_latest(mgr, state)
  if restored is not None:
    state = restored
  start = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)

  train_np = data_lib.load_split(config.data, 'train')
  val_np = data_lib.load_split(config.data, 'val') if config.val_every else None
  _check_split(train_np, config, 'train')
  if val_np is not None:
    _check_split(val_np, config, 'val')
  sharding = _task_sharding(config)
  if config.data.sampler == 'device':
    images = jax.device_put(train_np)
    step_fn = _cached('train', config, lambda: meta.make_train_step(config, tx, sharding),
                      sharding)
  else:
    step_fn = _cached('train_host', config, lambda: meta.make_train_step_on_episodes(config, tx))
  val_step = None
  if val_np is not None:
    mc, bt = config.eval.val_mc_samples, min(config.eval.batch_tasks, config.eval.val_episodes)
    val_step = _cached('eval', config, lambda: meta.make_eval_step(config, mc, bt), mc, bt)

  end = config.num_steps
  if config.max_steps_per_run:
    end = min(end, start + config.max_steps_per_run)
  bar = _progress(config.num_steps, start, config.progress_bar)
  t0 = time.time()
  window, last_log = [], time.time()
  step = start
  stopped = 'finished'
  warned_inner = False
  while step < end:
    if config.data.sampler == 'device':
      state, m = step_fn(state, images, train_key)
    else:
      eps = episodes_lib.sample_batch_host(config.seed, step, train_np, config.meta_batch,
                                           config.way, config.shot, config.query,
                                           config.data.shared_classes)
      state, m = step_fn(state, jax.device_put(eps, sharding), train_key)
    step += 1
    window.append(m)
    if bar is not None:
      bar.update(1)
    if step % config.log_every == 0 or step == end:
      scalars = {f'train/{k}': float(v) for k, v in
                 jax.device_get(jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *window)).items()}
      if not all(np.isfinite(v) for v in scalars.values()):
        raise FloatingPointError(f'non-finite training metrics in steps {step - len(window) + 1}-'
                                 f'{step}: {scalars}. Lower meta_lr / inner_lr, or check the data.')
      diverging = inner_loop_diverging(scalars)
      if diverging and not warned_inner:
        warnings.warn(f'steps {step - len(window) + 1}-{step}: {diverging}', RuntimeWarning)
        warned_inner = True
      now = time.time()
      scalars['train/steps_per_sec'] = len(window) / max(now - last_log, 1e-9)
      writer.write_scalars(step, scalars)
      if bar is not None:
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", acc=f"{scalars['train/acc']:.3f}")
      window, last_log = [], now
    if val_step is not None and step % config.val_every == 0:
      r = evaluate(state.params, val_np, config, split='val', num_episodes=config.eval.val_episodes,
                   mc_samples=config.eval.val_mc_samples, eval_step=val_step)
      writer.write_scalars(step, {'val/acc': r['mean'] / 100.0, 'val/ci95': r['ci95'] / 100.0,
                                  'val/loss': r['loss']})
    out_of_time = (config.max_minutes_per_run and
                   (time.time() - t0) / 60.0 >= config.max_minutes_per_run)
    if step % config.checkpoint_every == 0 or step == end or out_of_time:
      mgr.save(step, args=ocp.args.StandardSave(state))
      mgr.wait_until_finished()
    if out_of_time:
      stopped = 'time limit'
      break
  if bar is not None:
    bar.close()
  writer.close()
  if step < config.num_steps and stopped == 'finished':
    stopped = 'step limit'
  status = {'step': step, 'num_steps': config.num_steps, 'stopped': stopped,
            'done': step >= config.num_steps, 'minutes_this_run': (time.time() - t0) / 60.0}
  _append_run_log(workdir, {**status, 'start_step': start, **provenance()})
  return status | {'state': state}


def inner_loop_diverging(scalars: dict, factor: float = 10.0) -> str | None:
  """A message when the logged support loss grows ``factor``-fold over the inner loop (mean over
  the logging window: ``train/inner_loss_last`` vs ``train/inner_loss_first``), else None.

  SGD on the support set should lower its loss; a loss that grows by an order of magnitude over
  the K inner steps means the inner learning rate is too large for this loss (e.g. VIB's KL
  term at an inner lr tuned for cross-entropy) and the run's accuracy says little.
  """
  first, last = scalars.get('train/inner_loss_first'), scalars.get('train/inner_loss_last')
  if first is None or last is None or not first > 0 or not last > factor * first:
    return None
  return (f'the inner loop diverges: support loss {first:.3g} before the inner steps, {last:.3g} '
          f'after them. Lower --config.inner_lr (or, for vib / infodrop, '
          f'--config.methods.vib_beta).')


def _check_split(images, config, split):
  if images.shape[0] < config.way:
    raise ValueError(f'{split} split has {images.shape[0]} classes; a {config.way}-way task '
                     'needs at least that many (lower --config.way)')
  if images.shape[1] < config.shot + config.query:
    raise ValueError(f'{split} split has {images.shape[1]} images per class; shot+query = '
                     f'{config.shot + config.query} (lower --config.query or --config.shot)')


def _task_sharding(config):
  """Splits the task axis over all local devices when there is more than one (else None)."""
  n = jax.local_device_count()
  if n <= 1:
    return None
  if config.meta_batch % n:
    raise config_lib.ConfigError(f'meta_batch={config.meta_batch} must be divisible by the '
                                 f'{n} local devices to shard tasks across them')
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ('tasks',))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('tasks'))


def _append_run_log(workdir, row):
  with open(os.path.join(workdir, 'runs.jsonl'), 'a') as f:
    f.write(json.dumps(row) + '\n')


def restore_workdir(workdir: str, config=None) -> tuple[Any, meta.TrainState]:
  """(config, latest TrainState) of a training workdir; config defaults to its config.json."""
  config = config or load_run_config(workdir)
  config_lib.validate(config)
  init_key, _ = run_keys(config)
  template, _ = meta.create_state(init_key, config)
  state = restore_latest(checkpoint_manager(workdir, config), template)
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints: train first '
                            f'(launch.py --config=... --workdir={workdir})')
  return config, state


def require_split(config, split: str):
  """The split's images; a clear error if the data set has no such split with this config."""
  images = data_lib.load_split(config.data, split)
  if images is None:
    raise ValueError(f'data set {config.data.name} has no {split!r} split with this config')
  return images


def load_eval_split(config, split: str):
  """:func:`require_split`, checked against the config's episode shape."""
  images = require_split(config, split)
  _check_split(images, config, split)
  return images


def evaluate_checkpoint(config, workdir: str, split: str = 'test') -> dict[str, Any]:
  """Restores the latest checkpoint and writes ``workdir/results.json`` (paper protocol)."""
  config, state = restore_workdir(workdir, config)
  images = load_eval_split(config, split)
  t0 = time.time()
  r = evaluate(state.params, images, config, split=split)
  result = {
      'name': config.name, 'method': config.method, 'dataset': config.data.name,
      'way': config.way, 'shot': config.shot, 'query': config.query,
      'step': int(state.step), 'num_steps': config.num_steps,
      'accuracy': r['mean'], 'ci95': r['ci95'], 'episodes': r['n'], 'loss': r['loss'],
      'mc_samples': r['mc_samples'], 'split': split, 'eval_seed': config.eval.seed,
      'eval_minutes': (time.time() - t0) / 60.0, **provenance(),
  }
  name = 'results.json' if split == 'test' else f'results_{split}.json'
  metrics_lib.write_json_atomic(os.path.join(workdir, name), result)
  path = os.path.join(workdir, f'episode_accs_{split}.npy')
  with open(path + '.tmp', 'wb') as f:
    np.save(f, r['accs'])
  os.replace(path + '.tmp', path)
  return result


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains to ``num_steps`` (resuming), then evaluates on the test split once training is done."""
  status = train(config, workdir)
  status.pop('state')
  if status['done']:
    status['results'] = evaluate_checkpoint(config, workdir)
  return status
