"""Benchmark of one meta-training iteration (the real jitted ``meta.make_train_step``).

For each config x method it measures the default ("fast") formulation and the NAIVE one
(``conv_impl='xla'``, vmap over tasks, unrolled inner loop, theta/phi convs unfused) and reports:
compile time, steady-state seconds per meta-iteration (median over ``--iters`` after
``--warmup``), XLA's FLOP count per iteration (``compiled.cost_analysis()``), achieved FLOP/s,
XLA's temp-buffer size (``compiled.memory_analysis()``), peak memory (``device.memory_stats()``
on GPU, process peak RSS on CPU) and the device. Every measurement runs in its own subprocess so
that peak RSS, XLA flags and compilation caches do not leak between rows.

  python benchmarks/meta_step.py --quick                      # tiny + omniglot 20w1s, few iters
  python benchmarks/meta_step.py --out bench.json             # all paper configs, honest default
  python benchmarks/meta_step.py --configs omniglot_20way1shot --methods metadrop --iters 5
  python benchmarks/meta_step.py --configs tiny --set model.task_map=vmap --no-naive

Images are synthetic uint8 arrays of the real split shapes ([1200, 20, 28, 28, 1] for Omniglot,
[64, 600, 84, 84, 3] for miniImageNet) resident on the device: episodes are drawn inside the
step as in training; no data is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = ('omniglot_20way1shot', 'omniglot_20way5shot', 'mimgnet_5way1shot',
                 'mimgnet_5way5shot')
ALL_CONFIGS = PAPER_CONFIGS + ('tiny',)
METHODS = ('metadrop', 'maml')
# The reference formulation every fast path is tested against (tests/test_fast_paths.py).
NAIVE = {'model.conv_impl': 'xla', 'model.task_map': 'vmap', 'model.inner_loop': 'unroll',
         'model.fuse_noise_conv': False}
def peak_tflops(device_kind: str, precision: str):
  """The card's dense peak for this precision ('highest' -> float32, 'default' -> tf32), or None."""
  from metadrop_jax import flops as flops_lib
  return flops_lib.peak_tflops(device_kind, 'float32' if precision in ('highest', 'float32')
                               else 'tf32')


# The authors' TF 1.x code (oneDNN), seconds per meta-iteration, measured once on one machine:
# a 2-core AMD EPYC CPU (docs/performance.md). Printed only beside rows measured on that kind of
# CPU (tf_reference()); on any other device the comparison would mean nothing.
TF_REFERENCE = {
    'where': "authors' TF 1.x (oneDNN) code, 2-core AMD EPYC CPU (docs/performance.md)",
    'platform': 'cpu', 'cpu_model': 'AMD EPYC', 'cpu_count': 2,
    's_per_iter': {('omniglot_20way1shot', 'metadrop'): 2.27,
                   ('omniglot_20way1shot', 'maml'): 1.25,
                   ('mimgnet_5way1shot', 'metadrop'): 2.06,
                   ('mimgnet_5way1shot', 'maml'): 1.06},
}


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def tf_reference(row: dict):
  """The authors' TF seconds per iteration for ``row``'s config and method, or None unless the
  row was measured where that figure was (same platform, CPU model and core count)."""
  ref = TF_REFERENCE
  same_place = (row.get('device', '').split(':')[0] == ref['platform']
                and ref['cpu_model'] in row.get('cpu_model', '')
                and row.get('cpu_count') == ref['cpu_count'])
  return ref['s_per_iter'].get((row.get('config'), row.get('method'))) if same_place else None


def config_lib_override(config, **fields):
  c = config.copy_and_resolve_references()
  for k, v in fields.items():
    c[k] = v
  return c


