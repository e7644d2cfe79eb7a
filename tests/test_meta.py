"""Inner loop, meta-loss and the outer update: exactness properties."""

import dataclasses
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadrop_jax import episodes, meta, nets
from tests.conftest import tiny

IMAGES = np.random.default_rng(0).integers(0, 256, (6, 5, 8, 8, 1), dtype=np.uint8)


def setup(method='metadrop', **over):
  c = tiny(method, **over)
  spec = meta.spec_from_config(c)
  params = meta.init_params(jax.random.PRNGKey(0), spec)
  eps = episodes.sample_batch(jax.random.PRNGKey(1), jnp.asarray(IMAGES), 3, c.way, c.shot, c.query)
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  return c, spec, params, eps, keys


def task(eps, i):
  return jax.tree.map(lambda v: v[i], eps)


def test_vmapped_tasks_equal_per_task_loop():
  _, spec, params, eps, keys = setup()
  # jitted (one compilation each) rather than op by op: the same functions in a third of the time
  batch_vg = jax.jit(jax.value_and_grad(meta.batch_loss, has_aux=True), static_argnums=3)
  task_vg = jax.jit(jax.value_and_grad(meta.task_loss, has_aux=True), static_argnums=3)
  (loss, _), g = batch_vg(params, eps, keys, spec)
  per = [task_vg(params, task(eps, i), keys[i], spec) for i in range(3)]
  np.testing.assert_allclose(loss, np.mean([l for (l, _), _ in per]), rtol=1e-5)
  g_loop = jax.tree.map(lambda *gs: sum(gs) / 3.0, *[gi for _, gi in per])
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_task_keys_independent():
  """Two tasks with identical data but different keys get different noise."""
  _, spec, params, eps, keys = setup()
  same = jax.tree.map(lambda v: jnp.stack([v[0], v[0]]), eps)
  losses = jax.jit(jax.vmap(meta.task_loss, in_axes=(None, 0, 0, None)), static_argnums=3)
  _, m = losses(params, same, keys[:2], spec)
  assert m['inner_loss_first'][0] != m['inner_loss_first'][1]
  _, m = losses(params, same, jnp.stack([keys[0], keys[0]]), spec)
  assert m['inner_loss_first'][0] == m['inner_loss_first'][1]


def test_inner_loop_changes_theta_only():
  _, spec, params, eps, keys = setup()
  ep = task(eps, 0)
  theta, losses = meta.inner_adapt(params, ep.support_x, ep.support_y, keys[0], spec)
  assert losses.shape == (spec.inner_steps,)
  assert jax.tree.structure(theta) == jax.tree.structure(params['theta'])
  assert all(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(theta), jax.tree.leaves(params['theta'])) if a.ndim > 1)
  # phi and bn reach the inner loop only as read-only inputs: the gradient of the inner loop's
  # output w.r.t. them exists (second order) but the loop never writes them.
  g = jax.grad(lambda p: meta.inner_adapt(p, ep.support_x, ep.support_y, keys[0], spec)[0]
               ['dense']['w'].sum())(params)
  assert set(g) == {'theta', 'phi', 'bn'}


def test_zero_inner_lr_or_steps_is_identity():
  _, spec, params, eps, keys = setup()
  ep = task(eps, 0)
  for s in (dataclasses.replace(spec, inner_lr=0.0), dataclasses.replace(spec, inner_steps=0)):
    theta, _ = meta.inner_adapt(params, ep.support_x, ep.support_y, keys[0], s)
    for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(params['theta'])):
      np.testing.assert_array_equal(a, b)
    loss, _ = meta.task_loss(params, ep, keys[0], s)
    direct = meta.xent(nets.forward(params, ep.query_x, None, s.net, sample=False), ep.query_y)
    np.testing.assert_allclose(loss, direct, rtol=1e-6)


def test_maml_train_step_never_touches_phi():
  c, spec, params, eps, keys = setup('maml')
  state, tx = meta.create_state(jax.random.PRNGKey(0), c)
  phi0 = jax.device_get(state.params['phi'])
  step = meta.make_train_step_on_episodes(c, tx)
  for i in range(3):
    state, _ = step(state, eps, jax.random.PRNGKey(i))
  for a, b in zip(jax.tree.leaves(phi0), jax.tree.leaves(state.params['phi'])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(jax.device_get(state.params['theta']['dense']['w']),
                         np.asarray(params['theta']['dense']['w']))
  # and the meta-gradient w.r.t. phi is exactly zero in MAML mode
  g = jax.jit(jax.grad(lambda p: meta.batch_loss(p, eps, keys, spec)[0]))(params)
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g['phi']))
  assert meta.param_labels(params, 'maml')['phi']['dense']['w'] == 'freeze'
  assert meta.param_labels(params, 'metadrop')['phi']['dense']['w'] == 'train'


def test_metadrop_train_step_updates_phi():
  c, _, _, eps, _ = setup()
  state, tx = meta.create_state(jax.random.PRNGKey(0), c)
  phi0 = jax.device_get(state.params['phi'])
  state, _ = meta.make_train_step_on_episodes(c, tx)(state, eps, jax.random.PRNGKey(0))
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(phi0), jax.tree.leaves(state.params['phi']))]
  assert all(changed)


