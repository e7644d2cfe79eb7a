"""``python -m metadrop_jax.cli.tuning`` (installed: ``metadrop-tuning``): one config field chosen on validation classes only (:mod:`metadrop_jax.tuning`)."""

from __future__ import annotations

import argparse
import sys

from metadrop_jax import cli
from metadrop_jax import report
from metadrop_jax import tuning


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m metadrop_jax.cli.tuning', description=tuning.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdirs', required=True, help='comma-separated candidate workdirs')
  p.add_argument('--field', required=True, help='the config field they differ in (dotted)')
  p.add_argument('--out', default='', help='write the table here too (markdown)')
  p.add_argument('--print_choice', action='store_true',
                 help='print only the chosen value (for scripts); exit 1 if none qualifies')
  a = p.parse_args(argv)
  try:
    with cli.user_errors():
      cands = [tuning.candidate(w, a.field) for w in a.workdirs.split(',') if w]
  except KeyError as e:
    cli.fail(e.args[0] if e.args else e)
  best = tuning.choose(cands)
  if a.print_choice:
    if best is None:
      print('error: no candidate kept a finite inner loop', file=sys.stderr)
      return 1
    print(f"{best['value']:g}")
    return 0
  text = tuning.table(cands, a.field)
  if a.out:
    report.write_atomic(a.out, text)
  print(text, end='')
  return 0


if __name__ == '__main__':
  sys.exit(main())
