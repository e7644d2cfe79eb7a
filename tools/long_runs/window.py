"""One GPU window, start to end, inside a time budget; and unpacking what it brings back.

On the device (through ``scripts/device_window.sh BUDGET_S``, which installs the carried wheels,
lays out the data and sets the compile cache first):

  python -m metadrop_jax.window run --budget_s=450 --out=$OUT

runs, in this order, each phase with its own deadline so that the last one always happens:

a. ``info`` (devices, versions, nvidia-smi) and the smoke test (``metadrop_jax.gpu_check``: the
   meta-gradient of one task vs the float64 CPU reference, at 'highest' and default (TF32)
   matmul precision); a failed 'highest' check stops the window before the campaign;
b. the benchmark (``benchmarks/meta_step.py``: every paper config x both methods in the
   campaign's computation; TF32 and non-deterministic variants of the first cell) and the
   torch.func peer (``benchmarks/torch_peer.py``: one-task check against JAX, then timings);
c. a campaign sitting (``launch.py --mode=campaign``) for the rest of the budget;
d. packing into ``$OUT``: ``window.json`` (everything measured), ``window.log``, the campaign's
   changed state as ``campaign.tgz`` (split into ``campaign.tgz.N`` parts of <= 15 MiB if it is
   larger) and, when it fits, ``jax_cache.tgz`` (the compile cache, to carry next time):
   at most 8 files of at most 16 MiB.

Back here:

  python -m metadrop_jax.window unpack /path/to/returned/files

puts the campaign state in place (each returned run directory replaces the local one), stores
``window.json`` and the log under ``docs/bench/windows/``, regenerates the campaign tables,
``docs/results.md``'s status block and ``docs/performance.md``'s GPU block, and keeps the compile
cache in ``.gpu_cache/`` (git-ignored) for the next window. docs/gpu_window.md has the sequence.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
PART_BYTES = 15 * 2**20
PAPER_SETTINGS = ('omniglot_20way1shot', 'omniglot_20way5shot', 'mimgnet_5way1shot',
                  'mimgnet_5way5shot')
TF32_MIN_SPEEDUP = 1.25   # TF32 trains the campaign only if it is at least this much faster
# Fractions of the budget the phases may use at most (the campaign gets the rest).
SMOKE_FRACTION = 0.4     # runs beside the benchmark
BENCH_FRACTION = {'full': 0.55, 'quick': 0.4, 'skip': 0.0, 'formulations': 0.45}
PACK_RESERVE_S = 15.0


class Log:
  """Timestamped lines to stdout and a log file; subprocess output is appended to the file."""

  def __init__(self, path):
    self.path = path
    self.t0 = time.time()
    self.f = open(path, 'a')

  def __call__(self, msg):
    line = f'[{time.time() - self.t0:7.1f}s] {msg}'
    print(line, flush=True)
    self.f.write(line + '\n')
    self.f.flush()

  def run(self, cmd, timeout, env=None):
    """Runs ``cmd`` (list), its output into the log; returns (rc, seconds). Never raises."""
    self(f"$ {' '.join(cmd)}   (timeout {timeout:.0f} s)")
    t = time.time()
    if timeout <= 1:
      self('  skipped: no time left')
      return None, 0.0
    self.f.flush()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.f, stderr=subprocess.STDOUT,
                         start_new_session=True)
    _CHILDREN.append(p)
    try:
      rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      _kill_group(p)
      rc = 'timeout'
    self(f'  -> rc {rc} in {time.time() - t:.1f} s')
    return rc, time.time() - t


_CHILDREN: list = []   # process groups to end if this process is terminated (timeout in the .sh)


def _on_term(signum, frame):
  for p in _CHILDREN:
    if p.poll() is None:
      _kill_group(p)
  sys.exit(128 + signum)


def _kill_group(p):
  """Kills a child started with start_new_session=True and everything it started."""
  import signal
  try:
    os.killpg(p.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    p.kill()
  p.wait()


class Background:
  """A subprocess running beside the main sequence (its output in its own log file)."""

  def __init__(self, log, cmd, logfile, env):
    log(f"$ {' '.join(cmd)}   (in the background)")
    self.log, self.logfile, self.t = log, logfile, time.time()
    self.f = open(logfile, 'w')
    self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.f, stderr=subprocess.STDOUT,
                              start_new_session=True)
    _CHILDREN.append(self.p)

  def wait(self, deadline):
    try:
      rc = self.p.wait(timeout=max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      _kill_group(self.p)
      rc = 'timeout'
    self.f.close()
    with open(self.logfile) as f:
      self.log.f.write(f.read())
    self.log(f'  -> background rc {rc} in {time.time() - self.t:.1f} s')
    return rc


def _read_json(path, default=None):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


# ------------------------------------------------------------------------------------------------
# phase a: info
# ------------------------------------------------------------------------------------------------

def info() -> dict:
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


def _next_run_cell(cdir: str):
  """The benchmark cell of the campaign's next run (None if there is none)."""
  try:
    from tools.long_runs import campaign
    camp = campaign.load_campaign(cdir)
    nxt = next((r for r in campaign.plan(cdir, camp) if r['action'] == 'train' and
                r['data_here']), None)
  except Exception:  # noqa: BLE001 - no campaign here: the default first cell
    return None
  if nxt is None or nxt['setting'] not in PAPER_SETTINGS:
    return None
  prec = camp.get('matmul_precision')
  return (prec if prec in ('highest', 'default') else 'highest', nxt['setting'], nxt['method'],
          None, 1, nxt['meta_gradient'])


