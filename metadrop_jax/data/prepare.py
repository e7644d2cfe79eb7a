"""Prepare a data set once into the cache that training reads.

  python -m metadrop_jax.data.prepare --dataset=omniglot --source=local --path=/data/omniglot
  python -m metadrop_jax.data.prepare --dataset=omniglot --source=tfds
  python -m metadrop_jax.data.prepare --dataset=miniimagenet --path=/data/miniimagenet_84x84.zip

Training with the same ``data.*`` settings (path, source, cache_dir) then loads the arrays
without decoding anything (and without TensorFlow). See docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from metadrop_jax.config import base_config
from metadrop_jax.data import SPLITS, cache, load_split, miniimagenet, omniglot
from metadrop_jax.data.cache import DataError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Defaults in the options' help; the epilog (how to get the data) as written."""


def _parser() -> argparse.ArgumentParser:
  d = base_config().data
  p = argparse.ArgumentParser(
      prog='python -m metadrop_jax.data.prepare',
      description='Decode Omniglot or miniImageNet once into uint8 arrays '
                  '<cache_dir>/<dataset>-<hash>/<split>.npy plus manifest.json. '
                  'Training with the same data.* settings reuses them.',
      epilog=f'{omniglot.DOWNLOAD_INSTRUCTIONS}\n\n{miniimagenet.MANUAL_DOWNLOAD_INSTRUCTIONS}',
      formatter_class=_Formatter)
  p.add_argument('--dataset', required=True, choices=('omniglot', 'miniimagenet'))
  p.add_argument('--source', default='auto',
                 help="omniglot: local | tfds | auto (local if --path is set, else tfds). "
                      "miniimagenet: local (zip or unzipped tree) | npy (authors' train.npy/test.npy"
                      " folder) | ilsvrc (CSV folder + --ilsvrc_path) | auto (decided from --path)")
  p.add_argument('--path', default='',
                 help='omniglot local: folder with images_background.zip and '
                      'images_evaluation.zip (or the unzipped folders); omniglot tfds: TFDS '
                      'data_dir (optional). miniimagenet: miniimagenet_84x84.zip, a folder with it, '
                      'the unzipped tree, the npy folder, or the CSV folder for ilsvrc')
  p.add_argument('--ilsvrc_path', default='', help='miniimagenet ilsvrc: ILSVRC-2012 train folder')
  p.add_argument('--cache_dir', default=d.cache_dir, help='where prepared arrays are written')
  p.add_argument('--val_classes', type=int, default=0,
                 help='omniglot: characters held out of the 1200 meta-train ones as val '
                      '(only affects the shapes printed; the cache is the same)')
  p.add_argument('--force', action='store_true', help='rebuild even if a valid cache exists')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  c = base_config().data
  c.name, c.source, c.path = args.dataset, args.source, args.path
  c.ilsvrc_path, c.cache_dir, c.val_classes = args.ilsvrc_path, args.cache_dir, args.val_classes
  module = omniglot if args.dataset == 'omniglot' else miniimagenet
  messages = []

  def log(msg):
    messages.append(msg)
    print(msg, flush=True)

  t0 = time.time()
  try:
    directory, manifest = module.prepare(c, force=args.force, log=log)
    t1 = time.time()
    arrays = {s: load_split(c, s) for s in SPLITS}
  except DataError as e:
    # the library's messages name training's flags (--config.data.path); here they are --path
    print(f'error: {str(e).replace("--config.data.", "--")}', file=sys.stderr)
    return 2
  t2 = time.time()
  print(f'{args.dataset}: source={manifest["key"]["source"]} -> {directory}')
  print(f'  prepare: {t1 - t0:.1f} s ({"built now" if messages else "reused the cache"})')
  print(f'  load all splits: {t2 - t1:.2f} s')
  print(f'  cache size: {cache.cache_size_bytes(directory) / 2**20:.1f} MiB')
  for s, a in arrays.items():
    print(f'  {s:5s}: ' + ('none' if a is None else f'{a.dtype} {list(a.shape)}'))
  return 0


if __name__ == '__main__':
  sys.exit(main())
