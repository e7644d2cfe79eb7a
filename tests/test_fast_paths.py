"""Every execution strategy computes the reference meta-gradient.

Reference formulation: ``conv_impl='xla'`` (lax.conv_general_dilated), theta / phi convs
separate, python-unrolled inner loop, vmap over tasks. The fast paths (im2col convs, one fused
theta|phi matmul, lax.scan inner loop, lax.map over tasks, and the resolved defaults) must give
the same meta-loss and meta-gradients up to float32 rounding; bfloat16 compute stays within a
stated relative tolerance of float32. The Pallas conv (``conv_impl='pallas'``, interpret mode on
the CPU) is checked kernel by kernel too: values, batch-norm statistics, first and second
derivatives, vmap over tasks, and its Triton lowering for CUDA where this jaxlib can lower it.
"""

import functools
import pathlib
import re

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from metadrop_jax import episodes as episodes_lib
from metadrop_jax import meta
from metadrop_jax import nets
from metadrop_jax.kernels import conv3x3 as pallas_conv
from tests.conftest import tiny

REFERENCE = {'model.conv_impl': 'xla', 'model.pool_impl': 'reduce_window',
             'model.task_map': 'vmap', 'model.inner_loop': 'unroll',
             'model.fuse_noise_conv': False}
FAST_PATHS = {
    'im2col': {'model.conv_impl': 'im2col'},
    'fused': {'model.fuse_noise_conv': True},
    'scan': {'model.inner_loop': 'scan'},
    'map': {'model.task_map': 'map'},
    'select_pool': {'model.pool_impl': 'select'},
    'im2col_select_pool': {'model.conv_impl': 'im2col', 'model.pool_impl': 'select'},
    # interpret mode on the CPU: the kernels' code, float32 products of the 3xTF32 split parts
    'pallas': {'model.conv_impl': 'pallas'},
    'bn_one_pass': {'model.bn_impl': 'one_pass'},
    # XLA:CPU computes bf16_x3 as float32: this checks the plumbing; the GPU smoke test, accuracy
    'im2col_bf16_x3': {'model.conv_impl': 'im2col', 'model.dot_algorithm': 'bf16_x3'},
    'all': {'model.conv_impl': 'im2col', 'model.fuse_noise_conv': True,
            'model.inner_loop': 'scan', 'model.task_map': 'map'},
    'defaults': {'model.conv_impl': 'auto', 'model.pool_impl': 'auto',
                 'model.fuse_noise_conv': True, 'model.inner_loop': 'unroll',
                 'model.task_map': 'auto'},
}


def _config(method, variant, **extra):
  over = dict(REFERENCE)
  over.update(variant)
  over.update(extra)
  # 2 inner steps, 2 tasks, 10x10 images (odd sizes after the first pool) keep it small but real.
  over.setdefault('inner_steps', 2)
  over.setdefault('meta_batch', 2)
  over.setdefault('data.image_size', 10)
  return tiny(method, **over)


@functools.lru_cache(maxsize=None)
def _episodes(way, shot, query, size, tasks):
  images = jax.random.randint(jax.random.key(0), (8, 6, size, size, 1), 0, 256).astype(jnp.uint8)
  eps = episodes_lib.sample_batch(jax.random.key(1), images, tasks, way, shot, query)
  keys = jax.random.split(jax.random.key(2), tasks)
  return eps, keys


