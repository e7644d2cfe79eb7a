"""The experiment configs, one file each (``configs/<name>.py`` with ``get_config()``).

``get(name, **overrides)`` builds one by name, with dotted field overrides, the way launch.py's
``--config=configs/<name>.py --config.<field>=<value>`` does::

  from configs import get
  c = get('omniglot_20way1shot', method='maml', **{'model.conv_impl': 'im2col'})
"""

from __future__ import annotations

import importlib
import pkgutil


def names() -> list[str]:
  """The configs that :func:`get` knows (file names without ``.py``; ``common`` is shared code)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != 'common')


def get(name: str, **overrides):
  """The validated config ``configs/<name>.py``, its fields set from ``overrides`` in order
  (``get('tiny', method='maml', **{'model.channels': 8})``; an unknown field is a KeyError).
  A dict with dotted keys passes as ``**{'a.b': v}``."""
  from metadrop_jax import config as config_lib
  if name not in names():
    raise ValueError(f'no config named {name!r}: choose one of {names()}')
  c = importlib.import_module(f'{__name__}.{name}').get_config()
  return config_lib.validate(config_lib.override(c, overrides))
