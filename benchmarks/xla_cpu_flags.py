"""Which XLA:CPU options speed up the real meta-train step? A sweep, measured in one run.

Each row runs ``benchmarks/meta_step.py``'s measurement (the jitted ``meta.make_train_step``,
compile + median seconds per iteration) in its own subprocess with one ``XLA_FLAGS`` setting and
one convolution formulation, and prints its time relative to the first row (the defaults, no
flags) measured in the same run, so machine noise shared by the rows cancels in the ratio.

Numerics: every row starts from the same parameters and draws the same episodes, so the
meta-training loss after the timed iterations must agree with the default row up to float32
rounding (the column ``loss diff``); a flag that changes the arithmetic (fast math, reduced
precision) shows here and is not one to turn on silently.

  python benchmarks/xla_cpu_flags.py                                   # Omniglot 20w1s metadrop
  python benchmarks/xla_cpu_flags.py --config omniglot_5way1shot_cpu --iters 10
  python benchmarks/xla_cpu_flags.py --flags='--xla_cpu_use_xnnpack=true' --conv=im2col,xla
(write `--flags=...` with '=': the value itself starts with dashes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import meta_step  # noqa: E402  (benchmarks/meta_step.py)

# Flags of this jaxlib's XLA:CPU that can change how convs / dots / elementwise ops are lowered
# (names from the binary's flag table; each was checked to parse). '' = the defaults.
FLAG_SETS = (
    '',
    '--xla_cpu_use_xnnpack=true',
    '--xla_cpu_use_onednn=true',
    '--xla_cpu_experimental_onednn_fusion_type=dot,eltwise',
    '--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce',
    '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
    '--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce',
    '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution',
    '--xla_cpu_enable_concurrency_optimized_scheduler=true',
    '--xla_cpu_enable_fast_math=true',
)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--config', default='omniglot_20way1shot',
                  help=f'one of {meta_step.ALL_CONFIGS + ("omniglot_5way1shot_cpu",)}')
  ap.add_argument('--method', default='metadrop')
  ap.add_argument('--conv', default='im2col,xla',
                  help='comma-separated model.conv_impl values, each swept over the flag sets')
  ap.add_argument('--flags', action='append', default=None, metavar='XLA_FLAGS',
                  help='flag set to try (repeatable; default: the FLAG_SETS table); the defaults '
                       '(no flags) always run first as the reference')
  ap.add_argument('--iters', type=int, default=3)
  ap.add_argument('--warmup', type=int, default=1)
  ap.add_argument('--timeout', type=float, default=1800)
  ap.add_argument('--out', default=None, help='write the rows as JSON here')
  args = ap.parse_args(argv)

  flag_sets = [''] + [f for f in (args.flags or FLAG_SETS) if f]
  env_flags = os.environ.get('XLA_FLAGS', '')
  rows, ref = [], None
  for conv in args.conv.split(','):
    for flags in flag_sets:
      label = f'{conv:<7} {flags or "(defaults)"}'
      print(f'[{label}] ...', file=sys.stderr, flush=True)
      r = meta_step._run_subprocess(args.config, args.method, {'model.conv_impl': conv},
                                    args.iters, args.warmup, ' '.join([env_flags, flags]).strip(),
                                    args.timeout)
      r.update(conv=conv, flags=flags)
      if ref is None and 'error' not in r:
        ref = r
      rows.append(r)

  print(f"{'conv':<8}{'XLA_FLAGS':<70}{'compile s':>10}{'s/iter':>9}{'vs default':>11}"
        f"{'loss diff':>11}")
  for r in rows:
    head = f"{r['conv']:<8}{(r['flags'] or '(defaults)'):<70}"
    if 'error' in r:
      print(head + '  ERROR: ' + r['error'].strip().splitlines()[-1][:100])
      continue
    speedup = ref['s_per_iter'] / r['s_per_iter']
    diff = abs(r['final_loss'] - ref['final_loss']) / max(abs(ref['final_loss']), 1e-12)
    print(f"{head}{r['compile_s']:10.1f}{r['s_per_iter']:9.3f}{speedup:10.2f}x{diff:11.1e}")
  print(f"\n{args.config} / {args.method}, median of {args.iters} iterations after "
        f"{args.warmup} warm-up; 'vs default' = (im2col|first conv, no flags) s/iter / row s/iter; "
        f"'loss diff' = relative difference of the loss after the timed iterations")
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'argv': sys.argv[1:], 'rows': rows}, f, indent=1)
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
