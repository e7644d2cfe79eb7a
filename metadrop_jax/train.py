"""The meta-training loop: ``train`` (resumable, bounded sittings) and ``train_and_evaluate``.

Keys (:mod:`metadrop_jax.keys`): step ``s`` draws its episodes and noise from ``(seed, s)``
only, so a resumed run repeats exactly what an uninterrupted one would do. The workdir (config,
checkpoints, run log) is :mod:`metadrop_jax.workdir`; the meta-test protocol is
:mod:`metadrop_jax.evaluation`; the steps themselves are :mod:`metadrop_jax.meta`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metadrop_jax import config as config_lib
from metadrop_jax import data as data_lib
from metadrop_jax import episodes as episodes_lib
from metadrop_jax import evaluation
from metadrop_jax import keys as keys_lib
from metadrop_jax import meta
from metadrop_jax import metrics as metrics_lib
from metadrop_jax import workdir as workdir_lib


# The ETA: the steps after the first one (which compiles) are timed alone (no validation or
# checkpoint inside), then it is said once.
ETA_TIMED_STEPS = 2
CPU_EXPERIMENT = 'python launch.py --config=configs/omniglot_5way1shot_cpu.py'


def eta_message(seconds_per_step: float, remaining: int, backend: str) -> str:
  """The ETA of the remaining steps; on a CPU, when that is hours, the command that fits one."""
  eta = seconds_per_step * remaining
  when = f'{eta / 3600:.1f} h' if eta >= 3600 else f'{eta / 60:.1f} min'
  msg = (f'meta-train: {seconds_per_step:.3g} s/step on {backend} -> ETA {when} for the '
         f'{remaining} remaining steps')
  if backend == 'cpu' and eta > 2 * 3600:
    msg += ('.\n  This config is sized for a GPU (pip install -e ".[gpu]"). The reduced-budget '
            f'CPU experiment takes about 35 minutes per method:\n    {CPU_EXPERIMENT}\n'
            '  (docs/results.md). This run goes on; Ctrl-C stops it checkpointed, and the same\n'
            '  command resumes it.')
  return msg


def _say(msg: str, bar) -> None:
  if bar is not None:
    bar.write(msg, file=sys.stderr)
  else:
    print(msg, file=sys.stderr, flush=True)


def _progress(total, initial, enabled):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc='meta-train', unit='it', dynamic_ncols=True)


def train(config, workdir: str) -> dict[str, Any]:
  """Meta-trains (resuming from ``workdir`` if it holds a checkpoint) and returns a status dict.

  Stops early, checkpointed, after ``max_steps_per_run`` steps, ``max_minutes_per_run``, or at
  SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption: the step in flight finishes, is saved, and
  the status says 'interrupted'). One run at a time holds the workdir.
  """
  config_lib.validate(config)
  created = workdir_lib.prepare(workdir)
  try:
    with workdir_lib.locked(workdir), StopOnSignal(
        'stopping after this step, checkpointed (send it again to stop at once)') as stop:
      return _train(config, workdir, stop)
  except BaseException:
    if created:
      workdir_lib.remove_if_unused(workdir)
    raise


def _train(config, workdir: str, stop: StopOnSignal) -> dict[str, Any]:
  workdir_lib.check_run_config(workdir, config)
  # 'auto' execution fields: what this run recorded, or (a new run) today's rules, recorded below
  config = workdir_lib.run_config(workdir, config)
  train_np = data_lib.load_split(config.data, 'train')
  val_np = data_lib.load_split(config.data, 'val') if config.val_every else None
  workdir_lib.check_split(train_np, config, 'train')
  if val_np is not None:
    workdir_lib.check_split(val_np, config, 'val')

  init_key, train_key = keys_lib.run_keys(config)
  state, tx = meta.create_state(init_key, config)
  mgr = workdir_lib.checkpoint_manager(workdir, config)
  restored = workdir_lib.restore_latest(mgr, state, workdir, set_aside=True)
  if restored is not None:
    state = restored
  # only a config that can start is recorded: after the data checks and the restore (an
  # unreadable checkpoint_hashes.json refuses the resume and leaves config.json as it was)
  workdir_lib.write_run_config(workdir, config)
  start = int(state.step)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  sharding = _task_sharding(config)
  # A fresh state is uncommitted, a restored one committed to its device; jit compiles the step
  # once per kind, so a second sitting in the same process (a notebook) compiled it again. Both
  # are placed alike here: replicated over the task mesh, or on the default device.
  state = jax.device_put(state, jax.devices()[0] if sharding is None else
                         jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
  if config.data.sampler == 'device':
    images = jax.device_put(train_np)
    step_fn = meta.compiled('train', config, lambda: meta.make_train_step(config, tx, sharding),
                            sharding)
  else:
    step_fn = meta.compiled('train_host', config,
                            lambda: meta.make_train_step_on_episodes(config, tx))
  val_step = None
  if val_np is not None:
    mc, bt = config.eval.val_mc_samples, min(config.eval.batch_tasks, config.eval.val_episodes)
    val_step = meta.compiled('eval', config, lambda: meta.make_eval_step(config, mc, bt), mc, bt)

  end = config.num_steps
  if config.max_steps_per_run:
    end = min(end, start + config.max_steps_per_run)
  bar = _progress(config.num_steps, start, config.progress_bar)
  t0 = time.time()
  # the metrics since the last row: restored with the checkpoint, so rows match an uninterrupted run
  window, last_log = workdir_lib.load_metrics_window(workdir, start), time.time()
  step = start
  stopped = 'finished'
  warned_inner = False
  if jax.default_backend() == 'cpu' and config.num_steps - start >= 10000:
    _say(f'meta-train: {config.num_steps - start} steps of {config.name} on a CPU; the ETA follows '
         f'the first {ETA_TIMED_STEPS + 1} steps (the CPU-sized experiment: {CPU_EXPERIMENT})',
         bar)
  timed = 0.0
  # At most one step queued behind the one running: before dispatching step t+1 the loop waits
  # for step t-1's metrics. The device never idles (the next step is always queued), and the
  # progress bar, the ETA, the time limit and a stop signal see steps that have run, not steps
  # that were only dispatched (on a slow device an unbounded queue ran minutes past a stop).
  in_flight = None
  while step < end:
    timing = start + 1 <= step < start + 1 + ETA_TIMED_STEPS
    t_step = time.time()
    if config.data.sampler == 'device':
      state, m = step_fn(state, images, train_key)
    else:
      eps = episodes_lib.sample_batch_host(config.seed, step, train_np, config.meta_batch,
                                           config.way, config.shot, config.query,
                                           config.data.shared_classes)
      state, m = step_fn(state, jax.device_put(eps, sharding), train_key)
    if step == start or timing:   # the first step (compiling) and the timed ones: wait for them
      jax.block_until_ready(state)
      timed += (time.time() - t_step) if timing else 0.0
    elif in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = m
    step += 1
    window.append(m)
    if bar is not None:
      bar.update(1)
    if step == start + 1 + ETA_TIMED_STEPS and step < config.num_steps:
      _say(eta_message(timed / ETA_TIMED_STEPS, config.num_steps - step, jax.default_backend()),
           bar)
    if step % config.log_every == 0 or step == config.num_steps:
      scalars = {f'train/{k}': float(v) for k, v in
                 jax.device_get(jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *window)).items()}
      if not all(np.isfinite(v) for v in scalars.values()):
        raise FloatingPointError(f'non-finite training metrics in steps {step - len(window) + 1}-'
                                 f'{step}: {scalars}. Lower meta_lr / inner_lr, or check the data.'
                                 + _last_checkpoint(mgr))
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
      # a stop signal skips (or cuts short) this validation: Ctrl-C does not wait for it
      r = evaluation.evaluate(state.params, val_np, config, split='val',
                              num_episodes=config.eval.val_episodes,
                              mc_samples=config.eval.val_mc_samples, eval_step=val_step,
                              should_stop=lambda: stop.requested is not None)
      if r is not None:
        writer.write_scalars(step, {'val/acc': r['mean'] / 100.0, 'val/ci95': r['ci95'] / 100.0,
                                    'val/loss': r['loss']})
    out_of_time = (config.max_minutes_per_run and
                   (time.time() - t0) / 60.0 >= config.max_minutes_per_run)
    if step % config.checkpoint_every == 0 or step == end or out_of_time or stop.requested:
      if not workdir_lib.all_finite(state.params):
        raise FloatingPointError(f'the parameters are not finite at step {step}: not saved. '
                                 'Lower meta_lr / inner_lr, or check the data.'
                                 + _last_checkpoint(mgr))
      workdir_lib.save_checkpoint(mgr, workdir, step, state)
      workdir_lib.save_metrics_window(workdir, step, window)
    if out_of_time or stop.requested:
      stopped = 'time limit' if out_of_time else f'interrupted ({stop.requested})'
      break
  if bar is not None:
    bar.close()
  writer.close()
  if step < config.num_steps and stopped == 'finished':
    stopped = 'step limit'
  status = {'step': step, 'num_steps': config.num_steps, 'stopped': stopped,
            'done': step >= config.num_steps, 'minutes_this_run': (time.time() - t0) / 60.0}
  workdir_lib.append_run_log(workdir, {**status, 'start_step': start,
                                       'meta_lr': config_lib.meta_lr(config),
                                       **workdir_lib.provenance()})
  return status | {'state': state}


def _last_checkpoint(mgr) -> str:
  last = mgr.latest_step()
  return (f' The last checkpoint ({last}, finite) is kept; rerunning resumes from it.'
          if last is not None else ' No checkpoint was written.')


class StopOnSignal:
  """While active (main thread only), SIGINT and SIGTERM set ``requested`` (the signal's name),
  which the holder reads to stop at its next safe point (the training loop: after the step in
  flight, checkpointed; a campaign sitting: before the next run); a second signal interrupts at
  once. ``notice``, if given, is printed on the first signal."""

  def __init__(self, notice: str | None = None):
    self.requested = None
    self.notice = notice
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested is not None:   # a second signal: stop now
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name
    if self.notice:
      print(f'\n{self.requested}: {self.notice}', file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False


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


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains to ``num_steps`` (resuming), then evaluates on the test split once training is done."""
  status = train(config, workdir)
  status.pop('state')
  if status['done']:
    status['results'] = evaluation.evaluate_checkpoint(config, workdir)
  return status
