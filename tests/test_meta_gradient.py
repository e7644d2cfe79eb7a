"""The three meta-gradients (config.meta_gradient) and the authors' shared class set.

'authors' must change nothing but the second-order terms that pass through a batch norm's
backward pass: the same forward values, the same inner loop, the same first derivatives; a
different meta-gradient, and MAML's phi still untouched. tests/test_authors_gradient.py checks it
against a recorded gradient of the authors' TensorFlow graph.
"""

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadrop_jax import config as config_lib
from metadrop_jax import episodes, meta, nets
from tests.conftest import tiny

IMAGES = np.random.default_rng(0).integers(0, 256, (6, 5, 8, 8, 1), dtype=np.uint8)


def _bn_loss(backward, w):
  return lambda x: jnp.sum(w * jnp.tanh(nets.batch_norm(x, jnp.full((x.shape[-1],), 0.1), 1e-3,
                                                         backward)))


@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_constant_backward_batch_norm_has_exact_value_and_first_derivative(seed):
  kx, kw, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = 2.0 * jax.random.normal(kx, (4, 3, 3, 2)) + 1.0
  w = jax.random.normal(kw, x.shape)
  exact, const = _bn_loss('exact', w), _bn_loss('constant', w)
  np.testing.assert_array_equal(exact(x), const(x))
  np.testing.assert_allclose(jax.grad(const)(x), jax.grad(exact)(x), rtol=1e-6, atol=1e-7)
  # ...but its backward pass is a constant: the Hessian-vector product through it vanishes
  v = jax.random.normal(kv, x.shape)
  hvp = lambda f: jax.jvp(jax.grad(f), (x,), (v,))[1]
  assert float(jnp.linalg.norm(hvp(exact))) > 1e-3
  np.testing.assert_array_equal(hvp(const), np.zeros(x.shape, np.float32))


def test_unknown_batch_norm_backward_is_refused():
  with pytest.raises(ValueError, match='backward'):
    nets.batch_norm(jnp.ones((2, 1, 1, 1)), jnp.zeros(1), 1e-3, 'stop')


def _setup(method):
  c = tiny(method)
  spec = meta.spec_from_config(c)
  params = meta.init_params(jax.random.PRNGKey(0), spec)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape),
                        params)
  eps = episodes.sample_batch(jax.random.PRNGKey(1), jnp.asarray(IMAGES), 2, c.way, c.shot, c.query)
  keys = jax.random.split(jax.random.PRNGKey(2), 2)
  return spec, params, eps, keys


def _rel(a, b):
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return np.sqrt(num / sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b)))


@pytest.mark.parametrize('method', ['maml', 'metadrop'])
def test_authors_mode_changes_only_the_meta_gradient(method):
  spec, params, eps, keys = _setup(method)
  specs = {m: dataclasses.replace(spec, meta_gradient=m) for m in config_lib.META_GRADIENTS}
  assert specs['authors'].net.bn_backward == 'constant'
  assert specs['exact'].net.bn_backward == specs['first_order'].net.bn_backward == 'exact'
  ep = jax.tree.map(lambda v: v[0], eps)
  th = {m: meta.inner_adapt(params, ep.support_x, ep.support_y, keys[0], s)[0]
        for m, s in specs.items()}
  for m in ('authors', 'first_order'):
    for a, b in zip(jax.tree.leaves(th[m]), jax.tree.leaves(th['exact'])):
      np.testing.assert_array_equal(a, b)
  grads, losses = {}, {}
  for m, s in specs.items():
    (losses[m], _), grads[m] = jax.value_and_grad(meta.batch_loss, has_aux=True)(
        params, eps, keys, s)
  assert losses['authors'] == losses['exact'] == losses['first_order']
  # the three are different computations (tiny net: 0.3-1.5 relative L2 apart)
  assert _rel(grads['authors'], grads['exact']) > 0.05
  assert _rel(grads['authors'], grads['first_order']) > 0.05
  # the dense head's gradient does not pass through a batch-norm backward in the query pass,
  # and with no inner steps all three coincide
  zero = {m: dataclasses.replace(s, inner_steps=0) for m, s in specs.items()}
  g0 = {m: jax.grad(lambda p: meta.batch_loss(p, eps, keys, s)[0])(params) for m, s in zero.items()}
  assert _rel(g0['authors'], g0['exact']) < 1e-6
  if method == 'maml':
    # phi is never read by MAML, whatever the meta-gradient
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads['authors']['phi']))


def test_meta_gradient_is_validated_and_reaches_the_spec():
  with pytest.raises(config_lib.ConfigError, match='meta_gradient'):
    config_lib.validate(tiny(meta_gradient='second_order'))
  for m in config_lib.META_GRADIENTS:
    spec = meta.spec_from_config(config_lib.validate(tiny(meta_gradient=m)))
    assert spec.meta_gradient == m and spec.first_order == (m == 'first_order')


def _classes(x):
  return [tuple(sorted(set(np.round(np.asarray(t)[:, 0, 0, 0] * 255).astype(int).tolist())))
          for t in x]


@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_shared_classes_reuse_task_zeros_class_set(seed):
  images = np.zeros((40, 6, 1, 1, 1), np.uint8)
  images[:, :, 0, 0, 0] = np.arange(40)[:, None]
  key = jax.random.PRNGKey(seed)
  ind = episodes.sample_batch(key, jnp.asarray(images), 4, 5, 1, 2)
  shared = episodes.sample_batch(key, jnp.asarray(images), 4, 5, 1, 2, shared_classes=True)
  assert len(set(_classes(shared.support_x))) == 1
  assert _classes(shared.query_x) == _classes(shared.support_x)
  # task 0 is the same episode either way
  for a, b in zip(shared, ind):
    np.testing.assert_array_equal(a[0], b[0])
  h_ind = episodes.sample_batch_host(seed, 3, images, 4, 5, 1, 2)
  h_sh = episodes.sample_batch_host(seed, 3, images, 4, 5, 1, 2, shared_classes=True)
  assert len(set(_classes(h_sh.support_x))) == 1
  np.testing.assert_array_equal(h_sh.support_x[0], h_ind.support_x[0])


def test_paper_configs_default_to_the_authors_meta_gradient():
  import importlib
  for name in ('omniglot_20way1shot', 'omniglot_20way5shot', 'mimgnet_5way1shot',
               'mimgnet_5way5shot', 'omniglot_5way1shot_cpu'):
    assert importlib.import_module(f'configs.{name}').get_config().meta_gradient == 'authors'
  assert config_lib.base_config().meta_gradient == 'exact'


RUNS = ('authors_maml', 'authors_metadrop', 'exact_maml', 'exact_metadrop')


def test_committed_study_configs_load():
  """results/fidelity/<run>/config.json (written before meta_lr became one field) still loads,
  with the meta learning rate the run trained with."""
  from metadrop_jax import workdir as workdir_lib
  for run in RUNS:
    config = workdir_lib.load_run_config(f'results/fidelity/{run}')
    mg, method = run.split('_')
    assert (config.method, config.meta_gradient, config.meta_lr) == (method, mg, 1e-3)


def test_committed_study_checkpoint_restores(tmp_path):
  """A released study model restores, finite, at the step its results.json names."""
  import json
  import shutil

  from metadrop_jax import workdir as workdir_lib
  wd = shutil.copytree('results/fidelity/authors_metadrop', tmp_path / 'run')
  _, state = workdir_lib.restore(str(wd))
  assert int(state.step) == 2000 and workdir_lib.all_finite(state.params)
  if (wd / 'results.json').exists():
    assert json.loads((wd / 'results.json').read_text())['step'] == 2000
