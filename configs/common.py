"""Shared settings of the four paper configs (authors' final run scripts, paper_facts §4.3)."""

from metadrop_jax import config as config_lib


def paper_config(dataset: str, way: int, shot: int):
  c = config_lib.base_config()
  c.data.name = dataset
  c.way, c.shot, c.query = way, shot, 15
  c.model.channels = 64 if dataset == 'omniglot' else 32
  c.model.num_layers = 4
  c.inner_steps = 5
  c.train_mc_samples = 1
  c.meta_batch = 4
  c.num_steps = 60000
  c.eval.num_episodes = 1000
  c.eval.mc_samples = 30
  c.log_every = 100
  c.val_every = 1000
  c.checkpoint_every = 1000
  if dataset == 'omniglot':
    # Paper-faithful: all 1200 training characters are used for meta-training, so Omniglot has
    # no validation split by default (set --config.data.val_classes=100 to monitor one).
    c.data.val_classes = 0
  return c