def _synthetic_images(config):
  import numpy as np
  from metadrop_jax import data as data_lib
  h, w, ch = data_lib.image_shape(config.data)
  if config.data.name == 'omniglot':
    classes, per_class = 4800, 20       # the prepared train split (1200 characters x 4 rotations)
  elif config.data.name == 'miniimagenet':
    classes, per_class = 64, 600
  else:
    classes, per_class = config.data.num_classes['train'], config.data.images_per_class
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (classes, per_class, h, w, ch), dtype=np.uint8)


def _peak_memory(device):
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - CPU raises or returns None depending on the version
    stats = None
  if stats and 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'], 'device peak_bytes_in_use'
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return rss * 1024, 'process peak RSS'


def _cost(compiled):
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get('flops', float('nan')))


def measure_one(name: str, method: str, overrides: dict, iters: int, warmup: int,
                precision: str | None = None, seeds: int = 1) -> dict:
  """Compiles and times the train step of one (config, method, formulation) in this process.

  The step is built exactly as ``train.train`` builds it (same keys, same image shape), so
  with a persistent compilation cache a later training run of the same config reuses it.
  """
  import jax
  import numpy as np
  from metadrop_jax import keys as keys_lib
  from metadrop_jax import meta

  if precision:
    jax.config.update('jax_default_matmul_precision', precision)
  import configs
  config = configs.get(name, **{'method': method, **overrides})
  spec = meta.spec_from_config(config)
  net = spec.net
  images = jax.device_put(_synthetic_images(config))
  init_key, train_key = keys_lib.run_keys(config)
  state, tx = meta.create_state(init_key, config)
  step = meta.make_train_step(config, tx)
  if seeds > 1:
    # S independent runs of this config as one vmapped step (seed s: keys of config.seed + s):
    # what a seeds-as-a-batch-axis trainer would run. Measured here only, to price the idea.
    import jax.numpy as jnp
    keys = [keys_lib.run_keys(config_lib_override(config, seed=config.seed + s)) for s in range(seeds)]
    init_keys, train_key = jnp.stack([k[0] for k in keys]), jnp.stack([k[1] for k in keys])
    state = jax.vmap(lambda k: meta.create_state(k, config)[0])(init_keys)
    step = jax.jit(jax.vmap(step, in_axes=(0, None, 0)), donate_argnums=(0,))

  t0 = time.perf_counter()
  lowered = step.lower(state, images, train_key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  flops = _cost(compiled)
  try:
    ma = compiled.memory_analysis()
    temp_bytes = int(ma.temp_size_in_bytes)
  except Exception:  # noqa: BLE001
    temp_bytes = None

  times = []
  for i in range(warmup + iters):
    s = time.perf_counter()
    state, metrics = compiled(state, images, train_key)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - s)
  loss = float(np.mean(jax.device_get(metrics['loss'])))   # mean over seeds when S > 1
  device = jax.devices()[0]
  peak, peak_kind = _peak_memory(device)
  med = float(np.median(times))
  peak_tf = peak_tflops(device.device_kind, precision or 'default') if device.platform == 'gpu' \
      else None
  from metadrop_jax import flops as flops_lib
  return {'jax': jax.__version__, 'precision': precision or 'default', 'seeds': seeds,
      'peak_tflops': peak_tf,
      'peak_fraction': flops / med / 1e12 / peak_tf if peak_tf and med > 0 else None,
      # the analytic count (convs and dense layers; XLA:GPU's count leaves out cuDNN convs)
      **flops_lib.utilisation(config, med / seeds, device.device_kind),
      'config': name, 'method': method, 'overrides': overrides,
      'resolved': {'conv_impl': net.conv_impl, 'task_map': spec.task_map,
                   'inner_loop': spec.inner_loop, 'fuse_noise_conv': net.fuse_noise_conv,
                   'compute_dtype': net.compute_dtype},
      'device': f'{device.platform}:{device.device_kind}', 'num_devices': jax.device_count(),
      'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'trace_lower_s': t1 - t0, 'compile_s': t2 - t1 + (t1 - t0),
      'iters': iters, 'warmup': warmup, 's_per_iter': med,
      's_per_iter_min': float(np.min(times)), 's_per_iter_max': float(np.max(times)),
      'xla_flops_per_iter': flops, 'xla_gflops_per_s': flops / med / 1e9 if med > 0 else None,
      'xla_temp_bytes': temp_bytes, 'peak_mem_bytes': peak, 'peak_mem_kind': peak_kind,
      'final_loss': loss,
  }


