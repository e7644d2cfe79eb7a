"""The measuring phases of a GPU job, as plain functions of one :class:`Job`: info, the smoke
test (in the background), the benchmark and the torch.func peer. The job itself (the campaign's
sitting, packing, the order of everything) is :mod:`tools.long_runs.window`.

This process never imports jax (it would take the GPU's memory from the phases): every phase
runs in a child process with its own deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from tools.long_runs import choices
from tools.long_runs import procs
from tools.long_runs.procs import read_json

ROOT = procs.ROOT
# Fractions of the budget the phases may use at most (the campaign gets the rest).
SMOKE_FRACTION = 0.4     # runs beside the benchmark
BENCH_FRACTION = {'full': 0.55, 'quick': 0.4, 'skip': 0.0, 'formulations': 0.45}
# Of the measuring cap (window run --measure_cap_s), what the torch.func peer keeps after the
# benchmark (H200, 2026-12-04: its timing with the check took 19 s).
TORCH_RESERVE_S = 40.0


@dataclasses.dataclass
class Job:
  """What the phases of one job share: its options, clock, folders, log and summary."""
  a: Any                       # the parsed options of ``window run``
  t0: float
  work: str
  log: procs.Log
  env: dict
  summary: dict
  py: str = sys.executable
  smoke_proc: procs.Background | None = None
  smoke_end: float = 0.0
  smoke_record: dict | None = None     # a committed smoke result that makes the check needless
  bench_mode: str = 'skip'
  bench_cells: list = dataclasses.field(default_factory=list)   # meta_step, or formulation runs
  bench_end: float = 0.0
  measure_end: float = float('inf')    # benchmark and torch peer together end by then
  bench_rows: list = dataclasses.field(default_factory=list)
  formulation_cells: dict = dataclasses.field(default_factory=dict)   # formulations.CELLS

  @classmethod
  def start(cls, a) -> Job:
    t0 = time.time()
    work = os.path.abspath(a.work or os.path.join('/tmp', f'metadrop_window_{os.getpid()}'))
    os.makedirs(work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    summary = {'start': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t0)),
               'budget_s': a.budget_s, 'phases': {}, 'argv': sys.argv[1:]}
    return cls(a=a, t0=t0, work=work, log=procs.Log(os.path.join(work, 'window.log')), env=env,
               summary=summary)

  @property
  def end(self) -> float:          # everything, packing included, before this
    return self.t0 + self.a.budget_s

  @property
  def light_env(self) -> dict:
    """For children that share the GPU: allocate on demand instead of 75 % of the card."""
    return {**self.env, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}

  @property
  def measuring_env(self) -> dict:
    """For the smoke test and the benchmarks: their compiles go to a cache of their own, so
    that the one brought back holds what the campaign's sittings compile."""
    return {**self.light_env, 'JAX_COMPILATION_CACHE_DIR': self.path('measuring_cache')}

  def path(self, name: str) -> str:
    return os.path.join(self.work, name)

  def result(self, phase: str) -> dict:
    return self.summary['phases'].get(phase, {}).get('result') or {}

  @property
  def device_kind(self) -> str:
    return self.result('info').get('device_kind', '')


def run_phase(job: Job, name: str, fn) -> None:
  """``fn(job)`` into the summary as phase ``name``; a phase that fails is logged, never raised
  (a broken phase must not cost the packing)."""
  t = time.time()
  try:
    job.summary['phases'][name] = {'result': fn(job)}
  except Exception as e:  # noqa: BLE001
    import traceback
    job.log(f'{name} failed: {e!r}\n{traceback.format_exc()}')
    job.summary['phases'][name] = {'error': repr(e)}
  job.summary['phases'][name]['seconds'] = round(time.time() - t, 1)


# ------------------------------------------------------------------------------------------------
# a. info and the smoke test
# ------------------------------------------------------------------------------------------------

