"""A train step with the task axis sharded over 4 (forced host) devices equals the 1-device step.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` so that the
main test process keeps its single CPU device.
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from metadrop_jax import meta, train
    from tests.conftest import tiny

    assert jax.device_count() == 4, jax.devices()
    method, task_map = sys.argv[1], sys.argv[2]
    config = tiny(method, meta_batch=4, **{'model.task_map': task_map})
    images = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (24, 10, 8, 8, 1), dtype=np.uint8))
    key = jax.random.key(7)
    sharding = train._task_sharding(config)
    assert sharding is not None and sharding.mesh.devices.size == 4
    out = {'resolved_task_map': meta.spec_from_config(config).task_map}
    for name, sh in (('single', None), ('sharded', sharding)):
      state, tx = meta.create_state(jax.random.key(0), config)
      step = meta.make_train_step(config, tx, sh)
      for _ in range(2):
        state, metrics = step(state, images, key)
      out[name] = {'params': [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
                   'loss': float(metrics['loss'])}
      if sh is not None:
        # the compiled step really splits the work: its HLO is partitioned 4 ways
        txt = step.lower(state, images, key).compile().as_text()
        out['partitioned'] = 'num_partitions=4' in txt
    print('RESULT ' + json.dumps(out))
""")


def _run(method, task_map):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  p = subprocess.run([sys.executable, '-c', _SCRIPT, method, task_map], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  lines = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
  assert p.returncode == 0 and lines, p.stderr[-3000:]
  return json.loads(lines[-1][len('RESULT '):])


def test_sharded_train_step_equals_single_device():
  import numpy as np
  out = _run('metadrop', 'auto')
  assert out['resolved_task_map'] == 'vmap'   # 'auto' never picks lax.map with >1 device
  assert out['partitioned']
  np.testing.assert_allclose(out['sharded']['loss'], out['single']['loss'], rtol=1e-5)
  for a, b in zip(out['sharded']['params'], out['single']['params']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
