"""One sitting of the Table-1 campaign: train its next runs until a deadline, on any machine.

A sitting works through the campaign's order (:mod:`tools.long_runs.runs`): runs trained to
the end but not yet meta-tested first; then group by group (a setting in one meta-gradient),
the two runs of a group sharing the time left equally, the one with fewer steps first (when the
time left is too short to split, that one alone gets it, so both methods advance in turn). A run
that reaches ``num_steps`` is meta-tested at once if the time left allows (else first thing in
the next sitting); a meta-test cut by the deadline or a signal keeps the episodes it finished
and the next sitting continues it first, with the same result as an uninterrupted one. A run
whose data is not on this machine is skipped.

Every run is ``train.train`` with ``max_minutes_per_run``: checkpointed atomically, so a sitting
cut at any point loses at most the steps since the run's last checkpoint. Ctrl-C or SIGTERM stops
the whole sitting: the run in training saves its step and stops, a meta-test stops at its next
batch of episodes with nothing written, no other run starts, and the sitting's row says so. The
budget is counted on the monotonic clock: a change of the system time does not move it. A run
whose files need a fix (a cut config.json, a checkpoint that cannot be restored) is skipped with
a warning; the others train.
"""

from __future__ import annotations

import math
import os
import time

from tools.long_runs import autotune
from tools.long_runs import reports
from tools.long_runs import runs as runs_lib
from tools.long_runs import swap

# A run is not started with less than this (an accelerator's first step includes a compile of
# up to a minute; the time limit is checked after each step).
MIN_SHARE_S = {'accelerator': 60.0, 'cpu': 20.0}
# A finished run's meta-test starts with at least this much left (1000 episodes x 30 MC samples,
# compile included); what does not fit is continued by the next sitting.
EVAL_MIN_S = {'accelerator': 60.0, 'cpu': 10.0}
# eval.batch_tasks stays the config's on every machine: the test episodes of evaluate() are drawn
# per compiled call of batch_tasks episodes, so the same value is what lets a CPU meta-test of a
# committed checkpoint see the very episodes (and noise) the GPU's did.


def sitting(cdir: str, budget_s: float, *, eval_min_s: float | None = None,
            precision_choice: str | None = None, formulation: dict | None = None,
            formulation_xla_flags: str | None = None, started: float | None = None,
            log=print) -> dict:
  """Trains the campaign's next runs for ``budget_s`` seconds (elapsed time, compile included),
  checkpointing each; meta-tests runs that finish; regenerates the tables. Returns a summary.
  The budget counts on the monotonic clock from ``started`` (a ``time.monotonic()``; default:
  now), so a change of the system time (NTP, a VM resumed) cannot stretch or cut it.
  ``formulation``: execution fields (:data:`runs.FORMULATION_FIELDS`) set on every run it
  trains; ``formulation_xla_flags``: the XLA flags it was measured with (recorded with it for
  this kind of device; the process must already run under them, XLA_FLAGS)."""
  import jax
  from metadrop_jax import metrics as metrics_lib
  from metadrop_jax import train as train_lib
  from metadrop_jax import workdir as workdir_lib
  if not (math.isfinite(budget_s) and budget_s > 0):
    raise runs_lib.CampaignError(f'a sitting of {budget_s:.0f} s: give a positive '
                                 '--budget_minutes or a --deadline in the future')
  unfinished = swap.unfinished(cdir)
  if unfinished:
    raise runs_lib.CampaignError(unfinished)
  t_start, t_mono = time.time(), time.monotonic()
  deadline = (t_mono if started is None else started) + budget_s
  camp = runs_lib.load_campaign(cdir)
  formulation = runs_lib.resolve_formulation(cdir, camp, runs_lib.check_formulation(formulation),
                                             formulation_xla_flags)
  flags_problem = runs_lib.flags_differ_from_record(camp, os.environ.get('XLA_FLAGS', ''))
  if flags_problem:
    log(f'[campaign] WARNING: {flags_problem}')
  precision = runs_lib.resolve_precision(cdir, camp, precision_choice)
  jax.config.update('jax_default_matmul_precision', precision)
  if 'JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES' in autotune.xla_env(os.environ.get('XLA_FLAGS', '')):
    # the formulation's autotune cache (named in XLA_FLAGS), not the compilation cache's own
    jax.config.update('jax_persistent_cache_enable_xla_caches', 'none')
  eval_min_s, min_share_s = _minimum_times(jax.default_backend() != 'cpu', budget_s, eval_min_s)
  summary = {'start': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t_start)),
             'budget_s': budget_s, 'backend': jax.default_backend(),
             'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
             'commit': workdir_lib.provenance()['commit'], 'matmul_precision': precision,
             'xla_flags': os.environ.get('XLA_FLAGS', ''), 'formulation': formulation,
             'runs': [], 'skipped': []}
  rows = runs_lib.plan(cdir, camp)
  groups, summary['skipped'] = trainable_groups(rows)
  for r in rows:
    if r['action'] == 'skip':
      log(f"[campaign] WARNING: skipped {r['name']}: {r['problem']}")
  with train_lib.StopOnSignal() as stop:   # no run starts after a signal
    ctx = {'cdir': cdir, 'camp': camp, 'deadline': deadline, 'eval_min_s': eval_min_s,
           'min_share_s': min_share_s, 'formulation': formulation, 'log': log, 'stop': stop,
           'skipped': summary['skipped']}
    summary['runs'] += meta_test_finished(ctx, rows)
    for members in groups.values():
      done, out_of_time = train_group(ctx, members)
      summary['runs'] += done
      if out_of_time or stop.requested:
        break
  if stop.requested:
    summary['stopped'] = f'interrupted ({stop.requested})'
    log(f'[campaign] {stop.requested}: the sitting stops here (every run checkpointed)')
  summary['seconds'] = round(time.monotonic() - t_mono, 1)
  metrics_lib.append_jsonl(os.path.join(cdir, 'sittings.jsonl'), summary)
  reports.write_reports(cdir)
  return summary


