"""Test-only pacing (tests/test_slurm.py puts this folder on PYTHONPATH): with
METADROP_TEST_STEP_SECONDS=S set, every meta-training step of a metadrop_jax run waits S seconds
before it is dispatched. The computation and its results are unchanged; a tiny run then lasts at
least num_steps * S seconds on any machine, long enough to meet a SLURM time limit."""

import importlib.abc
import importlib.util
import os
import sys
import time

SECONDS = float(os.environ.get('METADROP_TEST_STEP_SECONDS') or 0)


def _pace(meta) -> None:
  compiled = meta.compiled

  def paced_compiled(kind, *args, **kwargs):
    fn = compiled(kind, *args, **kwargs)
    if not kind.startswith('train'):
      return fn

    def step(*a, **k):
      time.sleep(SECONDS)
      return fn(*a, **k)
    return step
  meta.compiled = paced_compiled


class _PaceOnImport(importlib.abc.MetaPathFinder):
  """Patches ``metadrop_jax.meta.compiled`` as the module is imported."""

  def find_spec(self, name, path=None, target=None):
    if name != 'metadrop_jax.meta':
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run_module = spec.loader.exec_module

    def exec_module(module):
      run_module(module)
      _pace(module)
    spec.loader.exec_module = exec_module
    return spec


if SECONDS > 0:
  sys.meta_path.insert(0, _PaceOnImport())
