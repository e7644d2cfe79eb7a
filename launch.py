"""Meta-train and evaluate MAML / Meta-Dropout (and the paper's comparison methods).

  python launch.py --config=configs/mimgnet_5way1shot.py --workdir=workdirs/mimg1
  python launch.py --config=configs/omniglot_20way1shot.py --config.method=maml --workdir=...
  python launch.py --mode=eval --workdir=workdirs/mimg1          # paper protocol -> results.json

Modes: train_eval (default: train to num_steps, resuming if the workdir has a checkpoint, then
evaluate), train (stop after training), eval (meta-test the latest checkpoint), prepare (build
the data cache only). Every config field can be overridden: --config.<field>=<value>.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py). Fields override with --config.x=y.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, results.json '
                    '(default: workdirs/<config.name>_<config.method>).')
flags.DEFINE_enum('mode', 'train_eval', ['train_eval', 'train', 'eval', 'prepare'],
                  'What to run.')
flags.DEFINE_enum('split', 'test', ['test', 'val'], 'eval mode: which split to meta-test on.')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Keep TensorFlow (pulled in by TFDS only) off the accelerator.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  from metadrop_jax import config as config_lib
  from metadrop_jax import train

  config = FLAGS.config
  if config is None and FLAGS.workdir and FLAGS.mode == 'eval':
    config = train.load_run_config(FLAGS.workdir)
  if config is None:
    raise app.UsageError('--config is required (e.g. --config=configs/omniglot_20way1shot.py)')
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e))
  from metadrop_jax.data import DataError
  logging.info('devices: %s', jax.devices())

  workdir = FLAGS.workdir or os.path.join('workdirs', f'{config.name}_{config.method}')
  logging.info('workdir: %s', workdir)
  try:
    _run(config, workdir, train)
  except (DataError, config_lib.ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _run(config, workdir, train):
  if FLAGS.mode == 'prepare':
    from metadrop_jax import data as data_lib
    for split in data_lib.SPLITS:
      x = data_lib.load_split(config.data, split)
      print(f'{split}: {None if x is None else x.shape}')
    return
  if FLAGS.mode == 'eval':
    result = train.evaluate_checkpoint(config, workdir, split=FLAGS.split)
    print(json.dumps(result, indent=2))
    return
  if FLAGS.mode == 'train':
    status = train.train(config, workdir)
    status.pop('state')
  else:
    status = train.train_and_evaluate(config, workdir)
  print(json.dumps(status, indent=2, default=str))
  if not status['done']:
    print(f"paused at step {status['step']}/{status['num_steps']} ({status['stopped']}); "
          'run the same command again to continue.', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