def _cell_key(cell, window_flags=''):
  prec, cfg, method, xflags, seeds = cell[:5]
  det = 'xla_gpu_deterministic_ops=true' in (window_flags if xflags is None else xflags)
  return (cfg, method, prec, det, seeds)


def _row_key(r):
  return (r.get('config'), r.get('method'), r.get('precision'),
          'xla_gpu_deterministic_ops=true' in r.get('xla_flags', ''), r.get('seeds', 1))


def measured_cells(device_kind: str, repo: str = ROOT) -> set:
  """Benchmark cells with a committed row measured on this kind of card (docs/bench/windows)."""
  out = set()
  for p in glob.glob(os.path.join(repo, 'docs', 'bench', 'windows', '*.json')):
    s = _read_json(p, {})
    if s.get('device_kind') != device_kind:
      continue
    for r in (s.get('phases', {}).get('bench', {}).get('result') or {}).get('rows', []):
      if 'error' not in r:
        out.add(_row_key(r))
  return out


def measured_torch_cells(device_kind: str, repo: str = ROOT) -> set:
  out = set()
  for p in glob.glob(os.path.join(repo, 'docs', 'bench', 'windows', '*.json')):
    s = _read_json(p, {})
    if s.get('device_kind') == device_kind:
      for r in (s.get('phases', {}).get('torch', {}).get('result') or {}).get('rows', []):
        if r.get('kind') == 'time':
          out.add((r['config'], r['method']))
  return out


def bench_plan(mode: str, cells: list, measured: set, window_flags: str, next_cell) -> tuple:
  """(mode, the cells to benchmark) for ``--bench=mode``. 'auto' is 'full' on the first window
  of a card kind (no committed row for it: ``measured`` is empty of ``cells``), else 'quick':
  later windows train, and the quick cell (the campaign's next run, ``next_cell()``, at the
  campaign's precision; its compile lands in the cache for the sitting) measures each setting as
  the campaign reaches it. The first H200 window's full benchmark took 55 % of its budget for
  five cells. 'full' measures the cells not yet measured (all of them again if none is left)."""
  todo = [c for c in cells if _cell_key(c, window_flags) not in measured]
  if mode == 'auto':
    mode = 'full' if len(todo) == len(cells) else 'quick'
  if mode == 'full':
    return mode, todo or cells
  if mode == 'quick':
    return mode, [next_cell() or cells[0]]
  return mode, []


def choose_formulation(form: dict | None, smoke: dict | None) -> dict:
  """The formulation a sitting trains with: the fastest deterministic cell of the formulations
  benchmark (steps dispatched back to back) whose conv formulation passed the smoke test, if it
  is faster than the baseline; else the configs' default. Returns {'overrides', 'extra_flags',
  'cell', 'why'}."""
  from tools.long_runs import campaign
  none = {'overrides': {}, 'extra_flags': '', 'cell': None}
  rows = [r for r in (form or {}).get('rows', []) if 'error' not in r]
  if not rows:
    return {**none, 'why': 'no formulation measured'}
  passed = (smoke or {}).get('pass_highest_by_conv_impl') or {}
  from tools.long_runs.gpu_check import formulation_key
  ok = [r for r in rows if r.get('deterministic_ops') and passed.get(formulation_key(
      r['overrides'].get('model.conv_impl', 'xla'),
      r['overrides'].get('model.dot_algorithm', 'default')), False)]
  if not ok:
    return {**none, 'why': 'no deterministic cell whose conv formulation passed the smoke test'}
  best = min(ok, key=lambda r: r['ms_per_iter_pipelined'])
  base = next((r for r in rows if r['cell'] == 'baseline'), None)
  if base is not None and best['ms_per_iter_pipelined'] >= base['ms_per_iter_pipelined']:
    return {**none, 'why': 'no cell faster than the baseline'}
  overrides = {k: v for k, v in best['overrides'].items() if k in campaign.FORMULATION_FIELDS}
  why = f"{best['cell']}: {best['ms_per_iter_pipelined']:.2f} ms/iter"
  if base is not None:
    why += (f" vs baseline {base['ms_per_iter_pipelined']:.2f} "
            f"({base['ms_per_iter_pipelined'] / best['ms_per_iter_pipelined']:.2f}x)")
  return {'overrides': overrides, 'extra_flags': best.get('extra_flags', ''),
          'cell': best['cell'], 'why': why}


def formulation_checked(smoke: dict | None, overrides: dict):
  """Whether the smoke test passed the conv formulation that ``overrides`` (on top of the
  configs' defaults) trains with, at 'highest' precision: True, False, or None (not run)."""
  from metadrop_jax import nets
  from tools.long_runs.gpu_check import formulation_key
  if not smoke or not smoke.get('rows'):
    return None
  key = formulation_key(nets.resolve_conv_impl(overrides.get('model.conv_impl', 'auto')),
                        overrides.get('model.dot_algorithm', 'default'))
  by = smoke.get('pass_highest_by_conv_impl') or {}
  return bool(by.get(key, False))