def _meta_grad(config):
  spec = meta.spec_from_config(config)
  params = meta.init_params(jax.random.key(3), spec)
  # Non-zero BN offsets and biases so that every term of the gradient is exercised.
  params = jax.tree.map(
      lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
  eps, keys = _episodes(config.way, config.shot, config.query, config.data.image_size,
                        config.meta_batch)
  fn = jax.jit(jax.value_and_grad(meta.batch_loss, has_aux=True), static_argnums=3)
  (loss, metrics), grads = fn(params, eps, keys, spec)
  return loss, metrics, grads


def _rel_l2(a, b):
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.lru_cache(maxsize=None)
def _reference(method):
  return _meta_grad(_config(method, {}))


# Interpret-mode Pallas kernels compile for about twice as long as the other paths: MAML's case
# (the kernel's batch-norm statistics, its second derivatives, vmap over tasks) runs in CI,
# Meta-dropout's (the fused theta|phi conv through the same kernels) with the slow tests.
# A path whose code does not depend on the method (the conv, pooling, batch-norm, task-map and
# dot-algorithm choices) runs in CI for Meta-dropout, whose features the noise perturbs, and for MAML
# with the slow tests; 'im2col_select_pool' is in 'defaults' (im2col, select pooling, fused) and
# Meta-SGD's inner update in 'scan', so those two cases run with the slow tests too.
METHOD_AGNOSTIC = ('im2col', 'select_pool', 'map', 'bn_one_pass', 'im2col_bf16_x3', 'defaults')
SLOW_CASES = ({('pallas', 'metadrop'), ('all', 'metasgd_metadrop')}
              | {(path, 'maml') for path in METHOD_AGNOSTIC}
              | {('im2col_select_pool', m) for m in ('metadrop', 'maml')})


@pytest.mark.parametrize('path,method', [
    pytest.param(path, method, marks=[pytest.mark.slow] if (path, method) in SLOW_CASES else [])
    for path in sorted(FAST_PATHS) for method in ('metadrop', 'maml', 'metasgd_metadrop')])
def test_fast_path_meta_gradient_matches_reference(method, path):
  if method == 'metasgd_metadrop' and path not in ('scan', 'all'):
    pytest.skip('Meta-SGD only changes the inner update (scan); the rest is method-agnostic')
  ref_loss, ref_metrics, ref_grads = _reference(method)
  loss, metrics, grads = _meta_grad(_config(method, FAST_PATHS[path]))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  gscale = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(ref_grads))
  for (path_k, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
    # atol relative to the largest gradient entry of the whole tree: conv biases in front of
    # batch norm have an exactly-zero gradient in theory (float noise ~1e-7 in practice).
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5 * gscale,
                               err_msg=f'{path}: {jax.tree_util.keystr(path_k)}')
  assert _rel_l2(grads, ref_grads) < 1e-4
  if method == 'maml':  # phi is never read by MAML: its gradient is exactly zero on every path
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads['phi']))


def test_defaults_resolve_per_backend():
  """Today's rules (a new run's): select pooling and im2col on every backend. A run's own
  record wins over them (tests/test_train.py: committed runs keep reduce_window)."""
  spec = meta.spec_from_config(tiny())
  assert spec.net.conv_impl == 'im2col' and spec.net.pool_impl == 'select'
  assert spec.task_map == 'vmap' and spec.inner_loop == 'unroll'
  for backend in ('cpu', 'gpu'):
    resolved = meta.resolve_auto(tiny(), backend=backend).model
    assert (resolved.conv_impl, resolved.pool_impl, resolved.task_map) == (
        'im2col', 'select', 'vmap')
  recorded = {'model.pool_impl': 'reduce_window', 'model.task_map': 'map'}
  resolved = meta.resolve_auto(tiny(**{'model.task_map': 'vmap'}), recorded).model
  assert (resolved.pool_impl, resolved.task_map) == ('reduce_window', 'vmap')  # explicit wins
  assert tiny().model.pool_impl == 'auto'            # the given config is left as it was
  assert nets.resolve_conv_impl('xla') == 'xla' and nets.resolve_pool_impl('select') == 'select'


def test_first_order_scan_matches_unroll():
  _, _, ref = _meta_grad(_config('metadrop', {}, meta_gradient='first_order'))
  _, _, got = _meta_grad(_config('metadrop', FAST_PATHS['all'], meta_gradient='first_order'))
  assert _rel_l2(got, ref) < 1e-5


