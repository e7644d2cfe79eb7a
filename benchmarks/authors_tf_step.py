"""The authors' meta-training iteration, timed: their TF graph at one setting, in this process.

Runs under TensorFlow 2.x with tf_keras (``tf.compat.v1`` graph mode) from a checkout of
github.com/haebeom-lee/metadrop that you provide (nothing of theirs is in this repository);
imports nothing from metadrop_jax. ``benchmarks/meta_step.py --authors-tf=PYTHON,REPO`` runs it
beside our step in the same run and prints the ratio.

  python benchmarks/authors_tf_step.py AUTHORS_REPO --dataset=omniglot --way=20 --shot=1 \\
      --query=15 --metabatch=4 --n_steps=5 --inner_lr=0.1 --meta_lr=3e-4 [--maml] --iters=5

What is timed is their ``main.py``'s training iteration minus the episode generation:
``sess.run([meta_train_op, net_cent, net_acc_mean])`` with their model (``MetaDropout``,
``get_loss_multiple(True)``: ``tf.map_fn`` over the tasks), their Adam train op with gradient
clipping to [-3, 3] (``layers.get_train_op``), their noise sampling, TF's default
thread pools; one fixed random episode is fed (uniform pixels in [0, 1), one-hot
labels), as their data loader would feed one. ``tf.contrib.layers.batch_norm`` (gone in TF 2)
is the core fused layer it dispatched to (``authors_gradient/tf_graph.py``). Prints one line
``RESULT {json}`` (seconds per iteration: median of ``--iters`` after ``--warmup``).
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'authors_gradient'))


def measure(repo, a):
  import tf_graph   # TensorFlow loads here, not for --help (sets up tf.compat.v1 graph mode)
  tf = tf_graph.tf
  their_model = tf_graph.import_authors(repo, fed_noise=False)
  import layers as their_layers   # noqa: E402  the module their model imported (already loaded)
  tf.disable_control_flow_v2()     # their TF 1.12 graph: v1 control flow
  tf_graph.BN['kind'] = 'layers'
  t0 = time.perf_counter()
  with tf.Graph().as_default():
    model = their_model.MetaDropout(a)
    epi = model.episodes
    net = model.get_loss_multiple(True)
    var_list = ([v for v in net['weights'] if 'phi' not in v.name] if a.maml
                else net['weights'])
    optim = tf.train.AdamOptimizer(tf.convert_to_tensor(a.meta_lr))
    train_op = their_layers.get_train_op(optim, net['cent'], clip=[-3., 3.],
                                         global_step=tf.train.get_or_create_global_step(),
                                         var_list=var_list)
    to_run = [train_op, net['cent'], tf.reduce_mean(net['acc'])]
    config = tf.ConfigProto()
    sess = tf.Session(config=config)
    sess.run(tf.global_variables_initializer())
    rng = np.random.default_rng(0)
    d = model.xdim * model.xdim * model.input_channel

    def episode(n_per_class):
      x = rng.random((a.metabatch, a.way * n_per_class, d), dtype=np.float32)
      y = np.tile(np.repeat(np.eye(a.way, dtype=np.float32), n_per_class, axis=0),
                  (a.metabatch, 1, 1))
      return x, y

    xtr, ytr = episode(a.shot)
    xte, yte = episode(a.query)
    fd = {epi['xtr']: xtr, epi['ytr']: ytr, epi['xte']: xte, epi['yte']: yte}
    t1 = time.perf_counter()
    times, loss = [], float('nan')
    for i in range(a.warmup + a.iters):
      s = time.perf_counter()
      _, loss, _ = sess.run(to_run, feed_dict=fd)
      if i >= a.warmup:
        times.append(time.perf_counter() - s)
      elif i == 0:
        first = time.perf_counter() - s
  return {'tf': tf_graph.tf2.__version__, 'cpu_count': os.cpu_count(), 'host': platform.node(),
          'graph_build_s': t1 - t0, 'first_iter_s': first, 'iters': a.iters, 'warmup': a.warmup,
          's_per_iter': float(np.median(times)), 's_per_iter_min': float(np.min(times)),
          's_per_iter_max': float(np.max(times)), 'final_loss': float(loss),
          'settings': {k: v for k, v in vars(a).items() if k != 'repo'}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('repo', help='a checkout of github.com/haebeom-lee/metadrop')
  p.add_argument('--dataset', choices=['omniglot', 'mimgnet'], required=True)
  p.add_argument('--way', type=int, required=True)
  p.add_argument('--shot', type=int, required=True)
  p.add_argument('--query', type=int, required=True)
  p.add_argument('--metabatch', type=int, required=True)
  p.add_argument('--n_steps', type=int, required=True)
  p.add_argument('--inner_lr', type=float, required=True)
  p.add_argument('--meta_lr', type=float, required=True)
  p.add_argument('--maml', action='store_true')
  p.add_argument('--iters', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  a = p.parse_args(argv)
  a.n_test_mc_samp = 1
  if not os.path.isfile(os.path.join(a.repo, 'model.py')):
    p.error(f'{a.repo} holds no model.py: give a checkout of github.com/haebeom-lee/metadrop')
  if a.iters < 1 or a.warmup < 1:
    p.error('--iters and --warmup must be >= 1')
  print('RESULT ' + json.dumps(measure(a.repo, a)), flush=True)


if __name__ == '__main__':
  main()
