"""Key derivation (metadrop_jax/keys.py): today's values, and no two purposes share a key."""

import jax
import jax.numpy as jnp
import numpy as np

from metadrop_jax import keys
from tests.conftest import tiny


def test_run_and_step_keys_keep_their_values():
  """Runs written before keys.py reproduce: the same folds as the code always used."""
  c = tiny(seed=3)
  root = jax.random.PRNGKey(3)
  init, train = keys.run_keys(c)
  np.testing.assert_array_equal(init, jax.random.fold_in(root, 0))
  np.testing.assert_array_equal(train, jax.random.fold_in(root, 1))
  ep, noise = keys.step_keys(train, 7)
  step = jax.random.fold_in(train, 7)
  np.testing.assert_array_equal(ep, jax.random.fold_in(step, 0))
  np.testing.assert_array_equal(noise, jax.random.fold_in(step, 1))
  np.testing.assert_array_equal(keys.task_keys(noise, 3)[2], jax.random.fold_in(noise, 2))
  ev = jax.random.fold_in(jax.random.PRNGKey(c.eval.seed), 1002)
  np.testing.assert_array_equal(keys.eval_keys(c, 'test')[0], jax.random.fold_in(ev, 0))


def test_attack_key_meets_no_evaluation_key():
  """The robustness attacks' root was fold_in(episode key, 7919): the episode key of evaluation
  batch 7919. It now has its own fold of the evaluation root."""
  c = tiny()
  ep, noise = keys.eval_keys(c, 'test')
  attack = np.asarray(keys.attack_key(c, 'test'))   # raw uint32[2] keys (PRNGKey)
  idx = jnp.arange(10000)
  for root in (ep, noise):
    batch = jax.vmap(lambda i: jax.random.fold_in(root, i))(idx)
    assert not np.any(np.all(np.asarray(batch) == attack, axis=-1))
  assert not np.array_equal(attack, ep) and not np.array_equal(attack, noise)


def test_training_and_evaluation_derive_task_keys_the_same_way():
  """Task t of a batch gets fold_in(batch noise key, t), in the train step and in every
  evaluation batch (meta.eval_batch_fn)."""
  from metadrop_jax import meta
  c = tiny()
  images = jnp.zeros((8, 5, 8, 8, 1), jnp.uint8)
  ep, noise = keys.eval_batch_keys(*keys.eval_keys(c, 'test'), 4)
  got = meta.eval_batch_fn(lambda p, e, k, s: k, c, 1, 3)(None, images, ep, noise)
  np.testing.assert_array_equal(got, keys.task_keys(noise, 3))
  np.testing.assert_array_equal(got[1], jax.random.fold_in(noise, 1))