# bfloat16 convolutions / matmuls (params and accumulation stay float32). Tolerances are the
# errors measured on this config with ~2x margin (docs/performance.md): first-order meta-gradients
# (no inner step) 3-4 % relative L2; through 2 inner steps metadrop 5.5 %, but MAML 54 % (its
# small second-order meta-gradient nearly cancels, so bf16 rounding dominates it). bf16 is
# therefore not a default anywhere.
BF16_REL_L2 = {('metadrop', 0): 0.1, ('maml', 0): 0.1, ('metadrop', 2): 0.15}


@pytest.mark.parametrize('method,steps', sorted(BF16_REL_L2))
def test_bfloat16_meta_gradient_close_to_float32(method, steps):
  fast = FAST_PATHS['defaults']
  loss32, _, g32 = _meta_grad(_config(method, fast, inner_steps=steps))
  loss16, _, g16 = _meta_grad(_config(method, fast, inner_steps=steps,
                                      **{'model.compute_dtype': 'bfloat16'}))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  np.testing.assert_allclose(loss16, loss32, rtol=1e-2)
  err = _rel_l2(g16, g32)
  assert err < BF16_REL_L2[method, steps], err


# ------------------------------------------------------------------------------------------------
# the Pallas conv, kernel by kernel (interpret mode on the CPU)
# ------------------------------------------------------------------------------------------------

# Small tiles on small maps: many row tiles (tile edges, the padding ring, the tail), two channel
# blocks when Cout > 16, and weight-gradient partial sums split over programs.
SMALL_TILES = pallas_conv.Tiles(block_m=16, block_n=16, wgrad_splits=3, interpret=True)


def _lax_conv(x, w, b):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO',
                                      'NHWC'), precision='highest') + b


def _conv_inputs(seed, b, h, w, cin, cout, offset=0.0):
  kx, kw, kb, kg = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(kx, (b, h, w, cin)), jax.random.normal(kw, (3, 3, cin, cout)),
          offset + jax.random.normal(kb, (cout,)), jax.random.normal(kg, (b, h, w, cout)))


@hypothesis.settings(max_examples=3)
@hypothesis.given(b=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
                  cin=st.integers(1, 5), cout=st.integers(1, 20), seed=st.integers(0, 2**16),
                  offset=st.sampled_from([0.0, 1000.0]))
def test_pallas_conv_value_statistics_and_weight_gradient(b, h, w, cin, cout, seed, offset):
  """The forward kernel equals lax.conv; its epilogue's mean and variance equal jnp's two-pass
  ones, also on outputs with a mean 1000x their spread (where E[y^2] - E[y]^2 would lose every
  digit in float32); the weight-gradient kernel equals lax.conv's."""
  x, wt, bias, g = _conv_inputs(seed, b, h, w, cin, cout, offset)

  @jax.jit
  def run(x, wt, bias, g):
    y, mean, var = pallas_conv._conv(x, wt, bias, True, SMALL_TILES)
    return y, mean, var, pallas_conv._wgrad(x, g, SMALL_TILES)
  y, mean, var, dw = run(x, wt, bias, g)
  ref = _lax_conv(x, wt, bias)
  spread = float(jnp.max(jnp.abs(ref - bias)))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * spread)
  np.testing.assert_allclose(mean, jnp.mean(ref, axis=(0, 1, 2)), rtol=1e-5, atol=1e-5 * spread)
  np.testing.assert_allclose(var, jnp.var(ref - bias, axis=(0, 1, 2)), rtol=1e-4,
                             atol=1e-6 * spread ** 2)
  ref_dw = jax.vjp(lambda v: _lax_conv(x, v, bias), wt)[1](g)[0]
  np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_dw))))


def _ref_conv_stats(x, w, b):
  y = _lax_conv(x, w, b)
  return y, jnp.mean(y, axis=(0, 1, 2)), jnp.var(y, axis=(0, 1, 2))


