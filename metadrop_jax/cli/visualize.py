"""``python -m metadrop_jax.cli.visualize`` (installed: ``metadrop-visualize``): decision-boundary
PNGs from export .npz files, and the stochastic-feature pictures of a trained workdir.

  python -m metadrop_jax.cli.visualize boundaries --npz=/tmp/db/metadrop.npz --out_dir=/tmp/db/png
  python -m metadrop_jax.cli.visualize panel --npz=maml.npz,metadrop.npz --task=0 --step=-1 \\
      --out=docs/images/decision_boundary.png
  python -m metadrop_jax.cli.visualize features --workdir=workdirs/omni1_metadrop \\
      --out_png=docs/images/stochastic_features.png --out_gif=docs/images/stochastic_features.gif
"""

from __future__ import annotations

import argparse
import sys

from metadrop_jax import cli
from metadrop_jax import export
from metadrop_jax import methods
from metadrop_jax import visualize

def _ints(s: str | None):
  if not s or s == 'all':
    return None
  return [int(v) for v in s.split(',')]


def _parser():
  p = argparse.ArgumentParser(prog='python -m metadrop_jax.cli.visualize',
                              description='Decision-boundary plots and stochastic features.')
  sub = p.add_subparsers(dest='cmd', required=True)
  b = sub.add_parser('boundaries', help='one PNG per sub-task and inner step from an export .npz')
  b.add_argument('--npz', required=True, help='output of python -m metadrop_jax.cli.export')
  b.add_argument('--out_dir', required=True)
  b.add_argument('--tasks', default='all', help='comma-separated task indices, or all')
  b.add_argument('--steps', default='all', help='comma-separated inner steps (-1: last), or all')
  b.add_argument('--label', default='', help='title prefix (default: method)')
  b.add_argument('--seed', type=int, default=0, help='t-SNE seed')
  pn = sub.add_parser('panel', help='side-by-side grid of several exports (columns) and steps')
  pn.add_argument('--npz', required=True, help='comma-separated .npz files, one column each')
  pn.add_argument('--out', required=True)
  pn.add_argument('--labels', default='', help='comma-separated column labels')
  pn.add_argument('--task', type=int, default=0)
  pn.add_argument('--steps', default='-1', help='comma-separated inner steps (rows), -1: last')
  pn.add_argument('--seed', type=int, default=0)
  f = sub.add_parser('features', help='stochastic feature maps of one training image')
  f.add_argument('--workdir', required=True)
  f.add_argument('--out_png', default='', help='still grid (PNG)')
  f.add_argument('--out_gif', default='', help='animation, one frame per draw (GIF)')
  f.add_argument('--split', default='test', choices=['test', 'val', 'train'])
  f.add_argument('--index', type=int, default=0, help='which support image')
  f.add_argument('--draws', type=int, default=5, help='noise draws')
  f.add_argument('--layer', type=int, default=0, help='block l: feats[u{l}]')
  f.add_argument('--channels', default='auto', help='comma-separated channels, or auto '
                 '(the 3 that vary most across draws)')
  f.add_argument('--tile', type=int, default=84, help='GIF tile size in pixels')
  f.add_argument('--seed', type=int, default=0)
  f.add_argument('--data_path', default='')
  f.add_argument('--cache_dir', default='')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  with cli.user_errors():
    return _main(args)


def _main(args) -> int:
  if args.cmd == 'boundaries':
    arrays = export.load_npz(args.npz)
    paths = visualize.plot_all_boundaries(arrays, args.out_dir, tasks=_ints(args.tasks),
                                          steps=_ints(args.steps), label=args.label or None,
                                          seed=args.seed)
    print(f'wrote {len(paths)} PNGs to {args.out_dir}')
  elif args.cmd == 'panel':
    exports = [export.load_npz(p) for p in args.npz.split(',')]
    labels = args.labels.split(',') if args.labels else None
    visualize.plot_boundary_panel(exports, args.out, task=args.task,
                                  steps=_ints(args.steps) or [-1], labels=labels, seed=args.seed)
    print(f'wrote {args.out}')
  elif args.cmd == 'features':
    if not (args.out_png or args.out_gif):
      raise SystemExit('give --out_png and/or --out_gif')
    maps, config = export.stochastic_features_workdir(
        args.workdir, split=args.split, index=args.index, num_draws=args.draws, layer=args.layer,
        data_path=args.data_path or None, cache_dir=args.cache_dir or None, seed=args.seed)
    ch = None if args.channels == 'auto' else _ints(args.channels)
    ch = ch if ch is not None else visualize.pick_channels(maps)
    if args.out_png:
      visualize.plot_feature_grid(maps, args.out_png, channels=ch,
                                  title=f'{methods.label(config.method)} '
                                        f'({config.data.name}): u{args.layer}, channels {ch}')
      print(f'wrote {args.out_png}')
    if args.out_gif:
      visualize.write_feature_gif(maps, args.out_gif, channels=ch, tile=args.tile)
      print(f'wrote {args.out_gif}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
