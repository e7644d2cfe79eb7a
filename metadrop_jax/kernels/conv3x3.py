"""The 3x3 SAME stride-1 convolution as Pallas kernels (``model.conv_impl='pallas'``).

What it computes: ``y = conv(x, w) + b`` for ``x: f32[B, H, W, Cin]`` (NHWC) and
``w: f32[3, 3, Cin, Cout]`` (HWIO), as ``lax.conv_general_dilated(..., 'SAME')`` does, and
(:func:`conv3x3_stats`) with the batch-norm statistics of ``y``: its per-channel mean and
biased variance over (B, H, W).

Why: the im2col formulation (``nets.conv3x3``) writes nine shifted copies of each conv input to
memory for one GEMM to read, and no XLA flag fuses that concatenation (along the contracting
dimension) into the GEMM. Here the GEMM is implicit: each program reads the nine shifted taps
of its input tile straight from the (padded) input and accumulates nine products, so no patch
array exists. The statistics come from the same program's epilogue, while its output tile is
still in registers, instead of from separate reductions over ``y``.

Layout: the input, zero-padded to (H + 2, W + 2) and its channels to a power of two (at least
16, Triton's smallest dot), is flattened to one row per padded position. The output at flat
position ``q`` is then ``sum_t X[q + off_t] @ w_t`` with the constant offsets
``off_t = (i - 1)(W + 2) + (j - 1)`` of the nine taps ``t = (i, j)``: every tap of a tile of
``block_m`` consecutive positions is one contiguous slice. Positions on the padding ring are
computed too and dropped afterwards (one slice of the output).

Products at float32 accuracy on tensor cores (3xTF32): each float32 operand is split into a
TF32-representable high part (rounded to nearest at 10 mantissa bits) and the rounded remainder,
and ``a.b = a_lo.b_hi + a_hi.b_lo + a_hi.b_hi`` (smallest first); the dropped ``a_lo.b_lo`` and
the remainders' rounding are ~2^-22 of each product. On a GPU the three dots run as TF32
tensor-core products with float32 accumulation; in interpret mode (the CPU, for tests) they are
float32 products of the same split parts.

Statistics: per program (``block_m`` positions x ``block_n`` channels) the sum and the sum of
squared deviations from the tile's own mean over its valid positions; the tiles are then merged
by one reduction over the tile axis (Chan et al.'s pairwise update:
``M2 = sum M2_t + sum n_t (mean_t - mean)^2``). Both terms are sums of non-negative numbers, so
there is no cancellation as in ``E[y^2] - E[y]^2``, and no atomics: the same inputs give the same
bits.

Derivatives (every order): each kernel is wrapped in ``jax.custom_vjp`` whose backward pass calls
the wrapped functions again, never a raw ``pallas_call``. For ``y = conv(x, w) + b`` with
cotangent ``g``: ``dx = conv(g, flip(w)^T)`` (the same kernel with the taps mirrored and in/out
channels swapped), ``dw = weight_grad(x, g)`` (the second kernel: per tap ``X_t^T g`` summed over
batch and space, in ``wgrad_splits`` partial sums added in a fixed order) and ``db = sum(g)``.
``weight_grad`` is bilinear and its own backward is two convolutions, so ``{conv3x3,
weight_grad}`` is closed under differentiation: ``grad`` of a ``grad`` (the second-order
meta-gradient) uses these rules throughout. The statistics' backward adds ``(g_mean +
2 g_var (y - mean)) / n`` to the output's cotangent. Forward mode (``jax.jvp``, ``jacfwd``) is
not defined for ``custom_vjp`` functions: nothing in the library uses it.

Backends: ``interpret=True`` (the kernels run as XLA:CPU code) when the default backend is the
CPU; otherwise Pallas' Triton backend. ``vmap`` (tasks of a meta-batch) adds a grid axis.
Float32 only. Triton addresses memory with 32-bit offsets: an operand in the flat layout, with
all its vmapped axes, must hold fewer than 2^31 elements (an Omniglot 20-way query batch's fused
theta|phi conv output, 4 tasks: about 1.4e8).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

_TF32_HALF = np.uint32(0x1000)        # half a unit of TF32's last place (13 bits dropped)
_TF32_KEEP = np.uint32(0xFFFFE000)    # sign, exponent and 10 mantissa bits


@dataclasses.dataclass(frozen=True)
class Tiles:
  """How the work is cut into programs (powers of two)."""
  block_m: int = 64        # output positions per program
  block_n: int = 64        # output channels per program (at most; at least 16)
  wgrad_splits: int = 32   # partial weight gradients summed afterwards (parallelism of that sum)
  interpret: bool = False  # run the kernels as XLA code (the CPU)


def default_tiles() -> Tiles:
  """GPU: small tiles, many programs. CPU (interpret mode runs the programs one after another):
  large tiles, few steps."""
  if jax.default_backend() == 'cpu':
    return Tiles(block_m=256, block_n=64, wgrad_splits=4, interpret=True)
  return Tiles()


def _pow2(n: int, least: int = 16) -> int:
  return max(least, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """The flat layout of a [B, H, W, C] map: one row per position of the padded map."""
  b: int
  h: int
  w: int
  block_m: int
  tiles_m: int

  @property
  def wp(self):
    return self.w + 2

  @property
  def image(self):          # positions per padded image
    return (self.h + 2) * self.wp

  @property
  def positions(self):
    return self.b * self.image

  @property
  def rows(self):
    return self.tiles_m * self.block_m

  @property
  def margin(self):         # the largest tap offset: zero rows before and after the map
    return self.wp + 1

  def offset(self, t):
    """Row offset of tap ``t = 3 i + j`` (a Python or a traced int) from the output's row."""
    i, j = divmod(t, 3) if isinstance(t, int) else (jax.lax.div(t, 3), jax.lax.rem(t, 3))
    return self.margin + (i - 1) * self.wp + (j - 1)

  def valid(self, q):
    """Whether flat positions ``q`` are pixels of the map (not the padding ring or the tail)."""
    r = jax.lax.rem(q, self.image)
    i, j = jax.lax.div(r, self.wp), jax.lax.rem(r, self.wp)
    return (q < self.positions) & (i >= 1) & (i <= self.h) & (j >= 1) & (j <= self.w)