def _conv_losses(conv, conv_stats):
  """A scalar of a two-layer conv net (the first layer's batch statistics included) and a scalar
  of its gradient: the meta-gradient's shape, grad of a function of a grad."""
  def loss(x, w, b):
    y, mean, var = conv_stats(x, w, b)
    w2 = 0.3 * jax.random.normal(jax.random.key(11), (3, 3, w.shape[-1], 4))
    z = conv(jnp.tanh(y), w2, jnp.linspace(-1.0, 1.0, 4))
    return jnp.sum(jnp.sin(z)) + jnp.sum(jnp.square(mean)) + jnp.sum(jnp.sqrt(var + 1.0))

  def of_grad(x, w, b):
    gx, gw, gb = jax.grad(loss, (0, 1, 2))(x, w, b)
    return jnp.sum(jnp.tanh(gw)) + jnp.sum(gx ** 2) + jnp.sum(gb * b)
  return loss, of_grad


def test_pallas_conv_derivatives_vmapped_over_tasks(monkeypatch):
  """grad and grad-of-grad through the custom_vjp closure {conv3x3, weight_grad} and the
  epilogue statistics, vmapped over tasks (per-task inputs and kernels, a shared bias), equal
  lax.conv's task by task, w.r.t. input, kernel and bias."""
  monkeypatch.setattr(pallas_conv, 'default_tiles', lambda: SMALL_TILES)
  tasks = [_conv_inputs(s, 2, 5, 4, 3, 18)[:3] for s in range(2)]
  xs, ws, b = jnp.stack([t[0] for t in tasks]), jnp.stack([t[1] for t in tasks]), tasks[0][2]

  def both(conv, conv_stats):
    loss, of_grad = _conv_losses(conv, conv_stats)
    return lambda x, w, b: (jax.grad(loss, (0, 1, 2))(x, w, b),
                            jax.grad(of_grad, (0, 1, 2))(x, w, b))
  got = jax.jit(jax.vmap(both(pallas_conv.conv3x3, pallas_conv.conv3x3_stats),
                         in_axes=(0, 0, None)))(xs, ws, b)
  ref_fn = jax.jit(both(_lax_conv, _ref_conv_stats))
  for i in range(len(tasks)):
    ref = ref_fn(xs[i], ws[i], b)
    for order, got_o, ref_o in zip(('grad', 'grad of grad'), got, ref):
      for name, g, r in zip('xwb', got_o, ref_o):
        np.testing.assert_allclose(g[i], r, rtol=2e-4, atol=2e-5 * float(jnp.max(jnp.abs(r))),
                                   err_msg=f'task {i}: {order} d/d{name}')


@pytest.mark.slow
@pytest.mark.parametrize('method', ['metadrop', 'maml'])
def test_pallas_authors_meta_gradient_matches_reference(method):
  """'authors': every batch norm's backward pass stays a constant to the outer gradient with the
  Pallas conv too (the kernel's statistics serve the 'exact' batch norm only)."""
  ref_loss, _, ref = _meta_grad(_config(method, {}, meta_gradient='authors'))
  loss, _, got = _meta_grad(_config(method, FAST_PATHS['pallas'], meta_gradient='authors'))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert _rel_l2(got, ref) < 1e-4
  exact = _reference(method)[2]
  assert _rel_l2(exact, ref) > 1e-3      # the two meta-gradients differ: the mode took effect


def test_pallas_conv_refuses_what_it_does_not_compute():
  """float32 only: a bfloat16 config is refused by validate (naming the fix), other dtypes and
  GEMM algorithms by the conv itself, before anything is traced into a kernel."""
  from metadrop_jax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match="conv_impl='pallas' computes float32 only"):
    config_lib.validate(tiny(**{'model.conv_impl': 'pallas', 'model.compute_dtype': 'bfloat16'}))
  x, w, b, _ = _conv_inputs(0, 1, 3, 3, 2, 4)
  with pytest.raises(ValueError, match='float32'):
    nets.conv3x3(x, w, b, 'pallas', 'bfloat16')
  with pytest.raises(ValueError, match='float32'):
    nets.conv3x3(x, w, b, 'pallas', 'float32', 'bf16_x3')
  with pytest.raises(ValueError, match='float32 only'):
    pallas_conv.conv3x3(x.astype(jnp.float16), w, b)


