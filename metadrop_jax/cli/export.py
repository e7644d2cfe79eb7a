"""``python -m metadrop_jax.cli.export`` (installed: ``metadrop-export``): decision-boundary arrays
of a trained workdir to an .npz (:func:`metadrop_jax.export.export_workdir`), optionally one PNG
per sub-task and inner step.

  python -m metadrop_jax.cli.export --workdir=workdirs/omni1_metadrop --out=/tmp/db/metadrop.npz \\
      --plot_dir=/tmp/db/metadrop_png
"""

from __future__ import annotations

import argparse
import sys

from metadrop_jax import cli
from metadrop_jax import export
from metadrop_jax import visualize

def _parser():
  p = argparse.ArgumentParser(
      prog='python -m metadrop_jax.cli.export',
      description='Export the decision-boundary arrays of 2-way sub-tasks (classes c, c+offset '
                  'of the meta-test split) at every inner step to an .npz, and optionally plot '
                  'one PNG per sub-task and step.')
  p.add_argument('--workdir', required=True, help='training workdir (config.json + checkpoints)')
  p.add_argument('--out', required=True, help='output .npz path')
  p.add_argument('--plot_dir', default='', help='if set, write task{t}_step{k}.png here')
  p.add_argument('--split', default='test', choices=['test', 'val', 'train'])
  p.add_argument('--num_tasks', type=int, default=10, help='sub-tasks (c, c+offset), c < this')
  p.add_argument('--class_offset', type=int, default=5)
  p.add_argument('--num_perturb', type=int, default=10, help='noise draws per training point')
  p.add_argument('--mc_samples', type=int, default=0,
                 help='MC samples of the inner loss (0: the config\'s eval.mc_samples)')
  p.add_argument('--shot', type=int, default=0, help='training points per class (0: config)')
  p.add_argument('--query', type=int, default=0, help='test points per class (0: config)')
  p.add_argument('--seed', type=int, default=0, help='instances, noise and t-SNE seed')
  p.add_argument('--data_path', default='', help='override config.data.path')
  p.add_argument('--cache_dir', default='', help='override config.data.cache_dir')
  p.add_argument('--fast_compile', default='auto', choices=['auto', 'true', 'false'],
                 help='lower XLA optimisation (auto: on CPU), see compiler_options()')
  p.add_argument('--label', default='', help='plot title prefix (default: method name)')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  with cli.user_errors(args.workdir):
    return _main(args)


def _main(args) -> int:
  arrays = export.export_workdir(
      args.workdir, split=args.split, data_path=args.data_path or None,
      cache_dir=args.cache_dir or None, num_tasks=args.num_tasks,
      class_offset=args.class_offset, num_perturb=args.num_perturb,
      mc_samples=args.mc_samples or None, shot=args.shot or None, query=args.query or None,
      seed=args.seed, fast_compile={'auto': None, 'true': True, 'false': False}[args.fast_compile])
  export.save_npz(args.out, arrays)
  print(f'wrote {args.out}: {arrays["feat_train"].shape[0]} sub-tasks x '
        f'{arrays["feat_train"].shape[1]} inner steps; test accuracy per step (mean over tasks): '
        + ' '.join(f'{a:.3f}' for a in arrays['acc_test'].mean(0)))
  if args.plot_dir:
    paths = visualize.plot_all_boundaries(arrays, args.plot_dir, label=args.label or None,
                                          seed=args.seed)
    print(f'wrote {len(paths)} PNGs to {args.plot_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
