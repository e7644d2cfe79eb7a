r"""Our meta-gradients vs the authors' TF graph on identical weights, episodes and noise draws
(docs/authors_gradient.md). Runs the TF side (tf_graph.py) in a subprocess.

  # one measurement: Omniglot 5-way 1-shot, 5 queries, 32 channels, 4 tasks, 5 inner steps
  python benchmarks/authors_gradient/compare.py measure --authors=/path/to/metadrop \
      --method=metadrop --weights=init --out=/tmp/ag.json
  # the recorded reference of tests/test_authors_gradient.py
  python benchmarks/authors_gradient/compare.py record-tiny --authors=/path/to/metadrop

``--weights``: ``init`` (our initialiser, seed 0) or an .npz of our params keyed
``theta/conv0/w`` etc.; ``--train-steps=N`` first trains N meta-steps of
configs/omniglot_5way1shot_cpu.py with our trainer (init key 0, train key 1). Noise: ``eps ~ N(0, 1)`` drawn with numpy, fed to TF's sampling calls and
returned by ``jax.random.normal`` to ours (patched only while our loss is traced, consumed in
the order our forward pass asks: inner step k, conv blocks 0..3, then the logits). Relative error
is ``||g_tf - g_ours|| / ||g_tf||`` (float64), cosine likewise.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from metadrop_jax import episodes as episodes_lib, meta, nets  # noqa: E402

TF_GRAPH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'tf_graph.py')
MODES = ('exact', 'first_order', 'authors')


@contextlib.contextmanager
def fed_noise(stream: list):
  """While active, ``jax.random.normal`` returns the next array of ``stream`` (shape-checked)."""
  orig = jax.random.normal

  def fake(key, shape=(), dtype=jnp.float32):
    e = stream.pop(0)
    if tuple(e.shape) != tuple(shape):
      raise AssertionError(f'fed noise shape {e.shape}, asked for {shape}')
    return jnp.asarray(e, dtype)

  jax.random.normal = fake
  try:
    yield
  finally:
    jax.random.normal = orig


def noise_shapes(spec: meta.MetaSpec, n_support: int):
  h, w, _ = spec.net.image_shape
  shapes = []
  for _ in range(spec.net.num_layers):
    shapes.append((n_support, h, w, spec.net.channels))
    h, w = h // 2, w // 2
  return shapes + [(n_support, spec.net.way)]


def draw_noise(rng, spec, tasks, n_support):
  """``noise[k][l]``: f32[tasks, ...] for inner step k, block l (the last entry: the logits)."""
  return [[rng.standard_normal((tasks,) + s).astype(np.float32)
           for s in noise_shapes(spec, n_support)] for _ in range(spec.inner_steps)]


def mean_task_loss(params, episodes, noise, spec):
  """Our meta-loss (meta.task_loss vmapped over tasks, averaged) with the fed noise."""
  flat = [e for step in noise for e in step] if meta.support_is_stochastic(spec.method) else []

  def one(ep, nz):
    stream = list(nz)
    with fed_noise(stream):
      loss, _ = meta.task_loss(params, ep, jax.random.PRNGKey(0), spec)
    assert not stream, f'{len(stream)} fed noise arrays unused'
    return loss

  return jnp.mean(jax.vmap(one)(episodes, flat))


def our_grads(params, episodes, noise, spec, modes=MODES):
  out = {}
  for m in modes:
    s = dataclasses.replace(spec, meta_gradient=m)
    f = jax.jit(jax.value_and_grad(lambda p, e, z, s=s: mean_task_loss(p, e, z, s)))
    loss, g = f(params, episodes, noise)
    out[m] = (float(loss), jax.tree.map(np.asarray, g))
  return out


def their_names(spec):
  """(subtree, layer, field) -> the authors' TF variable name."""
  names = {}
  for l in range(spec.net.num_layers):
    names[('theta', f'conv{l}', 'w')] = f'theta/conv{l + 1}_w'
    names[('theta', f'conv{l}', 'b')] = f'theta/conv{l + 1}_b'
    names[('phi', f'conv{l}', 'w')] = f'phi/conv{l + 1}_w'
    names[('phi', f'conv{l}', 'b')] = f'phi/conb{l + 1}_b'   # sic: their variable's name
    names[('bn', f'conv{l}', 'beta')] = f'conv{l + 1}_bn/beta'
  for sub in ('theta', 'phi'):
    names[(sub, 'dense', 'w')] = f'{sub}/dense_w'
    names[(sub, 'dense', 'b')] = f'{sub}/dense_b'
  return names


def meta_learned(spec):
  return [k for k in their_names(spec) if not (spec.method == 'maml' and k[0] == 'phi')]


