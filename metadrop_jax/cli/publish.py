"""``python -m metadrop_jax.cli.publish`` (installed: ``metadrop-publish``): copy a finished workdir's results and last checkpoint into a small folder that evaluates as a workdir (:func:`metadrop_jax.publish.publish`)."""

from __future__ import annotations

import argparse
import sys

from metadrop_jax import cli
from metadrop_jax import publish


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m metadrop_jax.cli.publish', description=publish.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='a training workdir with a checkpoint')
  p.add_argument('--out', required=True, help='the folder to write (replaced if it exists)')
  a = p.parse_args(argv)
  try:
    with cli.user_errors(a.workdir):
      r = publish.publish(a.workdir, a.out)
  except OSError as e:            # writing --out
    cli.fail(f'--out={a.out}: cannot write it ({e.strerror or e}): choose a writable place')
  except ValueError as e:         # the workdir holds no publishable run: the message says why
    cli.fail(e)
  print(f'{a.out}: step {r["step"]}, {len(r["files"])} files + checkpoint, '
        f'{r["bytes"] / 1e6:.2f} MB')
  return 0


if __name__ == '__main__':
  sys.exit(main())
