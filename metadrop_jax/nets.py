"""The base network theta, the noise generator phi and their joint forward pass. Pure functions.

Parameters are one pytree with three subtrees (partitioned by key, never by name matching):

* ``theta``: the Conv-4 learner, adapted in the inner loop and meta-learned.
  ``theta['conv{l}'] = {'w': f32[3, 3, Cin, C], 'b': f32[C]}``, ``theta['dense'] = {'w': f32[F, N],
  'b': f32[N]}``.
* ``phi``: the noise generator, meta-learned only. The same conv shapes as theta (it reads the same
  block inputs) plus ``phi['dense'] = {'w': f32[F, 1], 'b': f32[1]}``: one logit-noise scale per
  example, shared by all classes (the authors tile a single column).
* ``bn``: batch-norm offsets ``bn['conv{l}'] = {'beta': f32[C]}``, meta-learned only.

Block l (authors' ``layers.py::conv_block``)::

    mu = conv3x3_theta(h) ; a = conv3x3_phi(h)          # same input h (SAME padding, stride 1)
    u  = mu * softplus(a + eps)   (sample)   |   mu * softplus(a)   (no sample)
    h' = maxpool2x2_VALID(relu(BN(u)))                  # BN: this batch's stats over N, H, W

Head: ``logits = flat(h) W + b (+ softplus(flat(h) w_phi + b_phi) * eps when sampling)``.
MAML: ``u = mu`` and no logit noise; phi is never read.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from metadrop_jax import methods

Params = Any


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """Static (hashable) description of the network; built once from the config."""
  way: int
  image_shape: tuple[int, int, int]
  channels: int = 32
  num_layers: int = 4
  method: str = 'metadrop'
  bn_eps: float = 1e-3
  bn_backward: str = 'exact'      # 'exact' | 'constant'; set by meta.MetaSpec from meta_gradient
  bn_impl: str = 'two_pass'       # batch-norm statistics: 'two_pass' | 'one_pass' (same function)
  conv_impl: str = 'xla'          # resolved: 'xla' | 'im2col' | 'pallas'
  pool_impl: str = 'reduce_window'  # 'reduce_window' | 'select' (same values and derivatives)
  dot_algorithm: str = 'default'  # im2col GEMMs: 'default' | 'bf16_x3' | 'bf16_x6' | 'tf32_x3'
  fuse_noise_conv: bool = True
  compute_dtype: str = 'float32'
  fixed_noise_mean: float = 1.0
  infodrop_max_alpha: float = 0.7

  @property
  def feature_dim(self) -> int:
    h, w, _ = self.image_shape
    for _ in range(self.num_layers):
      h, w = h // 2, w // 2
    return h * w * self.channels

  @property
  def row(self) -> methods.Method:
    """What this spec's method does (its row of :data:`metadrop_jax.methods.METHODS`)."""
    return methods.METHODS[self.method]


def resolve_conv_impl(impl: str, backend: str | None = None) -> str:
  """'auto' -> 'im2col': the fastest formulation measured on a 2-core CPU (docs/performance.md)
  and on an H200 GPU (vmapped over tasks it is one batched GEMM per conv; 2.1x the cuDNN
  formulation there with select pooling, and 500x closer to float64)."""
  del backend   # the same on every backend measured so far
  return 'im2col' if impl == 'auto' else impl


def resolve_pool_impl(impl: str, backend: str | None = None) -> str:
  """'auto' -> 'select' on every backend: no scatter in the derivative (1.5x the whole step on
  an H200; 1.08-1.62x on a 2-core CPU at the eight paper settings, docs/performance.md). Both
  formulations pick the same elements, to every derivative order, but the compiled steps round
  differently, so a run keeps the value it was created with: a new run records the resolved
  value in its config.json (:func:`metadrop_jax.meta.resolve_auto`), and the 'auto' of a
  config.json written before runs recorded it is read with the rule of its time
  (:data:`metadrop_jax.workdir.LEGACY_AUTO`: 'reduce_window' on the CPU)."""
  del backend   # the same on every backend measured so far
  return 'select' if impl == 'auto' else impl


