"""``python -m metadrop_jax.cli.robustness`` (installed: ``metadrop-robustness``): adversarial
robustness of trained workdirs (:func:`metadrop_jax.robustness.evaluate_workdir`) and the
accuracy-vs-radius figure.

  python -m metadrop_jax.cli.robustness --workdirs=wd/maml,wd/metadrop --norms=linf,l2 \\
      --episodes=100 --out=robustness.png

Across training seeds (:mod:`metadrop_jax.seeds`): the workdirs of both methods at every seed,
their robustness_<norm>.json already written, give per seed and radius the paired difference and
across seeds its mean with a t-interval, as a table and a figure:

  python -m metadrop_jax.cli.robustness --plot_only --norms=linf \\
      --workdirs=s0/maml,s0/metadrop,s1/maml,s1/metadrop,s2/maml,s2/metadrop \\
      --seeds_figure=robustness_seeds.png --seeds_table=robustness_seeds.md
"""

from __future__ import annotations

import argparse
import os
import sys

from metadrop_jax import cli
from metadrop_jax import attacks
from metadrop_jax import report
from metadrop_jax import robustness
from metadrop_jax import seeds

def _floats(s: str):
  return tuple(float(v) for v in s.split(',') if v.strip())


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m metadrop_jax.cli.robustness',
      description='Adversarial robustness of trained workdirs: for every workdir, adapt on each '
      "test episode's support set (MC samples, as the meta-test) and attack the adapted "
      "model's query inputs with PGD at each radius; writes <workdir>/robustness_<norm>.json "
      'and plots accuracy vs radius (one panel per norm, one curve per workdir).',
      epilog='Attack: PGD on the per-example query cross-entropy of the deterministic query '
      'pass, exact projection onto the norm ball intersected with the [0,1] pixel box '
      '(metadrop_jax/attacks.py); defaults 20 steps, step 2.5*eps/steps, 1 random start. '
      'Radius defaults are the grids of the authors\' Omniglot figure. Episodes and '
      'adaptation noise are those of launch.py --mode=eval (eval.seed), so radius 0 equals the '
      'clean meta-test accuracy. Example: python -m metadrop_jax.cli.robustness '
      '--workdirs=wd/maml,wd/metadrop --norms=linf,l2 --episodes=100 --out=fig.png',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--workdirs', required=True,
                 help='comma-separated training workdirs (each with config.json + checkpoints)')
  p.add_argument('--norms', default='linf,l2,l1', help='comma-separated subset of l1,l2,linf')
  p.add_argument('--episodes', type=int, default=None,
                 help='test episodes per workdir (default: the config\'s eval.num_episodes)')
  p.add_argument('--mc_samples', type=int, default=None,
                 help='MC samples of the inner loss during adaptation (default: eval.mc_samples)')
  p.add_argument('--radii_l1', type=_floats, default=robustness.DEFAULT_RADII['l1'],
                 help='l1 radii, comma-separated (default: the authors\' Omniglot figure)')
  p.add_argument('--radii_l2', type=_floats, default=robustness.DEFAULT_RADII['l2'],
                 help='l2 radii')
  p.add_argument('--radii_linf', type=_floats, default=robustness.DEFAULT_RADII['linf'],
                 help='linf radii')
  p.add_argument('--steps', type=int, default=robustness.AttackSettings.steps, help='PGD steps')
  p.add_argument('--step_size', type=float, default=None,
                 help='PGD step relative to the radius (default 2.5/steps)')
  p.add_argument('--restarts', type=int, default=robustness.AttackSettings.restarts,
                 help='random restarts (worst case kept per example)')
  p.add_argument('--no_rand_init', action='store_true', help='start PGD at the clean input')
  p.add_argument('--l1_sparsity', type=float, default=robustness.AttackSettings.l1_sparsity,
                 help='fraction of pixels moved by one l1 step')
  p.add_argument('--split', default='test', choices=['test', 'val'])
  p.add_argument('--out', default='', help='figure path (png/pdf); empty: no figure')
  p.add_argument('--labels', default='', help='comma-separated legend labels (default: methods)')
  p.add_argument('--plot_only', action='store_true',
                 help='only plot existing robustness_<norm>.json files (no evaluation)')
  p.add_argument('--skip_existing', action='store_true',
                 help='do not re-evaluate a workdir whose robustness_<norm>.json files exist')
  p.add_argument('--title', default=None, help='figure title')
  p.add_argument('--seeds_figure', default='',
                 help='figure across training seeds: for each pair (a method and MAML of the '
                 'same setting, meta-gradient and attack) found at 2 or more seeds among '
                 '--workdirs, accuracy vs radius per seed and its mean, and the paired '
                 'difference per seed with its mean and t-interval (png/pdf); with --plot_only '
                 'nothing is evaluated')
  p.add_argument('--seeds_table', default='',
                 help='markdown table across training seeds (per seed the paired difference at '
                 'each radius, the mean over seeds ± t-interval); printed whenever '
                 '--seeds_figure or --seeds_table is given')
  p.add_argument('--no_progress', action='store_true', help='no progress bar over episodes')
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  with cli.user_errors():
    return _main(args)


