"""Decision-boundary export (the authors' ``main.py --mode export`` + ``model.py::export``).

For a meta-trained model, 2-way sub-tasks are built from meta-test classes ``(c, c + offset)``
(``c = 0 .. num_tasks - 1``, offset 5 as the authors did). The head is restricted to the first two
output columns of the dense layer (``theta['dense']['w'][:, :2]``, ``['b'][:2]``), so any model
trained with ``way >= 2`` works. The 2-way task is then adapted with the model's own inner loop
(``inner_steps`` SGD steps of the MC support loss, ``mc_samples`` samples, the same support loss
as meta-testing). At every inner step ``k = 0 .. K`` (before the first update up to after the last
one) we record, as the authors did:

* the last-layer features ``feats['feat']`` of the training (support) points, deterministic path;
* the features of ``num_perturb`` noise-perturbed copies of the training points (``sample=True``,
  one forward pass of the whole support batch per copy, so batch norm sees the perturbed batch);
  methods without feature noise (MAML, Meta-SGD, adv, mixup) have no perturbed copies;
* the features of the test (query) points, deterministic path;
* the 2-way head ``w: [F, 2]``, ``b: [2]``, the logits and the test accuracy.

Every call of the network computes its own batch statistics (transductive batch norm), as in the
authors' ``forward_h``. The arrays go to one ``.npz`` (see :func:`save_npz`), from which
:mod:`metadrop_jax.visualize` draws the 2-D view (projection on ``w0 - w1`` and a 1-D t-SNE of
the orthogonal remainder, the boundary where ``(w0 - w1)·f + (b0 - b1) = 0``).

  python -m metadrop_jax.export --workdir=workdirs/omni1_metadrop --out=/tmp/db/metadrop.npz \\
      --plot_dir=/tmp/db/metadrop_png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metadrop_jax import meta
from metadrop_jax import methods
from metadrop_jax import nets


# ------------------------------------------------------------------------------------------------
# loading a trained model
# ------------------------------------------------------------------------------------------------

def load_workdir(workdir: str, data_path: str | None = None, cache_dir: str | None = None):
  """``(config, params, step)`` of the latest checkpoint in ``workdir`` (config from config.json).

  ``data_path`` / ``cache_dir`` override where the data lives (e.g. a workdir copied from
  another machine).
  """
  from metadrop_jax import train
  config = train.load_run_config(workdir)
  if data_path:
    config.data.path = data_path
  if cache_dir:
    config.data.cache_dir = cache_dir
  config, state = train.restore_workdir(workdir, config)
  return config, state.params, int(state.step)


def load_images(config, split: str = 'test') -> np.ndarray:
  from metadrop_jax import train
  return train.require_split(config, split)


# ------------------------------------------------------------------------------------------------
# sub-tasks
# ------------------------------------------------------------------------------------------------

def two_way_tasks(images: np.ndarray, shot: int, query: int, num_tasks: int = 10,
                  class_offset: int = 5, seed: int = 0):
  """The authors' 2-way sub-tasks: classes ``(c, c + class_offset)`` for ``c < num_tasks``.

  Instances: a permutation of each class's images from ``default_rng([seed, class])``; the
  first ``shot`` are training points, the next ``query`` test points. Labels class-major
  (``[0]*shot + [1]*shot``). Returns ``(classes i32[T, 2], xs f32[T, 2S, H, W, C],
  ys i32[2S], xq f32[T, 2Q, H, W, C], yq i32[2Q])`` with pixels in [0, 1].
  """
  n_cls, n_img = images.shape[:2]
  if n_cls <= class_offset:
    raise ValueError(f'the split has {n_cls} classes; class_offset={class_offset} needs more '
                     '(lower --class_offset)')
  usable = n_cls - class_offset
  if num_tasks > usable:
    warnings.warn(f'only {usable} sub-tasks (c, c+{class_offset}) fit in {n_cls} classes; '
                  f'exporting {usable} instead of {num_tasks}')
    num_tasks = usable
  if shot + query > n_img:
    raise ValueError(f'{n_img} images per class < shot + query = {shot + query} '
                     '(lower --query)')
  classes, xs, xq = [], [], []
  for c in range(num_tasks):
    pair = (c, c + class_offset)
    sx, qx = [], []
    for cls in pair:
      perm = np.random.default_rng([seed, cls]).permutation(n_img)
      sx.append(images[cls, perm[:shot]])
      qx.append(images[cls, perm[shot:shot + query]])
    classes.append(pair)
    xs.append(np.concatenate(sx))
    xq.append(np.concatenate(qx))
  to_f = lambda a: np.stack(a).astype(np.float32) / 255.0
  ys = np.repeat(np.arange(2, dtype=np.int32), shot)
  yq = np.repeat(np.arange(2, dtype=np.int32), query)
  return np.asarray(classes, np.int32), to_f(xs), ys, to_f(xq), yq


# ------------------------------------------------------------------------------------------------
# the export itself
# ------------------------------------------------------------------------------------------------

def two_way_params(params: dict) -> dict:
  """``params`` with the dense head (and a Meta-SGD step size on it) cut to columns 0 and 1."""
  def cut(tree):
    d = tree['dense']
    return {**tree, 'dense': {'w': d['w'][:, :2], 'b': d['b'][:2]}}
  out = {**params, 'theta': cut(params['theta'])}
  if 'lr' in params:
    out['lr'] = cut(params['lr'])
  return out


def two_way_spec(config, mc_samples: int | None = None) -> meta.MetaSpec:
  spec = meta.spec_from_config(config, mc_samples=mc_samples)
  return dataclasses.replace(spec, net=dataclasses.replace(spec.net, way=2))


def compiler_options(fast_compile: bool | None = None) -> dict | None:
  """XLA options of the export / feature functions. ``fast_compile`` (default: on the CPU
  backend) lowers the LLVM optimisation level: these functions run a handful of times, and on
  CPU their compile time (x3-6 shorter) dominates (Omniglot-sized export of 10 tasks: about the
  same total time; tiny models: several times faster)."""
  if fast_compile is None:
    fast_compile = jax.default_backend() == 'cpu'
  return {'xla_backend_optimization_level': 0} if fast_compile else None


@functools.lru_cache(maxsize=16)
def make_export_fn(spec: meta.MetaSpec, num_perturb: int, fast_compile: bool | None = None):
  """Jitted ``(params2, xs, ys, xq, yq, key) -> dict of per-step arrays`` for one 2-way task.

  ``params2`` is already cut to the 2-way head (:func:`two_way_params`). The inner loop is
  :func:`meta.support_loss` with step ``k``'s noise from ``fold_in(key, k)`` exactly as
  :func:`meta.inner_adapt`; perturbed copies use ``fold_in(fold_in(key, 10**6), k)``. The steps
  run in a ``lax.scan`` (one compiled body whatever ``inner_steps``).
  """
  net = spec.net
  perturb = num_perturb if spec.row.feature_noise else 0
  copy_key_root = 10 ** 6

  def record(params, theta, xs, xq, yq, key, k):
    p = {**params, 'theta': theta}
    lt, ft = nets.forward_features(p, xs, None, net, sample=False)
    lq, fq = nets.forward_features(p, xq, None, net, sample=False)
    rec = {'feat_train': ft['feat'], 'feat_test': fq['feat'], 'logits_train': lt,
           'logits_test': lq, 'acc_test': meta.accuracy(lq, yq), 'w': theta['dense']['w'],
           'b': theta['dense']['b']}
    if perturb:
      keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, copy_key_root), k),
                              perturb)
      rec['feat_perturbed'] = jax.vmap(
          lambda kk: nets.forward_features(p, xs, kk, net, sample=True)[1]['feat'])(keys)
    else:
      rec['feat_perturbed'] = jnp.zeros((0,) + ft['feat'].shape, ft['feat'].dtype)
    return rec

  def run(params, xs, ys, xq, yq, key):
    lr = params.get('lr', spec.inner_lr)

    def body(theta, k):
      rec = record(params, theta, xs, xq, yq, key, k)
      loss, g = jax.value_and_grad(meta.support_loss)(
          theta, params, xs, ys, jax.random.fold_in(key, k), spec)
      if isinstance(lr, dict):
        theta = jax.tree.map(lambda t, a, gi: t - a * gi, theta, lr, g)
      else:
        theta = jax.tree.map(lambda t, gi: t - lr * gi, theta, g)
      return theta, (rec, loss)

    theta, (recs, losses) = jax.lax.scan(body, params['theta'], jnp.arange(spec.inner_steps))
    last = record(params, theta, xs, xq, yq, key, spec.inner_steps)
    out = jax.tree.map(lambda r, l: jnp.concatenate([r, l[None]]), recs, last)
    out['support_loss'] = losses
    return out

  return jax.jit(run, compiler_options=compiler_options(fast_compile))


def export_decision_boundaries(params: dict, config, images: np.ndarray, *, num_tasks: int = 10,
                               class_offset: int = 5, num_perturb: int = 10,
                               mc_samples: int | None = None, shot: int | None = None,
                               query: int | None = None, seed: int = 0,
                               step: int | None = None,
                               fast_compile: bool | None = None) -> dict[str, Any]:
  """Runs the export on ``images`` (a split ``u8[classes, images, H, W, C]``).

  Returns a dict of numpy arrays (``T`` tasks, ``K`` inner steps, ``F`` features, ``P`` copies)::

    feat_train f32[T, K+1, 2S, F]   feat_perturbed f32[T, K+1, P, 2S, F] (P = 0 without noise)
    feat_test  f32[T, K+1, 2Q, F]   w f32[T, K+1, F, 2]   b f32[T, K+1, 2]
    logits_train, logits_test, acc_test f32[T, K+1], support_loss f32[T, K]
    y_train i32[2S]  y_test i32[2Q]  classes i32[T, 2]
  plus 0-d metadata: method, name, dataset, way, shot, query, inner_steps, inner_lr,
  mc_samples, num_perturb, class_offset, seed, checkpoint_step.
  ``fast_compile``: see :func:`compiler_options`.
  """
  if config.way < 2:
    raise ValueError(f'way={config.way}: the export needs a model trained with way >= 2')
  shot = config.shot if shot is None else shot
  query = config.query if query is None else query
  mc = config.eval.mc_samples if mc_samples is None else mc_samples
  spec = two_way_spec(config, mc_samples=mc)
  classes, xs, ys, xq, yq = two_way_tasks(images, shot, query, num_tasks, class_offset, seed)
  fn = make_export_fn(spec, num_perturb, fast_compile)
  p2 = two_way_params(params)
  root = jax.random.fold_in(jax.random.PRNGKey(seed), 4242)
  outs = []
  for t in range(len(classes)):
    outs.append(jax.device_get(fn(p2, jnp.asarray(xs[t]), jnp.asarray(ys), jnp.asarray(xq[t]),
                                  jnp.asarray(yq), jax.random.fold_in(root, t))))
  arrays = {k: np.stack([np.asarray(o[k]) for o in outs]) for k in outs[0]}
  arrays.update(
      y_train=ys, y_test=yq, classes=classes,
      method=np.asarray(config.method), name=np.asarray(config.name),
      dataset=np.asarray(config.data.name), way=np.asarray(config.way),
      shot=np.asarray(shot), query=np.asarray(query),
      inner_steps=np.asarray(spec.inner_steps), inner_lr=np.asarray(spec.inner_lr),
      mc_samples=np.asarray(mc), num_perturb=np.asarray(arrays['feat_perturbed'].shape[2]),
      class_offset=np.asarray(class_offset), seed=np.asarray(seed),
      checkpoint_step=np.asarray(-1 if step is None else step))
  return arrays


def export_workdir(workdir: str, *, split: str = 'test', data_path: str | None = None,
                   cache_dir: str | None = None, **kwargs) -> dict[str, Any]:
  """:func:`export_decision_boundaries` for the latest checkpoint of a training workdir."""
  config, params, step = load_workdir(workdir, data_path, cache_dir)
  return export_decision_boundaries(params, config, load_images(config, split), step=step,
                                    **kwargs)


def save_npz(path: str, arrays: dict[str, Any]) -> str:
  """Writes ``arrays`` to ``path`` (compressed, atomically). Load with ``np.load(path)``."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, f'.{os.path.basename(path)}.tmp.{os.getpid()}.npz')
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)
  return path