def _minimum_times(on_accelerator: bool, budget_s: float, eval_min_s: float | None):
  """(eval_min_s, min_share_s). A finished run is meta-tested when at least eval_min_s are left
  (else first thing in the next sitting). No time is held back for it: a run that reaches
  num_steps stops before its share ends, and the rest of its share is what the evaluation
  uses."""
  if eval_min_s is None:
    eval_min_s = (EVAL_MIN_S['accelerator'] if on_accelerator else
                  min(EVAL_MIN_S['cpu'], 0.1 * budget_s))
  min_share_s = (MIN_SHARE_S['accelerator'] if on_accelerator else
                 min(MIN_SHARE_S['cpu'], 0.1 * budget_s))
  return eval_min_s, min_share_s


def meta_test(ctx, run: dict, cfg, entry: dict) -> dict:
  """Meta-tests ``run`` with the paper's protocol until the sitting's deadline or a stop signal;
  its accuracy goes into ``entry``. A meta-test cut there keeps the episodes it finished and the
  next sitting continues it first (evaluation.evaluate_checkpoint), so a finished run is always
  meta-tested, however little time the sitting that finished it had left."""
  from metadrop_jax import evaluation
  t0 = time.monotonic()
  wd = runs_lib.workdir_of(ctx['cdir'], run)
  r = evaluation.evaluate_checkpoint(
      cfg, wd, should_stop=lambda: (ctx['stop'].requested is not None or
                                    time.monotonic() > ctx['deadline']))
  entry['eval_s'] = round(time.monotonic() - t0, 1)
  if r is None:
    done = evaluation.load_partial(wd, cfg, entry['to']) or {'accs': ()}
    why = (f"interrupted ({ctx['stop'].requested})" if ctx['stop'].requested is not None else
           'cut by the deadline')
    entry.update(evaluated=False, eval_episodes_done=len(done['accs']), stopped=f'meta-test {why}')
    ctx['log'](f"[campaign] {run['name']}: meta-test {why} at {len(done['accs'])}/"
               f"{cfg.eval.num_episodes} episodes ({entry['eval_s']} s), kept: the next sitting "
               'continues it first')
    return entry
  entry.update(evaluated=True, accuracy=r['accuracy'], ci95=r['ci95'])
  ctx['log'](f"[campaign] {run['name']}: meta-test {r['accuracy']:.2f} ± {r['ci95']:.2f} "
             f"({entry['eval_s']} s)")
  return entry


