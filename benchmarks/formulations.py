"""Every formulation of the meta-training step, measured side by side on one device in one run.

Each cell is one formulation of the same step (config x method x meta-gradient): the execution
fields of ``config.model`` (conv and pool implementations, theta/phi fusion, task map, inner loop)
and the XLA flags (deterministic ops on or off, command buffers). All formulations compute the
same function (tests/test_fast_paths.py); what differs is speed, and on a GPU the rounding.

Cells are compiled in parallel, one process each, a wave at a time; once a wave has compiled,
its processes are timed one after the other, so the timing of one never shares the device or
the host with another's compile. A cell that fills XLA's autotune cache compiles in a wave before
the cells that read it (:func:`waves`); no other cell sees an autotune cache (:func:`cell_env`).
Per cell:

* compile s; ms/iter as the median of ``--iters`` steps each waited for (latency), as the mean
  of ``--iters`` steps dispatched back to back, and as the mean with one step queued behind the
  running one (how train.py dispatches);
* the counts of ops in the optimised HLO that matter on a GPU (sort, while, scatter,
  select-and-scatter, grouped convolutions, cuDNN convolutions, GEMMs, transposes, fusions), and
  what became of its dots (:func:`gemm_counts`): Triton GEMM fusions, cuBLAS GEMM calls or other
  dots, with the tile configs of the Triton ones;
* a SHA-256 of the state after warm-up + timed steps (cells with identical numerics agree; two
  processes of one cell, '<cell>' and '<cell>_again', agree only if the device computes
  deterministically and both compilations chose the same kernels) and the last loss;
* optionally a ``jax.profiler`` trace of a few steps (``--trace``; see profile_step.py).

Then, for the fastest cell (or ``--concurrent_cell``), N copies train at once on the card in
separate processes (``--concurrent=2,4``): the aggregate steps per second of N runs sharing one
device against one run alone.

  python benchmarks/formulations.py --config=omniglot_20way1shot --out=formulations.json
  python benchmarks/formulations.py --config=tiny --cells=baseline,select --iters=5
  python benchmarks/formulations.py --list                     # the cells and what they set
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  (benchmarks/provenance.py)
from tools.long_runs import autotune  # noqa: E402  (no jax: XLA's autotune cache)
from tools.long_runs import runs as runs_lib  # noqa: E402  (no jax: the XLA flags of a run)

DET = runs_lib.DETERMINISTIC_OPS
NO_CMD_BUFFER = '--xla_gpu_enable_command_buffer='
# Deterministic kernels without --xla_gpu_deterministic_ops: that flag also switches the autotuner
# off (XLA takes the first cuDNN / GEMM candidate), this one only excludes the kernels that are
# not deterministic (scatters with atomics and the like; it refuses to compile a
# select-and-scatter, so only with select pooling) and keeps autotuning. Which kernels the
# autotuner picks can differ between compilations: a cell with it counts as reproducible only if
# two processes of it (the '<cell>' and '<cell>_again' pair) end in the same state.
EXCLUDE_NONDET = runs_lib.EXCLUDE_NONDET
# every GEMM may become a Triton fusion (the autotuner weighs it against cuBLAS), which can read
# its operand's producers (the im2col patches) inside the GEMM instead of from memory
TRITON_GEMM = '--xla_gpu_triton_gemm_any=true'
# Triton GEMMs only: with the cuBLAS fallback off the autotuner keeps no cuBLAS candidate for a
# GEMM fusion (xla/debug_options_flags.cc: "Allow GEMM fusion autotuning to fall back to cuBLAS
# when that is faster"). A dot with an explicit algorithm such as TF32_TF32_F32_X3 is one Triton
# kernel then (three TF32 products per tile in registers), not the three cuBLAS GEMMs and the
# split/sum passes XLA makes of it otherwise; 'highest'-precision dots stay with cuBLAS.
TRITON_ONLY = f'{TRITON_GEMM} --xla_gpu_cublas_fallback=false'
# XLA's per-fusion autotune cache (tools/long_runs/autotune.py): the '_fill' cell compiles without
# deterministic ops, autotunes and writes it; the cells with deterministic ops and the same flag
# read it (instead of taking the first candidate); a cell that reads it never compiles beside one
# that fills it (:func:`waves`). Every other cell runs without one (:func:`cell_env`).
AUTOTUNE_CACHE = autotune.CACHE
AGAIN = '_again'
# Conv formulations whose kernels no XLA flag governs: a Pallas kernel is compiled by Triton, not
# chosen among XLA's kernels, so deterministic ops say nothing about it. It is deterministic by
# construction (no atomics; partial sums added in a fixed order), which its cell shows only by
# its two processes ('<cell>', '<cell>_again') ending in the same state: until then it is not
# reproducible, deterministic ops or not.
CUSTOM_KERNEL_CONV_IMPLS = ('pallas',)

# name -> (config overrides, deterministic ops, extra XLA flags). Most likely winners first, so
# that a short run still measures them. 'baseline' is the formulation trained before this table.
CELLS = {
    'baseline': ({'model.conv_impl': 'xla', 'model.pool_impl': 'reduce_window'}, True, ''),
    'select': ({'model.conv_impl': 'xla', 'model.pool_impl': 'select'}, True, ''),
    'select_im2col': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}, True, ''),
    # the implicit-GEMM Pallas conv (metadrop_jax/kernels/conv3x3.py): no im2col patches in
    # memory, batch-norm statistics in its epilogue, 3xTF32 products; with its second process
    'select_pallas': ({'model.conv_impl': 'pallas', 'model.pool_impl': 'select'}, True, ''),
    'select_pallas_again': ({'model.conv_impl': 'pallas', 'model.pool_impl': 'select'}, True, ''),
    'select_nondet': ({'model.conv_impl': 'xla', 'model.pool_impl': 'select'}, False, ''),
    'select_nondet_again': ({'model.conv_impl': 'xla', 'model.pool_impl': 'select'}, False, ''),
    'select_im2col_nondet': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}, False,
                             ''),
    'baseline_nondet': ({'model.conv_impl': 'xla', 'model.pool_impl': 'reduce_window'}, False, ''),
    'select_unfused': ({'model.conv_impl': 'xla', 'model.pool_impl': 'select',
                        'model.fuse_noise_conv': False}, True, ''),
    'select_scan': ({'model.conv_impl': 'xla', 'model.pool_impl': 'select',
                     'model.inner_loop': 'scan'}, True, ''),
    'select_map': ({'model.conv_impl': 'xla', 'model.pool_impl': 'select',
                    'model.task_map': 'map'}, True, ''),
    'select_no_cmd_buffer': ({'model.conv_impl': 'xla', 'model.pool_impl': 'select'}, True,
                             NO_CMD_BUFFER),
    'select_im2col_scan': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                            'model.inner_loop': 'scan'}, True, ''),
    # multi-pass tensor-core GEMMs (nets.DOT_ALGORITHMS); the smoke test decides whether they
    # are accurate enough to train with
    'select_im2col_bf16x3': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                              'model.dot_algorithm': 'bf16_x3'}, True, ''),
    'select_im2col_bf16x6': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                              'model.dot_algorithm': 'bf16_x6'}, True, ''),
    'select_im2col_tf32x3': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                              'model.dot_algorithm': 'tf32_x3'}, True, ''),
    'select_im2col_bf16x3_unfused': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                                      'model.dot_algorithm': 'bf16_x3',
                                      'model.fuse_noise_conv': False}, True, ''),
    # the CPU's default (reduce_window pooling there): the pooling choice with im2col convs
    'im2col': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'reduce_window'}, True, ''),
    # autotuned deterministic kernels (EXCLUDE_NONDET), each with a second process to check that
    # two compilations train alike; Triton GEMMs with and without deterministic ops
    'select_im2col_excl': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}, False,
                           EXCLUDE_NONDET),
    'select_im2col_excl_again': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'},
                                 False, EXCLUDE_NONDET),
    'select_im2col_triton': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'}, True,
                             TRITON_GEMM),
    'select_im2col_excl_triton': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'},
                                  False, f'{EXCLUDE_NONDET} {TRITON_GEMM}'),
    'select_im2col_excl_triton_again': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select'},
                                        False, f'{EXCLUDE_NONDET} {TRITON_GEMM}'),
    # batch-norm statistics in one read of the activations (model.bn_impl, nets.batch_moments)
    'select_im2col_bn1': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                           'model.bn_impl': 'one_pass'}, True, ''),
    # the im2col GEMMs as 3 TF32 products in one Triton kernel each, autotuned once (the '_fill'
    # cell, without deterministic ops) and read from the cache by the deterministic cells
    'select_im2col_tf32x3_triton_fill': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                                          'model.dot_algorithm': 'tf32_x3'}, False,
                                         f'{TRITON_ONLY} {AUTOTUNE_CACHE}'),
    'select_im2col_tf32x3_triton': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                                     'model.dot_algorithm': 'tf32_x3'}, True,
                                    f'{TRITON_ONLY} {AUTOTUNE_CACHE}'),
    'select_im2col_tf32x3_triton_again': ({'model.conv_impl': 'im2col', 'model.pool_impl': 'select',
                                           'model.dot_algorithm': 'tf32_x3'}, True,
                                          f'{TRITON_ONLY} {AUTOTUNE_CACHE}'),
}
DEFAULT_TRACE = ('baseline', 'select', 'select_im2col', 'select_im2col_triton', 'select_im2col_bn1',
                 'select_im2col_tf32x3_triton')

HLO_OPS = {
    'sort': r'\bsort\(',
    'while': r'\bwhile\(',
    'scatter': r'\bscatter\(',
    'select_and_scatter': r'\bselect-and-scatter\(',
    'grouped_conv': r'(?:batch|feature)_group_count=(?:[2-9]|\d{2,})',
    'cudnn_conv': r'custom_call_target="__cudnn\$conv',
    'gemm': r'custom_call_target="__cublas',
    'convolution': r'\bconvolution\(',
    'dot': r'\bdot\(',
    'transpose': r'\btranspose\(',
    'fusion': r'\bfusion\(',
}


def hlo_counts(text: str) -> dict[str, int]:
  """Counts of the ops of :data:`HLO_OPS` in an optimised HLO module's text."""
  return {k: len(re.findall(p, text)) for k, p in HLO_OPS.items()}