def to_case(params, episodes, noise, spec):
  way, tasks = spec.net.way, episodes.support_x.shape[0]
  flat = lambda x: np.asarray(x).reshape(tasks, x.shape[1], -1)
  onehot = lambda y: np.eye(way, dtype=np.float32)[np.asarray(y)]
  case = dict(way=way, n_steps=spec.inner_steps, inner_lr=spec.inner_lr,
              maml=spec.method == 'maml', xdim=spec.net.image_shape[0],
              n_channel=spec.net.channels, xtr=flat(episodes.support_x),
              ytr=onehot(episodes.support_y), xte=flat(episodes.query_x),
              yte=onehot(episodes.query_y))
  for (a, b, c), n in their_names(spec).items():
    case['w/' + n] = np.asarray(params[a][b][c])
  for k, step in enumerate(noise):
    for l, e in enumerate(step):
      if spec.method == 'maml' and l == spec.net.num_layers:
        continue   # MAML: their dense block samples nothing
      case[f'eps_s{k}_l{l + 1}'] = e
  return case


def run_tf(authors, case, variants):
  with tempfile.TemporaryDirectory() as d:
    cp, op = os.path.join(d, 'case.npz'), os.path.join(d, 'out.npz')
    np.savez(cp, **case)
    env = dict(os.environ, VARIANTS=','.join(variants), CUDA_VISIBLE_DEVICES='')
    r = subprocess.run([sys.executable, TF_GRAPH, authors, cp, op], env=env, text=True,
                       capture_output=True)
    if r.returncode:
      sys.stderr.write(r.stdout + r.stderr[-8000:])
      raise SystemExit('the TF side failed')
    return dict(np.load(op))


def err(a, b):
  """(||a - b|| / ||a||, cosine), a = TF."""
  a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / na), float(a @ b / (na * nb))


def compare(tf_out, ours, spec, variant):
  names, keys = their_names(spec), meta_learned(spec)
  tf_g = {k: tf_out[f'{variant}/g/{names[k]}'] for k in keys}
  rows = {}
  for m, (loss, g) in ours.items():
    og = {k: g[k[0]][k[1]][k[2]] for k in keys}
    cat = lambda d, ks: np.concatenate([np.ravel(d[k]) for k in ks])
    r = {'all': err(cat(tf_g, keys), cat(og, keys)),
         'loss_tf_minus_ours': float(tf_out[f'{variant}/loss']) - loss}
    for sub in ('theta', 'phi', 'bn'):
      ks = [k for k in keys if k[0] == sub]
      if ks:
        r[sub] = err(cat(tf_g, ks), cat(og, ks))
    r['per_variable'] = {names[k]: err(tf_g[k], og[k]) for k in keys}
    rows[m] = r
  return rows


def load_params(spec, weights):
  params = nets.init_params(jax.random.PRNGKey(0), spec.net)
  if weights == 'init':
    return params
  z = np.load(weights)
  return jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.asarray(z['/'.join(str(getattr(k, 'key', k)) for k in p)]), params)


def cmd_measure(a):
  from configs import omniglot_5way1shot_cpu
  from metadrop_jax import data
  spec = meta.MetaSpec(
      net=nets.NetSpec(way=a.way, image_shape=(28, 28, 1), channels=a.channels, num_layers=4,
                       method=a.method, conv_impl='xla'),
      inner_steps=a.inner_steps, inner_lr=a.inner_lr)
  params = load_params(spec, a.weights)
  c = omniglot_5way1shot_cpu.get_config()
  c.data.path = a.data_path
  images = jnp.asarray(data.load_split(c.data, 'train'))
  if a.train_steps:   # our trainer from our init (key 0), train key 1, the CPU config
    c.method, c.model.conv_impl = a.method, 'im2col'
    state, tx = meta.create_state(jax.random.PRNGKey(0), c)
    step = meta.make_train_step(c, tx)
    for _ in range(a.train_steps):
      state, _ = step(state, images, jax.random.PRNGKey(1))
    params = state.params
  episodes = episodes_lib.sample_batch(jax.random.PRNGKey(a.seed), images, a.tasks, a.way, 1,
                                       a.query)
  noise = draw_noise(np.random.default_rng(a.noise_seed), spec, a.tasks, a.way)
  ours = our_grads(params, episodes, noise, spec)
  variants = a.variants.split(',')
  tf_out = run_tf(a.authors, to_case(params, episodes, noise, spec), variants)
  res = {'args': vars(a), 'tf_version': str(tf_out['tf_version']), 'jax_version': jax.__version__,
         'loss': {**{m: l for m, (l, _) in ours.items()},
                  **{v: float(tf_out[f'{v}/loss']) for v in variants}}}
  for v in variants:
    res[v] = compare(tf_out, ours, spec, v)
    for m, r in res[v].items():
      print(f'TF {v:18s} vs ours {m:12s}: rel L2 {r["all"][0]:.2e} (cos {r["all"][1]:.4f})  ' +
            '  '.join(f'{s} {r[s][0]:.1e}' for s in ('theta', 'phi', 'bn') if s in r))
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(res, f, indent=1)


TINY = dict(way=3, shot=1, query=2, channels=4, image=16, tasks=2, inner_steps=2, inner_lr=0.5)


def tiny_spec(method):
  t = TINY
  return meta.MetaSpec(
      net=nets.NetSpec(way=t['way'], image_shape=(t['image'], t['image'], 1),
                       channels=t['channels'], num_layers=4, method=method, conv_impl='xla'),
      inner_steps=t['inner_steps'], inner_lr=t['inner_lr'])


