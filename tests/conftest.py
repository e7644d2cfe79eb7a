"""Test settings: hypothesis profiles and tiny configs."""

import os

import hypothesis
import pytest

hypothesis.settings.register_profile('ci', max_examples=8, deadline=None, derandomize=True,
                                     print_blob=True)
hypothesis.settings.register_profile('dev', max_examples=40, deadline=None)
hypothesis.settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


def tiny(method='metadrop', **over):
  """A config small enough to compile in seconds: 8x8 synthetic images, 2 blocks of 4 channels."""
  from configs import tiny as tiny_cfg
  c = tiny_cfg.get_config()
  from metadrop_jax import config as config_lib
  c.method = method
  c.progress_bar = False
  return config_lib.override(c, over)


@pytest.fixture
def tiny_config():
  return tiny()


def kernel_available(name='python3') -> bool:
  """Whether a Jupyter kernel of this name is installed (the notebook tests execute in one)."""
  try:
    from jupyter_client.kernelspec import KernelSpecManager
    KernelSpecManager().get_kernel_spec(name)
    return True
  except Exception:  # pylint: disable=broad-except
    return False