def _geometry(shape, block_m: int, splits: int = 1) -> _Geometry:
  b, h, w = shape[:3]
  tiles = -(-b * (h + 2) * (w + 2) // block_m)
  return _Geometry(b, h, w, block_m, -(-tiles // splits) * splits)


def _to_rows(x, geo: _Geometry, channels: int, margin: int):
  """[B, H, W, C] -> [margin + rows + margin, channels]: the zero-padded map row by row."""
  b, h, w, c = x.shape
  flat = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, channels - c))).reshape(-1, channels)
  return jnp.pad(flat, ((margin, geo.rows - geo.positions + margin), (0, 0)))


def _from_rows(y, geo: _Geometry, c: int):
  return y[:geo.positions].reshape(geo.b, geo.h + 2, geo.wp, -1)[:, 1:geo.h + 1, 1:geo.w + 1, :c]


def _round_tf32(v):
  bits = jax.lax.bitcast_convert_type(v, jnp.uint32)
  return jax.lax.bitcast_convert_type((bits + _TF32_HALF) & _TF32_KEEP, jnp.float32)


def _dot3(a, b, contract, precision):
  """``a . b`` (contracting ``contract`` dims) at float32 accuracy from three products of
  TF32-representable parts, smallest first."""
  a_hi, b_hi = _round_tf32(a), _round_tf32(b)
  a_lo, b_lo = _round_tf32(a - a_hi), _round_tf32(b - b_hi)
  dot = functools.partial(jax.lax.dot_general, dimension_numbers=(contract, ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)
  return (dot(a_lo, b_hi) + dot(a_hi, b_lo)) + dot(a_hi, b_hi)


def _precision(tiles: Tiles):
  # interpret mode: XLA:CPU has no TF32 and multiplies the (TF32-representable) parts exactly
  return jax.lax.Precision.HIGHEST if tiles.interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32


def _call(kernel, tiles: Tiles, **kwargs):
  params = None
  if not tiles.interpret:
    from jax.experimental.pallas import triton as pltriton
    params = pltriton.CompilerParams(num_warps=4, num_stages=2)
  return pl.pallas_call(kernel, interpret=tiles.interpret, compiler_params=params, **kwargs)


# ------------------------------------------------------------------------------------------------
# the kernels
# ------------------------------------------------------------------------------------------------

def _conv_kernel(x_ref, w_ref, b_ref, y_ref, *stat_refs, geo: _Geometry, precision):
  q0 = pl.program_id(0) * geo.block_m
  acc = None
  for t in range(9):
    xt = x_ref[pl.ds(q0 + geo.offset(t), geo.block_m), :]          # [block_m, Cin']
    part = _dot3(xt, w_ref[t], ((1,), (0,)), precision)             # [block_m, block_n]
    acc = part if acc is None else acc + part
  y = acc + b_ref[...][None, :]
  y_ref[...] = y
  if stat_refs:
    sum_ref, m2_ref = stat_refs
    q = q0 + jnp.arange(geo.block_m, dtype=jnp.int32)
    valid = geo.valid(q).astype(jnp.float32)[:, None]
    n = jnp.sum(valid)
    s = jnp.sum(y * valid, axis=0)
    d = (y - s / jnp.maximum(n, 1.0)) * valid
    sum_ref[...] = s
    m2_ref[...] = jnp.sum(d * d, axis=0)


def _wgrad_kernel(x_ref, g_ref, o_ref, *, geo: _Geometry, steps: int, precision):
  split, tap = pl.program_id(0), pl.program_id(1)
  off = geo.offset(tap)

  def body(k, acc):
    q0 = (split * steps + k) * geo.block_m
    xt = x_ref[pl.ds(q0 + off, geo.block_m), :]                    # [block_m, Cin']
    gt = g_ref[pl.ds(q0, geo.block_m), :]                          # [block_m, block_n]
    return acc + _dot3(xt, gt, ((0,), (0,)), precision)             # [Cin', block_n]

  o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def _check(*arrays):
  if any(a.dtype != jnp.float32 for a in arrays):
    raise ValueError(f'the Pallas conv computes float32 only, got {[str(a.dtype) for a in arrays]}'
                     ": use model.conv_impl='xla' or 'im2col' for other dtypes")


def _conv(x, w, b, stats: bool, tiles: Tiles | None = None):
  """The forward kernel: ``y`` or ``(y, mean, var)``."""
  _check(x, w, b)
  if x.ndim != 4 or w.shape[:3] != (3, 3, x.shape[-1]) or b.shape != w.shape[3:]:
    raise ValueError(f'conv3x3 takes x [B, H, W, Cin], w [3, 3, Cin, Cout] and b [Cout], got '
                     f'{x.shape}, {w.shape} and {b.shape}')
  tiles = tiles or default_tiles()
  cin, cout = w.shape[2], w.shape[3]
  cp, npad = _pow2(cin), _pow2(cout)
  bn = min(_pow2(tiles.block_n), npad)
  geo = _geometry(x.shape, tiles.block_m)
  xr = _to_rows(x, geo, cp, geo.margin)
  wr = jnp.pad(w.reshape(9, cin, cout), ((0, 0), (0, cp - cin), (0, npad - cout)))
  br = jnp.pad(b, (0, npad - cout))
  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct((geo.rows, npad), f32)]
  out_specs = [pl.BlockSpec((geo.block_m, bn), lambda i, j: (i, j))]
  if stats:
    out_shape += [jax.ShapeDtypeStruct((geo.tiles_m, npad), f32)] * 2
    out_specs += [pl.BlockSpec((None, bn), lambda i, j: (i, j))] * 2
  outs = _call(
      functools.partial(_conv_kernel, geo=geo, precision=_precision(tiles)), tiles,
      grid=(geo.tiles_m, npad // bn), out_shape=out_shape, out_specs=out_specs,
      in_specs=[pl.BlockSpec(xr.shape, lambda i, j: (0, 0)),
                pl.BlockSpec((9, cp, bn), lambda i, j: (0, 0, j)),
                pl.BlockSpec((bn,), lambda i, j: (j,))],
      name='conv3x3')(xr, wr, br)
  y = _from_rows(outs[0], geo, cout)
  if not stats:
    return y
  return (y, *_merge_stats(outs[1][:, :cout], outs[2][:, :cout], tile_counts(geo)))


def tile_counts(geo: _Geometry) -> np.ndarray:
  """Valid positions per row tile (numpy: the layout is static)."""
  q = np.arange(geo.rows)
  r = q % geo.image
  i, j = r // geo.wp, r % geo.wp
  ok = (q < geo.positions) & (i >= 1) & (i <= geo.h) & (j >= 1) & (j <= geo.w)
  return ok.reshape(geo.tiles_m, geo.block_m).sum(1)


def _merge_stats(sums, m2s, counts):
  """Mean and biased variance from per-tile sums and squared deviations from the tile means."""
  n = float(counts.sum())
  cnt = jnp.asarray(counts, jnp.float32)[:, None]
  mean = jnp.sum(sums, axis=0) / n
  tile_mean = sums / jnp.maximum(cnt, 1.0)
  var = (jnp.sum(m2s, axis=0) + jnp.sum(cnt * jnp.square(tile_mean - mean), axis=0)) / n
  return mean, var


def _wgrad(x, g, tiles: Tiles | None = None):
  """The second kernel: ``dw[i, j] = sum_{b,h,w} xpad[b, h+i, w+j]^T g[b, h, w]``."""
  _check(x, g)
  if x.ndim != 4 or g.shape[:3] != x.shape[:3]:
    raise ValueError(f'weight_grad takes x [B, H, W, Cin] and g [B, H, W, Cout], got {x.shape} '
                     f'and {g.shape}')
  tiles = tiles or default_tiles()
  cin, cout = x.shape[-1], g.shape[-1]
  cp, npad = _pow2(cin), _pow2(cout)
  bn = min(_pow2(tiles.block_n), npad)
  tiles_needed = -(-x.shape[0] * (x.shape[1] + 2) * (x.shape[2] + 2) // tiles.block_m)
  splits = max(1, min(tiles.wgrad_splits, tiles_needed))
  geo = _geometry(x.shape, tiles.block_m, splits)
  xr = _to_rows(x, geo, cp, geo.margin)
  gr = _to_rows(g, geo, npad, 0)
  parts = _call(
      functools.partial(_wgrad_kernel, geo=geo, steps=geo.tiles_m // splits,
                        precision=_precision(tiles)), tiles,
      grid=(splits, 9, npad // bn),
      out_shape=jax.ShapeDtypeStruct((splits, 9, cp, npad), jnp.float32),
      out_specs=pl.BlockSpec((None, None, cp, bn), lambda s, t, j: (s, t, 0, j)),
      in_specs=[pl.BlockSpec(xr.shape, lambda s, t, j: (0, 0)),
                pl.BlockSpec((geo.rows, bn), lambda s, t, j: (0, j))],
      name='conv3x3_wgrad')(xr, gr)
  return jnp.sum(parts, axis=0)[:, :cin, :cout].reshape(3, 3, cin, cout)


# ------------------------------------------------------------------------------------------------
# differentiable to every order: each backward pass calls the wrapped functions
# ------------------------------------------------------------------------------------------------

def _flip(w):
  """The kernel of the input gradient: taps mirrored, in/out channels swapped."""
  return jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)


def _input_grad(g, w):
  return conv3x3(g, _flip(w), jnp.zeros((w.shape[2],), g.dtype))


@jax.custom_vjp
def conv3x3(x, w, b):
  """``conv(x, w) + b``, 3x3 SAME stride 1, NHWC / HWIO, float32."""
  return _conv(x, w, b, stats=False)


def _conv3x3_fwd(x, w, b):
  return conv3x3(x, w, b), (x, w)


def _conv3x3_bwd(res, g):
  x, w = res
  return _input_grad(g, w), weight_grad(x, g), jnp.sum(g, axis=(0, 1, 2))


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


@jax.custom_vjp
def weight_grad(x, g):
  """``dw`` of ``conv3x3(x, w, b)`` for the output cotangent ``g``: [3, 3, Cin, Cout]."""
  return _wgrad(x, g)


def _weight_grad_fwd(x, g):
  return weight_grad(x, g), (x, g)


def _weight_grad_bwd(res, ct):
  x, g = res
  return _input_grad(g, ct), conv3x3(x, ct, jnp.zeros((ct.shape[3],), x.dtype))


weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


@jax.custom_vjp
def conv3x3_stats(x, w, b):
  """``(y, mean, var)``: :func:`conv3x3` and the per-channel mean and biased variance of ``y``
  over (B, H, W) from the kernel's epilogue (what batch norm normalises with)."""
  return _conv(x, w, b, stats=True)


def _conv3x3_stats_fwd(x, w, b):
  out = conv3x3_stats(x, w, b)
  return out, (x, w, out[0], out[1])


def _conv3x3_stats_bwd(res, cts):
  x, w, y, mean = res
  g_y, g_mean, g_var = cts
  n = y.shape[0] * y.shape[1] * y.shape[2]
  # d mean / dy = 1/n; d var / dy = 2 (y - mean) / n (the sum of y - mean vanishes)
  return _conv3x3_bwd((x, w), g_y + (g_mean + 2.0 * g_var * (y - mean)) / n)


conv3x3_stats.defvjp(_conv3x3_stats_fwd, _conv3x3_stats_bwd)
