"""The forward pass: noise placement, transductive batch norm, shared logit-noise scale."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadrop_jax import nets


def spec(method='metadrop', **kw):
  base = dict(way=3, image_shape=(8, 8, 1), channels=4, num_layers=2, method=method,
              conv_impl='xla')
  base.update(kw)
  return nets.NetSpec(**base)


def data(n=6, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n, 8, 8, 1))


def test_param_shapes_and_init():
  s = nets.NetSpec(way=20, image_shape=(28, 28, 1), channels=64)
  p = nets.init_params(jax.random.PRNGKey(0), s)
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))
  # the authors' Conv-4 (model.py): Omniglot 20-way theta 112,724, phi 111,489, BN 256.
  assert (count(p['theta']), count(p['phi']), count(p['bn'])) == (112724, 111489, 256)
  s = nets.NetSpec(way=5, image_shape=(84, 84, 3), channels=32)
  p = nets.init_params(jax.random.PRNGKey(0), s)
  assert (count(p['theta']), count(p['phi']), count(p['bn'])) == (32645, 29441, 128)
  assert s.feature_dim == 800
  w = np.asarray(p['theta']['conv1']['w'])
  assert abs(w.std() - 0.02 * 0.88) < 2e-3 and np.abs(w).max() <= 0.04 + 1e-7  # truncated at 2σ
  assert all(np.all(np.asarray(b['b']) == 0) for b in p['theta'].values())
  assert all(np.all(np.asarray(b['beta']) == 0) for b in p['bn'].values())


def test_query_path_is_deterministic_but_gated_by_phi():
  s = spec()
  p = nets.init_params(jax.random.PRNGKey(0), s)
  x = data()
  a = nets.forward(p, x, jax.random.PRNGKey(1), s, sample=False)
  b = nets.forward(p, x, jax.random.PRNGKey(2), s, sample=False)
  np.testing.assert_array_equal(a, b)
  # sample=True depends on the key
  c = nets.forward(p, x, jax.random.PRNGKey(1), s, sample=True)
  d = nets.forward(p, x, jax.random.PRNGKey(2), s, sample=True)
  assert not np.allclose(c, d)
  # the deterministic path still reads phi (softplus(a) gate), unlike MAML
  p2 = jax.tree.map(lambda v: v, p)
  p2['phi']['conv0']['w'] = p['phi']['conv0']['w'] * 7.0 + 0.05
  e = nets.forward(p2, x, None, s, sample=False)
  assert not np.allclose(a, e)


def test_maml_ignores_phi_and_key():
  s = spec('maml')
  p = nets.init_params(jax.random.PRNGKey(0), s)
  x = data()
  a = nets.forward(p, x, jax.random.PRNGKey(1), s, sample=True)
  p2 = jax.tree.map(lambda v: v, p)
  p2['phi'] = jax.tree.map(lambda v: v + 1.0, p['phi'])
  b = nets.forward(p2, x, jax.random.PRNGKey(5), s, sample=True)
  np.testing.assert_array_equal(a, b)
  g = jax.grad(lambda q: nets.forward(q, x, jax.random.PRNGKey(1), s, sample=True).sum())(p)
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g['phi']))


def test_metadrop_matches_handwritten_block():
  """One block written out from the authors' equations (layers.py::conv_block, docs/paper.md)."""
  s = spec(num_layers=1)
  p = nets.init_params(jax.random.PRNGKey(3), s)
  p['bn']['conv0']['beta'] = jnp.linspace(-0.5, 0.5, 4)
  x = data()
  key = jax.random.PRNGKey(9)
  logits, feats = nets.forward_features(p, x, key, s, sample=True)
  conv = lambda h, w, b: jax.lax.conv_general_dilated(
      h, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b
  mu = conv(x, p['theta']['conv0']['w'], p['theta']['conv0']['b'])
  a = conv(x, p['phi']['conv0']['w'], p['phi']['conv0']['b'])
  k_layer, k_head = jax.random.split(key, 2)
  eps = jax.random.normal(k_layer, mu.shape)
  u = mu * jax.nn.softplus(a + eps)
  np.testing.assert_allclose(feats['u0'], u, rtol=1e-5, atol=1e-6)
  m, v = u.mean((0, 1, 2)), u.var((0, 1, 2))
  h = jax.nn.relu((u - m) / jnp.sqrt(v + 1e-3) + p['bn']['conv0']['beta'])
  h = h.reshape(6, 4, 2, 4, 2, 4).max(axis=(2, 4)).reshape(6, -1)
  mu_l = h @ p['theta']['dense']['w'] + p['theta']['dense']['b']
  sigma = jax.nn.softplus(h @ p['phi']['dense']['w'] + p['phi']['dense']['b'])
  expect = mu_l + sigma * jax.random.normal(k_head, mu_l.shape)
  np.testing.assert_allclose(logits, expect, rtol=1e-4, atol=1e-5)


def test_logit_noise_scale_shared_across_classes():
  s = spec()
  p = nets.init_params(jax.random.PRNGKey(0), s)
  p['phi']['dense']['b'] = jnp.array([0.7])
  x = data()
  key = jax.random.PRNGKey(4)
  noisy, f = nets.forward_features(p, x, key, s, sample=True)
  clean = f['feat'] @ p['theta']['dense']['w'] + p['theta']['dense']['b']
  eps = jax.random.normal(jax.random.split(key, 3)[-1], clean.shape)
  sigma = (noisy - clean) / eps  # one value per example, identical in every class column
  np.testing.assert_allclose(sigma, jnp.broadcast_to(sigma[:, :1], sigma.shape), rtol=1e-3)
  assert p['phi']['dense']['w'].shape == (s.feature_dim, 1)


def test_batch_norm_uses_batch_statistics():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 3)) * 3.0 + 2.0
  y = nets.batch_norm(x, jnp.zeros(3), 1e-3)
  np.testing.assert_allclose(y.mean((0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var((0, 1, 2)), np.asarray(x.var((0, 1, 2)) / (x.var((0, 1, 2)) + 1e-3)),
                             rtol=1e-4)
  # transductive: an example's output depends on the rest of the batch
  y2 = nets.batch_norm(x.at[1:].multiply(5.0), jnp.zeros(3), 1e-3)
  assert not np.allclose(y[0], y2[0])


@pytest.mark.parametrize('fuse', [True, False])
def test_conv_impls_agree(fuse):
  s_ref = spec(conv_impl='xla', fuse_noise_conv=False)
  s = spec(conv_impl='im2col', fuse_noise_conv=fuse)
  p = nets.init_params(jax.random.PRNGKey(0), s)
  x = data()
  key = jax.random.PRNGKey(3)
  np.testing.assert_allclose(nets.forward(p, x, key, s, sample=True),
                             nets.forward(p, x, key, s_ref, sample=True), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('size', [7, 8])
def test_max_pool_matches_reduce_window(size):
  """2x2/2 VALID pooling (odd sizes drop the last row/column, as TF does), value and gradient."""
  x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3))
  ref = lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                        'VALID')
  assert nets.max_pool(x).shape == (2, size // 2, size // 2, 3)
  np.testing.assert_array_equal(nets.max_pool(x), ref(x))
  g = jax.grad(lambda v: (nets.max_pool(v) ** 2).sum())(x)
  np.testing.assert_allclose(g, jax.grad(lambda v: (ref(v) ** 2).sum())(x), rtol=1e-6)


def _pool_inputs(size, ties):
  x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3))
  if ties:   # ReLU zeros and equal maxima: where the two rules could route the gradient apart
    x = jnp.round(jax.nn.relu(x) * 2) / 2
  return x


