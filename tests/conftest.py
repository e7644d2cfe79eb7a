"""Test settings: hypothesis profiles and tiny configs."""

import atexit
import os
import shutil
import tempfile

import hypothesis
import pytest

# One persistent XLA compilation cache for the whole suite and the processes its tests start
# (launch.py, notebooks, the SLURM tasks inherit the environment): many tests build the same tiny
# programs, and a cached executable computes exactly what a fresh compilation does. A test that
# sets its own JAX_COMPILATION_CACHE_DIR keeps it; METADROP_TEST_JAX_CACHE=0 turns this off.
if os.environ.get('METADROP_TEST_JAX_CACHE', '1') != '0':
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):   # a folder of this run's, removed at exit
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='metadrop_jax_cache_')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                    int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))

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
