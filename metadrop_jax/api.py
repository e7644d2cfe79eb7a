"""The documented public API in one namespace (see the package docstring and README, "API")."""

from metadrop_jax.config import base_config, meta_lr, validate, ConfigError, METHODS
from metadrop_jax.data import load_split, image_shape
from metadrop_jax.episodes import Episode, sample_batch, sample_batch_host, sample_episode
from metadrop_jax.meta import (TrainState, batch_loss, create_state, init_params, inner_adapt,
                               make_eval_step, make_optimizer, make_train_step, support_loss,
                               task_accuracy, task_loss)
from metadrop_jax.meta import spec_from_config as meta_spec
from metadrop_jax.metrics import ci95, summarize
from metadrop_jax.nets import NetSpec, forward, forward_features
from metadrop_jax.nets import spec_from_config as net_spec
from metadrop_jax.evaluation import evaluate, evaluate_checkpoint
from metadrop_jax.train import train, train_and_evaluate


def get_config(path: str):
  """Loads ``get_config()`` from a config file path (as launch.py's --config does)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('_metadrop_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()
