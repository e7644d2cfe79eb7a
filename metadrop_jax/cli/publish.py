"""``python -m metadrop_jax.cli.publish`` (installed: ``metadrop-publish``): copy a finished workdir's results and last checkpoint into a small folder that evaluates as a workdir (:func:`metadrop_jax.publish.publish`)."""

from __future__ import annotations

import argparse
import sys

from metadrop_jax import publish


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m metadrop_jax.cli.publish', description=publish.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True, help='a training workdir with a checkpoint')
  p.add_argument('--out', required=True, help='the folder to write (replaced if it exists)')
  a = p.parse_args(argv)
  try:
    r = publish.publish(a.workdir, a.out)
  except (FileNotFoundError, OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{a.out}: step {r["step"]}, {len(r["files"])} files + checkpoint, '
        f'{r["bytes"] / 1e6:.2f} MB')
  return 0


if __name__ == '__main__':
  sys.exit(main())