# What XLA:GPU makes of a dot: a Triton GEMM fusion (its backend_config's kind; the tile config
# beside it), a cuBLAS call (the custom call's target), or a cuDNN GEMM fusion.
TRITON_GEMM_KINDS = ('__triton_gemm', '__triton_nested_gemm_fusion')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\) -> .* \{$')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)')
_FUSION_KIND = re.compile(r'"kind":"([^"]+)"')
_TILING = re.compile(r'"(triton_gemm_config|block_level_fusion_config)":(\{(?:[^{}]|\{[^{}]*\})*\})')


def gemm_counts(text: str) -> dict:
  """What the dots of an optimised HLO module became: ``triton_gemm`` (fusions of kind
  :data:`TRITON_GEMM_KINDS`, one dot each), ``cublas_gemm`` (``__cublas$gemm`` /
  ``__cublas$lt$matmul`` custom calls: a dot XLA split into 3 products for a multi-pass
  algorithm is 3 of them), ``cudnn_fusion``, ``other_dot`` (dot instructions anywhere else: the
  CPU's, or ones no GPU library took), ``algorithms`` (how many instructions carry each dot
  algorithm, e.g. ``dot_tf32_tf32_f32_x3``) and ``triton_configs`` (the tile config of every
  Triton GEMM fusion, as XLA prints it, and how many fusions have it: two compilations that
  chose the same kernels list the same)."""
  comp, calls, triton_comps = None, {}, set()
  dots_in = collections.Counter()
  out = {'triton_gemm': 0, 'cublas_gemm': 0, 'cudnn_fusion': 0, 'other_dot': 0}
  algorithms, configs = collections.Counter(), collections.Counter()
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      comp = m.group(1)
      continue
    if ' = ' not in line or comp is None:
      continue
    calls.setdefault(comp, set()).update(_CALLS.findall(line))
    for alg in re.findall(r'algorithm=(dot_[\w]+)', line):
      algorithms[alg] += 1
    if re.search(r'\sdot\(', line):
      dots_in[comp] += 1
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if target and target.group(1).startswith('__cublas$'):
      out['cublas_gemm'] += 1
    if ' fusion(' in line:
      kind = _FUSION_KIND.search(line)
      if kind and kind.group(1) in TRITON_GEMM_KINDS:
        out['triton_gemm'] += 1
        triton_comps.update(_CALLS.findall(line))
        tiling = _TILING.search(line)
        configs[tiling.group(2) if tiling else '?'] += 1
      elif kind and kind.group(1) == '__cudnn$fusion':
        out['cudnn_fusion'] += 1
  inside, todo = set(), list(triton_comps)
  while todo:                     # the computations a Triton fusion calls, nested ones included
    c = todo.pop()
    if c not in inside:
      inside.add(c)
      todo.extend(calls.get(c, ()))
  out['other_dot'] = sum(n for c, n in dots_in.items() if c not in inside)
  out['algorithms'] = dict(algorithms)
  out['triton_configs'] = dict(configs.most_common())
  return out


