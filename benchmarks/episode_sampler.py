"""Episodes per second: the on-device sampler (inside jit) against the host (numpy) sampler.

  python benchmarks/episode_sampler.py [--iters 50] [--out sampler.json]

For each paper setting it draws meta-batches of 4 episodes from a split array of the real shape
(random uint8: what an episode costs does not depend on the pixels) and reports
episodes/s of (a) ``episodes.sample_batch`` jitted with the split resident on the device and (b)
``episodes.sample_batch_host`` plus the transfer to the device, and their ratio, measured in the
same run. (Absolute numbers depend on the machine's load; the ratio is the result.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metadrop_jax import episodes

SETTINGS = {  # name: (split shape, way, shot, query)
    'omniglot_20way1shot': ((4800, 20, 28, 28, 1), 20, 1, 15),
    'omniglot_20way5shot': ((4800, 20, 28, 28, 1), 20, 5, 15),
    'mimgnet_5way1shot': ((64, 600, 84, 84, 3), 5, 1, 15),
    'mimgnet_5way5shot': ((64, 600, 84, 84, 3), 5, 5, 15),
}


def measure(shape, way, shot, query, tasks, iters):
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  dev_images = jax.device_put(images)
  f = jax.jit(lambda k, im: episodes.sample_batch(k, im, tasks, way, shot, query))
  jax.block_until_ready(f(jax.random.PRNGKey(0), dev_images))
  t = time.perf_counter()
  for i in range(iters):
    out = f(jax.random.PRNGKey(i), dev_images)
  jax.block_until_ready(out)
  dev = iters * tasks / (time.perf_counter() - t)
  t = time.perf_counter()
  for i in range(iters):
    out = jax.device_put(episodes.sample_batch_host(0, i, images, tasks, way, shot, query))
  jax.block_until_ready(out)
  host = iters * tasks / (time.perf_counter() - t)
  return {'device_eps_per_s': dev, 'host_eps_per_s': host, 'device_over_host': dev / host}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--iters', type=int, default=50, help='meta-batches timed per sampler')
  p.add_argument('--tasks', type=int, default=4, help='episodes per meta-batch')
  p.add_argument('--settings', default=','.join(SETTINGS), help='comma-separated subset')
  p.add_argument('--out', default='', help='write the rows as JSON here')
  a = p.parse_args()
  rows = []
  print(f'device: {jax.devices()[0]}')
  print(f"{'setting':22s} {'device ep/s':>12s} {'host ep/s':>10s} {'device/host':>12s}")
  for name in a.settings.split(','):
    shape, way, shot, query = SETTINGS[name]
    r = {'setting': name, **measure(shape, way, shot, query, a.tasks, a.iters)}
    rows.append(r)
    print(f"{name:22s} {r['device_eps_per_s']:12.0f} {r['host_eps_per_s']:10.0f} "
          f"{r['device_over_host']:12.2f}", flush=True)
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