def test_library_uses_no_forward_mode():
  """custom_vjp functions (the Pallas conv) have no forward-mode rule: jvp, jacfwd, linearize or
  hessian anywhere in the library would break model.conv_impl='pallas'."""
  pkg = pathlib.Path(__file__).resolve().parents[1] / 'metadrop_jax'
  pattern = re.compile(r'\b(jvp|jacfwd|linearize|hessian)\s*\(')
  hits = [f'{p.relative_to(pkg)}: {line.strip()}' for p in sorted(pkg.rglob('*.py'))
          for line in p.read_text().splitlines() if pattern.search(line)]
  assert not hits, hits


def _triton_modules(lowered):
  """The Triton IR of every pallas_call in a program lowered for CUDA."""
  from jax._src.lib.mlir import ir
  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          attrs = o.operation.attributes
          if o.operation.name == 'stablehlo.custom_call' and 'mhlo.backend_config' in attrs:
            config = attrs['mhlo.backend_config']
            if 'ir' in config:
              found.append(ir.StringAttr(config['ir']).value_bytes)
          walk(o.operation)
  walk(lowered.compiler_ir('stablehlo').operation)
  return found


def _lower_for_cuda(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))


def test_pallas_conv_lowers_to_triton_for_cuda(monkeypatch):
  """The kernels at the Omniglot 20-way shapes (a query batch of 300 28x28 maps; the first
  layer's one input channel; 64 -> 128 channels as theta|phi fused), vmapped over 4 tasks and
  differentiated twice, lower to Triton modules that pass MLIR's verifier. Compiling them to PTX
  needs a GPU (XLA does it when it compiles the program): not checked here."""
  from jax.experimental import pallas as pl

  def copy(x_ref, o_ref):
    o_ref[...] = x_ref[...]
  try:    # a probe that is not ours: can this jaxlib lower any Triton kernel for CUDA?
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax.experimental.pallas import triton as pltriton
    _lower_for_cuda(pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
                                   compiler_params=pltriton.CompilerParams()),
                    jax.ShapeDtypeStruct((16,), jnp.float32))
  except Exception as e:  # noqa: BLE001
    pytest.skip(f'this jaxlib cannot lower Pallas Triton kernels for CUDA: {e!r}'[:300])
  monkeypatch.setattr(pallas_conv, 'default_tiles', pallas_conv.Tiles)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  _, of_grad = _conv_losses(pallas_conv.conv3x3, pallas_conv.conv3x3_stats)
  grad2 = jax.vmap(jax.grad(of_grad, (0, 1, 2)))
  counts = {}
  for name, shapes in {'layer 0': (f32(4, 300, 28, 28, 1), f32(4, 3, 3, 1, 64), f32(4, 64)),
                       'layer 1': (f32(4, 300, 14, 14, 64), f32(4, 3, 3, 64, 128),
                                   f32(4, 128))}.items():
    modules = _triton_modules(_lower_for_cuda(grad2, *shapes))
    counts[name] = len(modules)
    with triton_lowering._new_ir_context():
      for m in modules:
        from jax._src.lib.mlir import ir
        assert ir.Module.parse(m).operation.verify(), name
  # forward, input gradient and weight gradient of the first and second derivative: every kernel
  assert all(n >= 3 for n in counts.values()), counts


# ------------------------------------------------------------------------------------------------
# batch norm in one pass (model.bn_impl='one_pass', nets.batch_moments)
# ------------------------------------------------------------------------------------------------

