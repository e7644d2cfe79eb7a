"""PGD attacks: exact projections (ball + box), feasibility of the attack, eps = 0, strength;
the robustness evaluation of a trained workdir (files, plot, CLI)."""

import functools
import json
import os

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny
from metadrop_jax import attacks

B, D = 3, 12
NORMS = ('l1', 'l2', 'linf')
TOL = 1e-5


def _norm(d, norm):
  d = np.asarray(d, np.float64).reshape(d.shape[0], -1)
  return {'l1': np.abs(d).sum(1), 'l2': np.sqrt((d ** 2).sum(1)), 'linf': np.abs(d).max(1)}[norm]


@functools.lru_cache(maxsize=None)
def _project(norm, box=(0.0, 1.0)):
  return jax.jit(lambda d, x, eps: attacks.project(d, x, eps, norm, box))


def _duchi_l1(v, eps):
  """Duchi et al. 2008 (sorting) projection of one vector onto the l1 ball, float64."""
  if np.abs(v).sum() <= eps:
    return v
  u = np.sort(np.abs(v))[::-1]
  css = np.cumsum(u)
  rho = np.nonzero(u * np.arange(1, len(u) + 1) > (css - eps))[0][-1]
  theta = (css[rho] - eps) / (rho + 1.0)
  return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


floats = dict(allow_nan=False, allow_infinity=False, width=32)
scalar = dict(allow_nan=False, allow_infinity=False)
vecs = hnp.arrays(np.float32, (B, D), elements=st.floats(-3, 3, **floats))
pixels = hnp.arrays(np.float32, (B, D), elements=st.floats(0, 1, **floats))


@pytest.mark.parametrize('norm', NORMS)
@hypothesis.given(v=vecs, x=pixels, eps=st.floats(0, 4, **scalar), seed=st.integers(0, 2**16))
def test_projection_is_feasible_and_optimal(norm, v, x, eps, seed):
  eps = {'l1': eps, 'l2': eps / 2, 'linf': eps / 8}[norm]
  p = np.asarray(_project(norm)(v, x, eps), np.float64)
  assert np.all(_norm(p, norm) <= eps + TOL)
  assert np.all(x + p >= -1e-6) and np.all(x + p <= 1 + 1e-6)
  # optimality (variational inequality): <v - p, q - p> <= 0 for every feasible q
  rng = np.random.default_rng(seed)
  q = np.asarray(_project(norm)(rng.normal(size=(B, D)).astype(np.float32) * 3, x, eps),
                 np.float64)
  q = np.concatenate([q, np.zeros_like(q)])  # 0 is always feasible
  vv, pp = np.tile(np.asarray(v, np.float64), (2, 1)), np.tile(p, (2, 1))
  scale = 1 + np.abs(vv).sum(1)
  assert np.all(np.sum((vv - pp) * (q - pp), axis=1) <= 1e-4 * scale)
  # and no feasible point we know of is closer
  assert np.all(np.linalg.norm(vv - pp, axis=1) <= np.linalg.norm(vv - q, axis=1) + 1e-4)


@hypothesis.given(v=vecs, eps=st.floats(0.01, 4, **scalar))
def test_projection_without_box_matches_closed_forms(v, eps):
  """Box removed: l1 = Duchi et al.'s sorting algorithm, l2 = rescaling, linf = clipping."""
  x = np.zeros((B, D), np.float32)
  nobox = (-1e6, 1e6)
  v64 = np.asarray(v, np.float64)
  p1 = np.asarray(_project('l1', nobox)(v, x, eps), np.float64)
  np.testing.assert_allclose(p1, np.stack([_duchi_l1(r, eps) for r in v64]), atol=2e-5)
  p2 = np.asarray(_project('l2', nobox)(v, x, eps), np.float64)
  n = np.linalg.norm(v64, axis=1, keepdims=True)
  np.testing.assert_allclose(p2, v64 * np.minimum(1, eps / np.maximum(n, 1e-30)), atol=2e-5)
  pi = np.asarray(_project('linf', nobox)(v, x, eps), np.float64)
  np.testing.assert_allclose(pi, np.clip(v64, -eps, eps), atol=1e-6)


def test_clip_then_project_is_not_the_projection():
  """Why the joint KKT solve: Duchi-then-clip leaves budget unused / is not the nearest point."""
  x = np.array([[0.95, 0.5, 0.5]], np.float32)
  v = np.array([[1.0, 0.8, 0.0]], np.float32)
  eps = 0.5
  p = np.asarray(_project('l1')(v, x, eps), np.float64)[0]
  naive = np.clip(_duchi_l1(v[0].astype(np.float64), eps), -x[0], 1 - x[0])
  assert np.abs(p).sum() == pytest.approx(eps, abs=1e-5)
  assert np.abs(naive).sum() < eps - 0.1
  assert np.linalg.norm(v[0] - p) < np.linalg.norm(v[0] - naive) - 1e-3


def _linear_problem():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))
  x = jnp.asarray(rng.uniform(size=(32, 4, 4, 1)).astype(np.float32))
  y = jnp.argmax(x.reshape(32, -1) @ w, -1)   # the clean model is 100% accurate

  def loss_fn(xx):
    return optax.softmax_cross_entropy_with_integer_labels(xx.reshape(32, -1) @ w, y)

  acc = lambda xx: float(jnp.mean(jnp.argmax(xx.reshape(32, -1) @ w, -1) == y))
  return loss_fn, x, acc


