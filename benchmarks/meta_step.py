r"""Benchmark of one meta-training iteration (the real jitted ``meta.make_train_step``).

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
  python benchmarks/meta_step.py --configs omniglot_20way1shot --no-naive \
      --candidate select=model.pool_impl=select     # a candidate formulation beside the default
  python benchmarks/meta_step.py --configs omniglot_20way1shot --no-naive \
      --authors-tf=/path/to/tf-venv/bin/python,/path/to/metadrop   # + the authors' TF step

With ``--authors-tf`` the authors' TF graph (``authors_tf_step.py``, in its own interpreter) is
timed at each paper setting right after our rows, on the same machine in the same run, and the
table prints its seconds per iteration and the ratio TF / ours.

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  (benchmarks/provenance.py)
PAPER_CONFIGS = ('omniglot_20way1shot', 'omniglot_20way5shot', 'mimgnet_5way1shot',
                 'mimgnet_5way5shot')
# the CPU experiment's config: its seeds-as-a-batch-axis question is measured on a CPU
ALL_CONFIGS = PAPER_CONFIGS + ('omniglot_5way1shot_cpu', 'tiny')
METHODS = ('metadrop', 'maml')
# The reference formulation every fast path is tested against (tests/test_fast_paths.py).
NAIVE = {'model.conv_impl': 'xla', 'model.task_map': 'vmap', 'model.inner_loop': 'unroll',
         'model.fuse_noise_conv': False}
def peak_tflops(device_kind: str, precision: str):
  """The card's dense peak for this precision ('highest' -> float32, 'default' -> tf32), or None."""
  from metadrop_jax import flops as flops_lib
  return flops_lib.peak_tflops(device_kind, 'float32' if precision in ('highest', 'float32')
                               else 'tf32')


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


AUTHORS_TF_STEP = os.path.join(ROOT, 'benchmarks', 'authors_tf_step.py')


def authors_tf_flags(config) -> list[str] | None:
  """``authors_tf_step.py``'s flags for the setting of a paper config (their ``main.py`` flags),
  or None where their code has no such setting (other widths, methods or computations)."""
  from metadrop_jax import config as config_lib
  dataset = {'omniglot': 'omniglot', 'miniimagenet': 'mimgnet'}.get(config.data.name)
  their_channels = {'omniglot': 64, 'mimgnet': 32}.get(dataset)
  if (dataset is None or config.model.channels != their_channels or config.model.num_layers != 4
      or config.method not in ('metadrop', 'maml') or config.meta_gradient != 'authors'):
    return None
  flags = [f'--dataset={dataset}', f'--way={config.way}', f'--shot={config.shot}',
           f'--query={config.query}', f'--metabatch={config.meta_batch}',
           f'--n_steps={config.inner_steps}', f'--inner_lr={config.inner_lr:g}',
           f'--meta_lr={config_lib.meta_lr(config):g}']
  return flags + (['--maml'] if config.method == 'maml' else [])


def run_authors_tf(spec: str, name: str, method: str, overrides: dict, iters: int, warmup: int,
                   timeout: float) -> dict:
  """The authors' TF step at this row's setting, timed by ``authors_tf_step.py`` under
  ``spec`` = 'PYTHON,REPO' (a TensorFlow 2.x + tf_keras interpreter, their checkout)."""
  import configs
  row = {'config': name, 'method': method, 'overrides': overrides, 'variant': 'authors_tf'}
  flags = authors_tf_flags(configs.get(name, **{'method': method, **overrides}))
  if flags is None:
    return {**row, 'error': "not run: the authors' code has no such setting"}
  python, repo = spec.split(',', 1)
  cmd = [python, AUTHORS_TF_STEP, repo, *flags, f'--iters={iters}', f'--warmup={max(1, warmup)}']
  r = _run_for_result(cmd, timeout)
  return {**row, **r} if 'error' in r else {**row, **r, 'cmd': cmd[1:]}