def _recorded(cdir: str, kind: str) -> dict:
  from tools.long_runs import campaign
  try:
    return campaign.recorded_formulation(campaign.load_campaign(cdir), kind)
  except (OSError, ValueError):
    return {}


def choose_precision(smoke: dict | None, bench_rows: list[dict]) -> tuple[str, str]:
  """('highest' | 'default', why). TF32 ('default') only where the smoke test passed it and the
  benchmark measured it at least TF32_MIN_SPEEDUP faster on the same cell; else 'highest'."""
  if not smoke or not smoke.get('pass_default'):
    return 'highest', 'TF32 meta-gradient check failed or missing'
  ok = [r for r in bench_rows if 'error' not in r and r.get('s_per_iter')]
  for h in ok:
    if h.get('precision') != 'highest':
      continue
    for d in ok:
      if (d.get('precision') == 'default' and d['config'] == h['config'] and
          d['method'] == h['method'] and d.get('xla_flags') == h.get('xla_flags')):
        speed = h['s_per_iter'] / d['s_per_iter']
        if speed >= TF32_MIN_SPEEDUP:
          return 'default', f"TF32 passed the check and was {speed:.2f}x faster ({h['config']})"
        return 'highest', f"TF32 only {speed:.2f}x faster ({h['config']}): not worth it"
  return 'highest', 'no TF32 timing to compare'


# ------------------------------------------------------------------------------------------------
# the window
# ------------------------------------------------------------------------------------------------