def info() -> dict:
  """Devices, package versions and nvidia-smi of this machine (run in a child process)."""
  import importlib.metadata as md
  import platform
  out = {'python': sys.version.split()[0], 'host': platform.node(),
         'commit': os.environ.get('METADROP_COMMIT', ''), 'xla_flags': os.environ.get(
             'XLA_FLAGS', ''), 'cpu_count': os.cpu_count(), 'versions': {}}
  for pkg in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax',
              'orbax-checkpoint', 'ml_collections', 'numpy', 'torch', 'tensorstore'):
    try:
      out['versions'][pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      pass
  from tools.long_runs import data_parts
  data_dir = os.environ.get('METADROP_DATA_DIR', '')
  if data_dir:   # what device_data.sh laid out: miniImageNet whole, or which parts are missing
    out['data'] = {'miniimagenet': data_parts.machine_status(
        os.path.join(ROOT, '.gpu_data', 'mimg'), data_parts.stash_dir(),
        os.path.join(data_dir, 'miniimagenet', 'miniimagenet_84x84.zip'))}
  import jax
  out['devices'] = [str(d) for d in jax.devices()]
  out['backend'] = jax.default_backend()
  out['device_kind'] = jax.devices()[0].device_kind
  if shutil.which('nvidia-smi'):
    try:
      out['nvidia_smi'] = subprocess.run(
          ['nvidia-smi', '--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit',
           '--format=csv,noheader'], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001
      out['nvidia_smi'] = repr(e)
  return out


def info_phase(job: Job) -> dict:
  out = job.path('info.json')
  job.log.run([job.py, '-c', 'import json, sys; from tools.long_runs import phases; '
               f'json.dump(phases.info(), open({out!r}, "w"))'], 120, job.light_env)
  return read_json(out) or {}


def start_smoke(job: Job) -> None:
  """The smoke test (mostly the float64 reference on the CPU) starts beside the benchmark (on the
  GPU): the benchmark compiles meanwhile and starts timing once it is done. It checks the
  formulations of ``--smoke_conv_impls`` and those the planned formulation cells compute
  (:func:`choices.smoke_keys`). With ``--smoke=auto`` it is not run when a committed result of
  this card kind and numerics fingerprint passed every one of them."""
  a = job.a
  from tools.long_runs import fingerprint
  digest = fingerprint.numerics_fingerprint(job.result('info').get('versions', {}).get('jax', ''))
  rec = choices.smoke_on_record(job.device_kind, digest) if a.smoke == 'auto' else None
  keys = choices.smoke_keys(a.smoke_conv_impls, job.bench_cells if job.bench_mode ==
                           'formulations' else [], job.formulation_cells)
  if rec and all((rec.get('pass_highest_by_conv_impl') or {}).get(k) for k in keys.split(',')):
    job.smoke_record = rec
    job.log(f"smoke test passed on record ({rec['on_record']}, fingerprint {digest}): "
            'not run again')
    return
  cmd = [job.py, '-m', 'tools.long_runs.gpu_check', f'--setting={a.smoke_setting}',
         f'--gradients={a.smoke_gradients}', f"--out={job.path('smoke.json')}"]
  cmd += [f'--set={x}' for x in a.smoke_set.split(',') if x]
  cmd += [f'--precisions={a.smoke_precisions}', f'--conv_impls={keys}']
  job.smoke_proc = procs.Background(job.log, cmd, job.path('smoke.log'), job.measuring_env)
  job.smoke_end = time.time() + SMOKE_FRACTION * a.budget_s


def smoke_phase(job: Job) -> dict:
  if job.smoke_record is not None:
    return {'rc': 'on record', **job.smoke_record}
  rc = job.smoke_proc.wait(job.smoke_end)
  res = read_json(job.path('smoke.json'))
  if res:
    from tools.long_runs import gpu_check
    job.log(gpu_check.format_check(res))
  return {'rc': rc, **(res or {})}


# ------------------------------------------------------------------------------------------------
# b. the benchmark and the torch peer
# ------------------------------------------------------------------------------------------------

def plan_bench(job: Job) -> None:
  """The benchmark's mode, cells and deadline. Cells are (precision, config, method, XLA flags or
  None = the job's, seeds), most useful first: the campaign's first cell (its compile is reused
  by the sitting through the cache), TF32 (decides the campaign's precision), the cost of
  deterministic ops, seeds as a batch axis, the rest."""
  a = job.a
  job.measure_end = time.time() + a.measure_cap_s
  if a.bench in ('auto', 'formulations'):
    plan_formulations(job)
    return
  on_gpu = job.result('info').get('backend') not in (None, 'cpu')
  flags = os.environ.get('XLA_FLAGS', '')
  nondet = (' '.join(f for f in flags.split() if 'xla_gpu_deterministic_ops' not in f)
            if 'xla_gpu_deterministic_ops' in flags else None)
  configs = a.bench_configs.split(',')
  first = configs[0]
  cells = [('highest', first, 'metadrop', None, 1)]
  if on_gpu:
    cells.append(('default', first, 'metadrop', None, 1))
  if nondet is not None:
    cells.append(('highest', first, 'metadrop', nondet, 1))
  cells += [('highest', first, 'maml', None, 1), ('highest', first, 'metadrop', None, a.bench_seeds)]
  cells += [('highest', c, m, None, 1) for c in configs[1:] for m in ('metadrop', 'maml')]
  job.bench_mode, job.bench_cells = choices.bench_plan(
      a.bench, cells, choices.measured_cells(job.device_kind), flags,
      lambda: choices.next_run_cell(os.path.abspath(a.campaign_dir)))
  job.bench_end = _bench_end(job)


def plan_formulations(job: Job) -> None:
  """``--bench=formulations``: the given cells; ``auto``: the cells without a committed timing
  on this card kind (after the one the campaign trains with), or none: the job trains."""
  import importlib.util
  a = job.a
  spec = importlib.util.spec_from_file_location(
      'formulations', os.path.join(ROOT, 'benchmarks', 'formulations.py'))
  formulations = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(formulations)
  job.formulation_cells = formulations.CELLS
  first, cdir = a.bench_configs.split(',')[0], os.path.abspath(a.campaign_dir)
  reference = choices.reference_cell(choices.recorded(cdir, job.device_kind), formulations.CELLS,
                                     choices.recorded_flags(cdir, job.device_kind))
  job.bench_cells = choices.formulation_runs(
      a.bench, first, a.formulations_cells.split(','), reference,
      lambda c, m: choices.measured_formulations(job.device_kind, c, m),
      choices.pending_pairs(cdir))
  job.bench_mode = 'formulations' if job.bench_cells else 'skip'
  job.bench_end = _bench_end(job)
  job.log('benchmark: ' + ('; '.join(f"{c} {m}: {','.join(cells)}" for c, m, cells in
                                     job.bench_cells) or 'none (every cell has a timing)'))


def _bench_end(job: Job) -> float:
  """The benchmark's deadline: its fraction of the budget, within the measuring cap less the
  torch peer's share of it when the peer runs after it."""
  torch_after = job.bench_mode not in ('skip', 'quick') and job.a.torch != 'skip'
  return min(time.time() + BENCH_FRACTION.get(job.bench_mode, 0.0) * job.a.budget_s,
             job.measure_end - (TORCH_RESERVE_S if torch_after else 0.0))


def formulations_phase(job: Job) -> dict:
  """benchmarks/formulations.py once per planned (config, method); the first run's summary
  is formulations.json, the others go into its 'also' list. Only the first is traced."""
  a = job.a
  results = []
  for i, (cfg, method, cells) in enumerate(job.bench_cells):
    out = job.path(f'formulations_{i}.json')
    cmd = [job.py, 'benchmarks/formulations.py', f'--config={cfg}', f'--method={method}',
           f'--gradient={a.bench_gradient}', '--precision=highest', f"--cells={','.join(cells)}",
           f'--parallel={a.formulations_parallel}', f'--iters={a.bench_iters}',
           f'--warmup={a.bench_warmup}', f'--deadline={job.bench_end}',
           f'--concurrent={a.formulations_concurrent if i == 0 else ""}', f'--out={out}']
    if i == 0:
      cmd += [f"--trace_dir={job.path('traces')}", '--trace_steps=3']
    if job.smoke_proc is not None:   # time on a card the smoke test no longer shares
      cmd.append(f'--wait_pid={job.smoke_proc.p.pid}')
    cmd += [f'--set={x}' for x in a.bench_set.split(',') if x]
    job.log.run(cmd, job.bench_end - time.time() + 5, job.measuring_env)
    if read_json(out):
      results.append(read_json(out))
  if not results:
    return {'mode': job.bench_mode, 'formulations': None}
  merged = {**results[0], 'also': results[1:]}
  with open(job.path('formulations.json'), 'w') as f:
    json.dump(merged, f, indent=1)
  return {'mode': job.bench_mode, 'formulations': merged}


def bench_phase(job: Job) -> dict:
  a = job.a
  if job.bench_mode == 'formulations':
    return formulations_phase(job)
  if not job.bench_cells:
    return {'mode': job.bench_mode}
  base = [job.py, 'benchmarks/meta_step.py', '--no-naive', f'--iters={a.bench_iters}',
          f'--warmup={a.bench_warmup}'] + [f'--set={x}' for x in a.bench_set.split(',') if x]
  for i, (prec, cfg, method, xflags, seeds, *grad) in enumerate(job.bench_cells):
    if time.time() > job.bench_end - 3:
      job.bench_rows.append({'config': cfg, 'method': method, 'precision': prec, 'seeds': seeds,
                             'error': 'not run: window budget'})
      continue
    out = job.path(f'bench_{i}.json')
    cmd = base + [f'--configs={cfg}', f'--methods={method}', f'--precision={prec}',
                  f'--set=meta_gradient={grad[0] if grad else a.bench_gradient}',
                  f'--deadline={job.bench_end}', f'--out={out}']
    if seeds > 1:
      cmd.append(f'--seeds={seeds}')
    if xflags is not None:
      cmd.append(f'--xla-flags={xflags}')
    job.log.run(cmd, job.bench_end - time.time(), job.env)
    job.bench_rows.extend((read_json(out) or {}).get('rows', []))
  return {'mode': job.bench_mode, 'rows': job.bench_rows}


def torch_formulation_cells(bench_cells: list) -> list[tuple[str, str]]:
  """The torch.func peer's cells after a formulations benchmark, each beside our timing of the
  same job: both methods of the first (config, method) timed, then every other (config, method)
  timed, in that order (the peer's deadline may end the list)."""
  out = []
  for i, (cfg, method, _) in enumerate(bench_cells):
    for m in (method, 'maml' if method == 'metadrop' else 'metadrop') if i == 0 else (method,):
      if (cfg, m) not in out:
        out.append((cfg, m))
  return out


def torch_phase(job: Job) -> dict:
  a = job.a
  if job.bench_mode in ('skip', 'quick') or a.torch == 'skip':
    return {'skipped': 'not asked'}
  torch_end = min(max(job.bench_end, time.time()) + a.torch_share * a.budget_s, job.measure_end)
  if torch_end - time.time() < 10:
    return {'skipped': f'the measuring cap (--measure_cap_s={a.measure_cap_s:.0f}) is spent'}
  try:
    import importlib.util
    if importlib.util.find_spec('torch') is None:
      return {'skipped': 'torch is not installed here'}
  except Exception as e:  # noqa: BLE001
    return {'skipped': repr(e)}
  out = job.path('torch.json')
  configs = a.bench_configs.split(',')
  cells = [(c, m) for c in configs for m in ('metadrop', 'maml')]
  done = choices.measured_torch_cells(job.device_kind)
  missing = [c for c in cells if c not in done]
  if job.bench_mode == 'formulations':   # the peer beside the new timings: a ratio in one job
    cells = torch_formulation_cells(job.bench_cells)
  else:
    cells = missing or cells
  cmd = [job.py, 'benchmarks/torch_peer.py', f"--cells={','.join(f'{c}:{m}' for c, m in cells)}",
         '--precision=highest', f'--iters={a.bench_iters}', f'--deadline={torch_end - 10}',
         f'--out={out}'] + (['--check'] if not done else [])
  job.log.run(cmd, torch_end - time.time(), job.env)
  return read_json(out) or {'error': 'no output'}
