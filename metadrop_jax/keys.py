"""Every random key of a run, derived in one place. Nothing random is carried or checkpointed.

Training (one run, ``config.seed``)::

    root  = PRNGKey(seed)
    init  = fold_in(root, INIT)                       # parameter initialisation
    train = fold_in(root, TRAIN)
    step s:  step = fold_in(train, s)
             episodes = fold_in(step, EPISODES)       # task t: fold_in(episodes, t)
             noise    = fold_in(step, NOISE)          # task t: fold_in(noise, t)

Evaluation (``config.eval.seed`` and the split only: every method and checkpoint meets the same
episodes)::

    root  = fold_in(PRNGKey(eval.seed), EVAL_SPLIT_OFFSET + SPLIT_IDS[split])
    episodes = fold_in(root, EPISODES), noise = fold_in(root, NOISE), attack = fold_in(root, ATTACK)
    batch i: fold_in(episodes, i), fold_in(noise, i)  # task t: fold_in(., t), as in training
                                                      # (task noise was split(., T) before)

Inside a task (:mod:`metadrop_jax.meta`): inner step ``k`` uses ``fold_in(task, k)`` and
adversarial querying ``fold_in(task, inner_steps)`` (:func:`query_attack_key`), the step after
the last inner step. The export and the stochastic-feature pictures have their own roots
(:func:`export_key`, :func:`feature_key`), so they never meet a training or evaluation key.

The constants keep the values the code has always used, so runs written before this module
existed reproduce bit for bit. Two evaluation keys changed with it: the robustness attack root
(:data:`ATTACK`), and the per-task adaptation noise of evaluation batches, which is now
``task_keys`` as in training (it was ``split(noise, T)``): meta-test numbers of a checkpoint move
within their confidence interval, the episodes are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INIT, TRAIN = 0, 1             # fold_in(root, .) of a run
EPISODES, NOISE = 0, 1         # fold_in(step key, .) in training; fold_in(eval root, .)
ATTACK = 2                     # fold_in(eval root, .): PGD starts of the robustness evaluation
                               # (was fold_in(episodes, 7919), the episode key of eval batch 7919)
EVAL_SPLIT_OFFSET = 1000       # eval root = fold_in(PRNGKey(eval.seed), 1000 + split id)
SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
EXPORT = 4242                  # decision-boundary export root: fold_in(PRNGKey(seed), 4242)
EXPORT_COPIES = 10 ** 6        # perturbed copies at inner step k: fold_in(fold_in(task, 10**6), k)
FEATURES = 777                 # stochastic-feature pictures: fold_in(PRNGKey(seed), 777)


def run_keys(config):
  """``(init key, train key)`` of a run: fixed by ``config.seed``."""
  root = jax.random.PRNGKey(config.seed)
  return jax.random.fold_in(root, INIT), jax.random.fold_in(root, TRAIN)


def step_keys(train_key, step):
  """``(episode key, noise key)`` of training step ``step`` (``step`` may be traced)."""
  step_key = jax.random.fold_in(train_key, step)
  return jax.random.fold_in(step_key, EPISODES), jax.random.fold_in(step_key, NOISE)


def task_keys(key, num_tasks: int):
  """``[fold_in(key, t) for t < num_tasks]`` as one array: the per-task keys of a batch."""
  return jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.arange(num_tasks))


def eval_keys(config, split: str):
  """``(episode key, noise key)`` for evaluating on ``split``: fixed by ``eval.seed`` and split."""
  root = _eval_root(config, split)
  return jax.random.fold_in(root, EPISODES), jax.random.fold_in(root, NOISE)


def eval_batch_keys(episode_key, noise_key, index: int):
  """``(episode key, noise key)`` of evaluation batch ``index``."""
  return jax.random.fold_in(episode_key, index), jax.random.fold_in(noise_key, index)


def attack_key(config, split: str = 'test'):
  """Root of the robustness attacks' random starts: fixed by ``eval.seed`` and split; apart from
  every episode and noise key of the evaluation."""
  return jax.random.fold_in(_eval_root(config, split), ATTACK)


def query_attack_key(task_key, inner_steps: int):
  """Adversarial querying's PGD key inside a task: the index after the last inner step."""
  return jax.random.fold_in(task_key, inner_steps)


def export_key(seed: int):
  return jax.random.fold_in(jax.random.PRNGKey(seed), EXPORT)


def export_copy_keys(task_key, step: int, num_copies: int):
  """Keys of the perturbed copies recorded at inner step ``step`` of an exported task."""
  return jax.random.split(jax.random.fold_in(jax.random.fold_in(task_key, EXPORT_COPIES), step),
                          num_copies)


def feature_key(seed: int):
  return jax.random.fold_in(jax.random.PRNGKey(seed), FEATURES)


def _eval_root(config, split):
  if split not in SPLIT_IDS:
    raise ValueError(f'split={split!r}: choose one of {tuple(SPLIT_IDS)}')
  return jax.random.fold_in(jax.random.PRNGKey(config.eval.seed),
                            EVAL_SPLIT_OFFSET + SPLIT_IDS[split])