@pytest.mark.parametrize('norm,eps', [('linf', 0.25), ('l2', 1.5), ('l1', 4.0)])
def test_pgd_breaks_a_linear_classifier_and_stays_feasible(norm, eps):
  loss_fn, x, acc = _linear_problem()
  run = jax.jit(lambda x, k, e: attacks.pgd(loss_fn, x, k, norm=norm, eps=e, steps=10,
                                             restarts=2))
  x_adv = run(x, jax.random.PRNGKey(0), eps)
  assert acc(x) == 1.0
  assert acc(x_adv) < 0.5, acc(x_adv)
  d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
  assert np.all(_norm(d, norm) <= eps + TOL)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  # a bigger radius is at least as strong (same steps): monotone in eps on average
  assert float(loss_fn(run(x, jax.random.PRNGKey(0), 2 * eps)).mean()) >= \
      float(loss_fn(x_adv).mean()) - 1e-3
  # eps = 0 is the identity, bit for bit
  np.testing.assert_array_equal(np.asarray(run(x, jax.random.PRNGKey(1), 0.0)), np.asarray(x))


@functools.lru_cache(maxsize=None)
def _pgd_small(norm):
  def run(x, w, k, eps):
    loss_fn = lambda xx: jnp.sum(jnp.square(xx.reshape(2, -1) @ w), -1)   # per-example losses
    return attacks.pgd(loss_fn, x, k, norm=norm, eps=eps, steps=3, restarts=2)
  return jax.jit(run)


@pytest.mark.parametrize('norm', NORMS)
@hypothesis.given(x=hnp.arrays(np.float32, (2, 3, 3, 1), elements=st.floats(0, 1, **floats)),
                  eps=st.floats(0, 3, **scalar), seed=st.integers(0, 2**16))
def test_pgd_output_respects_ball_and_box(norm, x, eps, seed):
  w = jax.random.normal(jax.random.PRNGKey(seed), (9, 3))
  eps = eps if norm != 'linf' else eps / 10
  x_adv = _pgd_small(norm)(x, w, jax.random.PRNGKey(seed), eps)
  d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
  assert np.all(_norm(d, norm) <= eps + TOL)
  assert float(np.min(x_adv)) >= 0.0 and float(np.max(x_adv)) <= 1.0
  if eps == 0:
    np.testing.assert_array_equal(np.asarray(x_adv), x)


# ------------------------------------------------------------------------------------------------
# robustness evaluation of a trained workdir
# ------------------------------------------------------------------------------------------------

def test_robustness_evaluation_end_to_end(tmp_path):
  """Train MAML a few steps, then: radius 0 == evaluation.evaluate on the same episodes, accuracy
  falls under attack, JSON written, figure and CLI work."""
  from metadrop_jax import data as data_lib
  from metadrop_jax import robustness
  from metadrop_jax import evaluation, keys, meta, train, workdir
  from metadrop_jax.cli import robustness as robustness_cli
  wd = str(tmp_path / 'maml')
  c = tiny('maml', num_steps=10, val_every=0, inner_steps=1, **{
      'eval.num_episodes': 4, 'eval.batch_tasks': 4, 'eval.mc_samples': 1,
      'model.num_layers': 1})
  train.train(c, wd)
  radii = {'linf': (0.0, 0.3)}
  attack = robustness.AttackSettings(steps=5)
  res = robustness.evaluate_workdir(wd, ['linf'], radii=radii, attack=attack)
  for n in ('linf',):
    path = os.path.join(wd, f'robustness_{n}.json')
    with open(path) as f:
      r = json.load(f)
    assert r == json.loads(json.dumps(res[n]))
    assert r['radii'] == list(radii[n]) and len(r['accuracy']) == len(r['ci95']) == 2
    assert r['accuracy'][1] < r['accuracy'][0], r['accuracy']
    assert r['attack']['steps'] == 5 and r['method'] == 'maml' and r['episodes'] == 4
  # radius 0 reproduces the clean evaluation protocol (same episodes, same adaptation)
  state = workdir.restore_latest(workdir.checkpoint_manager(wd, c),
                                 meta.create_state(keys.run_keys(c)[0], c)[0])
  clean = evaluation.evaluate(state.params, data_lib.load_split(c.data, 'test'), c)
  assert res['linf']['accuracy'][0] == pytest.approx(clean['mean'], abs=1e-4)
  # figure from the JSONs (plot-only CLI), two workdirs on one figure
  out = str(tmp_path / 'fig.png')
  robustness_cli.main(['--workdirs', f'{wd},{wd}', '--norms', 'linf,l1', '--plot_only',
                   '--out', out, '--labels', 'a,b'])
  assert os.path.getsize(out) > 1000
  assert robustness.label_of({'method': 'adv', 'adv_training': {'norm': 'l1', 'eps': 20}}) == \
      'MAML + adv. training l1 e=20'
  assert robustness.label_of({'method': 'maml', 'meta_gradient': 'authors'}) == "MAML (authors')"
  assert r['meta_gradient'] == c.meta_gradient and len(r['episode_accs'][0]) == 4


def test_cli_help_mentions_every_setting(capsys):
  from metadrop_jax.cli import robustness as robustness_cli
  with pytest.raises(SystemExit):
    robustness_cli.main(['--help'])
  text = capsys.readouterr().out
  for flag in ('--workdirs', '--norms', '--episodes', '--out', '--steps', '--step_size',
               '--restarts', '--no_rand_init', '--radii_linf', '--mc_samples'):
    assert flag in text