def _run_subprocess(name, method, overrides, iters, warmup, xla_flags, timeout, precision=None,
                    seeds=1):
  env = dict(os.environ)
  if xla_flags is not None:
    env['XLA_FLAGS'] = xla_flags
  cmd = [sys.executable, os.path.abspath(__file__), '--_single',
         json.dumps({'name': name, 'method': method, 'overrides': overrides, 'iters': iters,
                     'warmup': warmup, 'precision': precision, 'seeds': seeds})]
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {'config': name, 'method': method, 'overrides': overrides, 'error': 'timeout'}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  return {'config': name, 'method': method, 'overrides': overrides,
          'error': (p.stderr or p.stdout)[-2000:]}


def _fmt(v, spec):
  if isinstance(v, (int, float)) and v == v:
    return format(v, spec)
  return format('n/a', '>' + spec.split('.')[0])


def print_table(rows):
  """The rows as a table; the authors' TF figure only beside rows measured where it was."""
  show_tf = any(tf_reference(r) is not None for r in rows if 'error' not in r)
  hdr = (f"{'config':<22}{'method':<10}{'variant':<8}{'compile s':>10}{'s/iter':>9}"
         f"{'GFLOP/it':>10}{'GFLOP/s':>9}{'temp MiB':>9}{'peak MiB':>9}{'naive/fast':>11}"
         + (f"{'TF s/it*':>9}" if show_tf else ''))
  print(hdr)
  print('-' * len(hdr))
  by_key = {}
  for r in rows:
    by_key.setdefault((r['config'], r['method']), {})[r['variant']] = r
  for (name, method), d in by_key.items():
    fast, naive = d.get('fast'), d.get('naive')
    ratio = (naive['s_per_iter'] / fast['s_per_iter']
             if fast and naive and 'error' not in fast and 'error' not in naive else None)
    for variant in ('fast', 'naive'):
      r = d.get(variant)
      if r is None:
        continue
      if 'error' in r:
        print(f'{name:<22}{method:<10}{variant:<8}  ERROR: {r["error"].splitlines()[-1][:80]}')
        continue
      tf = tf_reference(r)
      print(f"{name:<22}{method:<10}{variant:<8}{_fmt(r['compile_s'], '10.1f')}"
            f"{_fmt(r['s_per_iter'], '9.3f')}{_fmt(r['xla_flops_per_iter'] / 1e9, '10.1f')}"
            f"{_fmt(r['xla_gflops_per_s'], '9.1f')}"
            f"{_fmt((r['xla_temp_bytes'] or float('nan')) / 2**20, '9.0f')}"
            f"{_fmt(r['peak_mem_bytes'] / 2**20, '9.0f')}"
            f"{_fmt(ratio if variant == 'fast' else None, '11.1f')}"
            + (_fmt(tf if variant == 'fast' else None, '9.2f') if show_tf else ''))
  if rows and 'error' not in rows[0]:
    r = rows[0]
    print(f"\ndevice: {r['device']}  (x{r['num_devices']}; {r.get('cpu_model', '?')}, "
          f"{r.get('cpu_count', '?')} cores); peak memory: {r['peak_mem_kind']}; "
          f"fast = the defaults ({r['resolved']})")
  if show_tf:
    print(f"* TF s/it: {TF_REFERENCE['where']}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--configs', default=','.join(PAPER_CONFIGS + ('tiny',)),
                  help=f'comma-separated subset of {ALL_CONFIGS}')
  ap.add_argument('--methods', default=','.join(METHODS), help='comma-separated methods')
  ap.add_argument('--iters', type=int, default=20, help='timed iterations (median reported)')
  ap.add_argument('--naive-iters', type=int, default=None,
                  help='timed iterations of the naive formulation (default: --iters)')
  ap.add_argument('--warmup', type=int, default=2, help='untimed iterations after compiling')
  ap.add_argument('--quick', action='store_true',
                  help='fast CPU run: tiny + omniglot_20way1shot, 5 iters (naive 3), 1 warm-up')
  ap.add_argument('--no-naive', action='store_true', help='skip the naive formulation')
  ap.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                  help='config override of the fast variant, e.g. model.task_map=vmap')
  ap.add_argument('--xla-flags', default=None,
                  help='XLA_FLAGS of the fast variant (default: inherit the environment)')
  ap.add_argument('--timeout', type=float, default=3600, help='seconds per measurement')
  ap.add_argument('--precision', default=None, choices=['highest', 'default'],
                  help='jax_default_matmul_precision of the fast variant (GPU: TF32 or not)')
  ap.add_argument('--seeds', type=int, default=1,
                  help='fast variant: S seeds of the config as one vmapped step (s_per_iter is '
                       'for all S)')
  ap.add_argument('--deadline', type=float, default=0.0,
                  help='unix time after which no measurement starts (GPU windows)')
  ap.add_argument('--out', default=None, help='write the rows as JSON here')
  ap.add_argument('--_single', default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args._single:
    a = json.loads(args._single)
    sys.path.insert(0, ROOT)
    r = measure_one(a['name'], a['method'], a['overrides'], a['iters'], a['warmup'],
                    a.get('precision'), a.get('seeds', 1))
    print('RESULT ' + json.dumps(r))
    return

  configs = args.configs.split(',')
  iters, warmup, naive_iters = args.iters, args.warmup, args.naive_iters
  if args.quick:
    if '--configs' not in ' '.join(argv or sys.argv):
      configs = ['tiny', 'omniglot_20way1shot']
    iters, warmup, naive_iters = min(iters, 5), 1, naive_iters or 3
  naive_iters = naive_iters or iters
  for c in configs:
    if c not in ALL_CONFIGS:
      ap.error(f'unknown config {c!r}: choose from {ALL_CONFIGS}')
  sys.path.insert(0, ROOT)
  from metadrop_jax.cli import parse_overrides     # no jax in this parent process
  overrides = parse_overrides(args.set)

  rows = []

  def save():   # after every row: a window that runs out of time keeps what it measured
    if args.out:
      meta = {'host': platform.node(), 'cpu_count': os.cpu_count(),
              'python': sys.version.split()[0], 'argv': sys.argv[1:], 'rows': rows}
      with open(args.out, 'w') as f:
        json.dump(meta, f, indent=1)

  for name in configs:
    for method in args.methods.split(','):
      variants = [('fast', overrides, iters, args.xla_flags)]
      if not args.no_naive:
        variants.append(('naive', NAIVE, naive_iters, None))
      for variant, ov, n, flags in variants:
        if args.deadline and time.time() > args.deadline - 3.0:
          rows.append({'config': name, 'method': method, 'overrides': ov, 'variant': variant,
                       'error': 'not run: deadline'})
          continue
        print(f'[{name} {method} {variant}] ...', file=sys.stderr, flush=True)
        timeout = args.timeout
        if args.deadline:
          timeout = max(1.0, min(timeout, args.deadline - time.time()))
        r = _run_subprocess(name, method, ov, n, warmup, flags, timeout,
                            args.precision if variant == 'fast' else None,
                            args.seeds if variant == 'fast' else 1)
        r['variant'] = variant
        if 'error' not in r:
          print(f"[{name} {method} {variant}] compile {r['compile_s']:.1f} s, "
                f"{r['s_per_iter']:.3f} s/iter", file=sys.stderr, flush=True)
        rows.append(r)
        save()
  print_table(rows)
  save()
  if args.out:
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
