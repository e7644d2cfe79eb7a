"""Every config loads, validates, and gives each method its authors' meta learning rate."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from metadrop_jax import config as config_lib

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob('configs/*.py')
               if not os.path.basename(p).startswith(('_', 'common')))


@pytest.mark.parametrize('name', NAMES)
def test_config_loads_and_validates(name):
  c = importlib.import_module(f'configs.{name}').get_config()
  config_lib.validate(c)
  for m in config_lib.METHODS:
    c.method = m
    config_lib.validate(c)
  assert c.name == name


def test_get_builds_a_config_by_name_with_overrides_in_order():
  """configs.get is the one way to build a config by name (campaign runs, benchmarks, the GPU
  check): the file's get_config(), dotted overrides applied in order, then validated."""
  import configs
  assert configs.names() == NAMES
  c = configs.get('omniglot_20way1shot', method='maml', **{'model.conv_impl': 'xla',
                                                             'meta_gradient': 'exact'})
  ref = importlib.import_module('configs.omniglot_20way1shot').get_config()
  ref.method, ref.model.conv_impl, ref.meta_gradient = 'maml', 'xla', 'exact'
  assert c.to_dict() == ref.to_dict()
  assert configs.get('tiny', **{'inner_steps': 1, 'model.num_layers': 1}).model.num_layers == 1
  with pytest.raises(ValueError, match="no config named 'omniglot'"):
    configs.get('omniglot')
  with pytest.raises(KeyError, match='model.chanels'):
    configs.get('tiny', **{'model.chanels': 3})
  with pytest.raises(config_lib.ConfigError):
    configs.get('tiny', inner_steps=-1)


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
  # the authors' meta learning rates (docs/paper.md): Omniglot 1-shot differs per method
  assert [config_lib.meta_lr(c) for c in (o1, o5, m1, m5)] == [3e-4, 1e-3, 1e-4, 1e-4]
  for c in (o1, o5, m1, m5):
    assert c.meta_lr is None     # one source: read per method, after any override
  o1.method = 'maml'
  assert config_lib.meta_lr(o1) == 1e-3
  o1.method = 'vib'              # the comparison methods: 1e-3
  assert config_lib.meta_lr(o1) == config_lib.DEFAULT_META_LR == 1e-3
  o1.meta_lr = 5e-4              # an explicit value holds for every method
  assert config_lib.meta_lr(o1) == 5e-4
  o1.method = 'metadrop'
  assert config_lib.meta_lr(o1) == 5e-4


def test_method_override_on_the_command_line_takes_the_methods_meta_lr():
  """--config.method=maml is applied after get_config(): the optimizer still gets MAML's rate."""
  import jax
  import numpy as np
  from metadrop_jax import meta
  for method, lr in (('metadrop', 3e-4), ('maml', 1e-3)):
    c = importlib.import_module('configs.omniglot_20way1shot').get_config()
    c.lock()
    config_lib.override(c, {'method': method, 'model.num_layers': 1, 'model.channels': 2})
    state, tx = meta.create_state(jax.random.PRNGKey(0), c)
    ones = jax.tree.map(np.ones_like, state.params)
    updates, _ = tx.update(ones, state.opt_state, state.params)   # Adam's first step: -lr
    np.testing.assert_allclose(updates['theta']['dense']['w'], -lr, rtol=1e-4)


@pytest.mark.parametrize('field,value,needle', [
    ('method', 'dropout', 'method='),
    ('way', 1, 'way=1'),
    ('inner_steps', -1, 'inner_steps'),
    ('model.conv_impl', 'cudnn', 'conv_impl'),
    ('eval.num_episodes', 0, 'eval.num_episodes'),
    ('data.images_per_class', 2, 'images_per_class'),
    ('data.omniglot_split', 'omniglot', 'data.omniglot_split'),
    ('data.omniglot_split', 'lake', 'applies to Omniglot only'),   # tiny is synthetic data
])
def test_validate_names_the_bad_field(field, value, needle):
  from configs import tiny
  c = config_lib.override(tiny.get_config(), {field: value})
  with pytest.raises(config_lib.ConfigError, match=needle.replace('.', r'\.')):
    config_lib.validate(c)


def test_launch_rejects_an_unknown_field():
  """launch.py's --config flag is locked: a misspelled override stops with a message naming it
  instead of adding a field nothing reads (before any data or model is touched)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, 'launch.py', '--config=configs/tiny.py',
                      '--config.inner_stpes=3', '--mode=prepare'], cwd=root, capture_output=True,
                     text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode != 0
  assert 'inner_stpes' in r.stderr


def test_override_rejects_an_unknown_field():
  from configs import tiny
  with pytest.raises(KeyError, match='inner_stpes'):
    config_lib.override(tiny.get_config(), {'inner_stpes': 3})
  with pytest.raises(KeyError, match='model.chanels'):
    config_lib.override(tiny.get_config(), {'model.chanels': 3})
  with pytest.raises(KeyError, match='modle'):
    config_lib.override(tiny.get_config(), {'modle.channels': 3})


def test_omniglot_splits_are_the_loaders():
  from metadrop_jax.data import omniglot
  assert config_lib.OMNIGLOT_SPLITS == omniglot.OMNIGLOT_SPLITS
  assert config_lib.base_config().data.omniglot_split == 'vinyals'