def _run_for_result(cmd: list, timeout: float, env: dict | None = None) -> dict:
  """Runs a measuring process and returns the JSON of its last ``RESULT {...}`` line, else
  {'error': 'timeout' or the tail of its output}."""
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  except subprocess.TimeoutExpired:
    return {'error': 'timeout'}
  for line in reversed(p.stdout.splitlines()):
    if line.startswith('RESULT '):
      return json.loads(line[len('RESULT '):])
  return {'error': (p.stderr or p.stdout)[-2000:]}


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
  r = _run_for_result(cmd, timeout, env)
  return {'config': name, 'method': method, 'overrides': overrides, **r} if 'error' in r else r


def _fmt(v, spec):
  if isinstance(v, (int, float)) and v == v:
    return format(v, spec)
  return format('n/a', '>' + spec.split('.')[0])


FIXED_VARIANTS = ('fast', 'naive', 'exact', 'authors_tf')


def print_table(rows):
  """The rows as a table, with ratios to the fast row of the same config and method measured in
  this run: naive / fast, exact / fast (``--exact``: the fast formulation with the exact
  meta-gradient), <candidate> / fast (``--candidate``) and TF / fast (``--authors-tf``: the
  authors' TF step)."""
  by_key = {}
  for r in rows:
    by_key.setdefault((r['config'], r['method']), {})[r['variant']] = r
  ok = lambda r: r is not None and 'error' not in r
  candidates = list(dict.fromkeys(r['variant'] for r in rows
                                  if r['variant'] not in FIXED_VARIANTS))
  extra = [v for v in ('exact', *candidates, 'authors_tf')
           if any(ok(d.get(v)) for d in by_key.values())]
  head = {v: 'TF/fast' if v == 'authors_tf' else f'{v}/fast' for v in extra}
  width = {v: max(11, len(h) + 2) for v, h in head.items()}
  hdr = (f"{'config':<22}{'method':<10}{'variant':<11}{'compile s':>10}{'s/iter':>9}"
         f"{'GFLOP/it':>10}{'GFLOP/s':>9}{'temp MiB':>9}{'peak MiB':>9}{'naive/fast':>11}"
         + ''.join(f'{head[v]:>{width[v]}}' for v in extra))
  print(hdr)
  print('-' * len(hdr))
  for (name, method), d in by_key.items():
    fast = d.get('fast')
    ratio = lambda v: (d[v]['s_per_iter'] / fast['s_per_iter']
                       if ok(fast) and ok(d.get(v)) else None)
    for variant in ('fast', 'naive', 'exact', *candidates, 'authors_tf'):
      r = d.get(variant)
      if r is None:
        continue
      label = 'TF' if variant == 'authors_tf' else variant
      if 'error' in r:
        msg = r['error'].splitlines()[-1][:80]
        print(f"{name:<22}{method:<10}{label:<11}  {'' if msg.startswith('not run') else 'ERROR: '}"
              f'{msg}')
        continue
      beside = variant == 'fast'
      if variant == 'authors_tf':
        print(f"{name:<22}{method:<10}{label:<11}{_fmt(r.get('graph_build_s'), '10.1f')}"
              f"{_fmt(r['s_per_iter'], '9.3f')}")
        continue
      print(f"{name:<22}{method:<10}{label:<11}{_fmt(r['compile_s'], '10.1f')}"
            f"{_fmt(r['s_per_iter'], '9.3f')}{_fmt(r['xla_flops_per_iter'] / 1e9, '10.1f')}"
            f"{_fmt(r['xla_gflops_per_s'], '9.1f')}"
            f"{_fmt((r['xla_temp_bytes'] or float('nan')) / 2**20, '9.0f')}"
            f"{_fmt(r['peak_mem_bytes'] / 2**20, '9.0f')}"
            f"{_fmt(ratio('naive') if beside else None, '11.1f')}"
            + ''.join(_fmt(ratio(v) if beside else None, f'{width[v]}.2f') for v in extra))
  first = next((r for r in rows if r['variant'] != 'authors_tf' and 'error' not in r), None)
  if first:
    print(f"\ndevice: {first['device']}  (x{first['num_devices']}; "
          f"{first.get('cpu_model', '?')}, {first.get('cpu_count', '?')} cores); peak memory: "
          f"{first['peak_mem_kind']}; fast = the defaults ({first['resolved']})")
  if 'authors_tf' in extra:
    tf = next(d['authors_tf'] for d in by_key.values() if ok(d.get('authors_tf')))
    print(f"TF: the authors' TF graph (benchmarks/authors_tf_step.py, TensorFlow {tf['tf']}), "
          "timed in this run on this machine ('compile s': graph build); TF/fast > 1: ours is "
          "faster")


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
  ap.add_argument('--exact', action='store_true',
                  help='also time the fast formulation with meta_gradient=exact (paper configs '
                       "default to the authors' computation)")
  ap.add_argument('--candidate', action='append', default=[], metavar='NAME=FIELD=VALUE[,...]',
                  help='also time the fast formulation with these overrides (a formulation '
                       'candidate) and print NAME/fast, e.g. select=model.pool_impl=select; '
                       'repeatable')
  ap.add_argument('--authors-tf', default=None, metavar='PYTHON,REPO',
                  help="also time the authors' TF step at each paper setting (metadrop/maml, "
                       "authors' computation) in this run: a TensorFlow 2.x + tf_keras "
                       "interpreter and a checkout of github.com/haebeom-lee/metadrop")
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

  if args.authors_tf:
    tf_python, _, tf_repo = args.authors_tf.partition(',')
    if not (tf_repo and os.path.isfile(os.path.join(tf_repo, 'model.py'))
            and os.access(tf_python, os.X_OK)):
      ap.error(f'--authors-tf={args.authors_tf!r}: give PYTHON,REPO (an executable interpreter '
               'with TensorFlow 2.x + tf_keras, a checkout of github.com/haebeom-lee/metadrop)')
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
  candidates = []
  for c in args.candidate:
    cname, _, spec = c.partition('=')
    items = spec.split(',')
    if (not cname.isidentifier() or cname in FIXED_VARIANTS or
        not all('=' in x and x.split('=', 1)[0] for x in items)):
      ap.error(f'--candidate={c!r}: give NAME=FIELD=VALUE[,FIELD=VALUE], NAME a word other '
               f'than {FIXED_VARIANTS}, e.g. select=model.pool_impl=select')
    candidates.append((cname, {**overrides, **parse_overrides(items)}))

  rows = []
  commit = provenance.commit()

  def save():   # after every row: a window that runs out of time keeps what it measured
    if args.out:
      meta = {'host': platform.node(), 'cpu_count': os.cpu_count(), 'cpu_model': cpu_model(),
              'commit': commit, 'python': sys.version.split()[0], 'argv': sys.argv[1:],
              'rows': rows}
      with open(args.out + '.tmp', 'w') as f:
        json.dump(meta, f, indent=1)
      os.replace(args.out + '.tmp', args.out)

  for name in configs:
    for method in args.methods.split(','):
      variants = [('fast', overrides, iters, args.xla_flags)]
      if not args.no_naive:
        variants.append(('naive', NAIVE, naive_iters, None))
      if args.exact:
        variants.append(('exact', {**overrides, 'meta_gradient': 'exact'}, iters,
                         args.xla_flags))
      variants += [(cname, ov, iters, args.xla_flags) for cname, ov in candidates]
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
                            args.precision if variant != 'naive' else None,
                            args.seeds if variant != 'naive' else 1)
        r['variant'] = variant
        if 'error' not in r:
          print(f"[{name} {method} {variant}] compile {r['compile_s']:.1f} s, "
                f"{r['s_per_iter']:.3f} s/iter", file=sys.stderr, flush=True)
        rows.append(r)
        save()
      if args.authors_tf and not (args.deadline and time.time() > args.deadline - 3.0):
        print(f"[{name} {method} authors' TF] ...", file=sys.stderr, flush=True)
        r = run_authors_tf(args.authors_tf, name, method, overrides, iters, warmup,
                           args.timeout)
        if 'error' not in r:
          print(f"[{name} {method} authors' TF] {r['s_per_iter']:.3f} s/iter", file=sys.stderr,
                flush=True)
        rows.append(r)
        save()
  print_table(rows)
  print(f'commit {commit}')
  save()
  if args.out:
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
