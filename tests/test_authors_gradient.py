"""Our ``meta_gradient='authors'`` is the meta-gradient the authors' TF graph computes.

tests/data/authors_gradient_tiny.npz holds a recorded reference (docs/authors_gradient.md):
the authors' model.py / layers.py (github.com/haebeom-lee/metadrop) run under TensorFlow 2.x
``tf.compat.v1`` with v1 control flow, their ``tf.map_fn`` over tasks, fused batch norm, on a
tiny case (16x16 Omniglot characters, 4 blocks of 4 channels, 3-way 1-shot, 2 queries per class,
2 tasks, 2 inner steps, weights = our init + N(0, 0.1^2)), for MAML and Meta-dropout, with the
noise eps fed to their sampling calls; plus the same graph without tf.map_fn (a Python loop over
tasks), whose meta-gradient is exact. Recorded by
``benchmarks/authors_gradient/compare.py record-tiny``. TensorFlow is not needed here: we feed
the same eps to our forward pass (``jax.random.normal`` patched while our loss is traced).
"""

import contextlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metadrop_jax import episodes, meta, nets

DATA = pathlib.Path(__file__).parent / 'data' / 'authors_gradient_tiny.npz'
# float32 tolerance on ||g_ours - g_tf|| / ||g_tf|| over all meta-learned variables and over
# each of theta, phi, bn. Observed when recorded: 'authors' vs their graph 4e-6 (both modes),
# 'exact' vs the control 6e-6 (MAML) / 2e-5 (Meta-dropout).
TOL = 2e-4
# the exact and the authors' meta-gradients of this case differ by far more than that
DIFFERENT = 0.1


@pytest.fixture(scope='module')
def rec():
  return dict(np.load(DATA))


def spec_of(rec, method, meta_gradient):
  n = lambda k: int(rec[f'config/{k}'])
  return meta.MetaSpec(
      net=nets.NetSpec(way=n('way'), image_shape=(n('image'), n('image'), 1),
                       channels=n('channels'), num_layers=4, method=method, conv_impl='xla'),
      inner_steps=n('inner_steps'), inner_lr=float(rec['config/inner_lr']),
      meta_gradient=meta_gradient)


def params_of(rec):
  params = {}
  for k, v in rec.items():
    if k.startswith('params/'):
      _, sub, layer, field = k.split('/')
      params.setdefault(sub, {}).setdefault(layer, {})[field] = jnp.asarray(v)
  return params


@contextlib.contextmanager
def fed_noise(stream):
  """``jax.random.normal`` returns the recorded draws, in the order our forward pass asks."""
  orig = jax.random.normal

  def fake(key, shape=(), dtype=jnp.float32):
    e = stream.pop(0)
    assert tuple(e.shape) == tuple(shape), (e.shape, shape)
    return jnp.asarray(e, dtype)

  jax.random.normal = fake
  try:
    yield
  finally:
    jax.random.normal = orig


def meta_loss(params, rec, spec):
  """Mean over the recorded tasks of meta.task_loss, with the recorded noise of each task."""
  eps = episodes.Episode(*[jnp.asarray(rec[f'episode/{f}']) for f in episodes.Episode._fields])
  noise = ([jnp.asarray(rec[f'noise/s{k}_l{l}']) for k in range(spec.inner_steps)
            for l in range(spec.net.num_layers + 1)] if spec.method == 'metadrop' else [])

  def one(ep, nz):
    stream = list(nz)
    with fed_noise(stream):
      loss, _ = meta.task_loss(params, ep, jax.random.PRNGKey(0), spec)
    assert not stream, 'recorded noise left unused'
    return loss

  return jnp.mean(jax.vmap(one)(eps, noise))


def rel(tf, ours, keys):
  a = np.concatenate([np.ravel(tf[k]) for k in keys]).astype(np.float64)
  b = np.concatenate([np.ravel(ours[k]) for k in keys]).astype(np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def grads(rec, method, modes):
  """``{mode: (loss, {'theta/conv0/w': grad, ...})}``, all modes in one compiled call. XLA's
  backend optimisation is off: this graph runs once, and it halves the compile time."""
  params = params_of(rec)
  specs = [spec_of(rec, method, m) for m in modes]
  f = jax.jit(lambda p: [jax.value_and_grad(lambda q, s=s: meta_loss(q, rec, s))(p)
                         for s in specs])
  out = f.lower(params).compile({'xla_backend_optimization_level': 0})(params)
  flat = lambda g: {'/'.join(str(getattr(p, 'key', p)) for p in path): np.asarray(v)
                    for path, v in jax.tree_util.tree_flatten_with_path(g)[0]}
  return {m: (float(loss), flat(g)) for m, (loss, g) in zip(modes, out)}


def recorded(rec, method, tag):
  pre = f'{method}/{tag}/grad/'
  return float(rec[f'{method}/{tag}/loss']), {k[len(pre):]: v for k, v in rec.items()
                                               if k.startswith(pre)}


def assert_matches(tf_g, ours, keys):
  assert rel(tf_g, ours, keys) < TOL
  for sub in ('theta', 'phi', 'bn'):
    ks = [k for k in keys if k.startswith(sub + '/')]
    if ks:
      assert rel(tf_g, ours, ks) < TOL, sub


@pytest.mark.parametrize('method', [
    'metadrop',                                       # theta, phi and the BN offsets; ~17 s
    pytest.param('maml', marks=pytest.mark.slow)])    # ~14 s more on 2 CPU cores
def test_meta_gradients_against_their_tf_graph(rec, method):
  """'authors' equals their graph's meta-gradient (tf.map_fn, v1 control flow); 'exact' does
  not, and equals the same graph's meta-gradient without tf.map_fn."""
  tf_loss, tf_g = recorded(rec, method, 'tf_authors')
  exact_loss, exact_g = recorded(rec, method, 'tf_exact_control')
  keys = sorted(tf_g)
  assert any(k.startswith('phi/') for k in keys) == (method == 'metadrop')
  assert sorted(exact_g) == keys
  assert rel(tf_g, exact_g, keys) > DIFFERENT

  ours = grads(rec, method, ('authors', 'exact'))
  loss, authors = ours['authors']
  np.testing.assert_allclose(loss, tf_loss, rtol=1e-5)
  assert_matches(tf_g, authors, keys)

  loss, exact = ours['exact']
  np.testing.assert_allclose(loss, exact_loss, rtol=1e-5)
  assert rel(tf_g, exact, keys) > DIFFERENT
  assert_matches(exact_g, exact, keys)