def run_window(a) -> dict:
  t0 = time.time()
  end = t0 + a.budget_s                     # everything, packing included, before this
  work = os.path.abspath(a.work or os.path.join('/tmp', f'metadrop_window_{os.getpid()}'))
  os.makedirs(work, exist_ok=True)
  os.makedirs(a.out, exist_ok=True)
  log = Log(os.path.join(work, 'window.log'))
  summary: dict = {'start': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t0)),
                   'budget_s': a.budget_s, 'phases': {}, 'argv': sys.argv[1:]}
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  py = sys.executable
  pack_reserve = min(PACK_RESERVE_S, 0.1 * a.budget_s)

  def phase(name, fn):
    t = time.time()
    try:
      summary['phases'][name] = {'result': fn()}
    except Exception as e:  # noqa: BLE001 - a broken phase must not cost the packing
      import traceback
      log(f'{name} failed: {e!r}\n{traceback.format_exc()}')
      summary['phases'][name] = {'error': repr(e)}
    summary['phases'][name]['seconds'] = round(time.time() - t, 1)

  # a. info + smoke test. This process never imports jax (it would take the GPU's memory from
  # the phases); info runs in a child, and the smoke test, which shares the GPU with the
  # benchmark, allocates on demand instead of preallocating 75 % of the card.
  light = {**env, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}

  def info_phase():
    out = os.path.join(work, 'info.json')
    log.run([py, '-c', 'import json, sys; from tools.long_runs import window; '
             f'json.dump(window.info(), open({out!r}, "w"))'], 120, light)
    return _read_json(out) or {}

  phase('info', info_phase)
  log(f"devices {summary['phases']['info'].get('result', {}).get('devices')}")
  smoke_path = os.path.join(work, 'smoke.json')

  # The smoke test (mostly the float64 reference on the CPU) runs beside the benchmark (on the
  # GPU): their overlap is a few seconds of small GPU work, and saves a minute of the window.
  smoke_cmd = [py, '-m', 'tools.long_runs.gpu_check', f'--setting={a.smoke_setting}',
               f'--gradients={a.smoke_gradients}', f'--out={smoke_path}']
  smoke_cmd += [f'--set={x}' for x in a.smoke_set.split(',') if x]
  smoke_cmd += [f'--precisions={a.smoke_precisions}', f'--conv_impls={a.smoke_conv_impls}']
  smoke_proc = Background(log, smoke_cmd, os.path.join(work, 'smoke.log'), light)
  smoke_end = time.time() + SMOKE_FRACTION * a.budget_s

  # b. benchmark + torch peer
  kind = summary['phases']['info'].get('result', {}).get('device_kind', '')
  on_gpu = summary['phases']['info'].get('result', {}).get('backend') not in (None, 'cpu')
  flags = os.environ.get('XLA_FLAGS', '')
  nondet = (' '.join(f for f in flags.split() if 'xla_gpu_deterministic_ops' not in f)
            if 'xla_gpu_deterministic_ops' in flags else None)
  configs = a.bench_configs.split(',')
  first = configs[0]
  # (precision, config, method, XLA flags or None = the window's, seeds), most useful first: the
  # campaign's first cell (its compile is reused by the sitting through the cache), TF32 (decides
  # the campaign's precision), the cost of deterministic ops, seeds as a batch axis, the rest.
  cells = [('highest', first, 'metadrop', None, 1)]
  if on_gpu:
    cells.append(('default', first, 'metadrop', None, 1))
  if nondet is not None:
    cells.append(('highest', first, 'metadrop', nondet, 1))
  cells += [('highest', first, 'maml', None, 1), ('highest', first, 'metadrop', None, a.bench_seeds)]
  cells += [('highest', c, m, None, 1) for c in configs[1:] for m in ('metadrop', 'maml')]
  bench_mode, jobs = bench_plan(a.bench, cells, measured_cells(kind), flags,
                                lambda: _next_run_cell(os.path.abspath(a.campaign_dir)))
  bench_end = time.time() + BENCH_FRACTION.get(bench_mode, 0.0) * a.budget_s
  bench_rows: list[dict] = []

  formulations_path = os.path.join(work, 'formulations.json')
  trace_dir = os.path.join(work, 'traces')

  def bench():
    if bench_mode == 'formulations':
      cmd = [py, 'benchmarks/formulations.py', f'--config={first}', '--method=metadrop',
             f'--gradient={a.bench_gradient}', '--precision=highest',
             f'--cells={a.formulations_cells}', f'--parallel={a.formulations_parallel}',
             f'--iters={a.bench_iters}', f'--warmup={a.bench_warmup}',
             f'--trace_dir={trace_dir}', '--trace_steps=3', f'--deadline={bench_end}',
             f'--concurrent={a.formulations_concurrent}',
             f'--out={formulations_path}']
      cmd += [f'--set={x}' for x in a.bench_set.split(',') if x]
      log.run(cmd, bench_end - time.time() + 5, env)
      return {'mode': bench_mode, 'formulations': _read_json(formulations_path)}
    if not jobs:
      return {'mode': bench_mode}
    base = [py, 'benchmarks/meta_step.py', '--no-naive', f'--iters={a.bench_iters}',
            f'--warmup={a.bench_warmup}'] + [f'--set={x}' for x in a.bench_set.split(',') if x]
    for i, (prec, cfg, method, xflags, seeds, *grad) in enumerate(jobs):
      if time.time() > bench_end - 3:
        bench_rows.append({'config': cfg, 'method': method, 'precision': prec, 'seeds': seeds,
                           'error': 'not run: window budget'})
        continue
      out = os.path.join(work, f'bench_{i}.json')
      cmd = base + [f'--configs={cfg}', f'--methods={method}', f'--precision={prec}',
                    f'--set=meta_gradient={grad[0] if grad else a.bench_gradient}',
                    f'--deadline={bench_end}', f'--out={out}']
      if seeds > 1:
        cmd.append(f'--seeds={seeds}')
      if xflags is not None:
        cmd.append(f'--xla-flags={xflags}')
      log.run(cmd, bench_end - time.time(), env)
      bench_rows.extend((_read_json(out) or {}).get('rows', []))
    return {'mode': bench_mode, 'rows': bench_rows}

  phase('bench', bench)

  def smoke():
    rc = smoke_proc.wait(smoke_end)
    res = _read_json(smoke_path)
    if res:
      from tools.long_runs import gpu_check
      log(gpu_check.format_check(res))
    return {'rc': rc, **(res or {})}

  phase('smoke', smoke)
  smoke_res = summary['phases']['smoke'].get('result') or {}

  def torch_peer():
    if bench_mode == 'skip' or a.torch == 'skip':
      return {'skipped': 'not asked'}
    try:
      import importlib.util
      if importlib.util.find_spec('torch') is None:
        return {'skipped': 'torch is not installed here'}
    except Exception as e:  # noqa: BLE001
      return {'skipped': repr(e)}
    out = os.path.join(work, 'torch.json')
    cells = [(c, m) for c in configs for m in ('metadrop', 'maml')]
    done = measured_torch_cells(kind)
    missing = [c for c in cells if c not in done]
    if bench_mode != 'full' and done:
      return {'skipped': 'the torch peer has rows on this card kind (--bench=full measures more)'}
    cells = missing or cells
    if bench_mode != 'full':
      cells = cells[:1]
    torch_end = max(bench_end, time.time()) + a.torch_share * a.budget_s
    cmd = [py, 'benchmarks/torch_peer.py', f"--cells={','.join(f'{c}:{m}' for c, m in cells)}",
           '--precision=highest', f'--iters={a.bench_iters}', f'--deadline={torch_end - 10}',
           f'--out={out}'] + (['--check'] if not done else [])
    log.run(cmd, torch_end - time.time(), env)
    return _read_json(out) or {'error': 'no output'}

  phase('torch', torch_peer)

  # c. the campaign
  precision, why = choose_precision(smoke_res, bench_rows)
  summary['precision_choice'] = {'precision': precision, 'why': why}
  log(f'matmul precision for a campaign still on auto: {precision} ({why})')
  form = choose_formulation(_read_json(formulations_path), smoke_res)
  summary['formulation_choice'] = form
  log(f"formulation of this sitting: {form['overrides'] or 'the configs default'} "
      f"({form['why']})")
  cdir = os.path.abspath(a.campaign_dir)

  def campaign_phase():
    checked = formulation_checked(smoke_res, form['overrides'] or _recorded(cdir, kind))
    if checked is False:
      return {'skipped': "the float32 meta-gradient check failed for this sitting's formulation: "
                         'no training on this device'}
    hard = end - pack_reserve                 # killed here; it aims to be done well before
    cmd = [py, 'launch.py', '--mode=campaign', f'--campaign_dir={cdir}',
           f'--deadline={hard - min(30.0, 0.1 * a.budget_s):.1f}',
           f'--precision_choice={precision}']
    if form['overrides']:
      cmd.append('--formulation=' + ','.join(f'{k}={v}' for k, v in form['overrides'].items()))
    cenv = dict(env)
    if form.get('extra_flags'):
      cenv['XLA_FLAGS'] = (cenv.get('XLA_FLAGS', '') + ' ' + form['extra_flags']).strip()
    if a.campaign_settings:
      cmd.append(f'--campaign_settings={a.campaign_settings}')
      if a.campaign_overrides:
        cmd.append(f'--campaign_overrides={a.campaign_overrides}')
    rc, _ = log.run(cmd, hard - time.time(), cenv)
    row = _read_jsonl_tail(os.path.join(cdir, 'sittings.jsonl'))
    if not (row and row.get('start', '') >= summary['start']) and os.path.isdir(cdir):
      row = recover_sitting(cdir, t0, summary['start'])
      log(f"campaign killed before its summary: recovered from the runs' logs: {row['runs']}")
    return {'rc': rc, 'sitting': row}

  phase('campaign', campaign_phase)

  # d. pack
  summary['seconds_before_pack'] = round(time.time() - t0, 1)
  cache_dir = os.environ.get('JAX_COMPILATION_CACHE_DIR', '')
  extra = {}
  if os.path.exists(formulations_path):
    extra['formulations.json'] = formulations_path
  if os.path.isdir(trace_dir):
    extra['traces.tgz'] = trace_dir
  files = pack(a.out, work, cdir, since=t0, summary=summary, log=log,
               cache_dir=cache_dir if a.pack_cache else '', extra=extra)
  summary['files'] = files
  log(f'packed {len(files)} files into {a.out}: ' +
      ', '.join(f"{n} ({s / 2**20:.1f} MiB)" for n, s in files.items()))
  log(format_window(summary))
  # window.json last, with the final summary (the log above is already in window.log)
  shutil.copy(log.path, os.path.join(a.out, 'window.log')) if os.path.getsize(log.path) \
      <= MAX_FILE_BYTES else _tail_copy(log.path, os.path.join(a.out, 'window.log'))
  with open(os.path.join(a.out, 'window.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  return summary


def recover_sitting(cdir: str, since: float, start: str) -> dict:
  """The sitting row of a campaign process that was killed before writing it, rebuilt from
  what train() wrote for each run it finished (runs.jsonl, results.json changed since
  ``since``); appended to sittings.jsonl. A run cut inside its share left only its last
  checkpoint (its steps since then are lost) and no row."""
  from metadrop_jax import metrics as metrics_lib
  runs = []
  for name in sorted(os.listdir(cdir)):
    log_path = os.path.join(cdir, name, 'runs.jsonl')
    if not os.path.exists(log_path) or os.path.getmtime(log_path) < since:
      continue
    last = metrics_lib.read_jsonl(log_path)[-1]
    entry = {'name': name, 'from': last.get('start_step'), 'to': last.get('step'),
             'minutes': round(float(last.get('minutes_this_run', 0.0)), 3),
             'stopped': last.get('stopped'), 'evaluated': False}
    res = os.path.join(cdir, name, 'results.json')
    if os.path.exists(res) and os.path.getmtime(res) >= since:
      r = _read_json(res, {})
      entry.update(evaluated=True, accuracy=r.get('accuracy'), ci95=r.get('ci95'))
    runs.append(entry)
  row = {'start': start, 'killed': 'the window stopped the campaign process at its deadline',
         'runs': runs, 'skipped': []}
  with open(os.path.join(cdir, 'sittings.jsonl'), 'a') as f:
    f.write(json.dumps(row) + '\n')
  return row


def _read_jsonl_tail(path):
  from metadrop_jax import metrics as metrics_lib
  rows = metrics_lib.read_jsonl(path)
  return rows[-1] if rows else None


def _tail_copy(src, dst, limit=MAX_FILE_BYTES - 2**20):
  with open(src, 'rb') as f:
    f.seek(max(0, os.path.getsize(src) - limit))
    data = f.read()
  with open(dst, 'wb') as f:
    f.write(b'[... log truncated ...]\n' + data)


# ------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------

SKIP_PARTS = ('tb', '__pycache__', '.lock')   # .lock: held by a running train() only


def _skip(rel: str) -> bool:
  parts = rel.split(os.sep)
  return (any(p in SKIP_PARTS for p in parts) or any('.tmp' in p or 'orbax-checkpoint-tmp' in p
                                                     for p in parts))


def campaign_members(cdir: str, since: float) -> list[str]:
  """Relative paths to pack: every top-level file, and every file of each run directory that
  changed since ``since`` (the whole directory, so that unpacking can replace it)."""
  out = []
  for name in sorted(os.listdir(cdir)):
    p = os.path.join(cdir, name)
    if os.path.isfile(p):
      out.append(name)
      continue
    files = []
    newest = 0.0
    for root, dirs, fs in os.walk(p):
      dirs.sort()
      for fn in sorted(fs):
        full = os.path.join(root, fn)
        rel = os.path.relpath(full, cdir)
        if _skip(rel):
          continue
        files.append(rel)
        newest = max(newest, os.path.getmtime(full))
    if files and newest >= since - 1.0:
      out += files
  return out


def pack(out_dir, work, cdir, *, since, summary, log=print, cache_dir='',
         extra=None) -> dict[str, int]:
  """Writes ``extra`` (name -> a file, copied, or a folder, packed as .tgz), the campaign archive
  (split if needed) and the compile cache into ``out_dir``. window.json and window.log are
  written by the caller. Returns {file name: bytes}."""
  files: dict[str, int] = {}
  budget_files = MAX_FILES - 2     # window.json, window.log
  for name, src in (extra or {}).items():
    dst = os.path.join(out_dir, name)
    if os.path.isdir(src):
      with tarfile.open(dst, 'w:gz') as tar:
        tar.add(src, arcname=os.path.basename(src))
    else:
      shutil.copy(src, dst)
    if os.path.getsize(dst) > MAX_FILE_BYTES - 2**20:
      log(f'{name} is {os.path.getsize(dst)} bytes: too large to bring back')
      os.remove(dst)
      continue
    files[name] = os.path.getsize(dst)
    budget_files -= 1
  if os.path.isdir(cdir):
    buf = io.BytesIO()
    members = campaign_members(cdir, since)
    with tarfile.open(fileobj=buf, mode='w:gz', compresslevel=6) as tar:
      for rel in members:
        tar.add(os.path.join(cdir, rel), arcname=rel, recursive=False)
    data = buf.getvalue()
    summary['campaign_members'] = len(members)
    summary['campaign_runs_packed'] = sorted({m.split(os.sep)[0] for m in members
                                              if os.sep in m})
    parts = [data[i:i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b'']
    if len(parts) > budget_files:
      log(f'campaign archive is {len(data)} bytes: more than {budget_files} parts; packing the '
          'first runs only is not implemented, so the tail is lost')
      parts = parts[:budget_files]
    names = ['campaign.tgz'] if len(parts) == 1 else [f'campaign.tgz.{i}' for i in range(len(parts))]
    for n, d in zip(names, parts):
      with open(os.path.join(out_dir, n), 'wb') as f:
        f.write(d)
      files[n] = len(d)
    budget_files -= len(parts)
  if cache_dir and os.path.isdir(cache_dir) and budget_files >= 1:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz', compresslevel=1) as tar:
      for fn in sorted(os.listdir(cache_dir)):
        tar.add(os.path.join(cache_dir, fn), arcname=fn)
    if 0 < len(buf.getvalue()) <= MAX_FILE_BYTES - 2**20:
      with open(os.path.join(out_dir, 'jax_cache.tgz'), 'wb') as f:
        f.write(buf.getvalue())
      files['jax_cache.tgz'] = len(buf.getvalue())
    else:
      log(f'compile cache is {len(buf.getvalue())} bytes compressed: not brought back')
  return files


def format_window(s: dict) -> str:
  """The short table printed last (the device tool returns the output's tail)."""
  s = {'phases': {}, 'budget_s': 0.0, 'start': '?', **s}
  lines = ['=' * 78, f"window {s['start']}  budget {s['budget_s']:.0f} s"]
  inf = s['phases'].get('info', {}).get('result', {})
  lines.append(f"device {inf.get('device_kind')}  jax {inf.get('versions', {}).get('jax')}  "
               f"torch {inf.get('versions', {}).get('torch')}")
  sm = s['phases'].get('smoke', {}).get('result') or {}
  for r in sm.get('rows', []):
    lines.append(f"smoke {r['meta_gradient']:<7} {r.get('conv_impl', 'xla'):<7} {r['precision']:<8} rel err {r['rel_err']:.1e} "
                 f"{'PASS' if r['pass'] else 'FAIL'}")
  for r in (s['phases'].get('bench', {}).get('result') or {}).get('rows', []):
    if 'error' in r:
      lines.append(f"bench {r['config']} {r['method']}: {str(r['error'])[:60]}")
      continue
    det = ('nondet' if str(r.get('device', '')).startswith('gpu') and
           'xla_gpu_deterministic_ops' not in r.get('xla_flags', '') else '')
    if r.get('seeds', 1) > 1:
      det = f"x{r['seeds']}seeds"

    frac = r.get('peak_fraction')
    lines.append(f"bench {r['config']:<20} {r['method']:<8} {r.get('precision', ''):<8}{det:<7}"
                 f"{r['s_per_iter'] * 1e3:8.2f} ms/it  compile {r['compile_s']:5.1f} s  "
                 f"{r['xla_gflops_per_s']:8.0f} GFLOP/s" + (f"  {frac:.1%} of peak" if frac else ''))
  for r in (s['phases'].get('torch', {}).get('result') or {}).get('rows', []):
    if 'error' in r:
      lines.append(f"torch {r['config']} {r['method']}: {str(r['error'])[:60]}")
    elif r.get('kind') == 'check':
      lines.append(f"torch check {r['config']} {r['method']}: loss rel {r['loss_rel_err']:.1e} "
                   f"grad rel {r['grad_rel_err']:.1e}")
    else:
      lines.append(f"torch {r['config']:<20} {r['method']:<8} {r['s_per_iter'] * 1e3:8.2f} ms/it")
  fm = (s['phases'].get('bench', {}).get('result') or {}).get('formulations') or {}
  for r in fm.get('rows', []):
    if 'error' in r:
      lines.append(f"form  {r['cell']:<22} {str(r['error'])[:60]}")
    else:
      lines.append(f"form  {r['cell']:<22} {'det' if r['deterministic_ops'] else 'nondet':<7}"
                   f"{r['ms_per_iter']:7.2f} ms/it {r['ms_per_iter_pipelined']:7.2f} pipelined  "
                   f"compile {r['compile_s']:5.1f} s  {r['state_sha256'][:8]}")
  for r in fm.get('concurrent', []):
    lines.append(f"form  {r['copies']} x {r['cell']}: " + (
        str(r['error']) if 'error' in r else f"{r['aggregate_steps_per_s']:.1f} steps/s in all"))
  if fm.get('determinism'):
    lines.append(f"form  determinism {fm['determinism']}")
  fc = s.get('formulation_choice')
  if fc:
    lines.append(f"formulation choice: {fc.get('overrides')} ({fc.get('why')})")
  pc = s.get('precision_choice', {})
  lines.append(f"precision choice: {pc.get('precision')} ({pc.get('why')})")
  camp = (s['phases'].get('campaign', {}).get('result') or {})
  sit = camp.get('sitting') or {}
  for r in sit.get('runs', []):
    acc = f"  test {r['accuracy']:.2f} ± {r['ci95']:.2f}" if r.get('accuracy') is not None else ''
    lines.append(f"campaign {r['name']:<40} {r['from']:>6} -> {r['to']:<6} "
                 f"{r['minutes']:.2f} min{acc}")
  if camp.get('skipped'):
    lines.append(f"campaign skipped: {camp['skipped']}")
  for r in sit.get('skipped', []):
    lines.append(f"campaign skipped {r['name']}: {r['why']}")
  lines.append(f"files: {s.get('files')}")
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# unpacking (here, after the window)
# ------------------------------------------------------------------------------------------------

def unpack(src: str, repo: str = ROOT, campaign_dir: str | None = None, log=print) -> dict:
  """Puts a window's returned files in place (see the module docstring). Returns a summary."""
  cdir = os.path.join(repo, campaign_dir or os.path.join('results', 'table1'))
  summary = _read_json(os.path.join(src, 'window.json'))
  if summary is None:
    raise FileNotFoundError(f'{src}/window.json missing: not a window\'s returned files')
  parts = sorted(glob.glob(os.path.join(src, 'campaign.tgz.*')),
                 key=lambda p: int(p.rsplit('.', 1)[1]))
  if os.path.exists(os.path.join(src, 'campaign.tgz')):
    parts = [os.path.join(src, 'campaign.tgz')]
  data = b''.join(open(p, 'rb').read() for p in parts)
  replaced = []
  if data:
    with tarfile.open(fileobj=io.BytesIO(data), mode='r:gz') as tar:
      members = tar.getmembers()
      for m in members:
        if m.name.startswith('/') or '..' in m.name.split('/') or not (m.isfile() or m.isdir()):
          raise ValueError(f'unsafe member in the campaign archive: {m.name}')
      runs = sorted({m.name.split('/')[0] for m in members if '/' in m.name})
      os.makedirs(cdir, exist_ok=True)
      for r in runs:
        shutil.rmtree(os.path.join(cdir, r), ignore_errors=True)
        replaced.append(r)
      safe = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
      for m in members:
        tar.extract(m, cdir, **safe)
  stamp = summary['start'].replace(':', '').replace('-', '')
  kind = (summary['phases'].get('info', {}).get('result', {}).get('device_kind', 'unknown')
          .replace(' ', '_'))
  bench_dir = os.path.join(repo, 'docs', 'bench', 'windows')
  os.makedirs(bench_dir, exist_ok=True)
  base = os.path.join(bench_dir, f'{stamp}_{kind}')
  summary['device_kind'] = summary['phases'].get('info', {}).get('result', {}).get('device_kind')
  with open(base + '.json', 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  if os.path.exists(os.path.join(src, 'window.log')):
    _tail_copy(os.path.join(src, 'window.log'), base + '.log', limit=512 * 1024)
  if os.path.exists(os.path.join(src, 'jax_cache.tgz')):
    os.makedirs(os.path.join(repo, '.gpu_cache'), exist_ok=True)
    shutil.copy(os.path.join(src, 'jax_cache.tgz'), os.path.join(repo, '.gpu_cache'))
  written = []
  if os.path.exists(os.path.join(cdir, 'campaign.json')):
    from tools.long_runs import campaign
    written = campaign.write_reports(cdir, results_md=os.path.join(repo, 'docs', 'results.md'))
  written.append(write_performance_block(repo))
  log(format_window(summary))
  log(f'replaced runs: {replaced}\nwrote {base}.json/.log and {written}')
  return {'replaced': replaced, 'bench': base + '.json', 'written': written}


PERF_BEGIN = '<!-- gpu-windows:begin (generated by python -m metadrop_jax.window unpack) -->'
PERF_END = '<!-- gpu-windows:end -->'


def perf_table(repo: str = ROOT) -> str:
  lines = ['| window | card | jax | config | method | seeds | precision | XLA det. ops | compile s | '
           'ms / iter | GFLOP / iter | TFLOP/s | of peak | peak GPU MiB | torch.func ms / iter | '
           'torch / JAX |', '|' + '---|' * 16]
  for p in sorted(glob.glob(os.path.join(repo, 'docs', 'bench', 'windows', '*.json'))):
    s = _read_json(p, {})
    inf = s.get('phases', {}).get('info', {}).get('result', {})
    torch_rows = [r for r in (s.get('phases', {}).get('torch', {}).get('result') or {})
                  .get('rows', []) if r.get('kind') == 'time']
    for r in (s.get('phases', {}).get('bench', {}).get('result') or {}).get('rows', []):
      if 'error' in r:
        continue
      t = next((x for x in torch_rows if x['config'] == r['config'] and
                x['method'] == r['method'] and x['precision'] == r.get('precision')), None)
      if r.get('seeds', 1) > 1 or 'xla_gpu_deterministic_ops=true' not in r.get('xla_flags', ''):
        t = None
      det = 'yes' if 'xla_gpu_deterministic_ops=true' in r.get('xla_flags', '') else 'no'
      frac = r.get('peak_fraction')
      lines.append(' | '.join([
          f"| {s.get('start', '')[:16]}", str(inf.get('device_kind')), str(r.get('jax')),
          r['config'], r['method'], str(r.get('seeds', 1)), str(r.get('precision')), det,
          f"{r['compile_s']:.1f}",
          f"{r['s_per_iter'] * 1e3:.2f}", f"{r['xla_flops_per_iter'] / 1e9:.1f}",
          f"{r['xla_gflops_per_s'] / 1e3:.2f}", f'{frac:.1%}' if frac else 'n/a',
          f"{r['peak_mem_bytes'] / 2**20:.0f}",
          f"{t['s_per_iter'] * 1e3:.2f}" if t else '—',
          f"{t['s_per_iter'] / r['s_per_iter']:.2f}" if t else '—']) + ' |')
  return '\n'.join(lines) + '\n'


def write_performance_block(repo: str = ROOT) -> str:
  path = os.path.join(repo, 'docs', 'performance.md')
  if not os.path.exists(path):
    return ''
  with open(path) as f:
    text = f.read()
  if PERF_BEGIN not in text or PERF_END not in text:
    return ''
  a, rest = text.split(PERF_BEGIN, 1)
  _, b = rest.split(PERF_END, 1)
  from metadrop_jax import report
  return report.write_atomic(path, a + PERF_BEGIN + '\n' + perf_table(repo) + PERF_END + b)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m tools.long_runs.window',
                               description=__doc__.split('\n')[0])
  sub = ap.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('run', help='one window (on the device)')
  r.add_argument('--budget_s', type=float, required=True)
  r.add_argument('--out', default=os.environ.get('OUT', '/tmp/window_out'))
  r.add_argument('--work', default='')
  r.add_argument('--campaign_dir', default=os.path.join('results', 'table1'))
  r.add_argument('--campaign_settings', default='', help='new campaign only (tests: tiny)')
  r.add_argument('--campaign_overrides', default='', help='new campaign only: k=v,k=v')
  r.add_argument('--smoke_setting', default='omniglot_20way1shot')
  r.add_argument('--smoke_gradients', default='authors,exact')
  r.add_argument('--smoke_set', default='', help='config overrides of the smoke test: k=v,k=v')
  r.add_argument('--bench', default='auto', choices=['auto', 'full', 'quick', 'skip',
                                                    'formulations'],
                 help='auto: full while some cell has no committed row for this card kind, '
                      "else quick (the campaign's next run only); formulations: every "
                      'formulation of the first config side by side (benchmarks/formulations.py), '
                      'and the sitting trains with the fastest')
  r.add_argument('--formulations_cells', default='baseline,select,select_im2col,select_nondet,'
                 'select_nondet_again,select_im2col_nondet,baseline_nondet,select_unfused,'
                 'select_scan,select_map,select_no_cmd_buffer,select_im2col_scan')
  r.add_argument('--formulations_parallel', type=int, default=6)
  r.add_argument('--formulations_concurrent', default='',
                 help='copies of the fastest cell trained at once, e.g. 2,4 (H200, 2026-12-04: '
                      'no gain, the step keeps the card busy)')
  r.add_argument('--smoke_precisions', default='highest,default')
  r.add_argument('--smoke_conv_impls', default='im2col',
                 help="conv formulations the smoke test checks (gpu_check --conv_impls); the "
                      "sitting trains only if its own passed")
  r.add_argument('--bench_configs', default=','.join(PAPER_SETTINGS))
  r.add_argument('--bench_gradient', default='authors')
  r.add_argument('--bench_set', default='', help='config overrides of every benchmark cell '
                 '(k=v,k=v; the dry-run test makes tiny tinier)')
  r.add_argument('--bench_iters', type=int, default=20)
  r.add_argument('--bench_warmup', type=int, default=3)
  r.add_argument('--bench_seeds', type=int, default=4,
                 help='full benchmark: the first cell with this many seeds vmapped in one step')
  r.add_argument('--torch', default='auto', choices=['auto', 'skip'])
  r.add_argument('--torch_share', type=float, default=0.15,
                 help='fraction of the budget for the torch peer, after the benchmark')
  r.add_argument('--pack_cache', type=int, default=1)
  u = sub.add_parser('unpack', help="put a window's returned files in place (here)")
  u.add_argument('src')
  u.add_argument('--repo', default=ROOT)
  u.add_argument('--campaign_dir', default=os.path.join('results', 'table1'))
  a = ap.parse_args(argv)
  if a.cmd == 'run':
    import signal
    signal.signal(signal.SIGTERM, _on_term)
    run_window(a)
  else:
    unpack(a.src, a.repo, a.campaign_dir)
  return 0


if __name__ == '__main__':
  sys.exit(main())
