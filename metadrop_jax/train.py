"""The meta-training loop: ``train`` (resumable, bounded sittings) and ``train_and_evaluate``.

Keys (:mod:`metadrop_jax.keys`): step ``s`` draws its episodes and noise from ``(seed, s)``
only, so a resumed run repeats exactly what an uninterrupted one would do. The workdir (config,
checkpoints, run log) is :mod:`metadrop_jax.workdir`; the meta-test protocol is
:mod:`metadrop_jax.evaluation`; the steps themselves are :mod:`metadrop_jax.meta`.
"""

from __future__ import annotations

import os
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


# The ETA: the steps after the first one (which compiles) are timed alone; the checkpoints and
# validations ahead are counted at the cost of the first of each (a validation's first batch,
# which compiles, left out). It is said after the timed steps, and once more when a cost it
# could not count then is known.
ETA_TIMED_STEPS = 2
CPU_EXPERIMENT = 'python launch.py --config=configs/omniglot_5way1shot_cpu.py'


def _duration(seconds: float) -> str:
  return f'{seconds / 3600:.1f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min'


def eta_message(seconds_per_step: float, remaining: int, backend: str, *,
                checkpoints: tuple = (0, None), validations: tuple = (0, None),
                hint: bool = True) -> str:
  """The ETA of the remaining steps; on a CPU, when that is hours, the command that fits one
  (``hint``). ``checkpoints`` / ``validations``: (how many are ahead, seconds each, None if not
  timed yet): timed ones are in the ETA, the others are named as left out."""
  eta = seconds_per_step * remaining
  counted, left_out = [], []
  for what, (n, each) in (('checkpoint', checkpoints), ('validation', validations)):
    what += 's' if n != 1 else ''
    if n and each is None:
      left_out.append(f'{n} {what}')
    elif n:
      eta += n * each
      counted.append(f'{n} {what} x {each:.3g} s')
  msg = (f'meta-train: {seconds_per_step:.3g} s/step on {backend} -> ETA {_duration(eta)} for '
         f'the {remaining} remaining steps')
  if counted:
    msg += f' ({", ".join(counted)} included)'
  if left_out:
    msg += (f'; {" and ".join(left_out)} not counted yet (the ETA is said again once the first '
            'of each is timed)')
  if hint and backend == 'cpu' and eta > 2 * 3600:
    msg += ('.\n  This config is sized for a GPU (pip install -e ".[gpu]"). The reduced-budget '
            f'CPU experiment takes about 35 minutes per method:\n    {CPU_EXPERIMENT}\n'
            '  (docs/results.md). This run goes on; Ctrl-C stops it checkpointed, and the same\n'
            '  command resumes it.')
  return msg