@pytest.mark.parametrize('method', ['metadrop', 'maml'])
def test_meta_gradient_matches_finite_differences(method):
  """Exact second-order meta-gradient through the unrolled inner loop (float64, central
  differences along random directions; small steps stay clear of ReLU / max-pool kinks)."""
  with jax.enable_x64(True):
    _, spec, params, eps, keys = setup(method, **{'inner_steps': 2})
    spec = dataclasses.replace(spec, net=dataclasses.replace(spec.net, conv_impl='xla'))
    p64 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64) * 10.0, params)  # away from 0
    ep = jax.tree.map(lambda v: v.astype(jnp.float64) if v.dtype == jnp.float32 else v,
                      task(eps, 0))
    f = jax.jit(lambda p: meta.task_loss(p, ep, keys[0], spec)[0])
    g = jax.grad(f)(p64)
    h = 1e-6
    for i in range(3):
      d = jax.tree.map(lambda v: jax.random.normal(jax.random.PRNGKey(i), v.shape, v.dtype), p64)
      analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
      fd = (f(jax.tree.map(lambda a, b: a + h * b, p64, d)) -
            f(jax.tree.map(lambda a, b: a - h * b, p64, d))) / (2 * h)
      np.testing.assert_allclose(analytic, fd, rtol=1e-6)
    # phi alone (metadrop): its meta-gradient flows through the inner loop's noise
    if method == 'metadrop':
      d = jax.tree.map(jnp.zeros_like, p64)
      d['phi'] = jax.tree.map(lambda v: jax.random.normal(jax.random.PRNGKey(9), v.shape, v.dtype),
                              p64['phi'])
      analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
      fd = (f(jax.tree.map(lambda a, b: a + h * b, p64, d)) -
            f(jax.tree.map(lambda a, b: a - h * b, p64, d))) / (2 * h)
      assert abs(float(analytic)) > 1e-6
      np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_first_order_differs_from_second_order():
  _, spec, params, eps, keys = setup()
  fo = dataclasses.replace(spec, meta_gradient='first_order')
  g2 = jax.grad(lambda p: meta.batch_loss(p, eps, keys, spec)[0])(params)
  g1 = jax.grad(lambda p: meta.batch_loss(p, eps, keys, fo)[0])(params)
  # same loss value, different gradients (theta and phi)
  np.testing.assert_allclose(meta.batch_loss(params, eps, keys, spec)[0],
                             meta.batch_loss(params, eps, keys, fo)[0], rtol=1e-6)
  assert not np.allclose(g1['theta']['conv0']['w'], g2['theta']['conv0']['w'], rtol=1e-3)
  # first-order: phi only gets its direct (query-path) gradient
  assert not np.allclose(g1['phi']['conv0']['w'], g2['phi']['conv0']['w'], rtol=1e-3)
  # first-order theta gradient == query gradient at the adapted theta (the FOMAML identity)
  ep, k = task(eps, 0), keys[0]
  theta_k, _ = meta.inner_adapt(params, ep.support_x, ep.support_y, k, fo)
  gq = jax.grad(lambda th: meta.xent(nets.forward({**params, 'theta': th}, ep.query_x, None,
                                                  fo.net, sample=False), ep.query_y))(theta_k)
  g1_task = jax.grad(lambda p: meta.task_loss(p, ep, k, fo)[0])(params)
  np.testing.assert_allclose(g1_task['theta']['dense']['w'], gq['dense']['w'], rtol=1e-4, atol=1e-7)


def test_mc_samples_average_the_inner_loss():
  _, spec, params, eps, keys = setup()
  ep = task(eps, 0)
  s3 = dataclasses.replace(spec, mc_samples=3)
  l3 = meta.support_loss(params['theta'], params, ep.support_x, ep.support_y, keys[0], s3)
  s1 = dataclasses.replace(spec, mc_samples=1)
  ls = [meta.support_loss(params['theta'], params, ep.support_x, ep.support_y, k, s1)
        for k in jax.random.split(keys[0], 3)]
  np.testing.assert_allclose(l3, np.mean(ls), rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _compiled_step():
  c = tiny('metadrop')
  _, tx = meta.create_state(jax.random.PRNGKey(0), c)
  return c, meta.make_train_step(c, tx)   # compiled once for every hypothesis example


@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_train_step_deterministic_given_key(seed):
  c, step = _compiled_step()
  images = jnp.asarray(IMAGES)

  def run(s):
    state, _ = meta.create_state(jax.random.PRNGKey(0), c)
    for _ in range(2):
      state, _ = step(state, images, jax.random.PRNGKey(s))
    return jax.device_get(state.params)

  a, b, d = run(seed), run(seed), run(seed + 1)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a['theta']['dense']['w'], d['theta']['dense']['w'])


def test_every_evaluation_batch_honours_task_map(monkeypatch):
  """One eval-batch builder (meta.eval_batch_fn) serves the meta-test step and the robustness
  evaluation's adaptation, so both map the tasks as config.model.task_map says."""
  from metadrop_jax import robustness
  seen = []
  real = meta.map_tasks
  monkeypatch.setattr(meta, 'map_tasks', lambda fn, spec, *a: seen.append(spec.task_map)
                      or real(fn, spec, *a))
  c = tiny('maml', inner_steps=1, **{'model.task_map': 'map', 'model.num_layers': 1})
  params = meta.init_params(jax.random.PRNGKey(0), meta.spec_from_config(c))
  keys = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  with jax.disable_jit():
    acc, _ = meta.make_eval_step(c, 1, 2)(params, jnp.asarray(IMAGES), *keys)
    thetas, eps = robustness.make_adapt_step(c, 1, 2)(params, jnp.asarray(IMAGES), *keys)
  assert seen == ['map', 'map'] and acc.shape == (2,) and eps.query_y.shape[0] == 2