def spec_from_config(config, image_shape: tuple[int, int, int]) -> NetSpec:
  """The network of ``config`` for images of ``image_shape`` (H, W, C)."""
  impl = resolve_conv_impl(config.model.conv_impl)
  return NetSpec(
      way=config.way,
      image_shape=tuple(image_shape),
      channels=config.model.channels,
      num_layers=config.model.num_layers,
      method=config.method,
      bn_eps=config.model.bn_eps,
      bn_impl=config.model.bn_impl,
      conv_impl=impl,
      pool_impl=resolve_pool_impl(config.model.pool_impl),
      dot_algorithm=config.model.dot_algorithm,
      fuse_noise_conv=config.model.fuse_noise_conv,
      compute_dtype=config.model.compute_dtype,
      fixed_noise_mean=config.methods.fixed_noise_mean,
      infodrop_max_alpha=config.methods.infodrop_max_alpha,
  )


# ------------------------------------------------------------------------------------------------
# initialisation (authors: conv truncated normal std 0.02, dense normal std 0.02, biases 0)
# ------------------------------------------------------------------------------------------------

def _conv_init(key, cin, cout):
  # tf.truncated_normal_initializer(stddev=0.02): normal truncated at 2 std.
  w = 0.02 * jax.random.truncated_normal(key, -2.0, 2.0, (3, 3, cin, cout), jnp.float32)
  return {'w': w, 'b': jnp.zeros((cout,), jnp.float32)}


def _dense_init(key, fin, fout):
  return {'w': 0.02 * jax.random.normal(key, (fin, fout), jnp.float32),
          'b': jnp.zeros((fout,), jnp.float32)}


def init_params(key: jax.Array, spec: NetSpec) -> Params:
  """Returns ``{'theta', 'phi', 'bn'}``. phi is created for every method (unused ones stay put)."""
  k_theta, k_phi = jax.random.split(key)
  cin = spec.image_shape[-1]
  theta, phi, bn = {}, {}, {}
  kt = jax.random.split(k_theta, spec.num_layers + 1)
  kp = jax.random.split(k_phi, spec.num_layers + 1)
  for l in range(spec.num_layers):
    c_in = cin if l == 0 else spec.channels
    theta[f'conv{l}'] = _conv_init(kt[l], c_in, spec.channels)
    phi[f'conv{l}'] = _conv_init(kp[l], c_in, spec.channels)
    bn[f'conv{l}'] = {'beta': jnp.zeros((spec.channels,), jnp.float32)}
  theta['dense'] = _dense_init(kt[-1], spec.feature_dim, spec.way)
  phi['dense'] = _dense_init(kp[-1], spec.feature_dim, 1)
  return {'theta': theta, 'phi': phi, 'bn': bn}


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------

# config.model.dot_algorithm -> the algorithm of the im2col GEMMs ('default': the precision
# jax_default_matmul_precision sets). The multi-pass ones split each float32 operand into 3 or 6
# bfloat16 (or 3 TF32) products on the tensor cores with float32 accumulation; how close they
# come to float32 on a given card is what the GPU smoke test measures. XLA:CPU runs the bf16 ones
# as plain float32 and rejects tf32_x3.
DOT_ALGORITHMS = {
    'default': None,
    'bf16_x3': jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
    'bf16_x6': jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    'tf32_x3': jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
}