class Eta:
  """What the ETA needs: the time per step (``step_s``) and of one checkpoint and one validation
  (``checkpoint_s``, ``validation_s``), and when to say it (:meth:`message`)."""

  def __init__(self, config, validating: bool):
    self.config, self.validating = config, validating
    self.step_s = self.checkpoint_s = self.validation_s = None
    self.said = 0          # 0: not yet; 1: said with a cost left out; 2: said in full

  def ahead(self, step: int) -> tuple[int, int]:
    """(checkpoints, validations) in the steps after ``step`` (a run's last step saves too)."""
    c, n = self.config, self.config.num_steps
    ckpts = n // c.checkpoint_every - step // c.checkpoint_every + (n % c.checkpoint_every > 0)
    vals = (n // c.val_every - step // c.val_every) if self.validating else 0
    return ckpts, vals

  def time_validation(self, started: float, batch_ends: list[float]) -> None:
    """A validation's cost from the times its batches ended (the first, which compiles, is
    replaced by the mean of the others when there are others)."""
    if self.validation_s is None and batch_ends:
      n = len(batch_ends)
      self.validation_s = ((batch_ends[-1] - batch_ends[0]) * n / (n - 1) if n > 1 else
                           batch_ends[-1] - started)

  def message(self, step: int, backend: str) -> str | None:
    """The ETA line to say after ``step``, or None (nothing new to say)."""
    if self.step_s is None or self.said == 2 or step >= self.config.num_steps:
      return None
    ckpts, vals = self.ahead(step)
    full = ((not ckpts or self.checkpoint_s is not None) and
            (not vals or self.validation_s is not None))
    if self.said == 1 and not full:
      return None
    first, self.said = self.said == 0, 2 if full else 1
    return eta_message(self.step_s, self.config.num_steps - step, backend,
                       checkpoints=(ckpts, self.checkpoint_s),
                       validations=(vals, self.validation_s), hint=first)


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
  ident = workdir_lib.identity(workdir)
  workdir_lib.check_run_config(workdir, config)
  # 'auto' execution fields: what this run recorded, or (a new run) today's rules, recorded below
  config = workdir_lib.run_config(workdir, config)
  train_np = data_lib.load_split(config.data, 'train')
  val_np = data_lib.load_split(config.data, 'val') if config.val_every else None
  workdir_lib.check_split(train_np, config, 'train')
  if val_np is not None:
    workdir_lib.check_split(val_np, config, 'val')
  data = workdir_lib.check_data(workdir, workdir_lib.data_record({'train': train_np,
                                                                   'val': val_np}), config)

  init_key, train_key = keys_lib.run_keys(config)
  state, tx = meta.create_state(init_key, config)
  mgr = workdir_lib.checkpoint_manager(workdir, config)
  restored = workdir_lib.restore_latest(mgr, state, workdir, set_aside=True)
  if restored is not None:
    state = restored
  start = int(state.step)
  lowered = workdir_lib.check_num_steps(workdir, config, start)
  diverged = _diverged_before(workdir, start)
  # only a config that can start is recorded: after the data checks and the restore (an
  # unreadable checkpoint_hashes.json refuses the resume and leaves config.json as it was)
  workdir_lib.write_run_config(workdir, config)
  workdir_lib.write_data_record(workdir, data)
  for msg in (lowered, diverged):
    if msg:
      warnings.warn(msg, RuntimeWarning)
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
  # durations on the monotonic clock: a change of the system time cannot cut or stretch a sitting
  t0 = time.monotonic()
  # the metrics since the last row: restored with the checkpoint, so rows match an uninterrupted run
  window, last_log = workdir_lib.load_metrics_window(workdir, start), time.monotonic()
  step = start
  stopped = 'finished'
  warned_inner = False
  if jax.default_backend() == 'cpu' and config.num_steps - start >= 10000:
    _say(f'meta-train: {config.num_steps - start} steps of {config.name} on a CPU; the ETA follows '
         f'the first {ETA_TIMED_STEPS + 1} steps (the CPU-sized experiment: {CPU_EXPERIMENT})',
         bar)
  timed = 0.0
  eta = Eta(config, val_step is not None)
  # At most one step queued behind the one running: before dispatching step t+1 the loop waits
  # for step t-1's metrics. The device never idles (the next step is always queued), and the
  # progress bar, the ETA, the time limit and a stop signal see steps that have run, not steps
  # that were only dispatched (on a slow device an unbounded queue ran minutes past a stop).
  in_flight = None
  while step < end:
    timing = start + 1 <= step < start + 1 + ETA_TIMED_STEPS
    t_step = time.monotonic()
    if config.data.sampler == 'device':
      state, m = step_fn(state, images, train_key)
    else:
      eps = episodes_lib.sample_batch_host(config.seed, step, train_np, config.meta_batch,
                                           config.way, config.shot, config.query,
                                           config.data.shared_classes)
      state, m = step_fn(state, jax.device_put(eps, sharding), train_key)
    if step == start or timing:   # the first step (compiling) and the timed ones: wait for them
      jax.block_until_ready(state)
      timed += (time.monotonic() - t_step) if timing else 0.0
    elif in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = m
    step += 1
    window.append(m)
    if bar is not None:
      bar.update(1)
    if step == start + 1 + ETA_TIMED_STEPS:
      eta.step_s = timed / ETA_TIMED_STEPS
    if step % config.log_every == 0 or step == config.num_steps:
      scalars = {f'train/{k}': float(v) for k, v in
                 jax.device_get(jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *window)).items()}
      if not all(np.isfinite(v) for v in scalars.values()):
        _diverged(workdir, mgr, config, start, step, t0)
        raise FloatingPointError(f'non-finite training metrics in steps {step - len(window) + 1}-'
                                 f'{step}: {scalars}.' + _last_checkpoint(mgr))
      diverging = inner_loop_diverging(scalars)
      if diverging and not warned_inner:
        warnings.warn(f'steps {step - len(window) + 1}-{step}: {diverging}', RuntimeWarning)
        warned_inner = True
      now = time.monotonic()
      scalars['train/steps_per_sec'] = len(window) / max(now - last_log, 1e-9)
      writer.write_scalars(step, scalars)
      if bar is not None:
        bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", acc=f"{scalars['train/acc']:.3f}")
      window, last_log = [], now
    if val_step is not None and step % config.val_every == 0:
      # a stop signal skips (or cuts short) this validation: Ctrl-C does not wait for it
      t_val, batch_ends = time.monotonic(), []
      on_batch = None if eta.validation_s is not None else (
          lambda _: batch_ends.append(time.monotonic()))     # the first one is timed per batch
      r = evaluation.evaluate(state.params, val_np, config, split='val',
                              num_episodes=config.eval.val_episodes,
                              mc_samples=config.eval.val_mc_samples, eval_step=val_step,
                              should_stop=lambda: stop.requested is not None, on_batch=on_batch)
      if r is not None:
        eta.time_validation(t_val, batch_ends)
        writer.write_scalars(step, {'val/acc': r['mean'] / 100.0, 'val/ci95': r['ci95'] / 100.0,
                                    'val/loss': r['loss']})
    out_of_time = (config.max_minutes_per_run and
                   (time.monotonic() - t0) / 60.0 >= config.max_minutes_per_run)
    if step % config.checkpoint_every == 0 or step == end or out_of_time or stop.requested:
      if not workdir_lib.all_finite(state.params):
        _diverged(workdir, mgr, config, start, step, t0)
        raise FloatingPointError(f'the parameters are not finite at step {step}: not saved.'
                                 + _last_checkpoint(mgr))
      workdir_lib.check_intact(workdir, ident)
      t_save = time.monotonic()
      workdir_lib.save_checkpoint(mgr, workdir, step, state)
      workdir_lib.save_metrics_window(workdir, step, window)
      if eta.checkpoint_s is None:
        eta.checkpoint_s = time.monotonic() - t_save
    if out_of_time or stop.requested:
      stopped = 'time limit' if out_of_time else f'interrupted ({stop.requested})'
      break
    msg = eta.message(step, jax.default_backend())
    if msg:
      _say(msg, bar)
  if bar is not None:
    bar.close()
  writer.close()
  if step < config.num_steps and stopped == 'finished':
    stopped = 'step limit'
  status = {'step': step, 'num_steps': config.num_steps, 'stopped': stopped,
            'done': step >= config.num_steps, 'minutes_this_run': (time.monotonic() - t0) / 60.0}
  workdir_lib.check_intact(workdir, ident)
  workdir_lib.append_run_log(workdir, {**status, 'start_step': start,
                                       'meta_lr': config_lib.meta_lr(config),
                                       **workdir_lib.provenance()})
  return status | {'state': state}