def load_npz(path: str) -> dict[str, Any]:
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _parser():
  p = argparse.ArgumentParser(
      prog='python -m metadrop_jax.export',
      description='Export the decision-boundary arrays of 2-way sub-tasks (classes c, c+offset '
                  'of the meta-test split) at every inner step to an .npz, and optionally plot '
                  'one PNG per sub-task and step.')
  p.add_argument('--workdir', required=True, help='training workdir (config.json + checkpoints)')
  p.add_argument('--out', required=True, help='output .npz path')
  p.add_argument('--plot_dir', default='', help='if set, write task{t}_step{k}.png here')
  p.add_argument('--split', default='test', choices=['test', 'val', 'train'])
  p.add_argument('--num_tasks', type=int, default=10, help='sub-tasks (c, c+offset), c < this')
  p.add_argument('--class_offset', type=int, default=5)
  p.add_argument('--num_perturb', type=int, default=10, help='noise draws per training point')
  p.add_argument('--mc_samples', type=int, default=0,
                 help='MC samples of the inner loss (0: the config\'s eval.mc_samples)')
  p.add_argument('--shot', type=int, default=0, help='training points per class (0: config)')
  p.add_argument('--query', type=int, default=0, help='test points per class (0: config)')
  p.add_argument('--seed', type=int, default=0, help='instances, noise and t-SNE seed')
  p.add_argument('--data_path', default='', help='override config.data.path')
  p.add_argument('--cache_dir', default='', help='override config.data.cache_dir')
  p.add_argument('--fast_compile', default='auto', choices=['auto', 'true', 'false'],
                 help='lower XLA optimisation (auto: on CPU), see compiler_options()')
  p.add_argument('--label', default='', help='plot title prefix (default: method name)')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  arrays = export_workdir(
      args.workdir, split=args.split, data_path=args.data_path or None,
      cache_dir=args.cache_dir or None, num_tasks=args.num_tasks,
      class_offset=args.class_offset, num_perturb=args.num_perturb,
      mc_samples=args.mc_samples or None, shot=args.shot or None, query=args.query or None,
      seed=args.seed, fast_compile={'auto': None, 'true': True, 'false': False}[args.fast_compile])
  save_npz(args.out, arrays)
  print(f'wrote {args.out}: {arrays["feat_train"].shape[0]} sub-tasks x '
        f'{arrays["feat_train"].shape[1]} inner steps; test accuracy per step (mean over tasks): '
        + ' '.join(f'{a:.3f}' for a in arrays['acc_test'].mean(0)))
  if args.plot_dir:
    from metadrop_jax import visualize
    paths = visualize.plot_all_boundaries(arrays, args.plot_dir, label=args.label or None,
                                          seed=args.seed)
    print(f'wrote {len(paths)} PNGs to {args.plot_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