def conv3x3(x: jax.Array, w: jax.Array, b: jax.Array, impl: str, dtype: str = 'float32',
            algorithm: str = 'default'):
  """SAME 3x3 stride-1 convolution ``x: [B, H, W, Cin]``, ``w: [3, 3, Cin, Cout]``.

  'xla' uses lax.conv_general_dilated; 'im2col' builds the 9 shifted copies of the padded input
  and multiplies by the reshaped kernel (the same sums as one GEMM, which XLA:CPU and, vmapped
  over tasks, XLA:GPU run much faster). ``algorithm`` (a key of :data:`DOT_ALGORITHMS`) applies
  to that GEMM. 'pallas' is one kernel that reads the 9 taps in place (no patches in memory;
  float32 only: metadrop_jax/kernels/conv3x3.py).
  """
  if impl == 'pallas':
    if dtype != 'float32' or algorithm != 'default':
      raise ValueError(f"conv impl 'pallas' computes float32 at 3xTF32 only, got dtype={dtype!r}, "
                       f'algorithm={algorithm!r}')
    return _pallas().conv3x3(x, w, b)
  out = jnp.promote_types(x.dtype, w.dtype)     # float32 (float64 in gradient checks)
  cdt = jnp.bfloat16 if dtype == 'bfloat16' else out
  xc, wc = x.astype(cdt), w.astype(cdt)
  if impl == 'xla':
    y = jax.lax.conv_general_dilated(
        xc, wc, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        preferred_element_type=out)
  elif impl == 'im2col':
    bsz, h, wd, cin = x.shape
    xp = jnp.pad(xc, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [xp[:, i:i + h, j:j + wd, :] for i in range(3) for j in range(3)], axis=-1)
    y = jnp.dot(patches.reshape(bsz * h * wd, 9 * cin), wc.reshape(9 * cin, -1),
                precision=DOT_ALGORITHMS[algorithm],
                preferred_element_type=out).reshape(bsz, h, wd, -1)
  else:
    raise ValueError(f'conv impl {impl!r}: use xla, im2col or pallas')
  return y + b


def _pallas():
  """The Pallas kernels, imported when a spec asks for them."""
  from metadrop_jax.kernels import conv3x3 as kernel
  return kernel


BN_IMPLS = ('two_pass', 'one_pass')


