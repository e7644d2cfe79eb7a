"""Meta-learning: inner-loop adaptation, the per-task meta-loss, the vmapped batch loss, the
outer optimiser and the jitted train / evaluation steps. Pure functions of
``(params, episodes, key)``; the config is static (bound when the step is built).

Inner loop (authors' ``model.py``): ``theta_{k+1} = theta_k - alpha * grad_theta L_k`` with
``L_k = 1/S sum_s CE(f(x_s; theta_k, phi, eps_{k,s}), y_s)``, fresh noise at every step and MC
sample; only theta adapts (phi and the batch-norm offsets are meta-learned only). The meta-loss
is the query cross-entropy of ``f(x_q; theta_K, phi)`` without sampling, averaged over tasks.
Meta-gradients are exact (second order through the unrolled inner loop) unless
``meta_gradient`` is 'first_order' or 'authors' (config.META_GRADIENTS).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from metadrop_jax import config as config_lib
from metadrop_jax import episodes as episodes_lib
from metadrop_jax import keys as keys_lib
from metadrop_jax import methods
from metadrop_jax import nets

Params = Any


@dataclasses.dataclass(frozen=True)
class MetaSpec:
  """Static description of the meta-learner (network + inner loop + how tasks are mapped)."""
  net: nets.NetSpec
  inner_steps: int = 5
  inner_lr: float = 0.01
  mc_samples: int = 1
  task_map: str = 'vmap'        # tasks of a batch: 'vmap' | 'map' (lax.map, one at a time)
  inner_loop: str = 'unroll'    # inner SGD steps: 'unroll' (python loop) | 'scan' (lax.scan)
  meta_gradient: str = 'exact'   # config.META_GRADIENTS; 'authors' acts in nets.batch_norm
  kl_beta: float = 0.0          # vib / infodrop weight of the KL term in the support loss
  mixup_alpha: float = 2.0
  adv_norm: str = 'linf'
  adv_eps: float = 0.0
  adv_steps: int = 5
  adv_step_size: float | None = None  # fraction of adv_eps per PGD step; None: 2.5 / adv_steps
  adv_restarts: int = 1

  def __post_init__(self):
    # meta_gradient is the one source; the network's batch-norm backward follows it.
    bn = 'constant' if self.meta_gradient == 'authors' else 'exact'
    if self.net.bn_backward != bn:
      object.__setattr__(self, 'net', dataclasses.replace(self.net, bn_backward=bn))

  @property
  def method(self) -> str:
    return self.net.method

  @property
  def row(self) -> methods.Method:
    """What this spec's method does (its row of :data:`metadrop_jax.methods.METHODS`)."""
    return self.net.row

  @property
  def first_order(self) -> bool:
    return self.meta_gradient == 'first_order'


def resolve_task_map(impl: str, backend: str | None = None) -> str:
  """'auto' -> 'vmap' on every backend (measured, docs/performance.md: lax.map was slower on the
  CPU too)."""
  del backend
  return 'vmap' if impl == 'auto' else impl


# The execution fields whose 'auto' a run resolves once, when it is created, and records in its
# config.json, with the rule that resolves each (field, backend) -> value.
AUTO_FIELDS = {'model.conv_impl': nets.resolve_conv_impl,
               'model.pool_impl': nets.resolve_pool_impl,
               'model.task_map': resolve_task_map}


def resolve_auto(config, recorded: dict | None = None, backend: str | None = None):
  """A copy of ``config`` whose :data:`AUTO_FIELDS` hold concrete values where they say 'auto':
  the run's own (``recorded``: its config.json, flattened, as
  :func:`metadrop_jax.workdir.run_config` passes it) where there is one, else today's rule on
  ``backend`` (default: this process's). A value other than 'auto' is kept: an explicit choice
  wins over the record (these fields may change between sittings, workdir.LOOP_FIELDS)."""
  import jax
  backend = backend or jax.default_backend()
  out = config.copy_and_resolve_references()
  for field, rule in AUTO_FIELDS.items():
    section, name = field.split('.')
    if out[section][name] != 'auto':
      continue
    have = (recorded or {}).get(field, 'auto')
    out[section][name] = have if have != 'auto' else rule('auto', backend)
  return out


