"""``python -m metadrop_jax.cli.report`` (installed: ``metadrop-report``): the Table-1 style results
table of trained workdirs, the learning curves and the accuracy bar chart
(:mod:`metadrop_jax.report`).

  python -m metadrop_jax.cli.report --workdirs=workdirs/omni1_maml,workdirs/omni1_metadrop \\
      --out=table.md --curves=curves.png

Given runs of the same comparison at several training seeds, the table ends with the section
"Across training seeds" (:mod:`metadrop_jax.seeds`) and ``--seeds_figure`` draws it.

A workdir that is not there, an unreadable results.json or an output that cannot be written is
one line, ``error: <problem>: <fix>``, with exit code 2; a table without results never replaces
an existing ``--out`` file unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys

from metadrop_jax import cli, report, seeds


def _parser():
  p = argparse.ArgumentParser(
      prog='python -m metadrop_jax.cli.report',
      description="Markdown table of results.json files in the layout of the paper's Table 1 "
                  '(with the paper and the authors\' re-run figures), and learning curves.')
  p.add_argument('--workdirs', required=True, help='comma-separated training workdirs')
  p.add_argument('--out', default='', help='write the table here too (atomically)')
  p.add_argument('--force', action='store_true',
                 help='let an empty table (no results found) replace an existing --out file')
  p.add_argument('--curves', default='', help='learning-curve PNG from metrics.jsonl')
  p.add_argument('--labels', default='', help='comma-separated curve labels (default: method '
                 '(name))')
  p.add_argument('--smooth', type=int, default=1, help='moving-average window, train curves')
  p.add_argument('--bars', default='', help='bar chart PNG of accuracy ± 95%% CI per run')
  p.add_argument('--title', default='', help='title of the bar chart')
  p.add_argument('--seeds_figure', default='',
                 help='PNG of the comparisons across training seeds: per comparison each '
                 "seed's paired difference with its episode 95%% CI and the mean over seeds with "
                 'its t-interval (needs the workdirs of both runs at 2 or more seeds)')
  p.add_argument('--seeds_title', default='', help='title of the seeds figure')
  return p


def _write(kind: str, path: str, write) -> None:
  try:
    write()
  except OSError as e:
    if e.filename is None and not e.errno:     # ours (no metrics rows): the message says it
      cli.fail(f'{kind}: {e}')
    why = ('a part of the path is a file, not a folder' if isinstance(
        e, (FileExistsError, NotADirectoryError)) else e.strerror or e)
    cli.fail(f'{kind}={path}: cannot write it ({why}): choose a writable place')
  except ValueError as e:                       # no results to plot
    cli.fail(f'{kind}: {e}')
  print(f'wrote {path}', file=sys.stderr)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  workdirs = [w for w in args.workdirs.split(',') if w]
  missing = [w for w in workdirs if not os.path.isdir(w)]
  if not workdirs or missing:
    cli.fail(f'--workdirs: {", ".join(missing) or "none given"}: no such folder: pass training '
         'workdirs, comma-separated')
  try:
    runs = report.load_results(workdirs)
  except report.ResultsError as e:
    cli.fail(e)
  comps = seeds.comparisons(runs)
  if args.seeds_figure:
    try:
      seeds.with_two_seeds(comps, '--seeds_figure')
    except seeds.SeedsError as e:
      cli.fail(e)
  table = report.build_table(runs)
  section = seeds.markdown(comps)
  if section:
    table += '\n'.join(section) + '\n'
  print(table)
  if args.out:
    if not runs and os.path.exists(args.out) and not args.force:
      cli.fail(f'--out={args.out}: none of the workdirs has a results.json, and an empty table does '
           'not replace an existing file: meta-test them first, or pass --force')
    _write('--out', args.out, lambda: report.write_atomic(args.out, table))
  if args.curves:
    _write('--curves', args.curves, lambda: report.plot_learning_curves(
        workdirs, args.curves, labels=args.labels.split(',') if args.labels else None,
        smooth=args.smooth))
  if args.bars:
    _write('--bars', args.bars,
           lambda: report.plot_accuracy_bars(runs, args.bars, title=args.title or None))
  if args.seeds_figure:
    _write('--seeds_figure', args.seeds_figure, lambda: seeds.plot(
        comps, args.seeds_figure, title=args.seeds_title or None))
  return 0


if __name__ == '__main__':
  sys.exit(main())