def cmd_record_tiny(a):
  """Tiny reference: Omniglot characters resized to 16x16, 4 blocks of 4 channels, 3-way 1-shot,
  2 queries per class, 2 tasks, 2 inner steps; weights = our init + N(0, 0.1^2) so that phi and
  the BN offsets matter."""
  from configs import omniglot_5way1shot_cpu
  from metadrop_jax import data
  t = TINY
  c = omniglot_5way1shot_cpu.get_config()
  c.data.path = a.data_path
  images = data.load_split(c.data, 'train')
  rng = np.random.default_rng(a.seed)
  tasks = []
  for i in range(t['tasks']):
    ix = episodes_lib.sample_index(jax.random.PRNGKey(a.seed + i), images.shape[0],
                                   images.shape[1], t['way'], t['shot'], t['query'])
    imgs = images[np.asarray(ix.classes)[:, None], np.asarray(ix.instances)] / np.float32(255)
    imgs = np.asarray(jax.image.resize(imgs, imgs.shape[:2] + (t['image'], t['image'], 1),
                                       'linear'), np.float32)
    tasks.append((imgs[:, :t['shot']].reshape((-1,) + imgs.shape[2:]),
                  np.repeat(np.arange(t['way']), t['shot']).astype(np.int32),
                  imgs[:, t['shot']:].reshape((-1,) + imgs.shape[2:]),
                  np.repeat(np.arange(t['way']), t['query']).astype(np.int32)))
  episodes = episodes_lib.Episode(*[np.stack(z) for z in zip(*tasks)])
  spec = tiny_spec('metadrop')
  params = nets.init_params(jax.random.PRNGKey(0), spec.net)
  params = jax.tree.map(lambda p: np.asarray(p + 0.1 * rng.standard_normal(p.shape), np.float32),
                        params)
  noise = draw_noise(rng, spec, t['tasks'], t['way'] * t['shot'])
  rec = {f'config/{k}': np.int64(v) if isinstance(v, int) else np.float64(v)
         for k, v in TINY.items()}
  for (s, l, f), _ in their_names(spec).items():
    rec[f'params/{s}/{l}/{f}'] = params[s][l][f]
  for f in episodes._fields:
    rec[f'episode/{f}'] = getattr(episodes, f)
  for k, step in enumerate(noise):
    for l, e in enumerate(step):
      rec[f'noise/s{k}_l{l}'] = e
  variants = ['mapfn_layers', 'loop_layers']
  report = {}
  for method in ('maml', 'metadrop'):
    s = tiny_spec(method)
    tf_out = run_tf(a.authors, to_case(params, episodes, noise, s), variants)
    rec['tf_version'] = np.array(str(tf_out['tf_version']))
    names = their_names(s)
    for v, tag in (('mapfn_layers', 'tf_authors'), ('loop_layers', 'tf_exact_control')):
      rec[f'{method}/{tag}/loss'] = tf_out[f'{v}/loss']
      for k in meta_learned(s):
        rec[f'{method}/{tag}/grad/{"/".join(k)}'] = tf_out[f'{v}/g/{names[k]}']
    ours = our_grads(params, episodes, noise, s, modes=('exact', 'authors'))
    report[method] = {v: {m: r['all'] for m, r in compare(tf_out, ours, s, v).items()}
                      for v in variants}
  np.savez_compressed(a.out, **rec)
  print(json.dumps(report, indent=1))
  print(a.out, os.path.getsize(a.out), 'bytes')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='cmd', required=True)
  m = sub.add_parser('measure')
  m.add_argument('--authors', required=True, help='checkout of github.com/haebeom-lee/metadrop')
  m.add_argument('--data-path', default='data/omniglot', help='Omniglot folder (docs/data.md)')
  m.add_argument('--method', default='metadrop', choices=('metadrop', 'maml'))
  m.add_argument('--weights', default='init')
  m.add_argument('--train-steps', type=int, default=0,
                 help='>0: first train that many meta-steps with our trainer (cpu config)')
  m.add_argument('--way', type=int, default=5)
  m.add_argument('--query', type=int, default=5)
  m.add_argument('--channels', type=int, default=32)
  m.add_argument('--inner-lr', type=float, default=0.4)
  m.add_argument('--inner-steps', type=int, default=5)
  m.add_argument('--tasks', type=int, default=4)
  m.add_argument('--seed', type=int, default=123, help='episode key')
  m.add_argument('--noise-seed', type=int, default=7)
  m.add_argument('--variants', default='mapfn_layers,loop_layers,mapfn_cfv2_layers')
  m.add_argument('--out', default='')
  r = sub.add_parser('record-tiny')
  r.add_argument('--authors', required=True)
  r.add_argument('--data-path', default='data/omniglot')
  r.add_argument('--seed', type=int, default=0)
  r.add_argument('--out', default='tests/data/authors_gradient_tiny.npz')
  a = p.parse_args()
  {'measure': cmd_measure, 'record-tiny': cmd_record_tiny}[a.cmd](a)


if __name__ == '__main__':
  main()