def _guarded(ctx, name: str, what: str, fn):
  """``fn()``; or, when it fails with an error that a fix of this run's files or data must
  resolve, None, the run recorded as skipped with the reason (the other runs go on)."""
  from metadrop_jax import config as config_lib
  from metadrop_jax import workdir as workdir_lib
  from metadrop_jax.data import DataError
  try:
    return fn()
  except (config_lib.ConfigError, workdir_lib.WorkdirError, DataError, FloatingPointError,
          FileNotFoundError) as e:
    why = f'{what} failed: ' + ' '.join(str(e).split())
    ctx['skipped'].append({'name': name, 'why': why})
    ctx['log'](f'[campaign] WARNING: skipped {name}: {why}')
    return None


def meta_test_finished(ctx, rows) -> list[dict]:
  """Runs trained to the end but not yet meta-tested, while time is left: first."""
  out = []
  for row in rows:
    if (ctx['stop'].requested or row['action'] != 'eval' or not row['data_here'] or
        ctx['deadline'] - time.monotonic() <= ctx['eval_min_s']):
      continue
    run = runs_lib.run_of(ctx['camp'], row['name'])
    entry = {'name': run['name'], 'from': row['step'], 'to': row['step'], 'minutes': 0.0}
    cfg = runs_lib.run_config(run, ctx['camp'])
    if _guarded(ctx, run['name'], 'meta-test',
                lambda: meta_test(ctx, run, cfg, entry)) is not None:
      out.append(entry)
  return out


def trainable_groups(rows) -> tuple[dict[str, list[dict]], list[dict]]:
  """({group: its runs to train, in campaign order}, [runs skipped: their data is not here, or
  their files need a fix])."""
  skipped = [{'name': r['name'], 'why': r['problem']} for r in rows if r['action'] == 'skip']
  todo = [r for r in rows if r['action'] == 'train']
  skipped += [{'name': r['name'], 'why': f"no {r['data']} data here"}
              for r in todo if not r['data_here']]
  groups: dict[str, list[dict]] = {}
  for r in todo:
    if r['data_here']:
      groups.setdefault(r['group'], []).append(r)
  return groups, skipped


def train_group(ctx, members) -> tuple[list[dict], bool]:
  """Trains the runs of one group in equal shares of the time left. Returns (their entries,
  whether the sitting is out of time). A stop signal ends it (``ctx['stop'].requested``)."""
  from metadrop_jax import data as data_lib
  from metadrop_jax import train
  stop, log = ctx['stop'], ctx['log']
  left = lambda: ctx['deadline'] - time.monotonic()
  out = []
  # the run that is behind goes first: when a sitting is too short to split, the two methods of
  # a setting still advance in turn
  members = sorted(members, key=lambda r: r['step'])
  for i, row in enumerate(members):
    if stop.requested:
      break
    run = runs_lib.run_of(ctx['camp'], row['name'])
    cfg = runs_lib.config_lib_override(runs_lib.run_config(run, ctx['camp']), ctx['formulation'])
    t_data = time.monotonic()
    # prepares the cache outside the run's share
    if _guarded(ctx, run['name'], 'data', lambda: data_lib.load_split(cfg.data, 'train')) is None:
      continue
    if time.monotonic() - t_data > 1:
      log(f"[campaign] {cfg.data.name} data ready in {time.monotonic() - t_data:.0f} s")
    share = left() / (len(members) - i)
    if share < ctx['min_share_s']:
      if left() < ctx['min_share_s']:
        return out, True
      share = ctx['min_share_s']      # too short to split: this run gets the minimum, then stop
    cfg.max_minutes_per_run = share / 60.0
    log(f"[campaign] {run['name']}: step {row['step']}/{row['num_steps']}, share {share:.0f} s")
    wd = runs_lib.workdir_of(ctx['cdir'], run)
    status = _guarded(ctx, run['name'], 'training', lambda: train.train(cfg, wd))
    if status is None:
      continue
    status.pop('state')
    if status['stopped'].startswith('interrupted') and not stop.requested:
      stop.requested = status['stopped'].split('(')[-1].rstrip(')')
    entry = {'name': run['name'], 'from': row['step'], 'to': status['step'],
             'minutes': round(status['minutes_this_run'], 3), 'stopped': status['stopped'],
             'evaluated': False}
    log(f"[campaign] {run['name']}: now at {status['step']}/{status['num_steps']} "
        f"({status['minutes_this_run'] * 60:.0f} s, {status['stopped']})")
    if status['done'] and not stop.requested and left() > ctx['eval_min_s']:
      _guarded(ctx, run['name'], 'meta-test', lambda: meta_test(ctx, run, cfg, entry))
    out.append(entry)
  return out, False
