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

  python -m metadrop_jax.cli.export --workdir=workdirs/omni1_metadrop --out=/tmp/db/metadrop.npz \\
      --plot_dir=/tmp/db/metadrop_png
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metadrop_jax import keys as keys_lib
from metadrop_jax import meta
from metadrop_jax import methods
from metadrop_jax import nets
from metadrop_jax import workdir as workdir_lib


# ------------------------------------------------------------------------------------------------
# loading a trained model
# ------------------------------------------------------------------------------------------------

def load_workdir(workdir: str, data_path: str | None = None, cache_dir: str | None = None):
  """``(config, params, step)`` of the latest checkpoint in ``workdir`` (config from config.json).

  ``data_path`` / ``cache_dir`` override where the data lives (e.g. a workdir copied from
  another machine).
  """
  config = workdir_lib.load_run_config(workdir)
  if data_path:
    config.data.path = data_path
  if cache_dir:
    config.data.cache_dir = cache_dir
  config, state = workdir_lib.restore(workdir, config)
  return config, state.params, int(state.step)


def load_images(config, split: str = 'test') -> np.ndarray:
  return workdir_lib.require_split(config, split)


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
  :func:`meta.inner_adapt`; perturbed copies use :func:`keys.export_copy_keys`. The steps
  run in a ``lax.scan`` (one compiled body whatever ``inner_steps``).
  """
  net = spec.net
  perturb = num_perturb if spec.row.feature_noise else 0

  def record(params, theta, xs, xq, yq, key, k):
    p = {**params, 'theta': theta}
    lt, ft = nets.forward_features(p, xs, None, net, sample=False)
    lq, fq = nets.forward_features(p, xq, None, net, sample=False)
    rec = {'feat_train': ft['feat'], 'feat_test': fq['feat'], 'logits_train': lt,
           'logits_test': lq, 'acc_test': meta.accuracy(lq, yq), 'w': theta['dense']['w'],
           'b': theta['dense']['b']}
    if perturb:
      keys = keys_lib.export_copy_keys(key, k, perturb)
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
  root = keys_lib.export_key(seed)
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


# ------------------------------------------------------------------------------------------------
# stochastic features (drawn by visualize.plot_feature_grid / write_feature_gif)
# ------------------------------------------------------------------------------------------------

def stochastic_feature_maps(params: dict, config, images_batch: np.ndarray, *, index: int = 0,
                            num_draws: int = 5, layer: int = 0, seed: int = 0,
                            fast_compile: bool | None = None) -> dict:
  """Perturbed feature maps ``u{layer}`` of ``images_batch[index]`` under ``num_draws`` draws.

  ``images_batch``: f32 ``[B, H, W, C]`` in [0, 1] (e.g. a support set; deeper layers' inputs go
  through batch norm with this batch's statistics). Returns ``{'image': [H, W, C],
  'draws': [D, h, w, ch], 'mean': [h, w, ch], 'layer'}`` (``mean``: the deterministic path);
  meta-learned initial parameters, before any inner step. Noise from :func:`keys.feature_key`.
  """
  if not methods.get(config.method).feature_noise:
    raise ValueError(f'method {config.method!r} has no feature noise: every draw is the same '
                     '(use a model trained with one of '
                     f'{tuple(m for m, r in methods.METHODS.items() if r.feature_noise)})')
  spec = meta.spec_from_config(config).net
  if not 0 <= layer < spec.num_layers:
    raise ValueError(f'layer={layer}: the network has blocks 0..{spec.num_layers - 1}')
  x = jnp.asarray(images_batch, jnp.float32)
  name = f'u{layer}'

  @functools.partial(jax.jit, compiler_options=compiler_options(fast_compile))
  def run(params, key):
    det = nets.forward_features(params, x, None, spec, sample=False)[1][name][index]
    keys = jax.random.split(key, num_draws)
    draws = jax.vmap(lambda k: nets.forward_features(params, x, k, spec, sample=True)[1][name]
                     [index])(keys)
    return det, draws

  det, draws = jax.device_get(run(params, keys_lib.feature_key(seed)))
  return {'image': np.asarray(images_batch[index]), 'draws': np.asarray(draws),
          'mean': np.asarray(det), 'layer': layer}


def stochastic_features_workdir(workdir: str, *, split: str = 'test', task_seed: int = 0,
                                index: int = 0, num_draws: int = 5, layer: int = 0,
                                data_path: str | None = None, cache_dir: str | None = None,
                                seed: int = 0) -> tuple[dict, Any]:
  """:func:`stochastic_feature_maps` of one training image of a ``way``-way support set drawn
  from ``split`` (classes and images from ``default_rng([task_seed, 99])``), for the latest
  checkpoint of a training workdir. Returns ``(maps, config)``."""
  config, params, _ = load_workdir(workdir, data_path, cache_dir)
  images = load_images(config, split)
  rng = np.random.default_rng([task_seed, 99])
  classes = rng.permutation(images.shape[0])[:config.way]
  inst = rng.integers(0, images.shape[1], size=len(classes))
  batch = images[classes, inst].astype(np.float32) / 255.0
  maps = stochastic_feature_maps(params, config, batch, index=index, num_draws=num_draws,
                                 layer=layer, seed=seed)
  return maps, config


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
