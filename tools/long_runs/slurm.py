"""Table 1 as one SLURM array job: one array task per run of the campaign's run list, each
trained and meta-tested by ``launch.py`` in its own folder on the shared filesystem.

  scripts/slurm/submit_table1.sh DIR [sbatch options]   # the array, then the report job after it
  python -m tools.long_runs.slurm runs                  # the array's runs by task index
  python -m tools.long_runs.slurm task --dir=DIR --index=I  # one task (scripts/slurm/table1.sbatch)
  python -m tools.long_runs.slurm report --dir=DIR      # Table 1 from DIR's run folders

The runs are :func:`tools.long_runs.runs.default_runs` (setting x method x meta-gradient, in the
campaign's order), optionally times ``--seeds``; ``DIR/<run name>/`` is an ordinary training
workdir. A task trains its run (``launch.py --mode=train_eval``, resuming from the folder's
checkpoint) and meta-tests it. Near the time limit SLURM sends the task SIGUSR1
(``--signal=B:USR1@<seconds>``): the task passes it on to the trainer as SIGTERM (not during the
meta-test, which goes on), the trainer stops after the step in flight with a checkpoint, and the
task requeues itself (``scontrol requeue``) until its run is trained and meta-tested. A SIGTERM
that SLURM sends to the whole task (``scancel --full --signal=TERM``, a preemption, the hard time
limit) reaches the trainer directly; the task then requeues itself the same way. docs/slurm.md is
the user's guide.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from tools.long_runs import runs as runs_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the task answers to: the time-limit warning of the sbatch script (--signal=B:USR1@...),
# passed on to the trainer; SIGTERM / SIGINT, which SLURM sends to every process of the task
# (the trainer gets its own: passing it on would be a second signal, which stops it at once).
WARNING = signal.SIGUSR1
DIRECT = (signal.SIGTERM, signal.SIGINT)


def _comma_list(text: str) -> list[str]:
  return [x for x in text.split(',') if x]


def array_runs(settings=None, gradients=None, seeds=None) -> list[dict]:
  """The array's runs, task index = position: the campaign's run list
  (:func:`runs.default_runs` of ``settings`` and meta-``gradients``), each once per seed when
  ``seeds`` are given (name ``..._seed<s>``, the config's ``seed`` field set)."""
  base = runs_lib.default_runs(tuple(settings or runs_lib.SETTINGS),
                               gradients=tuple(gradients or runs_lib.GRADIENTS))
  if not seeds:
    return base
  return [{**r, 'name': f"{r['name']}_seed{s}", 'seed': int(s)} for r in base for s in seeds]


def check_configs(runs: list[dict], overrides: list[str]) -> None:
  """Builds every run's config (a misspelled field or a bad value: ValueError naming the run)."""
  import configs
  from metadrop_jax import cli
  fields = cli.parse_overrides(overrides)
  for r in runs:
    try:
      configs.get(r['setting'], method=r['method'], meta_gradient=r['meta_gradient'],
                  **({'seed': r['seed']} if 'seed' in r else {}), **fields)
    except (KeyError, ValueError, TypeError) as e:
      why = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
      raise ValueError(f"run {r['name']}: {' '.join(why.split())}: fix --settings / --overrides "
                       '(TABLE1_SETTINGS / TABLE1_OVERRIDES)') from None


def launch_command(run: dict, workdir: str, overrides: list[str],
                   python: str = sys.executable) -> list[str]:
  """``launch.py`` training and then meta-testing ``run`` in ``workdir`` (resuming)."""
  fields = {'method': run['method'], 'meta_gradient': run['meta_gradient'],
            **runs_lib.RUN_LOOP_FIELDS, **({'seed': run['seed']} if 'seed' in run else {})}
  return ([python, os.path.join(ROOT, 'launch.py'), '--mode=train_eval',
           f"--config={os.path.join(ROOT, 'configs', run['setting'] + '.py')}"]
          + [f'--config.{k}={v}' for k, v in fields.items()]
          + [f'--config.{o}' for o in overrides] + [f'--workdir={workdir}'])


def run_state(cdir: str, run: dict) -> dict:
  """Steps done, whether the run is trained and meta-tested (``done``), and what keeps its
  folder from training (``problem``), as the campaign reads a run folder."""
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')     # a cut results.json reads as none: meta-tested again
    p = runs_lib.progress(cdir, run)
  return {**p, 'done': p['trained'] and p['evaluated']}


def job_id() -> str | None:
  """This task's job as ``scontrol`` names it: ``<array job>_<task>`` in an array (the array's
  own id would requeue every task), else the job id; None outside SLURM."""
  array, task = os.environ.get('SLURM_ARRAY_JOB_ID'), os.environ.get('SLURM_ARRAY_TASK_ID')
  if array and task:
    return f'{array}_{task}'
  return os.environ.get('SLURM_JOB_ID')


class Signals:
  """While active: the time-limit warning is passed on to the trainer as SIGTERM, once, while the
  run trains (before the trainer starts it is only recorded; during the meta-test, which cannot
  stop at a checkpoint, it is ignored: the meta-test goes on, and if the limit comes first the
  next attempt repeats it). SIGTERM / SIGINT are recorded (the trainer got its own). ``seen``
  lists the names of the signals received."""

  def __init__(self, log, trained):
    self.seen: list[str] = []
    self.child = None
    self._trained = trained
    self._forwarded = False
    self._log = log
    self._old = {}

  def __enter__(self):
    for sig in (WARNING,) + DIRECT:
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    self.seen.append(name)
    if signum != WARNING:
      self._log(f'{name}: the trainer got it too and stops after this step, checkpointed')
    else:
      self._log(f'{name}: the time limit is near')
      self.forward()

  def forward(self):
    """Passes the warning on to the trainer (if it runs, and only once)."""
    if self.child is None or self._forwarded or self.child.poll() is not None:
      return
    if self._trained():
      self._log('the run is trained: its meta-test goes on')
      return
    self._forwarded = True
    self._log('the trainer stops after this step, checkpointed')
    self.child.send_signal(signal.SIGTERM)


def requeue(job: str, log) -> int:
  """``scontrol requeue`` of this task: SLURM ends it and starts it again later (0; this works
  during the hard time limit's SIGTERM as well), or the task fails with SLURM's reason (1)."""
  r = subprocess.run(['scontrol', 'requeue', job], capture_output=True, text=True, check=False)
  if r.returncode == 0:
    log(f'requeued {job}: the next attempt resumes from the checkpoint')
    return 0
  log(f"error: scontrol requeue {job} failed ({' '.join((r.stderr or r.stdout).split())}): "
      'submit the array again (finished runs are skipped)')
  return 1


def task(cdir: str, index: int, runs: list[dict], overrides: list[str],
         python: str = sys.executable) -> int:
  """One array task: trains and meta-tests run ``index`` unless it is done; requeues the task
  when the trainer was stopped (a signal, or a step limit) before the run was done. Returns the
  exit code: 0 (done or requeued), the trainer's when it failed without a stop (a rerun would
  fail again: no requeue), 1 when a requeue was needed but is impossible."""
  if not 0 <= index < len(runs):
    raise ValueError(f'--index={index}: the array has {len(runs)} runs (0-{len(runs) - 1}): '
                     'submit --array within them (python -m tools.long_runs.slurm runs)')
  run = runs[index]
  workdir = runs_lib.workdir_of(cdir, run)

  def log(msg):
    print(f"[table1 {index} {run['name']} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
          flush=True)

  before = run_state(cdir, run)
  if before['problem']:
    raise ValueError(before['problem'])
  if before['done']:
    log(f"already trained ({before['step']} steps) and meta-tested: nothing to do")
    return 0
  attempt = int(os.environ.get('SLURM_RESTART_COUNT', '0') or 0) + 1
  log(f"attempt {attempt} on {os.uname().nodename}, job {job_id()}: from step {before['step']}")
  os.makedirs(cdir, exist_ok=True)
  with Signals(log, lambda: run_state(cdir, run)['trained']) as sigs:
    sigs.child = subprocess.Popen(launch_command(run, workdir, overrides, python), cwd=ROOT)
    if WARNING.name in sigs.seen:    # the warning came while the trainer was being started
      sigs.forward()
    rc = sigs.child.wait()
  after = run_state(cdir, run)
  if after['done']:
    res = after['results']
    log(f"trained and meta-tested: accuracy {res['accuracy']:.2f} ± {res['ci95']:.2f}")
    return 0
  progressed = (after['step'], after['trained']) > (before['step'], before['trained'])
  log(f"stopped at step {after['step']}/{after['num_steps']} (trainer exit code {rc}"
      + (f", signals: {', '.join(sigs.seen)}" if sigs.seen else '') + ')')
  if not (sigs.seen or progressed):
    log('error: the trainer stopped without progress and without a stop signal: not requeued '
        '(the log above says why)')
    return rc if rc and rc > 0 else 1
  job = job_id()
  if job is None:
    log('not in a SLURM job: run the same command again to continue')
    return 0
  return requeue(job, log)


def report(cdir: str, runs: list[dict], out: str | None = None) -> int:
  """Prints each run's state and builds Table 1 (``metadrop_jax.cli.report``) from the runs that
  are done into ``out`` (default DIR/table1.md). Exit code 0 when every run is done, else 1."""
  from metadrop_jax.cli import report as report_cli
  states = [(r, run_state(cdir, r)) for r in runs]
  for i, (r, s) in enumerate(states):
    what = 'done' if s['done'] else 'trained, not meta-tested' if s['trained'] else 'training'
    print(f"{i:>3} {r['name']:<44} {s['step']:>7}/{s['num_steps'] or '?':<7} {what}")
  done = [runs_lib.workdir_of(cdir, r) for r, s in states if s['done']]
  missing = len(runs) - len(done)
  out = out or os.path.join(cdir, 'table1.md')
  print(f'{len(done)} of {len(runs)} runs done; Table 1 of them: {out}\n  (python -m '
        f"metadrop_jax.cli.report --workdirs={','.join(done) or '...'} --out={out})")
  if done:
    report_cli.main([f"--workdirs={','.join(done)}", f'--out={out}'])
  if missing:
    print(f'{missing} runs are not done: submit the array again to finish them '
          '(finished runs are skipped)', file=sys.stderr)
  return 1 if missing else 0


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--settings', type=_comma_list, default=None,
                      help="configs/<name>.py settings, comma-separated (default: Table 1's four)")
  common.add_argument('--gradients', type=_comma_list, default=None,
                      help='meta-gradients, comma-separated (default: %s)' % ','.join(
                          runs_lib.GRADIENTS))
  common.add_argument('--seeds', type=_comma_list, default=None,
                      help='comma-separated seeds: every run once per seed (default: the '
                           "configs' own seed, one run each)")
  common.add_argument('--overrides', type=_comma_list, default=[],
                      help='field=value overrides of every run, comma-separated (launch.py '
                           '--config.<field>=<value>)')
  ap = argparse.ArgumentParser(prog='python -m tools.long_runs.slurm',
                               description=__doc__.split('\n')[0])
  sub = ap.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('runs', parents=[common], help="the array's runs by task index; every "
                     "run's config is built first")
  r.add_argument('--count', action='store_true', help='print only how many runs there are')
  t = sub.add_parser('task', parents=[common], help='one array task (in the sbatch script)')
  t.add_argument('--dir', required=True, help='the runs\' folder on the shared filesystem')
  t.add_argument('--index', type=int, required=True, help='the run (SLURM_ARRAY_TASK_ID)')
  p = sub.add_parser('report', parents=[common], help='Table 1 from the runs that are done')
  p.add_argument('--dir', required=True, help='the runs\' folder')
  p.add_argument('--out', default=None, help='the table (default: DIR/table1.md)')
  return ap


def main(argv=None) -> int:
  from metadrop_jax import cli
  a = _parser().parse_args(argv)
  try:
    runs = array_runs(a.settings, a.gradients, a.seeds)
  except ValueError as e:
    cli.fail(f'--seeds: {e}: give integer seeds')
  bad = sorted(set(a.gradients or ()) - set(runs_lib.GRADIENTS))
  if bad:
    cli.fail(f'--gradients: {bad}: choose from {list(runs_lib.GRADIENTS)}')
  try:
    if a.cmd == 'runs':
      check_configs(runs, a.overrides)
      print(len(runs) if a.count else '\n'.join(f"{i:>3} {r['name']}" for i, r in enumerate(runs)))
      return 0
    if a.cmd == 'task':
      return task(a.dir, a.index, runs, a.overrides)
    return report(a.dir, runs, a.out)
  except ValueError as e:
    cli.fail(e)


if __name__ == '__main__':
  sys.exit(main())