def spec_from_config(config, mc_samples: int | None = None,
                     image_shape: tuple[int, int, int] | None = None) -> MetaSpec:
  """The static spec of ``config``. ``image_shape`` (H, W, C) defaults to the data set's;
  ``mc_samples`` to the training value (evaluation passes its own)."""
  from metadrop_jax import data as data_lib
  m = config.methods
  if image_shape is None:
    image_shape = data_lib.image_shape(config.data)
  task_map = resolve_task_map(config.model.task_map)
  return MetaSpec(
      net=nets.spec_from_config(config, image_shape),
      inner_steps=config.inner_steps,
      inner_lr=config.inner_lr,
      mc_samples=config.train_mc_samples if mc_samples is None else mc_samples,
      task_map=task_map,
      inner_loop=config.model.inner_loop,
      meta_gradient=config.meta_gradient,
      kl_beta=m.vib_beta if methods.get(config.method).kl else 0.0,
      mixup_alpha=m.mixup_alpha,
      adv_norm=m.adv_norm, adv_eps=m.adv_eps, adv_steps=m.adv_steps,
      adv_step_size=m.adv_step_size if m.adv_step_size > 0 else None,
      adv_restarts=m.adv_restarts)


def init_params(key, spec: MetaSpec, metasgd_init_lr: float | None = None) -> Params:
  """Network params; Meta-SGD methods add ``lr``: one meta-learned step size per theta entry.

  Meta-SGD (Li et al. 2017): ``theta' = theta - lr * grad`` element-wise, with ``lr`` (same
  shapes as theta) meta-learned jointly with the initialisation (it sits in the trained
  params; the optimizer's clip + Adam apply to it as to theta). Li et al. initialise ``lr``
  uniformly in [0.005, 0.1]; we start from the constant ``metasgd_init_lr`` (default
  ``inner_lr``), so step 0 equals MAML. ``metasgd_metadrop`` adds meta-dropout's noise.
  """
  params = nets.init_params(key, spec.net)
  if spec.row.per_param_lr:
    lr0 = spec.inner_lr if metasgd_init_lr is None or metasgd_init_lr < 0 else metasgd_init_lr
    params['lr'] = jax.tree.map(lambda p: jnp.full_like(p, lr0), params['theta'])
  return params


