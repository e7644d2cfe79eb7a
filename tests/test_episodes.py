"""Episode invariants for the on-device and the host sampler."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from metadrop_jax import episodes

C, M = 12, 9
# image value encodes (class, instance) so episodes can be decoded back to their sources
IMAGES = np.zeros((C, M, 2, 2, 1), np.uint8)
for c in range(C):
  for m in range(M):
    IMAGES[c, m, 0, 0, 0] = c
    IMAGES[c, m, 0, 1, 0] = m


def decode(x):
  x = np.round(np.asarray(x) * 255).astype(int)
  return x[..., 0, 0, 0], x[..., 0, 1, 0]


def check_task(ep, way, shot, query):
  sx, sy, qx, qy = map(np.asarray, ep)
  assert sx.shape == (way * shot, 2, 2, 1) and qx.shape == (way * query, 2, 2, 1)
  assert sx.dtype == np.float32 and sy.dtype == np.int32
  assert np.array_equal(np.bincount(sy, minlength=way), [shot] * way)
  assert np.array_equal(np.bincount(qy, minlength=way), [query] * way)
  s_cls, s_inst = decode(sx)
  q_cls, q_inst = decode(qx)
  # label k means the same source class in support and query; classes distinct
  label_to_class = {}
  for lab, cl in list(zip(sy, s_cls)) + list(zip(qy, q_cls)):
    assert label_to_class.setdefault(lab, cl) == cl
  assert len(set(label_to_class.values())) == way
  assert all(0 <= c < C for c in label_to_class.values())
  # support and query images disjoint; no image twice
  pairs = list(zip(s_cls, s_inst)) + list(zip(q_cls, q_inst))
  assert len(set(pairs)) == len(pairs)
  return sorted(label_to_class.values())


shapes = st.tuples(st.sampled_from([2, 3]), st.sampled_from([1, 2]), st.sampled_from([1, 3]),
                   st.sampled_from([1, 4]))


@hypothesis.given(seed=st.integers(0, 2**31 - 1), shape=shapes)
def test_device_episode_invariants(seed, shape):
  way, shot, query, tasks = shape
  eps = episodes.sample_batch(jax.random.PRNGKey(seed), jnp.asarray(IMAGES), tasks, way, shot, query)
  for t in range(tasks):
    check_task(jax.tree.map(lambda v: v[t], eps), way, shot, query)


@hypothesis.given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 10**6), shape=shapes)
def test_host_episode_invariants(seed, index, shape):
  way, shot, query, tasks = shape
  eps = episodes.sample_batch_host(seed, index, IMAGES, tasks, way, shot, query)
  for t in range(tasks):
    check_task(jax.tree.map(lambda v: v[t], eps), way, shot, query)


def test_tasks_in_batch_draw_classes_independently():
  """The authors' final code reused one class set per meta-batch; ours must not."""
  images = np.zeros((64, 3, 1, 1, 1), np.uint8)
  images[:, :, 0, 0, 0] = np.arange(64)[:, None]
  eps = episodes.sample_batch(jax.random.PRNGKey(0), jnp.asarray(images), 8, 5, 1, 1)
  sets = {tuple(sorted(np.round(np.asarray(eps.support_x[t, :, 0, 0, 0]) * 255).astype(int)))
          for t in range(8)}
  assert len(sets) == 8
  host = episodes.sample_batch_host(0, 0, images, 8, 5, 1, 1)
  sets = {tuple(sorted(np.round(host.support_x[t, :, 0, 0, 0] * 255).astype(int))) for t in range(8)}
  assert len(sets) == 8


def test_sampling_is_pure():
  k = jax.random.PRNGKey(3)
  a = episodes.sample_batch(k, jnp.asarray(IMAGES), 2, 3, 1, 2)
  b = episodes.sample_batch(k, jnp.asarray(IMAGES), 2, 3, 1, 2)
  c = episodes.sample_batch(jax.random.PRNGKey(4), jnp.asarray(IMAGES), 2, 3, 1, 2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a.support_x, c.support_x)
  h1 = episodes.sample_batch_host(1, 5, IMAGES, 2, 3, 1, 2)
  h2 = episodes.sample_batch_host(1, 5, IMAGES, 2, 3, 1, 2)
  h3 = episodes.sample_batch_host(1, 6, IMAGES, 2, 3, 1, 2)
  assert all(np.array_equal(x, y) for x, y in zip(h1, h2))
  assert not np.array_equal(h1.support_x, h3.support_x)


def test_classes_cover_the_pool():
  seen = set()
  for s in range(40):
    eps = episodes.sample_batch(jax.random.PRNGKey(s), jnp.asarray(IMAGES), 1, 3, 1, 1)
    seen.update(decode(eps.support_x[0])[0].tolist())
  assert seen == set(range(C))