@pytest.mark.parametrize('size', [7, 8])
@pytest.mark.parametrize('ties', [False, True])
def test_select_pool_equals_reduce_window(size, ties):
  """'select' pooling: the same values, first derivatives routed to the same (first) maximum of
  each window, and the same second derivatives (a Hessian-vector product through the pool, as the
  meta-gradient takes one), bit for bit, ties included."""
  x = _pool_inputs(size, ties)
  v = jax.random.normal(jax.random.PRNGKey(99), x.shape)
  pool = {impl: functools.partial(nets.max_pool, impl=impl) for impl in ('reduce_window', 'select')}
  f = {impl: (lambda u, p=p: jnp.sum(jnp.sin(p(u)) * p(u ** 2))) for impl, p in pool.items()}
  np.testing.assert_array_equal(pool['select'](x), pool['reduce_window'](x))
  g = {impl: jax.grad(fn)(x) for impl, fn in f.items()}
  np.testing.assert_array_equal(g['select'], g['reduce_window'])
  hvp = {impl: jax.jvp(jax.grad(fn), (x,), (v,))[1] for impl, fn in f.items()}
  np.testing.assert_array_equal(hvp['select'], hvp['reduce_window'])
  vjp2 = {impl: jax.grad(lambda u, fn=fn: jnp.vdot(jax.grad(fn)(u), v))(x) for impl, fn in f.items()}
  np.testing.assert_array_equal(vjp2['select'], vjp2['reduce_window'])


def test_select_pool_has_no_scatter():
  """The point of 'select': its derivative (to second order) compiles without a scatter or a
  select-and-scatter, which XLA:GPU serialises under deterministic ops."""
  x = _pool_inputs(8, True)
  def hlo(impl):
    fn = lambda u: jnp.sum(nets.max_pool(u, impl) ** 3)
    g2 = jax.grad(lambda u: jnp.sum(jax.grad(fn)(u) ** 2))
    return jax.jit(g2).lower(x).as_text()
  assert 'select_and_scatter' in hlo('reduce_window')
  text = hlo('select')
  assert 'scatter' not in text and 'select_and_scatter' not in text


def test_max_pool_rejects_unknown_impl():
  with pytest.raises(ValueError, match='max_pool impl'):
    nets.max_pool(_pool_inputs(8, False), 'cudnn')
