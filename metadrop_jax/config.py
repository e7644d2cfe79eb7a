"""Configuration: the one place where every field, its default and its check live.

Experiment files in ``configs/`` call :func:`base_config` and override a few fields; the
trainer calls :func:`validate` once, before anything is built. The one value that depends on
the method, the meta learning rate, is read through :func:`meta_lr` (the authors set it per
method and setting: :data:`AUTHORS_META_LR`).
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from metadrop_jax.methods import METHODS  # noqa: F401  (every method: one row of that table)

DATASETS = ('omniglot', 'miniimagenet', 'synthetic')
CONV_IMPLS = ('auto', 'xla', 'im2col', 'pallas')
TASK_MAPS = ('auto', 'vmap', 'map')
INNER_LOOPS = ('unroll', 'scan')
POOL_IMPLS = ('auto', 'reduce_window', 'select')
BN_IMPLS = ('two_pass', 'one_pass')       # nets.BN_IMPLS
DOT_ALGORITHMS = ('default', 'bf16_x3', 'bf16_x6', 'tf32_x3')   # nets.DOT_ALGORITHMS
# How the meta-gradient treats the inner loop (README, "Which meta-gradient"):
#   'exact'       second order through the unrolled inner loop: the method as the paper states it;
#   'authors'     what the authors' TF code computes: every batch norm's backward pass acts as a
#                 constant to the outer gradient (docs/authors_gradient.md), else second order;
#   'first_order' the inner gradients are constants (first-order MAML).
META_GRADIENTS = ('exact', 'authors', 'first_order')
OMNIGLOT_SPLITS = ('vinyals', 'lake')   # data.omniglot.OMNIGLOT_SPLITS

# The authors' meta learning rates (Adam), per setting (dataset, way, shot) and method: their
# final run scripts (github.com/haebeom-lee/metadrop, runfiles/*.sh, commit 41a97e7; Omniglot
# 20-way 1-shot Meta-dropout changed from 1e-3 to 3e-4 in that last commit). docs/paper.md.
AUTHORS_META_LR = {
    ('omniglot', 20, 1): {'metadrop': 3e-4, 'maml': 1e-3},
    ('omniglot', 20, 5): {'metadrop': 1e-3, 'maml': 1e-3},
    ('miniimagenet', 5, 1): {'metadrop': 1e-4, 'maml': 1e-4},
    ('miniimagenet', 5, 5): {'metadrop': 1e-4, 'maml': 1e-4},
}
DEFAULT_META_LR = 1e-3   # every other method and setting (MAML's Omniglot value)


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default. Paper configs override a handful of them."""
  c = ml_collections.ConfigDict()
  c.name = 'custom'               # experiment name (results tables group runs by it)
  c.seed = 0                      # root of every random number of a run (init, episodes, noise)
  c.method = 'metadrop'           # one of METHODS

  # ---- data -----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic'       # one of DATASETS
  c.data.source = 'auto'          # omniglot: 'tfds' | 'local'; miniimagenet: 'local' | 'npy' |
                                  # 'ilsvrc'; 'auto' picks from data.path (see metadrop_jax.data)
  c.data.path = ''                # where the user's copy lives (zip, folder or .npy directory)
  c.data.ilsvrc_path = ''         # miniimagenet 'ilsvrc' source: the ILSVRC-2012 train folder
  c.data.cache_dir = '~/.cache/metadrop_jax'  # prepared uint8 arrays + manifests
  c.data.val_classes = 0          # omniglot: characters held out of the meta-train side for
                                  # validation (lake split: whole alphabets, at least this many)
  c.data.omniglot_split = 'vinyals'  # one of OMNIGLOT_SPLITS: 'vinyals' (1200 / 423 characters
                                  # of both archives, the paper's) | 'lake' (meta-train on the 30
                                  # images_background alphabets, test on the 20 of
                                  # images_evaluation); metadrop_jax/data/omniglot.py
  # synthetic data (tests, smoke runs): classes are random prototypes plus pixel noise
  c.data.num_classes = {'train': 24, 'val': 8, 'test': 8}
  c.data.images_per_class = 10
  c.data.image_size = 8
  c.data.channels = 1
  c.data.synthetic_noise = 0.3
  c.data.sampler = 'device'       # 'device': episodes drawn inside the jitted step; 'host': numpy
  c.data.shared_classes = False   # True: the tasks of a training meta-batch share task 0's class
                                  # set (the authors' final code; independent classes otherwise)

  # ---- episodes -------------------------------------------------------------------------------
  c.way = 5
  c.shot = 1
  c.query = 15                    # query examples per class

  # ---- network --------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.channels = 32           # conv channels (64 Omniglot, 32 miniImageNet)
  c.model.num_layers = 4          # conv blocks
  c.model.bn_eps = 1e-3           # TF's batch_norm default
  c.model.bn_impl = 'two_pass'    # batch-norm statistics: 'two_pass' (mean, then variance) |
                                  # 'one_pass' (shifted sums in one read; nets.batch_moments)
  # 'auto' fields (conv_impl, pool_impl, task_map) are resolved when a run is created and the
  # values recorded in its config.json (meta.resolve_auto; a resumed run keeps them)
  c.model.conv_impl = 'auto'      # 'xla' (lax.conv) | 'im2col' (patches @ kernel) | 'pallas'
                                  # (one kernel, no patches in memory; float32 at 3xTF32 on a
                                  # GPU: metadrop_jax/kernels/conv3x3.py) | 'auto' (im2col:
                                  # nets.resolve_conv_impl)
  c.model.fuse_noise_conv = True  # compute theta and phi convs of a block as one conv
  c.model.pool_impl = 'auto'      # 2x2 max-pool: 'reduce_window' | 'select' (no scatter in its
                                  # derivative; the same numbers) | 'auto' (nets.resolve_pool_impl)
  c.model.dot_algorithm = 'default'  # im2col GEMMs: 'default' (jax_default_matmul_precision) |
                                  # 'bf16_x3' | 'bf16_x6' | 'tf32_x3' (GPU: multi-pass tensor-core
                                  # products; accuracy: tools/long_runs/gpu_check)
  c.model.compute_dtype = 'float32'  # 'float32' | 'bfloat16' (params stay float32)
  # execution strategy only (same numbers up to float32 rounding; docs/performance.md):
  c.model.task_map = 'auto'       # tasks of a meta-batch: 'vmap' | 'map' (lax.map) | 'auto'
  c.model.inner_loop = 'unroll'   # inner SGD steps: 'unroll' (python loop) | 'scan' (lax.scan)

  # ---- inner loop -----------------------------------------------------------------------------
  c.inner_steps = 5
  c.inner_lr = 0.01
  c.train_mc_samples = 1          # MC samples of the perturbed support loss in meta-training
  c.meta_gradient = 'exact'       # one of META_GRADIENTS

  # ---- outer loop -----------------------------------------------------------------------------
  c.meta_batch = 4                # tasks per meta-iteration
  c.meta_lr = config_dict.placeholder(float)  # None: the authors' value for this setting and
                                  # method, else DEFAULT_META_LR (see meta_lr()); a number: every
                                  # method uses it
  c.grad_clip = 3.0               # element-wise clip of the meta-gradient, then Adam
  c.num_steps = 60000             # meta-iterations

  # ---- comparison-method knobs (ignored by metadrop / maml; docs/methods.md) --------------------
  c.methods = ml_collections.ConfigDict()
  c.methods.fixed_noise_mean = 1.0     # fixed_noise: features * softplus(mean + eps)
  c.methods.vib_beta = 1e-3            # vib / infodrop: weight of the KL term in the inner loss
  c.methods.infodrop_max_alpha = 0.7   # infodrop: upper bound of the log-normal scale
  c.methods.mixup_alpha = 2.0          # mixup: Beta(alpha, alpha) mixing coefficient
  c.methods.metasgd_init_lr = -1.0     # metasgd: initial per-parameter step (<0: inner_lr)
  c.methods.adv_norm = 'linf'          # adv: 'l1' | 'l2' | 'linf'
  c.methods.adv_eps = 0.02             # adv: training radius
  c.methods.adv_steps = 5              # adv: PGD steps on the query set during training
  c.methods.adv_step_size = -1.0       # adv: PGD step as a fraction of eps (<0: 2.5 / adv_steps)
  c.methods.adv_restarts = 1           # adv: random starts; the worst per example is kept
                                       # (metadrop_jax/attacks.py)

  # ---- evaluation -----------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 0                 # test episodes depend on this only, so all methods see the same
  c.eval.num_episodes = 1000      # meta-test episodes (paper: 1000)
  c.eval.mc_samples = 30          # MC samples of the inner loss at meta-test (paper: 30)
  c.eval.batch_tasks = 10         # episodes evaluated per compiled call
  c.eval.val_episodes = 200       # validation episodes per periodic validation
  c.eval.val_mc_samples = 1       # MC samples during periodic validation (cheap)

  # ---- loop -----------------------------------------------------------------------------------
  c.log_every = 100
  c.val_every = 1000              # 0 disables periodic validation
  c.checkpoint_every = 1000
  c.keep_checkpoints = 2
  c.max_steps_per_run = 0         # >0: stop (checkpointed) after this many steps of this process
  c.max_minutes_per_run = 0.0     # >0: stop (checkpointed) after this wall time
  c.progress_bar = True
  return c


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted fields in place (``{'model.channels': 8}``), as ``--config.model.channels=8``.

  An unknown field raises a KeyError naming it (as the locked ``--config`` flag refuses one),
  instead of adding a field nothing reads; a value the field's type refuses, a TypeError saying
  which type it takes.
  """
  for k, v in overrides.items():
    node = config
    *path, leaf = k.split('.')
    for i, p in enumerate(path + [leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise KeyError(f'{k}: the config has no field {".".join(path[:i] + [p])!r}')
      if i < len(path):
        node = node[p]
    try:
      node[leaf] = v
    except (TypeError, ValueError) as e:
      old = node[leaf]
      raise TypeError(f'{k}={v!r}: the field takes {type(old).__name__} values (default '
                      f'{old!r})') from e
  return config


def meta_lr(config: ml_collections.ConfigDict) -> float:
  """The meta learning rate: ``config.meta_lr`` if set, else the authors' value for this setting
  and method (:data:`AUTHORS_META_LR`), else :data:`DEFAULT_META_LR`.

  Resolved when it is read, so ``--config.method=maml`` on a paper config gives the authors'
  MAML rate, and ``--config.meta_lr=x`` sets it for every method.
  """
  if config.meta_lr is not None:
    return config.meta_lr
  setting = (config.data.name, config.way, config.shot)
  return AUTHORS_META_LR.get(setting, {}).get(config.method, DEFAULT_META_LR)


class ConfigError(ValueError):
  """A config that cannot run. The message says which field and how to fix it."""


# jax.random.PRNGKey(seed) keeps the low 32 bits of a Python int (x64 off): -1 and 2**32 - 1 give the
# same key, as do 99999999999 and 1215752191. Seeds are therefore refused outside [0, 2**31 - 1]
# (non-negative int32: one key per seed, with or without jax_enable_x64, and valid for numpy).
SEED_MAX = 2**31 - 1


def _leaves(node, prefix=''):
  """(dotted name, value) of every leaf field of a ConfigDict (dicts are walked too)."""
  items = node.items() if hasattr(node, 'items') else []
  for k, v in items:
    name = f'{prefix}{k}'
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      yield from _leaves(v, name + '.')
    else:
      yield name, v


def _is_real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field once; raises ConfigError naming the field and the fix. Returns config."""
  errors = []

  def need(cond, msg):
    if not cond:
      errors.append(msg)

  # Every number must be finite: nan slips through every ``x >= 0`` check below as False, but
  # inf passes them (inner_lr=inf trains on nan), and nan noise makes synthetic images all zero.
  non_finite = [(k, v) for k, v in _leaves(config) if isinstance(v, float) and not math.isfinite(v)]
  for k, v in non_finite:
    errors.append(f'{k}={v!r}: must be a finite number (set --config.{k}=<number>)')
  if non_finite:   # the range checks below would only repeat these fields
    raise ConfigError('invalid config: ' + '; '.join(errors))
  for f in ('seed', 'eval.seed'):
    v = config.eval.seed if f == 'eval.seed' else config.seed
    need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SEED_MAX,
         f'{f}={v!r}: must be an integer in [0, {SEED_MAX}] (jax.random.PRNGKey keeps 32 bits, '
         'so negative or larger seeds can repeat another seed\'s run)')
  need(config.method in METHODS, f'method={config.method!r}: choose one of {tuple(METHODS)}')
  need(config.data.name in DATASETS, f'data.name={config.data.name!r}: choose one of {DATASETS}')
  need(config.data.omniglot_split in OMNIGLOT_SPLITS,
       f'data.omniglot_split={config.data.omniglot_split!r}: choose one of {OMNIGLOT_SPLITS}')
  need(config.data.omniglot_split == 'vinyals' or config.data.name == 'omniglot',
       f'data.omniglot_split={config.data.omniglot_split!r} applies to Omniglot only: leave it '
       f"'vinyals' for data.name={config.data.name!r}")
  need(config.data.sampler in ('device', 'host'),
       f"data.sampler={config.data.sampler!r}: choose 'device' or 'host'")
  for f in ('way', 'shot', 'query', 'meta_batch', 'num_steps', 'train_mc_samples'):
    need(isinstance(config[f], int) and config[f] >= 1, f'{f}={config[f]!r}: must be an integer >= 1')
  need(config.way >= 2, f'way={config.way}: a classification task needs at least 2 classes')
  need(isinstance(config.inner_steps, int) and config.inner_steps >= 0,
       f'inner_steps={config.inner_steps!r}: must be an integer >= 0')
  need(_is_real(config.inner_lr) and config.inner_lr >= 0,
       f'inner_lr={config.inner_lr!r}: must be a number >= 0')
  if config.method in METHODS or config.meta_lr is not None:
    lr = meta_lr(config)
    need(_is_real(lr) and lr > 0, f'meta_lr={lr!r}: must be > 0 (set --config.meta_lr)')
  need(config.grad_clip > 0, f'grad_clip={config.grad_clip}: must be > 0')
  need(config.model.num_layers >= 1, f'model.num_layers={config.model.num_layers}: must be >= 1')
  need(config.model.channels >= 1, f'model.channels={config.model.channels}: must be >= 1')
  need(config.model.conv_impl in CONV_IMPLS,
       f'model.conv_impl={config.model.conv_impl!r}: choose one of {CONV_IMPLS}')
  need(config.model.pool_impl in POOL_IMPLS,
       f'model.pool_impl={config.model.pool_impl!r}: choose one of {POOL_IMPLS}')
  need(config.model.dot_algorithm in DOT_ALGORITHMS,
       f'model.dot_algorithm={config.model.dot_algorithm!r}: choose one of {DOT_ALGORITHMS}')
  need(config.model.dot_algorithm == 'default' or config.model.conv_impl in ('im2col', 'auto'),
       f"model.dot_algorithm={config.model.dot_algorithm!r} applies to the im2col GEMMs: set "
       "model.conv_impl='im2col' too")
  need(config.model.conv_impl != 'pallas' or config.model.compute_dtype == 'float32',
       "model.conv_impl='pallas' computes float32 only: set model.compute_dtype='float32' or "
       "model.conv_impl='im2col'")
  need(config.model.task_map in TASK_MAPS,
       f'model.task_map={config.model.task_map!r}: choose one of {TASK_MAPS}')
  need(config.model.inner_loop in INNER_LOOPS,
       f'model.inner_loop={config.model.inner_loop!r}: choose one of {INNER_LOOPS}')
  need(config.model.compute_dtype in ('float32', 'bfloat16'),
       f"model.compute_dtype={config.model.compute_dtype!r}: choose 'float32' or 'bfloat16'")
  need(config.meta_gradient in META_GRADIENTS,
       f'meta_gradient={config.meta_gradient!r}: choose one of {META_GRADIENTS}')
  need(config.model.bn_eps > 0, f'model.bn_eps={config.model.bn_eps}: must be > 0')
  need(config.model.bn_impl in BN_IMPLS,
       f'model.bn_impl={config.model.bn_impl!r}: choose one of {BN_IMPLS}')
  ev = config.eval
  for f in ('num_episodes', 'mc_samples', 'batch_tasks', 'val_episodes', 'val_mc_samples'):
    need(isinstance(ev[f], int) and ev[f] >= 1, f'eval.{f}={ev[f]!r}: must be an integer >= 1')
  for f in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    need(isinstance(config[f], int) and config[f] >= 1, f'{f}={config[f]!r}: must be an integer >= 1')
  need(isinstance(config.val_every, int) and config.val_every >= 0,
       f'val_every={config.val_every!r}: must be an integer >= 0 (0 disables validation)')
  need(config.max_steps_per_run >= 0, 'max_steps_per_run: must be >= 0 (0 = no limit)')
  need(config.max_minutes_per_run >= 0, 'max_minutes_per_run: must be >= 0 (0 = no limit)')
  m = config.methods
  need(m.adv_norm in ('l1', 'l2', 'linf'), f"methods.adv_norm={m.adv_norm!r}: 'l1', 'l2' or 'linf'")
  need(m.adv_eps >= 0, f'methods.adv_eps={m.adv_eps}: must be >= 0 (0 trains clean)')
  need(isinstance(m.adv_steps, int) and m.adv_steps >= 1,
       f'methods.adv_steps={m.adv_steps!r}: must be an integer >= 1')
  need(isinstance(m.adv_restarts, int) and m.adv_restarts >= 1,
       f'methods.adv_restarts={m.adv_restarts!r}: must be an integer >= 1')
  need(m.adv_step_size != 0, 'methods.adv_step_size=0: PGD would not move; use <0 for the '
       'default 2.5 / adv_steps or a positive fraction of eps')
  need(m.mixup_alpha > 0, 'methods.mixup_alpha must be > 0')
  need(0 < m.infodrop_max_alpha, 'methods.infodrop_max_alpha must be > 0')
  if config.data.name == 'synthetic':
    d = config.data
    for split in ('train', 'val', 'test'):
      n = d.num_classes.get(split, 0)
      need(n >= config.way, f'data.num_classes.{split}={n}: synthetic split needs >= way={config.way} classes')
    need(_is_real(d.synthetic_noise) and d.synthetic_noise >= 0,
         f'data.synthetic_noise={d.synthetic_noise!r}: must be a number >= 0 (pixel noise std)')
    for f in ('images_per_class', 'image_size', 'channels'):
      need(isinstance(d[f], int) and d[f] >= 1, f'data.{f}={d[f]!r}: must be an integer >= 1')
    need(d.images_per_class >= config.shot + config.query,
         f'data.images_per_class={d.images_per_class}: needs >= shot+query={config.shot + config.query}')
    need(d.image_size >= 2 ** config.model.num_layers,
         f'data.image_size={d.image_size}: {config.model.num_layers} max-pools need >= '
         f'{2 ** config.model.num_layers} pixels (lower model.num_layers or raise image_size)')
  if errors:
    raise ConfigError('invalid config: ' + '; '.join(errors))
  return config
