"""Every comparison method trains and evaluates, and its mechanism is active (docs/methods.md).

Time budget: the all-methods smoke test runs the step functions op by op (without their outer
``jax.jit``): 11 methods x 2 whole-step compilations would cost minutes on a 2-core CPU, eager
dispatch of these tiny shapes costs seconds. The jitted paths are the same functions
(``launch.py --config=configs/tiny.py --config.method=<m>`` runs them for every method).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny
from metadrop_jax import config as config_lib
from metadrop_jax import data as data_lib
from metadrop_jax import episodes as episodes_lib
from metadrop_jax import meta
from metadrop_jax import methods
from metadrop_jax import nets
from metadrop_jax import evaluation

SMOKE = dict(inner_steps=1, meta_batch=1, way=2, query=1, **{
    'model.num_layers': 1, 'model.channels': 2, 'eval.batch_tasks': 1})
# mechanism tests: one block of 2 channels, 3-way (tiny's 8x8 images)
SMALL = dict(inner_steps=1, **{'model.num_layers': 1, 'model.channels': 2})


def _changed(a, b):
  return any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _setup(method, **over):
  c = tiny(method, **{**SMALL, **over})
  spec = meta.spec_from_config(c)
  params = meta.init_params(jax.random.PRNGKey(0), spec, c.methods.metasgd_init_lr)
  images = jnp.asarray(data_lib.load_split(c.data, 'train'))
  ep = episodes_lib.sample_episode(jax.random.PRNGKey(1), images, c.way, c.shot, c.query)
  return c, spec, params, ep


@pytest.mark.parametrize('method', config_lib.METHODS)
def test_every_method_trains_and_evaluates(method):
  """One meta-update (``meta.train_step``) and the meta-test protocol (``evaluation.evaluate``),
  executed op-by-op: the outer ``jax.jit`` of the step functions is skipped to save compiling."""
  c = tiny(method, **SMOKE)
  spec = meta.spec_from_config(c)
  state, tx = meta.create_state(jax.random.PRNGKey(0), c)
  p0 = state.params
  images = jnp.asarray(data_lib.load_split(c.data, 'train'))
  key = jax.random.PRNGKey(1)
  eps = meta.sample_train_episodes(images, key, state.step, c)
  state, m = meta.train_step(state, eps, key, spec=spec, tx=tx)
  with jax.disable_jit():   # the real meta.make_eval_step, op by op
    r = evaluation.evaluate(state.params, data_lib.load_split(c.data, 'test'), c, num_episodes=1,
                            mc_samples=2)
  assert all(np.isfinite(float(v)) for v in m.values()), m
  assert 0.0 <= r['mean'] <= 100.0 and np.isfinite(r['ci95']) and r['n'] == 1
  assert _changed(p0['theta'], state.params['theta'])
  # phi is trained exactly when the method uses the noise generator, frozen otherwise
  assert _changed(p0['phi'], state.params['phi']) == methods.get(method).uses_phi
  assert ('lr' in state.params) == methods.get(method).per_param_lr
  if 'lr' in state.params:   # Meta-SGD's step sizes are meta-learned
    assert _changed(p0['lr'], state.params['lr'])


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_method_row_says_what_the_method_does(method):
  """Each row of the method table, checked against what the code then does: sampling perturbs
  the features / logits exactly where the row says, phi matters exactly when it is used, the KL
  term exists exactly for the rows with ``kl``, and the support loss is random exactly when the
  row says so."""
  row = methods.get(method)
  assert row.label and row.phi_input in methods.PHI_INPUTS and row.support in methods.SUPPORTS
  c, spec, params, ep = _setup(method)
  x, y, k1, k2 = ep.support_x, ep.support_y, jax.random.PRNGKey(3), jax.random.PRNGKey(4)
  l1, f1 = nets.forward_features(params, x, k1, spec.net, sample=True)
  l2, f2 = nets.forward_features(params, x, k2, spec.net, sample=True)
  assert _changed(f1['u0'], f2['u0']) == row.feature_noise
  if not row.feature_noise:   # then only the logit noise can change the logits
    assert _changed(l1, l2) == (row.logit_noise_scale is not None)
  assert (float(f1['kl']) > 0) == row.kl
  g = jax.grad(lambda p: meta.support_loss(p['theta'], p, x, y, k1, spec))(params)
  assert any(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree.leaves(g['phi'])) == row.uses_phi
  s1 = meta.support_loss(params['theta'], params, x, y, k1, spec)
  s2 = meta.support_loss(params['theta'], params, x, y, k2, spec)
  assert (float(s1) != float(s2)) == row.stochastic_support
  assert spec.kl_beta == (c.methods.vib_beta if row.kl else 0.0)


def test_method_labels_are_distinct():
  labels = [r.label for r in methods.METHODS.values()]
  assert len(set(labels)) == len(labels)
  assert methods.label('metadrop') == 'Meta-dropout' and methods.label('unknown') == 'unknown'
  with pytest.raises(ValueError, match='choose one of'):
    methods.get('dropout')


# ------------------------------------------------------------------------------------------------
# noise types
# ------------------------------------------------------------------------------------------------

def _u0_mu0(params, spec, x, key, sample):
  _, f = nets.forward_features(params, x, key, spec, sample=sample)
  t = params['theta']['conv0']
  mu = nets.conv3x3(x, t['w'], t['b'], spec.conv_impl)
  return f['u0'], mu


def test_fixed_noise_is_random_and_not_learned():
  c, spec, params, ep = _setup('fixed_noise')
  x = ep.support_x
  k1, k2 = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
  l1 = nets.forward(params, x, k1, spec.net, sample=True)
  l2 = nets.forward(params, x, k2, spec.net, sample=True)
  assert float(jnp.max(jnp.abs(l1 - l2))) > 1e-3          # noise active with sample=True
  d1 = nets.forward(params, x, None, spec.net, sample=False)
  np.testing.assert_array_equal(d1, nets.forward(params, x, None, spec.net, sample=False))
  # the multiplicative factor is softplus(m + eps) with nothing learned: phi is not read (zero
  # gradient of the support loss, hence of the meta-loss) and frozen by the optimizer
  g = jax.grad(lambda p: meta.support_loss(p['theta'], p, x, ep.support_y, k1, spec))(params)
  assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(g['phi']))
  assert all(lab == 'freeze' for lab in jax.tree.leaves(meta.param_labels(params, 'fixed_noise')['phi']))
  # and the noise is exactly mu * softplus(m + eps) at block 0
  u, mu = _u0_mu0(params, spec.net, x, k1, True)
  eps = jax.random.normal(jax.random.split(k1, spec.net.num_layers + 1)[0], mu.shape)
  np.testing.assert_allclose(u, mu * jax.nn.softplus(c.methods.fixed_noise_mean + eps),
                             rtol=1e-5, atol=1e-6)


def test_metadrop_phi_receives_gradient():
  _, spec, params, ep = _setup('metadrop')
  g = jax.grad(lambda p: meta.support_loss(p['theta'], p, ep.support_x, ep.support_y,
                                           jax.random.PRNGKey(3), spec))(params)
  assert float(jnp.max(jnp.abs(g['phi']['conv0']['w']))) > 0
  assert float(jnp.max(jnp.abs(g['phi']['dense']['w']))) > 0


def _gate(params, spec, x, key, sample):
  u, mu = _u0_mu0(params, spec, x, key, sample)
  return u / mu, jnp.abs(mu) > 1e-3


@pytest.mark.parametrize('sample', [False, True])
def test_indep_noise_gate_does_not_depend_on_input(sample):
  _, spec, params, ep = _setup('indep_noise')
  x1 = ep.support_x
  x2 = jnp.flip(ep.query_x[:x1.shape[0]], axis=1)    # other images, same batch size
  key = jax.random.PRNGKey(5)
  g1, m1 = _gate(params, spec.net, x1, key, sample)
  g2, m2 = _gate(params, spec.net, x2, key, sample)
  both = m1 & m2
  assert int(both.sum()) > 10
  np.testing.assert_allclose(np.where(both, g1, 0), np.where(both, g2, 0), rtol=2e-3, atol=1e-5)
  # the same check detects metadrop's input-dependent gate
  _, mspec, mparams, _ = _setup('metadrop')
  h1, n1 = _gate(mparams, mspec.net, x1, key, sample)
  h2, n2 = _gate(mparams, mspec.net, x2, key, sample)
  assert float(jnp.max(jnp.abs(jnp.where(n1 & n2, h1 - h2, 0)))) > 1e-3
  # logit-noise scale: input independent too
  feat = jnp.ones((3, spec.net.feature_dim))
  k = jax.random.PRNGKey(6)
  np.testing.assert_allclose(nets._noise_logits(spec.net, params, feat, k, True),
                             nets._noise_logits(spec.net, params, 5 * feat, k, True), rtol=1e-6)


def test_additive_noise_is_additive():
  _, spec, params, ep = _setup('additive_noise')
  x, key = ep.support_x, jax.random.PRNGKey(7)
  scaled = jax.tree.map(lambda v: v, params)
  scaled['theta']['conv0'] = {'w': 3.0 * params['theta']['conv0']['w'],
                              'b': params['theta']['conv0']['b'] + 0.5}
  u1, mu1 = _u0_mu0(params, spec.net, x, key, True)
  u2, mu2 = _u0_mu0(scaled, spec.net, x, key, True)
  assert float(jnp.max(jnp.abs(mu1 - mu2))) > 1e-3
  # u - mu is the same noise whatever mu is (it depends on phi and x only) and is non-zero
  np.testing.assert_allclose(u1 - mu1, u2 - mu2, atol=1e-5)
  assert float(jnp.std(u1 - mu1)) > 1e-2
  # the query (deterministic) path is the noise's mean: u = mu
  u0, m0 = _u0_mu0(params, spec.net, x, None, False)
  np.testing.assert_allclose(u0, m0, atol=1e-6)
  # a multiplicative noise fails the same test
  _, mspec, mparams, _ = _setup('metadrop')
  mscaled = {**mparams, 'theta': {**mparams['theta'], 'conv0': scaled['theta']['conv0']}}
  v1, n1 = _u0_mu0(mparams, mspec.net, x, key, True)
  v2, n2 = _u0_mu0(mscaled, mspec.net, x, key, True)
  assert float(jnp.max(jnp.abs((v1 - n1) - (v2 - n2)))) > 1e-3


# ------------------------------------------------------------------------------------------------
# KL regularizers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', ['vib', 'infodrop'])
def test_kl_term_is_present_and_enters_the_support_loss(method):
  c, spec, params, ep = _setup(method)
  assert spec.kl_beta == c.methods.vib_beta > 0
  key = jax.random.PRNGKey(8)
  _, f = nets.forward_features(params, ep.support_x, key, spec.net, sample=True)
  kl = float(f['kl'])
  assert np.isfinite(kl) and kl > 0
  theta = params['theta']
  with_kl = meta.support_loss(theta, params, ep.support_x, ep.support_y, key, spec)
  no_kl = meta.support_loss(theta, params, ep.support_x, ep.support_y, key,
                            dataclasses.replace(spec, kl_beta=0.0))
  assert float(with_kl - no_kl) == pytest.approx(spec.kl_beta * kl, rel=1e-4)
  # the KL depends on phi (the posterior scale / dropout rate)
  g = jax.grad(lambda p: nets.forward_features(p, ep.support_x, key, spec.net,
                                               sample=True)[1]['kl'])(params)
  assert float(jnp.max(jnp.abs(g['phi']['conv0']['w']))) > 0
  # sampling perturbs the features, the query path does not
  l1 = nets.forward(params, ep.support_x, key, spec.net, sample=True)
  l0 = nets.forward(params, ep.support_x, None, spec.net, sample=False)
  assert float(jnp.max(jnp.abs(l1 - l0))) > 1e-4


# ------------------------------------------------------------------------------------------------
# manifold mixup
# ------------------------------------------------------------------------------------------------

def test_mixup_mixes_the_support_batch():
  c, spec, params, ep = _setup('mixup')
  x, y, theta = ep.support_x, ep.support_y, params['theta']
  seen = set()
  for i in range(6):
    key = jax.random.PRNGKey(100 + i)
    loss = meta.support_loss(theta, params, x, y, key, spec)
    k_layer, k_lam, k_perm = jax.random.split(key, 3)
    layer = int(jax.random.randint(k_layer, (), 0, spec.net.num_layers + 1))
    lam = float(jax.random.beta(k_lam, c.methods.mixup_alpha, c.methods.mixup_alpha))
    perm = jax.random.permutation(k_perm, x.shape[0])
    seen.add(layer)
    assert 0.0 < lam < 1.0
    logits = nets.forward(params, x, None, spec.net, sample=False, mix=(layer, perm, lam))
    expected = lam * meta.xent(logits, y) + (1 - lam) * meta.xent(logits, y[perm])
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    plain = meta.xent(nets.forward(params, x, None, spec.net, sample=False), y)
    if bool(jnp.any(perm != jnp.arange(x.shape[0]))):
      assert abs(float(loss) - float(plain)) > 1e-6
  assert len(seen) >= 2          # the layer is drawn, not fixed
  # _mix itself: convex combination with the permuted batch, only at the selected layer
  h = jnp.arange(12.0).reshape(3, 4)
  perm = jnp.array([2, 0, 1])
  np.testing.assert_allclose(nets._mix(h, (1, perm, 0.3), 1), 0.3 * h + 0.7 * h[perm])
  np.testing.assert_array_equal(nets._mix(h, (2, perm, 0.3), 1), h)


# ------------------------------------------------------------------------------------------------
# Meta-SGD
# ------------------------------------------------------------------------------------------------

def test_metasgd_step_sizes_are_meta_learned(method='metasgd'):
  c, spec, params, ep = _setup(method, inner_steps=1)
  assert all(bool(jnp.all(v == c.inner_lr)) for v in jax.tree.leaves(params['lr']))
  batch = jax.tree.map(lambda v: v[None], ep)
  keys = jax.random.PRNGKey(9)[None]
  g = jax.grad(lambda p: meta.batch_loss(p, batch, keys, spec)[0])(params)
  norms = [float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g['lr'])]
  assert len(norms) == 4   # conv0 w, b; dense w, b
  assert max(norms) > 0 and sum(n > 0 for n in norms) >= len(norms) // 2
  # the step sizes are used: changing one changes the adapted theta
  p2 = {**params, 'lr': {**params['lr'], 'dense': {**params['lr']['dense'],
                                                    'w': 2 * params['lr']['dense']['w']}}}
  t1, _ = meta.inner_adapt(params, ep.support_x, ep.support_y, keys[0], spec)
  t2, _ = meta.inner_adapt(p2, ep.support_x, ep.support_y, keys[0], spec)
  assert _changed(t1['dense'], t2['dense'])
  # and a meta-update (clip + Adam of these gradients) changes them
  tx = meta.make_optimizer(params, method, 1e-2, c.grad_clip)
  updates, _ = tx.update(g, tx.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  assert _changed(params['lr'], new['lr'])


# ------------------------------------------------------------------------------------------------
# adversarial querying
# ------------------------------------------------------------------------------------------------

def test_adv_attacks_the_query_set():
  _, spec, params, ep = _setup('adv', inner_steps=1, **{'methods.adv_eps': 0.1})
  key = jax.random.PRNGKey(10)
  adv_loss, _ = meta.task_loss(params, ep, key, spec)
  clean_loss, _ = meta.task_loss(params, ep, key, dataclasses.replace(spec, adv_eps=0.0))
  assert float(adv_loss) > float(clean_loss)


def test_adv_attack_settings_reach_the_attack():
  """methods.adv_step_size / adv_restarts go from the config into the PGD of adversarial
  querying (the attack itself is tested in test_attacks.py): a different step size gives a
  different adversarial query set, hence a different query loss."""
  c, spec, params, ep = _setup('adv', inner_steps=1, **{
      'methods.adv_eps': 0.1, 'methods.adv_step_size': 0.05, 'methods.adv_restarts': 3})
  assert (spec.adv_step_size, spec.adv_restarts) == (0.05, 3)
  assert meta.spec_from_config(tiny('adv')).adv_step_size is None   # default 2.5 / steps
  key = jax.random.PRNGKey(10)
  small, _ = meta.task_loss(params, ep, key, spec)
  large, _ = meta.task_loss(params, ep, key, dataclasses.replace(spec, adv_step_size=0.5))
  assert float(small) != float(large)


@pytest.mark.parametrize('field,value', [('adv_restarts', 0), ('adv_step_size', 0.0),
                                         ('adv_steps', 0), ('adv_eps', -1.0)])
def test_bad_adv_settings_are_refused(field, value):
  with pytest.raises(config_lib.ConfigError, match=f'methods.{field}'):
    config_lib.validate(tiny('adv', **{f'methods.{field}': value}))
