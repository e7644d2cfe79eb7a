"""TF side of the authors'-gradient measurement (docs/authors_gradient.md). Needs TensorFlow 2.x
with tf_keras; imports nothing from metadrop_jax.

    python benchmarks/authors_gradient/tf_graph.py AUTHORS_REPO case.npz out.npz

AUTHORS_REPO is a checkout of github.com/haebeom-lee/metadrop (their ``model.py`` and
``layers.py`` are imported from there, unmodified on disk; nothing of theirs is copied here).
Their files target TF 1.x; at import time this script gives them a ``tensorflow`` module that is
``tf.compat.v1`` (``disable_v2_behavior()``: graph mode, v1 control flow) with two names replaced:

* ``tf.contrib.layers.batch_norm`` (gone in TF 2) -> the layer it dispatched to for their call
  (4-D input, default ``updates_collections``: contrib hands over to the core layer with
  ``fused=True``): ``tf.compat.v1.layers.batch_normalization(center=True, scale=False,
  epsilon=1e-3, training=True, fused=True)``, then their ``activation_fn`` (ReLU). The BN
  variant can be switched (below) to a direct ``tf.nn.fused_batch_norm`` or a non-fused
  ``tf.nn.moments`` + ``tf.nn.batch_normalization``.
* ``tf.distributions.Normal(loc, scale).sample()`` -> ``loc + scale * eps`` with ``eps`` read from
  the case file (the same draws are given to our model), in the order their graph samples:
  inner step k, conv blocks 1..4, then (Meta-dropout only) the logits.

Their ``MetaDropout`` object is built with ``dataset='omniglot'`` and then given the case's image
size and channel count (``xdim``, ``n_channel``; a 4-block net needs 16..31 pixels for the
1x1 final map their dense layer assumes). The per-task loss is their ``get_loss_single`` (training
branch, 1 MC sample); the tasks are combined as in their ``get_loss_multiple``: ``tf.map_fn``
over the tasks (``parallel_iterations`` = number of tasks), mean of the query losses; the
meta-gradient is ``tf.gradients`` of that mean w.r.t. their var list (phi left out for MAML).

Variants (env VARIANTS, comma separated; one graph each; default: the three below)
  mapfn_layers       their structure: v1 tf.map_fn, core fused BN layer      <- what they ran
  loop_layers        control: a Python loop over tasks instead of tf.map_fn
  mapfn_cfv2_layers  control: tf.map_fn under control flow v2 (enable_control_flow_v2)
  mapfn_fused / loop_fused / ..._fused      tf.nn.fused_batch_norm called directly
  mapfn_unfused / loop_unfused / ..._unfused  tf.nn.moments + tf.nn.batch_normalization

Env SOFTPLUS=log1p replaces their softplus by relu(x) + log1p(exp(-|x|)) (a diagnostic of
TF's float32 Softplus kernel, docs/authors_gradient.md).

case.npz: way, n_steps, inner_lr, maml, xdim, n_channel, xtr/xte [T, n, xdim*xdim],
ytr/yte [T, n, way] one-hot, ``eps_s{k}_l{l}`` [T, ...] (l = 1..4 conv blocks, 5 = logits), and
the initial weights ``w/<their variable name>``. out.npz: ``<variant>/loss``,
``<variant>/g/<their variable name>``, ``tf_version``.
"""
import argparse
import os
import sys
import types

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['TF_USE_LEGACY_KERAS'] = '1'     # tf.compat.v1.layers.* need tf_keras under TF >= 2.16
import tensorflow as tf2  # noqa: E402

tf = tf2.compat.v1
tf.disable_v2_behavior()


class _Noise:
  """The fed noise, consumed in sampling order by :class:`FedNormal`."""
  items = None


NOISE = _Noise()


class FedNormal:
  """Stands in for tf.distributions.Normal: ``sample()`` = loc + scale * (next fed eps)."""

  def __init__(self, loc, scale):
    self.loc, self.scale = loc, scale

  def sample(self):
    return self.loc + self.scale * NOISE.items.pop(0)


BN = {'kind': 'layers'}


def batch_norm(x, activation_fn=None, scope=None, reuse=None, **kw):
  """Stands in for tf.contrib.layers.batch_norm(x, activation_fn=..., scope=..., reuse=...)."""
  if kw:
    raise TypeError(f'unexpected batch_norm arguments {sorted(kw)}')
  c = x.shape[-1]
  if BN['kind'] == 'layers':
    y = tf.layers.batch_normalization(x, center=True, scale=False, epsilon=1e-3, training=True,
                                      fused=True, name=scope, reuse=reuse)
  else:
    with tf.variable_scope(scope, reuse=reuse):
      beta = tf.get_variable('beta', [c], initializer=tf.zeros_initializer())
    if BN['kind'] == 'fused':
      y, _, _ = tf.nn.fused_batch_norm(x, tf.ones([c]), beta, epsilon=1e-3, is_training=True)
    elif BN['kind'] == 'unfused':
      m, v = tf.nn.moments(x, [0, 1, 2])
      y = tf.nn.batch_normalization(x, m, v, beta, None, 1e-3)
    else:
      raise ValueError(BN['kind'])
  return activation_fn(y) if activation_fn is not None else y


