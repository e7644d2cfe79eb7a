"""N-way K-shot Q-query episodes drawn from a split array ``u8[classes, images, H, W, C]``.

Two samplers with one contract, a pure function of a key / (seed, index):

* :func:`sample_batch` runs on the accelerator inside the jitted step (the default: the split
  stays resident on the device, no host round trip per step);
* :func:`sample_batch_host` draws the same kind of episodes with numpy on the host.

Every task draws its own classes (the authors' final code reused one class set for the whole
meta-batch: ``shared_classes=True``, ``config.data.shared_classes``, reproduces that). Within a task the N classes are distinct, and each class contributes
K + Q distinct images, the first K to the support set and the rest to the query set. Label k is
the k-th drawn class, in class-major order: ``support_y = [0]*K + [1]*K + ...``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metadrop_jax import keys as keys_lib


class Episode(NamedTuple):
  """One task (or a batch of tasks with a leading ``T`` axis)."""
  support_x: jax.Array   # f32[(T,) N*K, H, W, C] in [0, 1]
  support_y: jax.Array   # i32[(T,) N*K]
  query_x: jax.Array     # f32[(T,) N*Q, H, W, C]
  query_y: jax.Array     # i32[(T,) N*Q]


class EpisodeIndex(NamedTuple):
  """Which images make up a task: ``images[classes[n], instances[n, j]]``."""
  classes: jax.Array     # i32[(T,) N]
  instances: jax.Array   # i32[(T,) N, K+Q]


def sample_index(key, num_classes: int, num_images: int, way: int, shot: int, query: int
                 ) -> EpisodeIndex:
  """Distinct classes, distinct images per class; a pure function of ``key``."""
  k_cls, k_img = jax.random.split(key)
  classes = jax.random.permutation(k_cls, num_classes)[:way]
  inst = jax.vmap(lambda k: jax.random.permutation(k, num_images)[:shot + query])(
      jax.random.split(k_img, way))
  return EpisodeIndex(classes.astype(jnp.int32), inst.astype(jnp.int32))


def _assemble(imgs, way, shot, query, xp):
  """``imgs: u8[N, K+Q, H, W, C]`` -> Episode (class-major labels)."""
  hwc = imgs.shape[2:]
  x = imgs.astype(xp.float32) / 255.0
  sx = x[:, :shot].reshape((way * shot,) + hwc)
  qx = x[:, shot:].reshape((way * query,) + hwc)
  sy = xp.repeat(xp.arange(way, dtype=xp.int32), shot)
  qy = xp.repeat(xp.arange(way, dtype=xp.int32), query)
  return Episode(sx, sy, qx, qy)


def gather(images, index: EpisodeIndex, way: int, shot: int, query: int) -> Episode:
  """Builds one episode from its index (device arrays)."""
  imgs = images[index.classes[:, None], index.instances]
  return _assemble(imgs, way, shot, query, jnp)


def sample_episode(key, images, way: int, shot: int, query: int) -> Episode:
  idx = sample_index(key, images.shape[0], images.shape[1], way, shot, query)
  return gather(images, idx, way, shot, query)


def sample_batch(key, images, num_tasks: int, way: int, shot: int, query: int,
                 shared_classes: bool = False) -> Episode:
  """``num_tasks`` independent episodes, each from its own ``fold_in(key, t)``; jit-friendly.

  ``shared_classes``: every task takes task 0's classes (its own images), as the authors' final
  code did within a training meta-batch; task 0 is the same episode either way.
  """
  keys = keys_lib.task_keys(key, num_tasks)
  idx = jax.vmap(lambda k: sample_index(k, images.shape[0], images.shape[1], way, shot, query))(
      keys)
  if shared_classes:
    idx = idx._replace(classes=jnp.broadcast_to(idx.classes[:1], idx.classes.shape))
  return jax.vmap(lambda i: gather(images, i, way, shot, query))(idx)


def sample_batch_host(seed: int, index: int, images: np.ndarray, num_tasks: int, way: int,
                      shot: int, query: int, shared_classes: bool = False) -> Episode:
  """The host-side sampler: numpy episodes from ``default_rng([seed, index])``
  (``shared_classes`` as in :func:`sample_batch`)."""
  rng = np.random.default_rng([seed, index])
  c, m = images.shape[:2]
  eps = []
  for t in range(num_tasks):
    drawn = rng.permutation(c)[:way]   # drawn for every task: the stream is the same either way
    if t == 0:
      first = drawn
    classes = first if shared_classes else drawn
    inst = np.stack([rng.permutation(m)[:shot + query] for _ in range(way)])
    eps.append(_assemble(images[classes[:, None], inst], way, shot, query, np))
  return Episode(*[np.stack(f) for f in zip(*eps)])
