"""Why the authors' meta-gradient treats batch norm's backward pass as a constant
(docs/authors_gradient.md). TensorFlow 2.x only; nothing of the authors' code is used.

    python benchmarks/authors_gradient/mechanism.py

A two-task toy: per task, y = FusedBatchNorm(x * a) (training mode), L = sum(relu(y) * w),
g = dL/dx (the "inner gradient"), out = sum(g^2); then d(mean out)/da. That second derivative
runs through the gradient of FusedBatchNormGrad. Built three ways: a Python loop over tasks,
tf.map_fn with v1 control flow (what the authors' graph is under tf.compat.v1 with
disable_v2_behavior), tf.map_fn with control flow v2. For each, we log what TF's registered
second-derivative function of FusedBatchNormGrad returns (None = "no gradient", which
tf.gradients treats as zero), once with the current registration (a GradientTape over a
recomputation) and once with the TF 1.x registration's formulation (tf.gradients over the same
recomputation). Last, a probe shows what the v1 loop gradient does to the inputs of the
recomputation.
"""
import argparse
import os
import subprocess
import sys


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python benchmarks/authors_gradient/mechanism.py',
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  # one process per registration of the gradient (the registry is global): set by main itself
  p.add_argument('which', nargs='?', choices=('current', 'tf1_style', 'probe'),
                 help=argparse.SUPPRESS)
  return p.parse_args(argv)


if __name__ == '__main__':
  ARGS = _args()     # before TensorFlow loads: --help needs none of it

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import numpy as np  # noqa: E402
import tensorflow as tf2  # noqa: E402
from tensorflow.python.eager import backprop  # noqa: E402
from tensorflow.python.framework import ops  # noqa: E402
from tensorflow.python.ops import gradients_impl  # noqa: E402
from tensorflow.python.ops import nn_fused_batch_norm_grad as bn_grad  # noqa: E402

tf = tf2.compat.v1
tf.disable_v2_behavior()
CALLS = []
NAME = 'FusedBatchNormGradV3'


def logged(fn):
  def wrapped(op, *grad):
    r = fn(op, *grad)
    CALLS.append(['None' if v is None else 'tensor' for v in r[:3]])
    return r
  return wrapped


def tf1_style(op, *grad):
  """TF 1.x: the recomputation differentiated with tf.gradients, not a GradientTape."""
  gx, gs, go = bn_grad._BatchNormGrad(op.inputs[0], op.inputs[1], op.inputs[2], op.inputs[3],
                                      op.inputs[4], op.get_attr('epsilon'),
                                      op.get_attr('data_format'), op.get_attr('is_training'))
  r = gradients_impl.gradients([gx, gs, go], [op.inputs[0], op.inputs[1], op.inputs[2]],
                               list(grad[:3]))
  return (*r, None, None, None)


def probe(op, *grad):
  x = op.inputs[1]
  with backprop.GradientTape() as tape:
    tape.watch(x)
    y = x * 2.0
  print(f'  probe: recomputation input {y.op.inputs[0].name!r}, watched tensor {x.name!r}; '
        f'tape gradient is None: {tape.gradient(y, x) is None}')
  return ORIGINAL(op, *grad)


ORIGINAL = ops._gradient_registry._registry[NAME]['type']
rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)
W = rng.standard_normal((2, 3, 4, 4, 2)).astype(np.float32)


def second_derivative(structure):
  (tf.enable_control_flow_v2 if structure == 'map_fn, control flow v2'
   else tf.disable_control_flow_v2)()
  with tf.Graph().as_default():
    x, w = tf.constant(X), tf.constant(W)
    a = tf.Variable(np.float32([1.5, 0.7]))
    beta = tf.Variable(np.float32([0.1, -0.2]))

    def single(args):
      xi, wi = args
      y, _, _ = tf.nn.fused_batch_norm(xi * a, tf.ones([2]), beta, epsilon=1e-3,
                                       is_training=True)
      g = tf.gradients(tf.reduce_sum(tf.nn.relu(y) * wi), xi)[0]
      return tf.reduce_sum(g * g)

    if structure == 'python loop':
      out = tf.stack([single((x[t], w[t])) for t in range(2)])
    else:
      out = tf.map_fn(single, (x, w), dtype=tf.float32)
    da = tf.gradients(tf.reduce_mean(out), [a])[0]
    with tf.Session() as s:
      s.run(tf.global_variables_initializer())
      return s.run(da)


def main(which=None):
  if which is None:    # one process per registration (the registry is global)
    print('TensorFlow', tf2.__version__)
    for w in ('current', 'tf1_style', 'probe'):
      subprocess.run([sys.executable, __file__, w], check=True)
    return
  fn = {'current': ORIGINAL, 'tf1_style': tf1_style, 'probe': probe}[which]
  ops._gradient_registry._registry[NAME]['type'] = logged(fn)
  structures = (['map_fn, v1 control flow'] if which == 'probe' else
                ['python loop', 'map_fn, v1 control flow', 'map_fn, control flow v2'])
  print(f'grad of {NAME}: {which}')
  for st in structures:
    CALLS.clear()
    da = second_derivative(st)
    print(f'  {st:24s} d/da = {np.array2string(da, precision=5)}   '
          f'd(grad_y, x, scale) per call: {CALLS}')


if __name__ == '__main__':
  main(ARGS.which)