def _bn_input(offset, scale, seed=0):
  """[N, H, W, C] activations with a per-channel offset far from 0 (the case a textbook
  one-pass variance gets wrong) and per-channel scales."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (6, 5, 7, 3)) * (scale * jnp.array([1.0, 0.1, 3.0]))
  return x + offset * jnp.array([1.0, -2.0, 0.5]) + 0.3 * jax.random.normal(k2, (1, 1, 1, 3))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _bn_parts(x, beta, w, v, impl, backward):
  """Batch norm's value, its gradient in (x, beta) of a scalar loss, and the gradient of
  <grad_x loss, v>: the outer derivative the second-order meta-gradient takes of it."""
  f = lambda xx, bb: jnp.sum(w * jnp.tanh(nets.batch_norm(xx, bb, 1e-3, backward, impl)))
  g = jax.grad(f, argnums=(0, 1))
  gg = jax.grad(lambda xx, bb: jnp.vdot(g(xx, bb)[0], v), argnums=(0, 1))
  return nets.batch_norm(x, beta, 1e-3, backward, impl), g(x, beta), gg(x, beta)


@pytest.mark.parametrize('backward', ['exact', 'constant'])
@hypothesis.given(offset=st.floats(-50.0, 50.0), scale=st.floats(0.05, 5.0))
@hypothesis.example(offset=50.0, scale=0.05)   # mean 1000 std: unshifted sums would lose it all
def test_one_pass_batch_norm_is_the_two_pass_function(backward, offset, scale):
  """Value, first derivative and the derivative of the backward pass (zero for 'constant', the
  authors' meta-gradient) of batch norm with one-pass statistics: as close to float64 as the
  two-pass formula's in float32 (closer where the channels sit far from 0: the shift takes the
  offset out before anything is summed)."""
  x = _bn_input(offset, scale)
  args = (x, jnp.array([0.1, -0.2, 0.3]), jax.random.normal(jax.random.key(7), x.shape),
          jax.random.normal(jax.random.key(8), x.shape))
  with jax.enable_x64(True):
    exact = jax.tree.map(np.asarray, _bn_parts(*(a.astype(jnp.float64) for a in args),
                                               'two_pass', backward))
  err = lambda got: [float(np.max(np.abs(np.asarray(g, np.float64) - r)) /
                           max(float(np.max(np.abs(r))), 1e-30))
                     for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(exact))
                     if np.max(np.abs(r)) > 0]
  one = _bn_parts(*args, 'one_pass', backward)
  for e1, e2 in zip(err(one), err(_bn_parts(*args, 'two_pass', backward))):
    assert e1 <= 2 * e2 + 1e-5, (e1, e2)
  if backward == 'constant':
    assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in jax.tree.leaves(one[2]))


def test_one_pass_statistics_in_float64_and_a_constant_channel():
  """In float64 the two agree to 1e-12 (the same function); a constant channel has variance 0
  (not a rounding-negative one) and a finite output."""
  with jax.enable_x64(True):
    x = _bn_input(30.0, 1.0).astype(jnp.float64)
    for a, b in zip(nets.batch_moments(x, 'one_pass'), nets.batch_moments(x, 'two_pass')):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
  const = jnp.full((4, 3, 3, 2), 7.25)
  centred, var = nets.batch_moments(const, 'one_pass')
  assert float(jnp.max(jnp.abs(centred))) == 0.0 and float(jnp.max(var)) == 0.0
  assert bool(jnp.all(jnp.isfinite(nets.batch_norm(const, jnp.zeros(2), 1e-3, impl='one_pass'))))
  with pytest.raises(ValueError, match='one_pass'):
    nets.batch_moments(const, 'three_pass')


@functools.lru_cache(maxsize=None)
def _reference_with(method, gradient):
  return _meta_grad(_config(method, {}, meta_gradient=gradient))


@pytest.mark.parametrize('method', ['metadrop', 'maml'])
def test_one_pass_batch_norm_authors_meta_gradient(method):
  """The authors' meta-gradient (every batch norm's backward constant to the outer gradient)
  with one-pass statistics equals the reference's; the exact one is FAST_PATHS['bn_one_pass']."""
  ref_loss, _, ref = _reference_with(method, 'authors')
  loss, _, got = _meta_grad(_config(method, FAST_PATHS['bn_one_pass'], meta_gradient='authors'))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  gscale = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(ref))
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5 * gscale)
  assert _rel_l2(got, ref) < 1e-4
  # the authors' computation differs from the exact one: this compares like with like
  assert _rel_l2(_reference(method)[2], ref) > 1e-3