def xent(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# inner loop
# ------------------------------------------------------------------------------------------------

def support_loss(theta, params, x, y, key, spec: MetaSpec):
  """MC estimate of the perturbed support loss ``1/S sum_s CE(f(x; theta, phi, eps_s), y)``.

  This is where every comparison method's perturbation / regularizer acts: on the support set,
  in every inner step, at meta-training and meta-test alike (it is part of the learning
  algorithm being meta-learned); the query set is always scored deterministically
  (``sample=False``). Per ``support`` kind of the method's row (:mod:`metadrop_jax.methods`,
  docs/methods.md, where the references are):

  * ``'noise'`` (metadrop, metasgd_metadrop, fixed/indep/additive noise, vib, infodrop): ``CE``
    of the noisy forward pass, averaged over ``mc_samples`` draws; where the row has ``kl``
    (vib / infodrop): ``CE + kl_beta * KL`` (the regularizer's objective, Alemi et al.
    2017 / Achille & Soatto 2018, with ``kl_beta = methods.vib_beta``), KL per example summed
    over the units of all blocks, averaged over the support batch;
  * ``'mixup'`` (manifold mixup, Verma et al. 2019): per MC draw, a layer ``k`` uniform in
    ``{0 (input), 1, ..., num_layers}``, ``lam ~ Beta(a, a)`` (``a = methods.mixup_alpha``) and a
    random permutation of the support batch; hidden states at ``k`` become
    ``lam h + (1 - lam) h[perm]`` and the loss ``lam CE(., y) + (1 - lam) CE(., y[perm])``;
  * ``'clean'`` (maml, metasgd, adv): plain ``CE`` (one deterministic pass; adv perturbs the
    *query* set in :func:`task_loss`, Goldblum et al. 2020's adversarial querying).
  """
  p = {**params, 'theta': theta}

  def one(k):
    if spec.row.support == 'mixup':
      k_layer, k_lam, k_perm = jax.random.split(k, 3)
      layer = jax.random.randint(k_layer, (), 0, spec.net.num_layers + 1)
      lam = jax.random.beta(k_lam, spec.mixup_alpha, spec.mixup_alpha)
      perm = jax.random.permutation(k_perm, x.shape[0])
      logits = nets.forward(p, x, None, spec.net, sample=False, mix=(layer, perm, lam))
      return lam * xent(logits, y) + (1.0 - lam) * xent(logits, y[perm])
    logits, feats = nets.forward_features(p, x, k, spec.net, sample=True)
    return xent(logits, y) + spec.kl_beta * feats['kl']

  if not spec.row.stochastic_support:
    return xent(nets.forward(p, x, None, spec.net, sample=False), y)
  if spec.mc_samples == 1:
    return one(key)
  return jnp.mean(jax.vmap(one)(jax.random.split(key, spec.mc_samples)))


def inner_adapt(params: Params, x, y, key, spec: MetaSpec):
  """K steps of SGD on theta from ``params['theta']``. Returns ``(theta_K, support_losses[K])``.

  ``key`` is folded with the step index, so step k's noise is ``fold_in(key, k)``.
  """
  theta = params['theta']
  lr = params.get('lr', spec.inner_lr)
  step = functools.partial(_inner_step, params=params, lr=lr, x=x, y=y, key=key, spec=spec)
  if spec.inner_loop == 'scan' and spec.inner_steps > 0:
    return jax.lax.scan(step, theta, jnp.arange(spec.inner_steps))
  losses = []
  for k in range(spec.inner_steps):
    theta, loss = step(theta, k)
    losses.append(loss)
  return theta, jnp.stack(losses) if losses else jnp.zeros((0,))


def _inner_step(theta, k, *, params, lr, x, y, key, spec: MetaSpec):
  """One SGD step on theta with the noise of ``fold_in(key, k)``; returns (theta, loss)."""
  loss, g = jax.value_and_grad(support_loss)(theta, params, x, y, jax.random.fold_in(key, k),
                                             spec)
  if spec.first_order:
    g = jax.lax.stop_gradient(g)
  if isinstance(lr, dict):   # Meta-SGD: one step size per parameter entry
    theta = jax.tree.map(lambda p, a, gi: p - a * gi, theta, lr, g)
  else:
    theta = jax.tree.map(lambda p, gi: p - lr * gi, theta, g)
  return theta, loss


# ------------------------------------------------------------------------------------------------
# meta-loss
# ------------------------------------------------------------------------------------------------

def task_loss(params: Params, ep: episodes_lib.Episode, key, spec: MetaSpec):
  """Query loss of one task after adaptation. Returns ``(loss, metrics)``."""
  theta, inner_losses = inner_adapt(params, ep.support_x, ep.support_y, key, spec)
  adapted = {**params, 'theta': theta}
  qx = ep.query_x
  if spec.row.query_attack and spec.adv_eps > 0:
    from metadrop_jax import attacks
    qx = jax.lax.stop_gradient(attacks.pgd(
        lambda xx: xent(nets.forward(adapted, xx, None, spec.net, sample=False), ep.query_y),
        qx, keys_lib.query_attack_key(key, spec.inner_steps), norm=spec.adv_norm, eps=spec.adv_eps,
        steps=spec.adv_steps, step_size=spec.adv_step_size, restarts=spec.adv_restarts))
  logits = nets.forward(adapted, qx, None, spec.net, sample=False)
  loss = xent(logits, ep.query_y)
  metrics = {'loss': loss, 'acc': accuracy(logits, ep.query_y)}
  if spec.inner_steps:
    metrics['inner_loss_first'] = inner_losses[0]
    metrics['inner_loss_last'] = inner_losses[-1]
  return loss, metrics


def batch_loss(params: Params, eps: episodes_lib.Episode, keys, spec: MetaSpec):
  """Mean query loss over the task axis (vmapped, or ``lax.map``: one task at a time, when
  ``spec.task_map == 'map'``); metrics averaged over tasks."""
  if spec.task_map == 'map':
    losses, metrics = jax.lax.map(lambda a: task_loss(params, a[0], a[1], spec), (eps, keys))
  else:
    losses, metrics = jax.vmap(task_loss, in_axes=(None, 0, 0, None))(params, eps, keys, spec)
  return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


# ------------------------------------------------------------------------------------------------
# outer loop
# ------------------------------------------------------------------------------------------------

class TrainState(NamedTuple):
  step: jax.Array        # i32[]
  params: Params
  opt_state: Any


def param_labels(params: Params, method: str):
  """'train' for meta-learned subtrees, 'freeze' for phi where the method has no noise net."""
  uses_phi = methods.get(method).uses_phi
  return {k: jax.tree.map(lambda _: 'train' if (k != 'phi' or uses_phi) else 'freeze', v)
          for k, v in params.items()}


def make_optimizer(params: Params, method: str, meta_lr: float, clip: float):
  """Element-wise clip to [-clip, clip], then Adam; phi frozen (exactly) for noise-free methods."""
  train = optax.chain(optax.clip(clip), optax.adam(meta_lr))
  return optax.multi_transform({'train': train, 'freeze': optax.set_to_zero()},
                               param_labels(params, method))


def create_state(key, config) -> tuple[TrainState, optax.GradientTransformation]:
  spec = spec_from_config(config)
  params = init_params(key, spec, config.methods.metasgd_init_lr)
  tx = make_optimizer(params, config.method, config_lib.meta_lr(config), config.grad_clip)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), tx


def train_step(state: TrainState, eps: episodes_lib.Episode, train_key, *, spec: MetaSpec,
               tx: optax.GradientTransformation):
  """One meta-update on a batch of episodes; task noise keys from :func:`keys.step_keys`."""
  _, noise_key = keys_lib.step_keys(train_key, state.step)
  keys = keys_lib.task_keys(noise_key, eps.support_y.shape[0])
  (loss, metrics), grads = jax.value_and_grad(batch_loss, has_aux=True)(
      state.params, eps, keys, spec)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), metrics