def _last_checkpoint(mgr) -> str:
  last = mgr.latest_step()
  if last is None:
    return (' No checkpoint was written. Lower --config.meta_lr / --config.inner_lr, or check '
            'the data.')
  return (f' The newest checkpoint, step {last}, is finite and kept; resuming repeats the same '
          'steps from it (on this machine they diverge again): lower --config.meta_lr / '
          '--config.inner_lr in a new --workdir, or check the data.')


def _diverged(workdir: str, mgr, config, start: int, step: int, t0: float) -> None:
  """Logs a sitting that diverged at ``step`` (runs.jsonl: its ``step`` is the checkpoint a
  resume starts from), so that the resume says so."""
  last = mgr.latest_step() or 0
  try:
    workdir_lib.append_run_log(workdir, {
        'step': last, 'num_steps': config.num_steps, 'stopped': f'diverged at step {step}',
        'done': False, 'minutes_this_run': (time.monotonic() - t0) / 60.0, 'start_step': start,
        'diverged_at': step, 'meta_lr': config_lib.meta_lr(config), **workdir_lib.provenance()})
  except OSError:
    pass      # (a workdir that cannot take the row: the divergence is raised all the same)


def _diverged_before(workdir: str, start: int) -> str | None:
  """What to say when the run's last sitting diverged after the checkpoint it resumes from."""
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'runs.jsonl'), warn=False)
  last = rows[-1] if rows else {}
  if 'diverged_at' not in last or last.get('step') != start:
    return None
  where = (f'resuming from its newest finite checkpoint, step {start},' if start else
           'starting it again (it has no checkpoint)')
  return (f'the last sitting of this run diverged at step {last["diverged_at"]} (runs.jsonl); '
          f'{where} repeats those steps (on the same machine they diverge again): to change the '
          'run, train with a lower --config.meta_lr / --config.inner_lr in a new --workdir')


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