def _main(args):
  workdirs = [w for w in args.workdirs.split(',') if w]
  norms = [n for n in args.norms.split(',') if n]
  for n in norms:
    if n not in attacks.NORMS:
      raise SystemExit(f'--norms: {n!r} is not one of {attacks.NORMS}')
  attack = robustness.AttackSettings(
      steps=args.steps, step_size=args.step_size, restarts=args.restarts,
      rand_init=not args.no_rand_init, l1_sparsity=args.l1_sparsity)
  radii = {'l1': args.radii_l1, 'l2': args.radii_l2, 'linf': args.radii_linf}
  if not args.plot_only:
    for wd in workdirs:
      if args.skip_existing and all(robustness.load_results(wd, n, args.split) for n in norms):
        print(f'{wd}: results exist, skipped')
        continue
      res = robustness.evaluate_workdir(wd, norms, radii=radii, num_episodes=args.episodes,
                                        mc_samples=args.mc_samples, attack=attack,
                                        split=args.split, progress=not args.no_progress)
      for n, r in res.items():
        row = ', '.join(f'{e:g}: {a:.2f}±{c:.2f}'
                        for e, a, c in zip(r['radii'], r['accuracy'], r['ci95']))
        print(f'{wd} [{r["method"]}] {n}: {row}')
  if args.out:
    labels = [s for s in args.labels.split(',')] if args.labels else None
    robustness.plot(workdirs, norms, args.out, labels=labels, split=args.split, title=args.title)
    print(f'figure: {args.out}')
  if args.seeds_figure or args.seeds_table:
    _across_seeds(args, workdirs, norms)


def _across_seeds(args, workdirs, norms):
  """--seeds_figure / --seeds_table: every pair found at 2 or more seeds, every norm."""
  missing = [w for w in workdirs if not os.path.isdir(w)]
  if missing:
    cli.fail(f'--workdirs: {", ".join(missing)}: no such folder: pass the workdirs of both '
             'methods at every seed, comma-separated')
  comps = []
  for n in norms:
    comps += seeds.robustness_comparisons(seeds.load_robustness(workdirs, n, args.split))
  try:
    comps = seeds.with_two_seeds(comps, '--seeds_figure/--seeds_table')
  except seeds.SeedsError as e:
    cli.fail(e)
  text = seeds.robustness_markdown(comps)
  print(text)
  for flag, path, write in (
      ('--seeds_table', args.seeds_table, lambda p: report.write_atomic(p, text)),
      ('--seeds_figure', args.seeds_figure,
       lambda p: robustness.plot_seeds(comps, p, title=args.title))):
    if not path:
      continue
    try:
      write(path)
    except OSError as e:
      cli.fail(f'{flag}={path}: cannot write it ({e.strerror or e}): choose a writable place')
    print(f'{flag[2:].replace("_", " ")}: {path}')


if __name__ == '__main__':
  sys.exit(main())
