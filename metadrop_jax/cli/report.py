"""``python -m metadrop_jax.cli.report`` (installed: ``metadrop-report``): the Table-1 style results
table of trained workdirs, the learning curves and the accuracy bar chart
(:mod:`metadrop_jax.report`).

  python -m metadrop_jax.cli.report --workdirs=workdirs/omni1_maml,workdirs/omni1_metadrop \\
      --out=table.md --curves=curves.png
"""

from __future__ import annotations

import argparse
import sys

from metadrop_jax import report

def _parser():
  p = argparse.ArgumentParser(
      prog='python -m metadrop_jax.cli.report',
      description="Markdown table of results.json files in the layout of the paper's Table 1 "
                  '(with the paper and the authors\' re-run figures), and learning curves.')
  p.add_argument('--workdirs', required=True, help='comma-separated training workdirs')
  p.add_argument('--out', default='', help='write the table here too (atomically)')
  p.add_argument('--curves', default='', help='learning-curve PNG from metrics.jsonl')
  p.add_argument('--labels', default='', help='comma-separated curve labels (default: method '
                 '(name))')
  p.add_argument('--smooth', type=int, default=1, help='moving-average window, train curves')
  p.add_argument('--bars', default='', help='bar chart PNG of accuracy ± 95%% CI per run')
  p.add_argument('--title', default='', help='title of the bar chart')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  workdirs = [w for w in args.workdirs.split(',') if w]
  runs = report.load_results(workdirs)
  table = report.build_table(runs)
  print(table)
  if args.out:
    report.write_atomic(args.out, table)
    print(f'wrote {args.out}', file=sys.stderr)
  if args.curves:
    report.plot_learning_curves(workdirs, args.curves,
                                labels=args.labels.split(',') if args.labels else None,
                                smooth=args.smooth)
    print(f'wrote {args.curves}', file=sys.stderr)
  if args.bars:
    report.plot_accuracy_bars(runs, args.bars, title=args.title or None)
    print(f'wrote {args.bars}', file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
