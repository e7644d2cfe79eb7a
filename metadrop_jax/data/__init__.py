"""Data: each split of a data set as one uint8 array ``[classes, images, H, W, C]``.

``load_split(data_config, split)`` is the only entry point the trainer uses. Episodes are drawn
from these arrays by :mod:`metadrop_jax.episodes` (on device, inside the jitted step).
Pixel values: uint8 in [0, 255]; the model sees ``x / 255`` (Omniglot: ink 1, background 0).
Real data sets are decoded once into a cache (see :mod:`metadrop_jax.data.cache`, docs/data.md);
missing or malformed data raises :class:`DataError` saying what was expected and how to fix it.
"""

from __future__ import annotations

import os


from metadrop_jax.data.cache import DataError  # noqa: F401  (re-export: missing/corrupt data)

SPLITS = ('train', 'val', 'test')


def load_split(data_config, split: str):
  """Returns uint8 ``[classes, images, H, W, C]`` for ``split``, or None if the data set has none.

  Omniglot has a validation split only when ``data.val_classes > 0``.
  """
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: choose one of {SPLITS}')
  name = data_config.name
  if name == 'synthetic':
    from metadrop_jax.data import synthetic
    return synthetic.load_split(data_config, split)
  data_config = with_default_path(data_config)
  if name == 'omniglot':
    from metadrop_jax.data import omniglot
    return omniglot.load_split(data_config, split)
  if name == 'miniimagenet':
    from metadrop_jax.data import miniimagenet
    return miniimagenet.load_split(data_config, split)
  raise ValueError(f'data.name={name!r}: choose omniglot, miniimagenet or synthetic')


# Where data.path='' looks, in order: $METADROP_DATA_DIR/<name>, then ./data/<name>.
def default_search_dirs(name: str) -> list[str]:
  dirs = []
  if os.environ.get('METADROP_DATA_DIR'):
    dirs.append(os.path.join(os.environ['METADROP_DATA_DIR'], name))
  dirs.append(os.path.join('data', name))
  return dirs


def with_default_path(data_config):
  """``data_config`` with ``path`` filled from :func:`default_search_dirs` when it is empty and
  a folder there exists (Omniglot without any local copy falls back to TFDS)."""
  if data_config.path:
    return data_config
  for d in default_search_dirs(data_config.name):
    if os.path.isdir(d) and os.listdir(d):
      c = data_config.copy_and_resolve_references()
      with c.unlocked():
        c.path = os.path.abspath(d)
      return c
  return data_config


def image_shape(data_config) -> tuple[int, int, int]:
  """(H, W, C) of the data set's images, known without loading anything."""
  if data_config.name == 'omniglot':
    return (28, 28, 1)
  if data_config.name == 'miniimagenet':
    return (84, 84, 3)
  return (data_config.image_size, data_config.image_size, data_config.channels)
