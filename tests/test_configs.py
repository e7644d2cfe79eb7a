"""Every config loads, validates, and gives each method its authors' meta learning rate."""

import glob
import importlib
import os

import pytest

from metadrop_jax import config as config_lib

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob('configs/*.py')
               if not os.path.basename(p).startswith(('_', 'common')))


@pytest.mark.parametrize('name', NAMES)
def test_config_loads_and_validates(name):
  c = importlib.import_module(f'configs.{name}').get_config()
  config_lib.validate(c)
  for m in ('metadrop', 'maml'):
    c.method = m
    config_lib.validate(c)
  assert c.name == name or name == 'tiny' or c.name.startswith(name)


def test_paper_hyperparameters():
  get = lambda n: importlib.import_module(f'configs.{n}').get_config()
  o1, o5, m1, m5 = (get(n) for n in ('omniglot_20way1shot', 'omniglot_20way5shot',
                                     'mimgnet_5way1shot', 'mimgnet_5way5shot'))
  assert (o1.way, o1.shot, o1.query, o1.inner_lr, o1.model.channels) == (20, 1, 15, 0.1, 64)
  assert (o5.way, o5.shot, o5.inner_lr) == (20, 5, 0.4)
  assert (m1.way, m1.shot, m1.inner_lr, m1.model.channels) == (5, 1, 0.01, 32)
  assert (m5.way, m5.shot) == (5, 5)
  for c in (o1, o5, m1, m5):
    assert (c.inner_steps, c.meta_batch, c.num_steps, c.grad_clip) == (5, 4, 60000, 3.0)
    assert (c.eval.num_episodes, c.eval.mc_samples, c.train_mc_samples) == (1000, 30, 1)
  # Omniglot 1-shot: the two methods have different meta learning rates (paper_facts §4.3)
  assert config_lib.resolved(o1, 'meta_lr') == 3e-4
  o1.method = 'maml'
  assert config_lib.resolved(o1, 'meta_lr') == 1e-3
  o1.meta_lr = 5e-4
  assert config_lib.resolved(o1, 'meta_lr') == 5e-4
  assert config_lib.resolved(m1, 'meta_lr') == 1e-4


@pytest.mark.parametrize('field,value,needle', [
    ('method', 'dropout', 'method='),
    ('way', 1, 'way=1'),
    ('inner_steps', -1, 'inner_steps'),
    ('model.conv_impl', 'cudnn', 'conv_impl'),
    ('eval.num_episodes', 0, 'eval.num_episodes'),
    ('data.images_per_class', 2, 'images_per_class'),
])
def test_validate_names_the_bad_field(field, value, needle):
  from configs import tiny
  c = config_lib.override(tiny.get_config(), {field: value})
  with pytest.raises(config_lib.ConfigError, match=needle.replace('.', r'\.')):
    config_lib.validate(c)


def test_locked_config_rejects_unknown_field():
  from configs import tiny
  c = tiny.get_config()
  c.lock()
  with pytest.raises(AttributeError):
    c.inner_stpes = 3
