"""CPU smoke config: synthetic data, 8x8 images, 2 conv blocks, 2 inner steps.

  python launch.py --config=configs/tiny.py --workdir=/tmp/metadrop_tiny

Runs in about a minute on a laptop CPU. Nothing here targets a paper number.
"""

from metadrop_jax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.name = 'tiny'
  c.data.name = 'synthetic'
  c.way, c.shot, c.query = 3, 1, 2
  c.model.channels = 4
  c.model.num_layers = 2
  c.inner_steps = 2
  c.inner_lr = 0.1
  c.meta_batch = 2
  c.num_steps = 20
  c.log_every = 5
  c.val_every = 10
  c.checkpoint_every = 10
  c.eval.num_episodes = 20
  c.eval.mc_samples = 3
  c.eval.batch_tasks = 5
  c.eval.val_episodes = 10
  return c