def fills_cache(name: str) -> bool:
  """A cell that autotunes into a named autotune cache: no deterministic ops, the cache flag."""
  _, det, extra = CELLS[name]
  return not det and autotune.named_cache(extra) is not None


def reads_cache(name: str) -> bool:
  """A cell with deterministic ops that looks its kernels up in a named autotune cache."""
  _, det, extra = CELLS[name]
  return det and autotune.named_cache(extra) is not None


def waves(cells: list[str], parallel: int) -> list[list[str]]:
  """The cells in waves of at most ``parallel`` compiles, in the given order, except that the
  cells that fill an autotune cache come first, in waves completed by cells that do not read
  one: a reading cell never compiles beside a filling one (before the cache is written)."""
  chunk = lambda cs: [cs[i:i + parallel] for i in range(0, len(cs), parallel)]
  fill = [c for c in cells if fills_cache(c)]
  first = fill + [c for c in cells if not fills_cache(c) and not reads_cache(c)]
  head = first[:-(-len(fill) // parallel) * parallel]
  return chunk(head) + chunk([c for c in cells if c not in head])


def cell_env(name: str, base_flags: str) -> dict:
  """The environment of a cell's process: XLA_FLAGS with or without deterministic ops and the
  cell's own. No cell uses the autotune cache jax would attach to the compilation cache (that one
  would carry a cell's autotuning into every deterministic cell compiled after it): a cell
  autotunes, or takes the first candidates, on its own, unless it names a cache."""
  _, det, extra = CELLS[name]
  flags = ' '.join(f for f in base_flags.split() if 'xla_gpu_deterministic_ops' not in f)
  flags = ' '.join(x for x in (flags, DET if det else '', extra) if x)
  env = dict(os.environ)
  env.update(autotune.xla_env(flags))
  env['JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'] = 'none'
  env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'   # many processes share the card
  env['PYTHONUNBUFFERED'] = '1'
  return env


def _entries(folder: str | None) -> int | None:
  return len(os.listdir(folder)) if folder and os.path.isdir(folder) else None


def autotune_check(rows) -> dict:
  """Whether the cells that read an autotune cache compiled the Triton GEMM kernels of the cell
  that filled it: per reading cell, the same tile configs (a hit for every fusion), or not (some
  fusion missed the cache and took the first candidate)."""
  by = {r['cell']: r for r in rows if 'error' not in r and 'gemms' in r}
  fills = {c: r for c, r in by.items() if c in CELLS and fills_cache(c)}
  out = {}
  for c, r in by.items():
    if c not in CELLS or not reads_cache(c):
      continue
    ov, _, extra = CELLS[c]
    fill = next((f for f, fr in fills.items()
                 if CELLS[f][0] == ov and CELLS[f][2] == extra), None)
    if fill is not None:
      out[c] = {'fill': fill, 'same_triton_configs':
                r['gemms']['triton_configs'] == by[fill]['gemms']['triton_configs']}
  return out


def state_digest(state) -> str:
  import jax
  import numpy as np
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(state)):
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# one cell (child process): compile, say READY, wait for GO, time, say RESULT
# ------------------------------------------------------------------------------------------------

def build_cell(a: dict):
  """(config, state, images, train_key, the jitted step) of cell ``a['cell']``, built as training
  builds it, on device-resident synthetic images of the real shapes."""
  import jax
  import configs
  import meta_step
  from metadrop_jax import keys as keys_lib
  from metadrop_jax import meta
  jax.config.update('jax_default_matmul_precision', a['precision'])
  overrides = {**CELLS[a['cell']][0], 'meta_gradient': a['gradient'], **a.get('set', {})}
  config = configs.get(a['config'], **{'method': a['method'], **overrides})
  images = jax.device_put(meta_step._synthetic_images(config))
  init_key, train_key = keys_lib.run_keys(config)
  state, tx = meta.create_state(init_key, config)
  return config, state, images, train_key, meta.make_train_step(config, tx)


def worker(a: dict) -> None:
  import jax
  import numpy as np
  config, state, images, train_key, step = build_cell(a)
  cache = autotune.named_cache(os.environ.get('XLA_FLAGS', ''))
  cache_before = _entries(cache)
  t0 = time.perf_counter()
  compiled = step.lower(state, images, train_key).compile()
  compile_s = time.perf_counter() - t0
  hlo_text = compiled.as_text()
  counts = hlo_counts(hlo_text)
  gemms = gemm_counts(hlo_text)
  print('READY ' + json.dumps({'compile_s': compile_s}), flush=True)
  if sys.stdin.readline().strip() != 'GO':
    return
  for _ in range(a['warmup']):
    state, metrics = compiled(state, images, train_key)
  jax.block_until_ready(state)
  lat = []
  for _ in range(a['iters']):
    s = time.perf_counter()
    state, metrics = compiled(state, images, train_key)
    jax.block_until_ready(state)
    lat.append(time.perf_counter() - s)
  s = time.perf_counter()
  for _ in range(a['iters']):
    state, metrics = compiled(state, images, train_key)
  jax.block_until_ready(state)
  pipelined = (time.perf_counter() - s) / a['iters']
  # as training runs it: one step queued behind the running one (train.py waits for step t-1's
  # metrics before dispatching t+1)
  s, prev = time.perf_counter(), None
  for _ in range(a['iters']):
    state, metrics = compiled(state, images, train_key)
    if prev is not None:
      jax.block_until_ready(prev)
    prev = metrics
  jax.block_until_ready(state)
  bounded = (time.perf_counter() - s) / a['iters']
  loss = float(jax.device_get(metrics['loss']))
  digest = state_digest(state)
  trace_dir = a.get('trace_dir')
  if trace_dir:
    os.makedirs(trace_dir, exist_ok=True)
    import profile_step
    with gzip.open(os.path.join(trace_dir, profile_step.HLO_FILE), 'wt') as f:
      f.write(hlo_text)     # what profile_step.parse names the kernels by
    jax.profiler.start_trace(trace_dir)
    for _ in range(a['trace_steps']):
      state, metrics = compiled(state, images, train_key)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    # keep the JSON trace (what profile_step.py reads); the xplane protobuf is ten times larger
    for root, _, files in os.walk(trace_dir):
      for fn in files:
        if fn.endswith('.xplane.pb'):
          os.remove(os.path.join(root, fn))
  dev = jax.devices()[0]
  try:
    peak = (dev.memory_stats() or {}).get('peak_bytes_in_use')
  except Exception:  # noqa: BLE001 - CPU: no statistics
    peak = None
  from metadrop_jax import flops as flops_lib
  print('RESULT ' + json.dumps({
      **flops_lib.utilisation(config, pipelined, dev.device_kind),
      'ms_per_iter': 1e3 * float(np.median(lat)), 'ms_per_iter_min': 1e3 * float(np.min(lat)),
      'ms_per_iter_pipelined': 1e3 * pipelined, 'ms_per_iter_bounded': 1e3 * bounded,
      'compile_s': compile_s, 'hlo': counts, 'gemms': gemms,
      **({'autotune_cache': {'dir': cache, 'entries_before': cache_before,
                             'entries_after': _entries(cache)}} if cache else {}),
      'loss': loss, 'state_sha256': digest, 'steps': a['warmup'] + 3 * a['iters'],
      'peak_mem_bytes': peak, 'device': f'{dev.platform}:{dev.device_kind}',
      'jax': jax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', '')}), flush=True)


def concurrent_worker(a: dict) -> None:
  """One of N copies of a cell training at once: compile, READY, GO, ``iters`` steps back to
  back; reports its own wall time."""
  import jax
  _, state, images, train_key, step = build_cell(a)
  compiled = step.lower(state, images, train_key).compile()
  for _ in range(a['warmup']):
    state, _ = compiled(state, images, train_key)
  jax.block_until_ready(state)
  print('READY {}', flush=True)
  if sys.stdin.readline().strip() != 'GO':
    return
  s = time.perf_counter()
  for _ in range(a['iters']):
    state, _ = compiled(state, images, train_key)
  jax.block_until_ready(state)
  print('RESULT ' + json.dumps({'seconds': time.perf_counter() - s, 'iters': a['iters']}),
        flush=True)


# ------------------------------------------------------------------------------------------------
# the parent: waves of parallel compiles, serial timing
# ------------------------------------------------------------------------------------------------

class Child:
  def __init__(self, mode, args, env, log_path):
    self.log = open(log_path, 'w')
    self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, json.dumps(args)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                              text=True, env=env, cwd=ROOT, start_new_session=True)
    self.ready = None
    self.result = None

  def wait_for(self, tag, deadline):
    """The JSON after the next line starting with ``tag`` (None at EOF or the deadline)."""
    import select
    while time.time() < deadline:
      r, _, _ = select.select([self.p.stdout], [], [], max(0.05, min(1.0, deadline - time.time())))
      if not r:
        continue
      line = self.p.stdout.readline()
      if not line:
        return None
      if line.startswith(tag + ' '):
        return json.loads(line[len(tag) + 1:])
    return None

  def send(self, word):
    try:
      self.p.stdin.write(word + '\n')
      self.p.stdin.flush()
    except (BrokenPipeError, OSError):
      pass

  def stop(self):
    import signal
    if self.p.poll() is None:
      try:
        os.killpg(self.p.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        self.p.kill()
    self.p.wait()
    self.log.close()

  def error_tail(self):
    try:
      with open(self.log.name) as f:
        return f.read()[-1500:]
    except OSError:
      return ''


def wait_for_process(pid: int, until: float, log) -> None:
  """Waits (at most until ``until``) for process ``pid`` to end: another job on the same card
  (the smoke test) must not share it with the timing."""
  if not pid:
    return
  t = time.time()
  while time.time() < until:
    try:
      os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
      break
    time.sleep(0.5)
  else:
    log(f'process {pid} still runs: timing beside it')
    return
  if time.time() - t > 1:
    log(f'waited {time.time() - t:.0f} s for process {pid} to end before timing')


def run_cells(cells, a, base, deadline, log) -> list[dict]:
  rows = []
  for w, wave in enumerate(waves(cells, a.parallel)):
    if time.time() > deadline - 10:
      rows += [{'cell': c, 'error': 'not run: deadline'} for c in wave]
      continue
    kids = {}
    for c in wave:
      args = {**base, 'cell': c}
      if c in a.trace and a.trace_dir:
        args['trace_dir'] = os.path.join(a.trace_dir, c)
      kids[c] = Child('--_worker', args, cell_env(c, a.base_flags),
                      os.path.join(a.logs, f'{c}.log'))
    t_wave = time.time()
    for c, k in kids.items():
      k.ready = k.wait_for('READY', deadline - 5)
    log(f'wave {w + 1}: {len(wave)} cells compiled in {time.time() - t_wave:.0f} s')
    wait_for_process(a.wait_pid, deadline - 30, log)
    for c, k in kids.items():
      row = {'cell': c, 'overrides': CELLS[c][0], 'deterministic_ops': CELLS[c][1],
             'extra_flags': CELLS[c][2]}
      if k.ready is not None and time.time() < deadline - 3:
        k.send('GO')
        k.result = k.wait_for('RESULT', deadline - 1)
      if k.result is not None:
        row.update(k.result)
        log(f"  {c:<24} {row['ms_per_iter']:8.2f} ms/iter ({row['ms_per_iter_pipelined']:.2f} "
            f"pipelined)  compile {row['compile_s']:5.1f} s  {row['state_sha256']}  "
            f"{format_gemms(row.get('gemms'))}")
      else:
        row['error'] = ('not timed: deadline' if k.ready is not None else
                        'no compile before the deadline or crashed: ' + k.error_tail()[-300:])
        log(f'  {c:<24} {row["error"][:100]}')
      k.stop()
      rows.append(row)
  return rows


def run_concurrent(cell, ns, a, base, deadline, log) -> list[dict]:
  out = []
  for n in ns:
    if time.time() > deadline - 15:
      out.append({'cell': cell, 'copies': n, 'error': 'not run: deadline'})
      continue
    kids = [Child('--_concurrent', {**base, 'cell': cell, 'iters': a.concurrent_iters},
                  cell_env(cell, a.base_flags), os.path.join(a.logs, f'concurrent_{n}_{i}.log'))
            for i in range(n)]
    ok = all(k.wait_for('READY', deadline - 5) is not None for k in kids)
    res = []
    if ok:
      t = time.time()
      for k in kids:
        k.send('GO')
      res = [k.wait_for('RESULT', deadline - 1) for k in kids]
      wall = time.time() - t
    for k in kids:
      k.stop()
    if not ok or any(r is None for r in res):
      out.append({'cell': cell, 'copies': n, 'error': 'not finished before the deadline'})
      continue
    steps = sum(r['iters'] for r in res)
    row = {'cell': cell, 'copies': n, 'wall_s': wall, 'steps': steps,
           'aggregate_steps_per_s': steps / wall,
           'per_copy_ms_per_iter': [1e3 * r['seconds'] / r['iters'] for r in res]}
    log(f"  {n} copies of {cell}: {row['aggregate_steps_per_s']:.1f} steps/s together")
    out.append(row)
  return out


def profiles(rows, a) -> dict:
  """The profile tables (profile_step.parse) of the traced cells, with their measured wall time."""
  import profile_step
  out = {}
  for r in rows:
    d = os.path.join(a.trace_dir, r['cell']) if a.trace_dir else ''
    if 'error' in r or not d or not os.path.isdir(d):
      continue
    try:
      out[r['cell']] = profile_step.parse(d, a.trace_steps, r['ms_per_iter_pipelined'] / 1e3,
                                          top=20)
    except (OSError, ValueError) as e:
      out[r['cell']] = {'error': repr(e)}
  return out


def flags_make_deterministic(row) -> bool:
  """Whether the XLA flags alone make a row's cell deterministic: deterministic ops, and no
  kernel outside XLA's (:data:`CUSTOM_KERNEL_CONV_IMPLS`)."""
  return bool(row['deterministic_ops']) and (
      row.get('overrides', {}).get('model.conv_impl') not in CUSTOM_KERNEL_CONV_IMPLS)


def fastest(rows, reproducible=None):
  """The fastest row (steps back to back) among those named in ``reproducible``
  (:func:`determinism`) or, without it, those the XLA flags make deterministic; None if there is
  none."""
  ok = [r for r in rows if 'error' not in r and not r['cell'].endswith(AGAIN) and
        (r['cell'] in reproducible if reproducible is not None else flags_make_deterministic(r))]
  return min(ok, key=lambda r: r['ms_per_iter_pipelined']) if ok else None


def determinism(rows) -> dict:
  """Which cells train reproducibly, from the state digests after the same steps.

  * ``two_processes_identical``: for every measured pair '<cell>' / '<cell>_again' (two
    processes, each compiled on its own), whether both ended in the same state;
  * ``reproducible``: the cells that deterministic ops make deterministic
    (:func:`flags_make_deterministic`), and the others whose pair agreed (what a sitting may
    train with: a resumed run then computes what an uninterrupted one does);
  * ``same_state_as_baseline``: informative; a formulation with other rounding differs by design.
  """
  by = {r['cell']: r for r in rows if 'error' not in r}
  pairs = {c[:-len(AGAIN)]: by[c[:-len(AGAIN)]]['state_sha256'] == r['state_sha256']
           for c, r in by.items() if c.endswith(AGAIN) and c[:-len(AGAIN)] in by}
  out = {'two_processes_identical': pairs,
         'reproducible': sorted(c for c, r in by.items() if not c.endswith(AGAIN) and
                                (flags_make_deterministic(r) or pairs.get(c, False)))}
  if 'select_nondet' in pairs:    # the name earlier records use
    out['nondet_two_processes_identical'] = pairs['select_nondet']
  if 'baseline' in by:
    out['same_state_as_baseline'] = sorted(c for c, r in by.items()
                                           if r['state_sha256'] == by['baseline']['state_sha256'])
  return out


def format_gemms(g: dict | None) -> str:
  """'dots: 12 triton, 0 cublas, 0 other' (or '' for a record from before the count)."""
  if not g:
    return ''
  return (f"dots: {g['triton_gemm']} triton, {g['cublas_gemm']} cublas, {g['other_dot']} other"
          + (f", {g['cudnn_fusion']} cudnn" if g.get('cudnn_fusion') else ''))


def format_table(summary) -> str:
  rows = summary['rows']
  base = next((r for r in rows if r['cell'] == 'baseline' and 'error' not in r), None)
  lines = [f"{summary['config']} {summary['method']} ({summary['gradient']}), precision "
           f"{summary['precision']}, {summary.get('device')}, jax {summary.get('jax')}",
           f"{'cell':<24}{'det':>5}{'ms/it':>9}{'pipel.':>9}{'vs base':>8}{'compile':>8}"
           f"{'sort':>5}{'while':>6}{'scat':>5}{'s&s':>4}{'grpconv':>8}{'triton':>7}"
           f"{'cublas':>7}{'dot':>5}{'  state'}"]
  for r in rows:
    if 'error' in r:
      lines.append(f"{r['cell']:<24} {r['error'][:70]}")
      continue
    h = r['hlo']
    ratio = base['ms_per_iter_pipelined'] / r['ms_per_iter_pipelined'] if base else float('nan')
    det = ('yes' if r['deterministic_ops'] else
           'excl' if EXCLUDE_NONDET in r.get('extra_flags', '') else 'no')
    lines.append(f"{r['cell']:<24}{det:>5}"
                 f"{r['ms_per_iter']:9.2f}{r['ms_per_iter_pipelined']:9.2f}{ratio:7.2f}x"
                 f"{r['compile_s']:8.1f}{h['sort']:5d}{h['while']:6d}{h['scatter']:5d}"
                 f"{h['select_and_scatter']:4d}{h['grouped_conv']:8d}"
                 + (''.join(f"{g[k]:{w}d}" for k, w in (('triton_gemm', 7), ('cublas_gemm', 7),
                                                        ('other_dot', 5)))
                    if (g := r.get('gemms')) else f"{'-':>7}{'-':>7}{'-':>5}")
                 + f"  {r['state_sha256'][:8]}")
  for r in summary.get('concurrent', []):
    if 'error' in r:
      lines.append(f"{r['copies']} x {r['cell']}: {r['error']}")
    else:
      lines.append(f"{r['copies']} x {r['cell']} at once: {r['aggregate_steps_per_s']:.1f} steps/s "
                   f"in all (per copy {', '.join(f'{x:.1f}' for x in r['per_copy_ms_per_iter'])} "
                   'ms/iter)')
  w = summary.get('winner')
  if w:
    lines.append(f"fastest reproducible: {w['cell']} {w['ms_per_iter_pipelined']:.2f} ms/iter "
                 f"pipelined {w['overrides']} {w['extra_flags']}".rstrip())
  for k, v in summary.get('determinism', {}).items():
    lines.append(f'{k}: {v}')
  for c, v in summary.get('autotune', {}).items():
    lines.append(f"{c}: Triton tile configs {'the same as' if v['same_triton_configs'] else 'NOT those of'}"
                 f" {v['fill']} (the autotune cache it filled)")
  return '\n'.join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] in ('--_worker', '--_concurrent'):
    (worker if argv[0] == '--_worker' else concurrent_worker)(json.loads(argv[1]))
    return 0
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--config', default='omniglot_20way1shot',
                  help="paper config name (configs/<name>.py) or 'tiny'")
  ap.add_argument('--method', default='metadrop')
  ap.add_argument('--gradient', default='authors', help='meta_gradient of every cell')
  ap.add_argument('--precision', default='highest', choices=['highest', 'default'])
  ap.add_argument('--cells', default=','.join(CELLS), help='comma-separated cells, in order')
  ap.add_argument('--list', action='store_true', help='print the cells and exit')
  ap.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                  help='config override of every cell (e.g. the tiny test config)')
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--parallel', type=int, default=6, help='cells compiled at once (a wave)')
  ap.add_argument('--trace', default=','.join(DEFAULT_TRACE),
                  help='cells whose steps are traced (with --trace_dir)')
  ap.add_argument('--trace_dir', default='', help='write jax.profiler traces here')
  ap.add_argument('--trace_steps', type=int, default=5)
  ap.add_argument('--concurrent', default='2,4',
                  help='numbers of copies of the fastest cell trained at once ("" for none)')
  ap.add_argument('--concurrent_cell', default='', help='default: the fastest deterministic cell')
  ap.add_argument('--concurrent_iters', type=int, default=100)
  ap.add_argument('--base_flags', default=os.environ.get('XLA_FLAGS', ''),
                  help='XLA_FLAGS under every cell (deterministic ops are set per cell)')
  ap.add_argument('--deadline', type=float, default=0.0, help='unix time to be done by')
  ap.add_argument('--wait_pid', type=int, default=0,
                  help='before timing, wait for this process to end (one sharing the card)')
  ap.add_argument('--out', default='', help='write everything as JSON here')
  a = ap.parse_args(argv)
  if a.list:
    for c, (ov, det, extra) in CELLS.items():
      print(f"{c:<24} det ops {'on ' if det else 'off'} {ov} {extra}")
    return 0
  cells = [c for c in a.cells.split(',') if c]
  bad = [c for c in cells if c not in CELLS]
  if bad:
    ap.error(f'unknown cells {bad}: --list shows them')
  from metadrop_jax.cli import parse_overrides
  extra = parse_overrides(a.set)
  a.trace = [c for c in a.trace.split(',') if c]
  a.logs = tempfile.mkdtemp(prefix='formulations_')
  deadline = a.deadline or time.time() + 3600
  t0 = time.time()

  def log(msg):
    print(f'[{time.time() - t0:6.1f}s] {msg}', flush=True)

  base = {'config': a.config, 'method': a.method, 'gradient': a.gradient, 'set': extra,
          'precision': a.precision, 'iters': a.iters, 'warmup': a.warmup,
          'trace_steps': a.trace_steps}
  summary = {'config': a.config, 'method': a.method, 'gradient': a.gradient,
             'precision': a.precision, 'set': extra, 'iters': a.iters, 'warmup': a.warmup,
             'commit': provenance.commit(), 'base_flags': a.base_flags,
             'start': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t0))}

  def save():
    if a.out:
      tmp = a.out + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(summary, f, indent=1)
      os.replace(tmp, a.out)

  summary['rows'] = run_cells(cells, a, base, deadline, log)
  done = [r for r in summary['rows'] if 'error' not in r]
  if done:
    summary['device'], summary['jax'] = done[0]['device'], done[0]['jax']
  summary['determinism'] = determinism(summary['rows'])
  summary['autotune'] = autotune_check(summary['rows'])
  summary['winner'] = fastest(summary['rows'], summary['determinism']['reproducible'])
  save()
  ns = [int(x) for x in a.concurrent.split(',') if x]
  cc = a.concurrent_cell or (summary['winner'] or {}).get('cell')
  if ns and cc:
    summary['concurrent'] = run_concurrent(cc, ns, a, base, deadline, log)
  summary['profiles'] = profiles(summary['rows'], a)
  summary['seconds'] = time.time() - t0
  save()
  print(format_table(summary))
  import profile_step
  for cell, p in summary['profiles'].items():
    print(f'\nprofile of {cell}:\n' + (p['error'] if 'error' in p else
                                        profile_step.format_profile(p)))
  if a.out:
    print(f'wrote {a.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
