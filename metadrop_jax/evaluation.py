"""The paper's meta-test protocol, and evaluating a training workdir's latest checkpoint.

Episodes and adaptation noise depend on ``config.eval.seed`` and the split only
(:func:`keys.eval_keys`): every method and every checkpoint meets the same episodes.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metadrop_jax import keys as keys_lib
from metadrop_jax import meta
from metadrop_jax import methods
from metadrop_jax import metrics as metrics_lib
from metadrop_jax import workdir as workdir_lib


def evaluate(params, images, config, *, split: str = 'test', num_episodes: int | None = None,
             mc_samples: int | None = None, eval_step=None,
             should_stop=None, on_batch=None, partial: dict | None = None,
             on_stop=None) -> dict[str, Any] | None:
  """The paper's meta-test protocol: adapt on each episode's support set with ``mc_samples``
  MC samples of the perturbed inner loss, score the query set; mean and 95% CI over episodes.

  ``eval_step``: a step built by :func:`meta.make_eval_step` for these settings (default: built,
  or reused from an earlier call with an equivalent config).
  Returns ``{'mean', 'ci95', 'n'}`` in percent plus ``'loss'`` and the per-episode ``'accs'``;
  None when ``should_stop()`` (asked before each batch of episodes) said to stop, after
  ``on_stop(progress)`` got what was done: ``{'batches', 'accs', 'losses'}``. Given back as
  ``partial``, that progress is continued from its next batch: each batch's episodes and noise
  depend on its index only, so a meta-test cut and continued equals an uninterrupted one.
  ``on_batch(k)``: called after each batch with the number ``k`` of episodes it finished.
  """
  n = num_episodes or config.eval.num_episodes
  mc = mc_samples or config.eval.mc_samples
  bt = min(config.eval.batch_tasks, n)
  step = eval_step or meta.compiled('eval', config, lambda: meta.make_eval_step(config, mc, bt),
                                    mc, bt)
  ep_key, noise_key = keys_lib.eval_keys(config, split)
  images = jnp.asarray(images)
  start = int(partial['batches']) if partial else 0
  accs = [np.asarray(partial['accs'])] if partial else []
  losses = [np.asarray(partial['losses'])] if partial else []
  for i in range(start, math.ceil(n / bt)):
    if should_stop is not None and should_stop():
      if on_stop is not None:
        on_stop({'batches': i, 'accs': np.concatenate(jax.device_get(accs) or [np.zeros(0)]),
                 'losses': np.concatenate(jax.device_get(losses) or [np.zeros(0)])})
      return None
    a, l = step(params, images, *keys_lib.eval_batch_keys(ep_key, noise_key, i))
    accs.append(a)
    losses.append(l)
    if on_batch is not None:
      a.block_until_ready()
      on_batch(min(bt, n - i * bt))
  accs = np.concatenate(jax.device_get(accs))[:n]
  losses = np.concatenate(jax.device_get(losses))[:n]
  return {**metrics_lib.summarize(accs), 'loss': float(losses.mean()), 'accs': accs,
          'mc_samples': mc if methods.get(config.method).stochastic_support else 1, 'split': split}


def _progress_bar(enabled: bool, total: int, split: str):
  """A tqdm bar over meta-test episodes (rate and ETA), on stderr; None when not ``enabled``."""
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, desc=f'meta-test ({split})', unit='episode', dynamic_ncols=True)


PROTOCOL_FIELDS = ('num_episodes', 'mc_samples', 'seed')


def protocol_tag(config, workdir: str) -> str:
  """'' when ``config``'s meta-test protocol (episodes, MC samples, episode seed) is the one the
  workdir was trained with; else e.g. ``'_100ep_5mc_seed0'``, so that a shortened meta-test of a
  committed model never replaces its results.json (the table's source)."""
  stored = workdir_lib.load_run_config(workdir).eval
  if all(stored[f] == config.eval[f] for f in PROTOCOL_FIELDS):
    return ''
  ev = config.eval
  return f'_{ev.num_episodes}ep_{ev.mc_samples}mc_seed{ev.seed}'


def result_name(split: str, tag: str = '') -> str:
  """results.json (the run's own test protocol), results_<split>.json, or either with a tag."""
  return ('results' if split == 'test' else f'results_{split}') + tag + '.json'


def _partial_path(workdir: str, split: str, tag: str) -> str:
  return os.path.join(workdir, f'eval_partial_{split}{tag}.npz')


def _partial_meta(config, step: int, split: str) -> dict:
  """What a cut meta-test's progress is only valid for: the checkpoint and the protocol."""
  ev = config.eval
  return {'step': step, 'split': split, 'num_episodes': ev.num_episodes,
          'mc_samples': ev.mc_samples, 'batch_tasks': ev.batch_tasks, 'seed': ev.seed}


def load_partial(workdir: str, config, step: int, split: str = 'test',
                 tag: str = '') -> dict | None:
  """The progress of a meta-test of this checkpoint and protocol that was cut, or None (none
  kept, unreadable, or of another checkpoint or protocol)."""
  try:
    with np.load(_partial_path(workdir, split, tag)) as z:
      if json.loads(str(z['meta'])) != _partial_meta(config, step, split):
        return None
      return {'batches': int(z['batches']), 'accs': z['accs'], 'losses': z['losses']}
  except (OSError, ValueError, KeyError):
    return None


def _save_partial(workdir: str, config, step: int, split: str, tag: str, progress: dict):
  path = _partial_path(workdir, split, tag)
  tmp = f'{path}.tmp.{os.getpid()}.npz'
  np.savez(tmp, meta=json.dumps(_partial_meta(config, step, split)),
           batches=progress['batches'], accs=progress['accs'], losses=progress['losses'])
  os.replace(tmp, path)


def evaluate_checkpoint(config, workdir: str, split: str = 'test',
                        should_stop=None) -> dict[str, Any] | None:
  """Restores the latest checkpoint and writes ``workdir/results.json`` (the run's own protocol;
  another episode count, MC samples or seed: :func:`protocol_tag` names the file), with a
  progress bar over episodes when ``config.progress_bar``.

  ``config`` None: the workdir's config.json; a given config must not differ from it in a field
  that changes results (only ``eval.*``, data locations and loop fields may). Refuses, before
  evaluating, a workdir it cannot write and a checkpoint with non-finite parameters; refuses to
  write a result whose loss or accuracy is not finite. The per-episode accuracies are written
  before the result, so a results.json never stands without them (the paired interval of a gain
  needs them). A training that holds the workdir (its ``.lock``) is said, with the step evaluated.

  ``should_stop()``, asked before each batch of episodes (a deadline, a signal): when it says
  stop, the episodes done so far are kept in ``eval_partial_<split>.npz`` and None is returned;
  the next call with the same checkpoint and protocol continues from there, and its result
  equals an uninterrupted meta-test's.
  """
  config, state = workdir_lib.restore(workdir, config)
  workdir_lib.ensure_writable(workdir)
  if not workdir_lib.all_finite(state.params):
    raise FloatingPointError(f'checkpoint {int(state.step)} of {workdir} holds non-finite '
                             'parameters (the run diverged): nothing to evaluate')
  holder = workdir_lib.lock_holder(workdir)
  if holder is not None:
    warnings.warn(f'{workdir} is in use by a training (pid {holder}): evaluating its newest '
                  f'checkpoint so far, step {int(state.step)} of {config.num_steps}; evaluate '
                  'again once the training has ended for its final result', RuntimeWarning)
  images = workdir_lib.load_eval_split(config, split)
  t0 = time.time()
  step, tag = int(state.step), protocol_tag(config, workdir)
  partial = load_partial(workdir, config, step, split, tag)
  bar = _progress_bar(config.progress_bar, config.eval.num_episodes, split)
  if bar is not None and partial:
    bar.update(min(partial['batches'] * config.eval.batch_tasks, config.eval.num_episodes))
  try:
    r = evaluate(state.params, images, config, split=split,
                 on_batch=None if bar is None else bar.update, should_stop=should_stop,
                 partial=partial,
                 on_stop=lambda p: _save_partial(workdir, config, step, split, tag, p))
  finally:
    if bar is not None:
      bar.close()
  if r is None:
    return None
  bad = [k for k in ('loss', 'mean', 'ci95') if not np.isfinite(r[k])]
  if bad:
    raise FloatingPointError(f'the query {" and ".join(bad)} of checkpoint {int(state.step)} '
                             f'{"is" if len(bad) == 1 else "are"} not finite on {split} episodes '
                             '(the inner loop diverges at meta-test: lower --config.inner_lr, or '
                             'eval.mc_samples for noise methods); no result written')
  result = {
      'name': config.name, 'method': config.method, 'dataset': config.data.name,
      'way': config.way, 'shot': config.shot, 'query': config.query,
      'step': int(state.step), 'num_steps': config.num_steps,
      'accuracy': r['mean'], 'ci95': r['ci95'], 'episodes': r['n'], 'loss': r['loss'],
      'mc_samples': r['mc_samples'], 'split': split, 'eval_seed': config.eval.seed,
      'meta_gradient': config.meta_gradient,
      **({'omniglot_split': config.data.omniglot_split} if config.data.name == 'omniglot' else {}),
      'eval_minutes': (time.time() - t0) / 60.0, **workdir_lib.provenance(),
  }
  if partial:   # continued from a meta-test cut earlier: eval_minutes counts this call only
    result['continued_from_episode'] = min(partial['batches'] * config.eval.batch_tasks,
                                           config.eval.num_episodes)
  result['file'] = result_name(split, tag)
  # the per-episode accuracies land first: if they cannot be written, neither is the result (an
  # earlier pair of both stays as it was)
  accs = metrics_lib.episode_accs_path(workdir, split + tag)
  metrics_lib.write_json_atomic(os.path.join(workdir, result['file']), result,
                                before_replace=lambda: metrics_lib.save_npy_atomic(accs, r['accs']))
  if os.path.exists(_partial_path(workdir, split, tag)):
    os.remove(_partial_path(workdir, split, tag))
  return result