def import_authors(repo, fed_noise=True):
  """Their ``model`` module under the shim above. ``fed_noise=False`` keeps their own
  ``tf.distributions.Normal`` sampling (``tf.compat.v1.distributions``: timing, not comparison)."""
  shim = types.ModuleType('tensorflow')
  shim.__dict__['__getattr__'] = lambda name: getattr(tf, name)
  shim.contrib = types.SimpleNamespace(layers=types.SimpleNamespace(batch_norm=batch_norm))
  normal = FedNormal if fed_noise else tf.distributions.Normal
  shim.distributions = types.SimpleNamespace(Normal=normal)
  saved = sys.modules.get('tensorflow')
  sys.modules['tensorflow'] = shim
  sys.path.insert(0, os.path.abspath(repo))
  try:
    import layers as their_layers   # noqa: F401
    import model as their_model
  finally:
    sys.modules['tensorflow'] = saved
  assert their_layers.normal is normal and their_layers.batch_norm is batch_norm
  if os.environ.get('SOFTPLUS') == 'log1p':
    # diagnostic only: TF's float32 Softplus kernel computes log(exp(x) + 1) for
    # -14 < x < 14, which loses precision for negative x; this is the accurate form
    their_layers.softplus = lambda x: tf.nn.relu(x) + tf.math.log1p(tf.exp(-tf.abs(x)))
  return their_model


def noise_order(n_steps, maml):
  return [f'eps_s{k}_l{l}' for k in range(n_steps) for l in range(1, 5 if maml else 6)]


def run_variant(their_model, case, variant):
  T = case['xtr'].shape[0]
  n_steps, maml = int(case['n_steps']), bool(case['maml'])
  order = noise_order(n_steps, maml)
  (tf.enable_control_flow_v2 if 'cfv2' in variant else tf.disable_control_flow_v2)()
  BN['kind'] = variant.split('_')[-1]
  with tf.Graph().as_default():
    args = argparse.Namespace(dataset='omniglot', way=int(case['way']), n_steps=n_steps,
                              metabatch=T, inner_lr=float(case['inner_lr']), n_test_mc_samp=1,
                              maml=maml)
    m = their_model.MetaDropout(args)
    m.xdim, m.n_channel = int(case['xdim']), int(case['n_channel'])
    ph = {k: tf.placeholder(tf.float32, case[k].shape, name=k)
          for k in ['xtr', 'ytr', 'xte', 'yte'] + order}

    def single(inputs):
      NOISE.items = list(inputs[4:])
      cent, acc = m.get_loss_single(tuple(inputs[:4]), True, reuse=tf.AUTO_REUSE)
      assert not NOISE.items, 'fed noise left unused'
      return cent, acc

    elems = tuple(ph[k] for k in ['xtr', 'ytr', 'xte', 'yte'] + order)
    if variant.startswith('mapfn'):
      cent, _ = tf.map_fn(single, elems=elems, dtype=(tf.float32, tf.float32),
                          parallel_iterations=T)
    elif variant.startswith('loop'):
      cent = tf.stack([single(tuple(e[t] for e in elems))[0] for t in range(T)])
    else:
      raise ValueError(variant)
    loss = tf.reduce_mean(cent)
    tvars = tf.trainable_variables()
    var_list = [v for v in tvars if 'phi' not in v.name] if maml else tvars
    grads = tf.gradients(loss, var_list)
    sess = tf.Session(config=tf.ConfigProto(intra_op_parallelism_threads=1,
                                            inter_op_parallelism_threads=1))
    sess.run(tf.global_variables_initializer())
    for v in tvars:
      v.load(case['w/' + v.name[:-2].replace('/batch_normalization', '')], sess)
    lv, gv = sess.run([loss, grads], feed_dict={ph[k]: case[k] for k in ph})
  out = {f'{variant}/loss': np.float32(lv)}
  for v, g in zip(var_list, gv):
    if g is None:
      raise RuntimeError(f'{variant}: no gradient for {v.name}')
    out[f'{variant}/g/{v.name[:-2]}'] = np.asarray(g, np.float32)
  return out


def main():
  repo, case_path, out_path = sys.argv[1:4]
  variants = os.environ.get('VARIANTS', 'mapfn_layers,loop_layers,mapfn_cfv2_layers').split(',')
  case = dict(np.load(case_path))
  their_model = import_authors(repo)
  res = {'tf_version': np.array(tf2.__version__)}
  for v in variants:
    res.update(run_variant(their_model, case, v))
    print(f'{v}: loss {res[f"{v}/loss"]:.7f}', flush=True)
  np.savez(out_path, **res)


if __name__ == '__main__':
  main()
