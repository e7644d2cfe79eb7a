"""A learnable synthetic few-shot data set: no download, deterministic from ``seed`` and split.

Each class is a random prototype image; its examples are the prototype plus pixel noise, so a
few gradient steps on one support example per class already classify queries above chance.
"""

from __future__ import annotations

import numpy as np

_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}


def load_split(data_config, split: str, seed: int = 1234) -> np.ndarray:
  n = data_config.num_classes[split]
  m = data_config.images_per_class
  s = data_config.image_size
  c = data_config.channels
  rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
  protos = rng.uniform(0.0, 1.0, size=(n, 1, s, s, c))
  noise = rng.normal(0.0, data_config.synthetic_noise, size=(n, m, s, s, c))
  x = np.clip(protos + noise, 0.0, 1.0)
  return np.round(x * 255).astype(np.uint8)