def batch_moments(x: jax.Array, impl: str = 'two_pass') -> tuple[jax.Array, jax.Array]:
  """``(x - mean, var)`` of ``x: [N, H, W, C]`` per channel, over N, H, W.

  ``'two_pass'``: the mean, then ``var = mean((x - mean)^2)``: two dependent reads of ``x``.

  ``'one_pass'``: both from sums of the shifted values ``d = x - s``, which need one read of
  ``x`` (two sibling reductions that XLA:GPU can fuse into one kernel; XLA:CPU runs them as two):
  ``m1 = mean(d)``, ``m2 = mean(d^2)``,
  ``x - mean = d - m1`` and ``var = m2 - m1^2``. The shift ``s`` is a cheap per-channel
  estimate of the mean: the first example's centre pixel (a value of the same channel, away
  from the zero-padded border), under ``stop_gradient``.

  Numerics: ``m2 - m1^2`` cancels; its rounding error relative to ``var`` grows like
  ``1 + (mean - s)^2 / var``, the squared z-score of the shift. With ``s = 0`` (the textbook
  one-pass formula) that is ``(mean / std)^2``, unbounded for a channel with a large offset; with
  ``s`` a sample of the channel it is that sample's squared z-score, small unless the sample is
  an outlier of its channel. The two-pass formula has its own error in the mean of a channel far
  from 0, which the shift avoids: against float64, the one-pass result is about as close as the
  two-pass one, and closer for such channels (tests/test_fast_paths.py compares both, and the
  full meta-gradients). ``var`` is clamped at 0 (rounding could make a constant
  channel's slightly negative; mathematically it is >= 0, so the function is unchanged).

  Derivatives: for every ``s``, ``d - m1 = x - mean`` and ``m2 - m1^2 = var`` exactly, so both
  are functions of ``x`` alone; their partial derivatives in ``s`` vanish identically, and
  cutting ``s`` off with ``stop_gradient`` leaves every derivative of every order (the
  second-order meta-gradient) that of the two-pass formula.
  """
  axes = (0, 1, 2)
  if impl == 'two_pass':
    mean = jnp.mean(x, axis=axes)
    return x - mean, jnp.mean(jnp.square(x - mean), axis=axes)
  if impl != 'one_pass':
    raise ValueError(f"batch_norm impl={impl!r}: use one of {BN_IMPLS}")
  s = jax.lax.stop_gradient(x[0, x.shape[1] // 2, x.shape[2] // 2])
  d = x - s
  m1 = jnp.mean(d, axis=axes)
  m2 = jnp.mean(jnp.square(d), axis=axes)
  return d - m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def batch_norm(x: jax.Array, beta: jax.Array, eps: float, backward: str = 'exact',
               impl: str = 'two_pass', stats=None) -> jax.Array:
  """Transductive batch norm: statistics of this batch over N, H, W; offset only, no scale.

  Matches ``tf.contrib.layers.batch_norm(is_training=True, scale=False, epsilon=1e-3)`` in value
  and first derivative. ``backward='exact'`` differentiates it exactly to every order;
  ``backward='constant'`` keeps the exact first derivative but makes that backward pass a
  constant to any further differentiation, which is what the authors' TF graph computes for the
  meta-gradient (docs/authors_gradient.md). ``impl``: how the statistics are computed
  (:func:`batch_moments`; the same function either way). ``stats``: ``(mean, var)`` of ``x``
  computed with it (the Pallas conv's epilogue: :func:`metadrop_jax.kernels.conv3x3.conv3x3_stats`,
  whose derivatives w.r.t. its output are exact); 'exact' only, and it replaces ``impl``.
  """
  if stats is not None and backward != 'exact':
    raise ValueError(f"batch_norm stats are for backward='exact' only, got {backward!r}")
  if backward == 'constant':
    return _batch_norm_constant_backward(x, beta, eps, impl)
  if backward != 'exact':
    raise ValueError(f"batch_norm backward={backward!r}: use 'exact' or 'constant'")
  if stats is None:
    centred, var = batch_moments(x, impl)
  else:
    mean, var = stats
    centred = x - mean
  return centred * jax.lax.rsqrt(var + eps) + beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _batch_norm_constant_backward(x, beta, eps, impl):
  return batch_norm(x, beta, eps, impl=impl)


def _bn_fwd(x, beta, eps, impl):
  return batch_norm(x, beta, eps, impl=impl), (x, beta)


def _bn_bwd(eps, impl, residuals, g):
  # The exact vector-Jacobian product, detached: its value is the true first derivative, its own
  # derivative (w.r.t. x, beta and the incoming cotangent g) is zero. In TF 2.x compat.v1 the
  # second derivative of FusedBatchNormGrad comes back None inside the v1 tf.map_fn the authors
  # use, which is this.
  _, vjp = jax.vjp(lambda xx, bb: batch_norm(xx, bb, eps, impl=impl), *residuals)
  return jax.tree.map(jax.lax.stop_gradient, vjp(g))


_batch_norm_constant_backward.defvjp(_bn_fwd, _bn_bwd)


def max_pool(x: jax.Array, impl: str = 'reduce_window') -> jax.Array:
  """2x2 max-pool, stride 2, VALID (odd sizes drop the last row/column, as TF does).

  ``'reduce_window'``: ``lax.reduce_window``; its derivative is a select-and-scatter, which
  XLA:GPU turns into a scatter (a sort or a loop under deterministic ops).
  ``'select'``: the four stride-2 phases of each window compared in row-major order with
  ``where(a >= b, a, b)``: the same value, and the derivative goes to the same element (the first
  maximum of the window, as reduce_window's rule picks it), to every order, with selects and
  pads instead of a scatter.
  """
  if impl == 'reduce_window':
    # reduce_window, not reshape + jnp.max: the latter's gradient splits ties evenly, and
    # second-order meta-gradients then disagreed between conv formulations
    # (tests/test_fast_paths.py caught it).
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
  if impl != 'select':
    raise ValueError(f"max_pool impl={impl!r}: use 'reduce_window' or 'select'")
  h, w = (x.shape[1] // 2) * 2, (x.shape[2] // 2) * 2
  m = None
  for i in range(2):
    for j in range(2):
      phase = x[:, i:h:2, j:w:2, :]
      m = phase if m is None else jnp.where(m >= phase, m, phase)
  return m


def _mix(h, mix, layer: int):
  """Manifold mixup (Verma et al. 2019) at ``layer`` when ``mix = (layer_index, perm, lam)``
  selects it: ``h <- lam * h + (1 - lam) * h[perm]``. Layer 0 is the input (input mixup), layer
  ``l + 1`` the output of block ``l`` (the last one is the flat feature fed to the head).
  ``layer_index`` may be traced (one compiled graph for every layer choice)."""
  if mix is None:
    return h
  sel, perm, lam = mix
  return jnp.where(sel == layer, lam * h + (1.0 - lam) * h[perm], h)


def _noise_logits(spec: NetSpec, params, feat, key, sample):
  """Additive logit noise ``sigma * eps``, ``eps ~ N(0, I_way)``, support set only (authors' head):
  one scale per example shared by all classes, from the method's ``logit_noise_scale``
  (:mod:`metadrop_jax.methods`). 0 for methods without logit noise."""
  scale = spec.row.logit_noise_scale
  if scale is None or not sample:
    return 0.0
  sigma = scale(spec, params['phi']['dense'], feat)        # [B, 1]: one scale per example
  return sigma * jax.random.normal(key, (feat.shape[0], spec.way), feat.dtype)


def forward(params: Params, x: jax.Array, key: jax.Array | None, spec: NetSpec, *,
            sample: bool, mix=None) -> jax.Array:
  """Logits ``f32[B, N]``; see :func:`forward_features` for the arguments."""
  return forward_features(params, x, key, spec, sample=sample, mix=mix)[0]


def forward_features(params: Params, x: jax.Array, key: jax.Array | None, spec: NetSpec, *,
                     sample: bool, mix=None):
  """Logits ``f32[B, N]`` of images ``x: f32[B, H, W, C]`` (one task's batch).

  Args:
    params: ``{'theta', 'phi', 'bn'}``.
    key: noise key; only read when ``sample`` (may be None otherwise).
    sample: draw the noise (support set in the inner loop) or take the deterministic path
      (query set; metadrop still gates by softplus(a)).
    mix: optional ``(layer, perm, lam)`` for manifold mixup: after block ``layer`` the batch's
      hidden states become ``lam * h + (1 - lam) * h[perm]``.

  Returns:
    ``(logits, features)``: features holds every block's perturbed pre-BN map ``u{l}``, the flat
    last-layer features ``feat`` and the summed (per-example mean) KL term ``kl`` of VIB /
    information dropout (0 otherwise). Unused entries are removed by XLA's dead-code pass.
  """
  theta, phi, bn = params['theta'], params['phi'], params['bn']
  keys = jax.random.split(key, spec.num_layers + 1) if sample else [None] * (spec.num_layers + 1)
  h = x
  impl = (spec.conv_impl, spec.compute_dtype, spec.dot_algorithm)
  kl_total = jnp.zeros((), jnp.float32)
  feats = {}
  h = _mix(h, mix, 0)
  for l in range(spec.num_layers):
    name = f'conv{l}'
    tw, tb = theta[name]['w'], theta[name]['b']
    phi_input = spec.row.phi_input
    stats = None
    if (spec.conv_impl == 'pallas' and spec.bn_backward == 'exact' and phi_input is None and
        spec.row.perturb is None):
      # batch norm reads this conv's output: its statistics come from the kernel's epilogue
      mu, *stats = _pallas().conv3x3_stats(h, tw, tb)
    elif phi_input == 'ones':
      # input-independent: phi's conv applied to an all-ones input (learned per position/channel)
      mu = conv3x3(h, tw, tb, *impl)
      a = conv3x3(jnp.ones_like(h[:1]), phi[name]['w'], phi[name]['b'], *impl)
    elif phi_input == 'features' and spec.fuse_noise_conv:
      both = conv3x3(h, jnp.concatenate([tw, phi[name]['w']], -1),
                     jnp.concatenate([tb, phi[name]['b']], -1), *impl)
      mu, a = both[..., :spec.channels], both[..., spec.channels:]
    else:
      mu = conv3x3(h, tw, tb, *impl)
      a = (conv3x3(h, phi[name]['w'], phi[name]['b'], *impl)
           if phi_input == 'features' else None)
    if spec.row.perturb is None:
      u = mu
    else:
      u, kl = spec.row.perturb(spec, mu, a, keys[l], sample)
      kl_total = kl_total + kl
    feats[f'u{l}'] = u
    h = max_pool(jax.nn.relu(batch_norm(u, bn[name]['beta'], spec.bn_eps, spec.bn_backward,
                                        spec.bn_impl, stats)), spec.pool_impl)
    h = _mix(h, mix, l + 1)
  feat = h.reshape(h.shape[0], -1)
  logits = feat @ theta['dense']['w'] + theta['dense']['b']
  logits = logits + _noise_logits(spec, params, feat, keys[-1], sample)
  feats['feat'] = feat
  feats['kl'] = kl_total
  return logits, feats