def sample_train_episodes(images, train_key, step, config) -> episodes_lib.Episode:
  """The training episodes of ``step``: a pure function of (train key, step)."""
  episode_key, _ = keys_lib.step_keys(train_key, step)
  return episodes_lib.sample_batch(episode_key, images, config.meta_batch,
                                   config.way, config.shot, config.query,
                                   shared_classes=config.data.shared_classes)


def make_train_step(config, tx, sharding=None):
  """Jitted ``(state, images, train_key) -> (state, metrics)`` with on-device episode sampling.

  ``sharding``: optional NamedSharding whose first mesh axis splits the task axis across devices.
  """
  spec = spec_from_config(config)

  def step_fn(state, images, train_key):
    eps = sample_train_episodes(images, train_key, state.step, config)
    if sharding is not None:
      eps = jax.lax.with_sharding_constraint(eps, sharding)
    return train_step(state, eps, train_key, spec=spec, tx=tx)

  return jax.jit(step_fn, donate_argnums=(0,))


def make_train_step_on_episodes(config, tx):
  """Jitted ``(state, episodes, train_key) -> (state, metrics)`` for host-sampled episodes."""
  spec = spec_from_config(config)
  return jax.jit(functools.partial(train_step, spec=spec, tx=tx), donate_argnums=(0,))


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

def task_accuracy(params: Params, ep: episodes_lib.Episode, key, spec: MetaSpec):
  """Query accuracy and loss of one task after adaptation (no meta-gradient)."""
  theta, _ = inner_adapt(params, ep.support_x, ep.support_y, key, spec)
  logits = nets.forward({**params, 'theta': theta}, ep.query_x, None, spec.net, sample=False)
  return accuracy(logits, ep.query_y), xent(logits, ep.query_y)


def map_tasks(fn, spec: MetaSpec, *args):
  """``fn`` over the leading task axis of ``args``: vmapped, or ``lax.map`` where
  ``spec.task_map == 'map'``."""
  if spec.task_map == 'map':
    return jax.lax.map(lambda a: fn(*a), args)
  return jax.vmap(fn)(*args)


def eval_batch_fn(per_task, config, mc_samples: int, num_tasks: int):
  """The evaluation batch, un-jitted: ``(params, images, episode_key, noise_key) ->
  per_task(params, episode, task_key, spec)`` over ``num_tasks`` episodes drawn on device.

  The one place where evaluation episodes and their noise keys are made (meta-test, validation,
  the robustness evaluation's adaptation): ``episodes.sample_batch(episode_key, ...)`` and one
  noise key per task, ``keys.task_keys(noise_key, T)`` as in training; tasks mapped as ``config.model.task_map`` says.
  """
  spec = spec_from_config(config, mc_samples=mc_samples)

  def run(params, images, episode_key, noise_key):
    eps = episodes_lib.sample_batch(episode_key, images, num_tasks, config.way, config.shot,
                                    config.query)
    task_keys = keys_lib.task_keys(noise_key, num_tasks)    # as in training
    return map_tasks(lambda ep, k: per_task(params, ep, k, spec), spec, eps, task_keys)

  return run


def make_eval_step(config, mc_samples: int, num_tasks: int):
  """Jitted ``(params, images, episode_key, noise_key) -> (acc[T], loss[T])``: the query
  accuracy and loss of ``num_tasks`` evaluation episodes (:func:`eval_batch_fn`)."""
  return jax.jit(eval_batch_fn(task_accuracy, config, mc_samples, num_tasks))


# ------------------------------------------------------------------------------------------------
# compiled steps, shared by the calls of one process
# ------------------------------------------------------------------------------------------------

# A resumed run in a notebook or test, or evaluation after training, reuses the compiled step of
# an equivalent config instead of paying the compile twice. Fields that do not enter a compiled
# step are left out of the key.
_COMPILED: dict = {}
_NOT_COMPILED = ('max_steps_per_run', 'max_minutes_per_run', 'progress_bar', 'log_every',
                 'val_every', 'checkpoint_every', 'keep_checkpoints', 'num_steps', 'name',
                 'data.cache_dir', 'data.path', 'data.ilsvrc_path', 'data.source')


def compiled(kind: str, config, build, *extra):
  """``build()``, memoised on ``(kind, extra, the config's compiled fields)``."""
  flat = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  key = (kind, extra, tuple(sorted((k, repr(v)) for k, v in flat.items()
                                   if k not in _NOT_COMPILED)))
  if key not in _COMPILED:
    _COMPILED[key] = build()
  return _COMPILED[key]
