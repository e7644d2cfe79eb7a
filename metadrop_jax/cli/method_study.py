"""``python -m metadrop_jax.cli.method_study`` (installed: ``metadrop-method_study``): the method study side by side in several meta-gradient computations (:mod:`metadrop_jax.method_study`): markdown table and figure."""

from __future__ import annotations

import argparse
import sys

from metadrop_jax import cli
from metadrop_jax import method_study
from metadrop_jax import report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m metadrop_jax.cli.method_study', description=method_study.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--columns', required=True, help='LABEL=FOLDER,... (one column each)')
  p.add_argument('--out', default='', help='markdown table (also printed)')
  p.add_argument('--figure', default='', help='figure (png)')
  p.add_argument('--title', default=None)
  a = p.parse_args(argv)
  try:
    with cli.user_errors():
      dirs = method_study.parse_columns(a.columns)
      columns = {l: method_study.load_column(d) for l, d in dirs.items()}
  except ValueError as e:         # a --columns spec it cannot read: the message says which
    cli.fail(e)
  rows = method_study.compare_columns(columns)
  text = method_study.markdown(rows, list(columns))
  if a.out:
    report.write_atomic(a.out, text)
  if a.figure:
    method_study.plot(rows, list(columns), a.figure, title=a.title)
  print(text, end='')
  return 0


if __name__ == '__main__':
  sys.exit(main())
