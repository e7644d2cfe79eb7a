"""Table 1 as a SLURM array job (scripts/slurm/, tools/long_runs/slurm.py): the task's decisions
without a scheduler, then the real thing on a one-node SLURM started on this machine
(tests/slurm/local_slurm.sh; skipped with the reason where it cannot start: not root, no
slurm-wlm / munge)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tools.long_runs import runs as runs_lib
from tools.long_runs import slurm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SLURM = os.path.join(ROOT, 'tests', 'slurm', 'local_slurm.sh')
PACE = os.path.join(ROOT, 'tests', 'slurm', 'pace')


def test_sbatch_array_covers_the_run_list():
  """The sbatch script's default --array is the campaign's run list (16 runs)."""
  with open(os.path.join(ROOT, 'scripts', 'slurm', 'table1.sbatch')) as f:
    m = re.search(r'^#SBATCH --array=0-(\d+)%\d+$', f.read(), re.M)
  assert m and int(m.group(1)) + 1 == len(slurm.array_runs()) == len(runs_lib.default_runs())
  seeded = slurm.array_runs(['tiny'], ['authors'], ['0', '3'])
  assert [r['name'] for r in seeded] == [
      'tiny_metadrop_authors_seed0', 'tiny_metadrop_authors_seed3', 'tiny_maml_authors_seed0',
      'tiny_maml_authors_seed3']
  assert '--config.seed=3' in slurm.launch_command(seeded[1], '/w', [])


def test_bad_options_are_one_line(tmp_path, capsys):
  for argv, says in [(['task', f'--dir={tmp_path}', '--index=16'], '--index=16: the array has 16'),
                     (['runs', '--overrides=num_stepz=3'], "no field 'num_stepz'"),
                     (['runs', '--gradients=approx'], "--gradients: ['approx']")]:
    with pytest.raises(SystemExit) as e:
      slurm.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and says in err, err
  assert not os.listdir(tmp_path)


FAKE_TRAINER = r'''
import json, os, signal, sys, time
workdir = [a for a in sys.argv if a.startswith('--workdir=')][0].split('=', 1)[1]
mode = os.environ['FAKE_MODE']
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(workdir, 'config.json'), 'w') as f:
  json.dump({'num_steps': 10}, f)
if mode == 'fail':
  sys.exit(2)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
open(os.path.join(workdir, 'ready'), 'w').close()
while not stop:
  time.sleep(0.01)
os.makedirs(os.path.join(workdir, 'checkpoints', '3'))
'''


def _fake_task(tmp_path, monkeypatch, mode, send=None):
  """slurm.task of run 0 with a fake trainer (``mode``), as array task 7_0 with a fake
  scontrol; ``send`` is sent to this process once the trainer is ready."""
  (tmp_path / 'bin').mkdir()
  (tmp_path / 'bin' / 'scontrol').write_text(
      f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
  (tmp_path / 'bin' / 'scontrol').chmod(0o755)
  (tmp_path / 'trainer.py').write_text(FAKE_TRAINER)
  (tmp_path / 'python').write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path}/trainer.py "$@"\n')
  (tmp_path / 'python').chmod(0o755)
  monkeypatch.setenv('PATH', f"{tmp_path / 'bin'}:{os.environ['PATH']}")
  monkeypatch.setenv('FAKE_MODE', mode)
  monkeypatch.setenv('SLURM_ARRAY_JOB_ID', '7')
  monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '0')
  monkeypatch.setenv('SLURM_JOB_ID', '9')
  cdir = tmp_path / 'runs'
  runs = slurm.array_runs(['tiny'])
  ready = cdir / runs[0]['name'] / 'ready'

  def signal_when_ready():
    for _ in range(1000):
      if ready.exists():
        os.kill(os.getpid(), send)
        return
      time.sleep(0.01)
  if send is not None:
    threading.Thread(target=signal_when_ready, daemon=True).start()
  rc = slurm.task(str(cdir), 0, runs, [], python=str(tmp_path / 'python'))
  log = tmp_path / 'scontrol.log'
  return rc, log.read_text() if log.exists() else ''


def test_time_limit_warning_stops_the_trainer_and_requeues_this_task(tmp_path, monkeypatch, capsys):
  """SIGUSR1 (the sbatch script's --signal=B:USR1@...) reaches the trainer as SIGTERM; it stops
  with a checkpoint, and the task requeues itself as <array>_<task> (the array's own id would
  requeue every task)."""
  rc, scontrol = _fake_task(tmp_path, monkeypatch, 'train', send=signal.SIGUSR1)
  assert rc == 0 and scontrol == 'requeue 7_0\n'
  assert 'stopped at step 3/10' in capsys.readouterr().err


def test_a_trainer_that_fails_is_not_requeued(tmp_path, monkeypatch, capsys):
  """A failure without a stop signal and without progress would fail again: the task exits
  with the trainer's code, and SLURM does not run it again."""
  rc, scontrol = _fake_task(tmp_path, monkeypatch, 'fail')
  assert rc == 2 and scontrol == ''
  assert 'not requeued' in capsys.readouterr().err


def test_a_finished_run_is_not_trained_again(tmp_path, capsys):
  run = slurm.array_runs(['tiny'])[1]
  wd = tmp_path / run['name']
  (wd / 'checkpoints' / '20').mkdir(parents=True)
  (wd / 'config.json').write_text(json.dumps({'num_steps': 20}))
  (wd / 'results.json').write_text(json.dumps({'step': 20, 'accuracy': 50.0, 'ci95': 1.0}))
  np.save(wd / 'episode_accs_test.npy', np.full(10, 0.5))   # a meta-test writes both
  assert slurm.task(str(tmp_path), 1, slurm.array_runs(['tiny']), [], python='/bin/false') == 0
  assert 'nothing to do' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# a real SLURM
# ------------------------------------------------------------------------------------------------

# Two tiny runs (one conv block, one inner step, no validation): 300 steps, each step paced to
# at least 0.1 s in the array (tests/slurm/pace: a sleep before each step; results unchanged), so a
# run trains for 30 s or more on any machine; the uninterrupted references run unpaced.
OPTIONS = ['--settings=tiny', '--gradients=authors',
           '--overrides=val_every=0,model.num_layers=1,inner_steps=1,num_steps=300,'
           'checkpoint_every=100,log_every=10,eval.num_episodes=10,eval.mc_samples=1']
STEP_SECONDS = 0.1
# what the sbatch script sets for every task (the references run under the same)
TASK_ENV = {'JAX_DEFAULT_MATMUL_PRECISION': 'highest',
            'XLA_FLAGS': ' --xla_gpu_deterministic_ops=true'}


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
  """munged, slurmctld and slurmd on localhost (tests/slurm/local_slurm.sh), stopped after."""
  d = tmp_path_factory.mktemp('slurm')
  r = subprocess.run(['bash', LOCAL_SLURM, 'start', str(d)], capture_output=True, text=True,
                     check=False)
  if r.returncode != 0:
    pytest.skip((r.stderr.strip().splitlines() or [f'exit code {r.returncode}'])[-1])
  env = {**os.environ, 'SLURM_CONF': str(d / 'slurm.conf')}
  try:
    yield {'dir': d, 'env': env}
  finally:   # a job's processes outlive slurmd: end the jobs first
    subprocess.run(['scancel', '--user=root'], env=env, check=False)
    for _ in range(100):
      if not _squeue(env):
        break
      time.sleep(0.2)
    subprocess.run(['bash', LOCAL_SLURM, 'stop', str(d)], check=False)


def _squeue(env) -> list[str]:
  out = subprocess.run(['squeue', '-h', '-o', '%i %T'], env=env, capture_output=True, text=True,
                       check=True).stdout
  return out.split('\n')[:-1]


def _after_time_limit_check(slurmctld_log, timeout=40.0):
  """Returns just after slurmctld's next test of the jobs' time limits (every 30 s)."""
  def count():
    with open(slurmctld_log, errors='replace') as f:
      return f.read().count('Testing job time limits')
  n, t0 = count(), time.time()
  while count() == n:
    assert time.time() - t0 < timeout, f'no time-limit test in {slurmctld_log} for {timeout} s'
    time.sleep(0.1)


def _rows(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def _state(workdir):
  import jax
  from metadrop_jax import workdir as workdir_lib
  _, state = workdir_lib.restore(workdir, workdir_lib.load_run_config(workdir))
  return jax.device_get(state)


def test_table1_array_on_a_real_slurm(cluster, tmp_path):
  """The array of two tiny runs under a real 1-minute time limit: every task is stopped by the
  limit's warning and requeues itself; one task is also stopped mid-run by
  ``scancel --full --signal=TERM`` and resumes; every task finishes and meta-tests its run; each
  final checkpoint (and meta-test) equals an uninterrupted run's bit for bit; the dependent
  report job builds Table 1; nothing is left in the queue.

  The time-limit path is the real one on every attempt: ``--time=1 --signal=B:USR1@5``, no
  test-sent USR1. slurmctld tests time limits every 30 s (compiled in) and sends the warning at
  the first test that finds at most warn time + 30 s left, so the warning comes 25-55 s into an
  attempt and the hard limit (60 s; OverTimeLimit=0, KillWait=5 in tests/slurm/local_slurm.sh)
  never. The array is submitted held and released just after such a test, so the first
  attempt's warning comes ~30 s in, while its run (>= 30 s of paced training) is still
  training, and a later attempt has ~50 s; a requeued task waits 5 s (cred_expire=5; SLURM's
  default is 2 minutes). The references are trained meanwhile, unpaced, and fill the
  compilation cache that the tasks use."""
  env = {**cluster['env'], **TASK_ENV, 'PYTHON': sys.executable,
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2',
         'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'jax_cache'),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  runs = slurm.array_runs(['tiny'], ['authors'])
  overrides = OPTIONS[2].split('=', 1)[1].split(',')
  (tmp_path / 'ref').mkdir()
  ref_logs = [open(tmp_path / 'ref' / f"{r['name']}.log", 'w')
              for r in runs]
  refs = [subprocess.Popen(slurm.launch_command(r, str(tmp_path / 'ref' / r['name']), overrides),
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
          for r, log in zip(runs, ref_logs)]
  cdir = tmp_path / 'table1'
  sub = subprocess.run(
      ['bash', os.path.join(ROOT, 'scripts', 'slurm', 'submit_table1.sh'), str(cdir),
       '--time=1', '--signal=B:USR1@5', '--gres=none', '--cpus-per-task=1', '--hold'],
      env={**env, 'TABLE1_OPTIONS': ' '.join(OPTIONS), 'PYTHONPATH': PACE,
           'METADROP_TEST_STEP_SECONDS': str(STEP_SECONDS)},
      cwd=str(tmp_path), capture_output=True, text=True, check=False)
  assert sub.returncode == 0, sub.stderr
  array = re.search(r'array job (\d+) \(2 runs\)', sub.stdout).group(1)
  for p, r, log in zip(refs, runs, ref_logs):
    rc = p.wait()
    log.close()
    assert rc == 0, (tmp_path / 'ref' / f"{r['name']}.log").read_text()[-2000:]
  _after_time_limit_check(cluster['dir'] / 'slurmctld.log')
  subprocess.run(['scontrol', 'release', array], env=env, check=True)
  t0 = time.time()

  # Task 1: once its second attempt trains on, scancel --full --signal=TERM (trainer and task).
  wd1 = str(cdir / runs[1]['name'])
  termed = None
  while _squeue(env) and time.time() - t0 < 240:
    log1 = _rows(os.path.join(wd1, 'runs.jsonl'))
    if termed is None and len(log1) == 1 and any(
        m['step'] > log1[0]['step'] for m in _rows(os.path.join(wd1, 'metrics.jsonl'))):
      subprocess.run(['scancel', '--full', '--signal=TERM', f'{array}_1'], env=env, check=True)
      termed = time.time() - t0
    time.sleep(0.1)
  left = _squeue(env)
  logs = {i: (cdir / 'logs' / f'table1_{array}_{i}.log').read_text() for i in range(2)}
  if left:
    subprocess.run(['scancel', array], env=env, check=False)
  assert not left, (left, logs)
  print(f'array and report done in {time.time() - t0:.0f} s (TERM at {termed:.0f} s)')

  for i, r in enumerate(runs):
    wd, ref = str(cdir / r['name']), str(tmp_path / 'ref' / r['name'])
    job = subprocess.run(['scontrol', 'show', 'job', f'{array}_{i}'], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert 'JobState=COMPLETED' in job and 'ExitCode=0:0' in job, job
    assert 'SIGUSR1: the time limit is near' in logs[i] and f'requeued {array}_{i}' in logs[i]
    assert 'trained and meta-tested' in logs[i]
    sittings = _rows(os.path.join(wd, 'runs.jsonl'))
    # stopped by the limit mid-run with a checkpoint, and resumed from it
    assert sittings[0]['stopped'] == 'interrupted (SIGTERM)' and 0 < sittings[0]['step'] < 300
    assert all(b['start_step'] == a['step'] for a, b in zip(sittings, sittings[1:]))
    assert sittings[-1]['step'] == 300
    got, want = _state(wd), _state(ref)
    import jax
    assert all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)), r['name']
    with open(os.path.join(wd, 'results.json')) as f, open(os.path.join(ref, 'results.json')) as g:
      assert json.load(f)['accuracy'] == json.load(g)['accuracy']
  # task 1: the TERM stopped its second attempt mid-run; the third resumed from that step
  s1 = _rows(os.path.join(wd1, 'runs.jsonl'))
  assert termed is not None and len(s1) >= 3, s1
  assert s1[1]['stopped'] == 'interrupted (SIGTERM)' and s1[0]['step'] < s1[1]['step'] < 300
  assert 'SIGTERM: the trainer got it too' in logs[1]
  table = (cdir / 'table1.md').read_text()
  assert f"`{cdir / runs[0]['name']}`" in table and f"`{cdir / runs[1]['name']}`" in table
