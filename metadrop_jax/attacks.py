"""Projected gradient descent (PGD) attacks under l1, l2 and linf budgets, inside the pixel box.

``pgd(loss_fn, x, key, norm=, eps=, steps=)`` returns ``x_adv`` with, for every example ``i``,

    ||x_adv[i] - x[i]||_p <= eps     and     box_lo <= x_adv <= box_hi   (default box [0, 1]),

found by ``steps`` ascent steps on ``loss_fn`` (Madry et al. 2018, "Towards deep learning models
resistant to adversarial attacks"), each followed by the *exact* Euclidean projection onto the
feasible set ``C = {d : ||d||_p <= eps} ∩ {d : lo <= d <= hi}`` with ``lo = box_lo - x <= 0 <= hi
= box_hi - x`` (see :func:`project`). Everything is jit/vmap/grad-traceable; ``eps`` may be a
traced scalar (one compilation serves a whole radius grid).

Ascent directions (the steepest-ascent direction of each norm, as is standard):

* linf: ``alpha * sign(g)``;
* l2:   ``alpha * g / ||g||_2``;
* l1:   a sparse sign step on the ``l1_sparsity`` fraction of coordinates with the largest
  ``|g|``, scaled to l1 length ``alpha`` (the "SLIDE" step of Tramer & Boneh 2019, "Adversarial
  training and robustness for multiple perturbations"); the pure l1 steepest-ascent step moves a
  single pixel and stalls.

For l1 and l2, coordinates whose gradient pushes against a box face they already touch are
excluded from the direction (they could not move; Croce & Hein 2021 do the same for l1-APGD).
``alpha = step_size * eps`` (step size is relative to the radius; default ``2.5 / steps``, Madry
et al.'s rule). Random start (``rand_init``): a uniform point of the linf ball, a uniformly
oriented l2 / l1 (Laplace direction) vector of random length ``<= eps``, projected onto ``C``.
``restarts`` independent runs: the worst case (highest per-example loss) is kept per example.

Exact projections (``project``): the KKT conditions of ``min ||d - v||^2 s.t. d in C`` are
separable per coordinate given one multiplier for the norm constraint, because 0 lies in the box:

* linf: ``d = clip(v, max(lo, -eps), min(hi, eps))`` (intersection of two boxes: closed form);
* l2:   ``d = clip(v / (1 + lam), lo, hi)``;
* l1:   ``d = clip(sign(v) * max(|v| - tau, 0), lo, hi)`` (soft threshold, then the box);

with ``lam, tau >= 0`` the smallest value for which the norm is ``<= eps``. Without the box, the
l1 case is exactly the projection of Duchi et al. 2008 (there ``tau`` is found by sorting); with
the box, "Duchi-project, then clip" (or clip, then project) is *not* the projection (clipping
changes the norm, re-projecting leaves the box), so we solve the joint KKT system instead: the
norm of ``d(tau)`` (resp. ``d(lam)``) is continuous and non-increasing in the multiplier, and we
locate the multiplier by ``_BISECT_ITERS`` bisection steps (to float32 resolution), keeping the
feasible end of the bracket. A final safeguard rescales by ``min(1, eps (1 - 1e-6) / ||d||)``
(which keeps the box because the box contains 0) so float32 rounding can never leave the ball.

Transductive batch norm note: the models of this project normalise the query set with its own
batch statistics, so examples interact. ``loss_fn`` sees (and the attack perturbs) the whole
batch jointly; restarts choose per example by the per-example loss when ``loss_fn`` returns a
vector ``[B]`` (a scalar loss selects whole restarts).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

NORMS = ('l1', 'l2', 'linf')
_BISECT_ITERS = 60
_SAFETY = 1e-6


def _bounds(x, box):
  lo = jnp.minimum(box[0] - x, 0.0)
  hi = jnp.maximum(box[1] - x, 0.0)
  return lo, hi


def _norm(d, norm):
  if norm == 'linf':
    return jnp.max(jnp.abs(d), axis=-1)
  if norm == 'l2':
    return jnp.sqrt(jnp.sum(jnp.square(d), axis=-1))
  return jnp.sum(jnp.abs(d), axis=-1)


def _bisect(fn, lo, hi, eps):
  """Smallest ``t`` in ``[lo, hi]`` (per row) with ``fn(t) <= eps``; ``fn`` non-increasing.

  Returns the feasible end of the final bracket.
  """
  def body(_, bracket):
    a, b = bracket
    mid = 0.5 * (a + b)
    ok = fn(mid) <= eps
    return jnp.where(ok, a, mid), jnp.where(ok, mid, b)
  _, b = jax.lax.fori_loop(0, _BISECT_ITERS, body, (lo, hi))
  return b


def project(d, x, eps, norm: str, box=(0.0, 1.0)):
  """Exact Euclidean projection of perturbations ``d`` onto ``{||d_i||_p <= eps} ∩ box - x``.

  ``d, x``: ``[B, ...]`` (norms per example over all trailing axes). Returns an array like ``d``.
  """
  if norm not in NORMS:
    raise ValueError(f'norm={norm!r}: choose one of {NORMS}')
  shape = d.shape
  b = shape[0]
  v = d.reshape(b, -1).astype(jnp.float32)
  lo, hi = _bounds(x.reshape(b, -1).astype(jnp.float32), box)
  eps = jnp.asarray(eps, jnp.float32)
  target = eps * (1.0 - _SAFETY)
  if norm == 'linf':
    out = jnp.clip(v, jnp.maximum(lo, -eps), jnp.minimum(hi, eps))
    return out.reshape(shape).astype(d.dtype)
  if norm == 'l2':
    # d(s) = clip(s * v, lo, hi), s = 1 / (1 + lam) in [0, 1]; ||d(s)|| non-decreasing in s.
    # Bisect on t = 1 - s (non-increasing norm).
    fn = lambda t: _norm(jnp.clip((1.0 - t)[:, None] * v, lo, hi), 'l2')
    dv = lambda t: jnp.clip((1.0 - t)[:, None] * v, lo, hi)
    t_max = jnp.ones((b,), jnp.float32)
  else:
    # d(tau) = clip(sign(v) max(|v| - tau, 0), lo, hi); ||d(tau)||_1 non-increasing in tau.
    av = jnp.abs(v)
    dv = lambda tau: jnp.clip(jnp.sign(v) * jnp.maximum(av - tau[:, None], 0.0), lo, hi)
    fn = lambda tau: _norm(dv(tau), 'l1')
    t_max = jnp.max(av, axis=-1)
  t0 = jnp.zeros((b,), jnp.float32)
  inside = fn(t0) <= target
  t = jnp.where(inside, t0, _bisect(fn, t0, t_max, target))
  out = dv(t)
  n = _norm(out, norm)
  scale = jnp.where(n > target, target / jnp.maximum(n, 1e-30), 1.0)
  out = out * scale[:, None]
  return out.reshape(shape).astype(d.dtype)


def _direction(g, x_adv, norm, box, l1_sparsity):
  """Unit-norm (in ``norm``) ascent direction per example from the flat gradient ``g: [B, D]``."""
  if norm == 'linf':
    return jnp.sign(g)
  # drop coordinates pushing against a face they already touch
  blocked = ((x_adv <= box[0]) & (g < 0)) | ((x_adv >= box[1]) & (g > 0))
  g = jnp.where(blocked, 0.0, g)
  if norm == 'l2':
    n = jnp.sqrt(jnp.sum(jnp.square(g), axis=-1, keepdims=True))
    return g / jnp.maximum(n, 1e-12)
  k = max(1, int(round(l1_sparsity * g.shape[-1])))
  ag = jnp.abs(g)
  thr = jax.lax.top_k(ag, k)[0][:, -1:]
  mask = (ag >= thr) & (ag > 0)
  cnt = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1)
  return jnp.where(mask, jnp.sign(g), 0.0) / cnt


def _random_start(key, shape, norm, eps):
  b = shape[0]
  k_dir, k_len = jax.random.split(key)
  if norm == 'linf':
    return eps * jax.random.uniform(k_dir, shape, jnp.float32, -1.0, 1.0)
  if norm == 'l2':
    u = jax.random.normal(k_dir, shape, jnp.float32)
  else:
    u = jax.random.laplace(k_dir, shape, jnp.float32)
  u = u.reshape(b, -1)
  u = u / jnp.maximum(_norm(u, norm), 1e-12)[:, None]
  r = eps * jax.random.uniform(k_len, (b, 1), jnp.float32)
  return (u * r).reshape(shape)


def _per_example(loss, b):
  loss = jnp.asarray(loss)
  return loss if loss.ndim == 1 else jnp.broadcast_to(loss, (b,))


def pgd(loss_fn: Callable[[jax.Array], jax.Array], x: jax.Array, key: jax.Array, *, norm: str,
        eps, steps: int, step_size: float | None = None, restarts: int = 1,
        rand_init: bool = True, l1_sparsity: float = 0.05, box=(0.0, 1.0)) -> jax.Array:
  """PGD maximising ``loss_fn`` within the ``norm`` ball of radius ``eps`` around ``x``.

  Args:
    loss_fn: ``x -> loss``: a scalar, or per-example losses ``[B]`` (their sum is ascended; they
      select the worst restart per example).
    x: clean inputs ``[B, ...]`` inside ``box``.
    key: randomness of the starts.
    norm: 'l1' | 'l2' | 'linf'.
    eps: radius (python float or traced scalar). ``eps = 0`` returns ``x`` unchanged.
    steps: ascent steps (static).
    step_size: step length relative to ``eps`` (``alpha = step_size * eps``); default
      ``2.5 / steps``.
    restarts: independent runs; the per-example worst case is kept.
    rand_init: start at a random point of the feasible set (else at ``x``).
    l1_sparsity: fraction of coordinates moved by one l1 step.
    box: the valid pixel range.

  Returns:
    ``x_adv`` like ``x``, with ``||x_adv - x||_p <= eps`` and ``x_adv`` inside ``box``, per example.
  """
  if norm not in NORMS:
    raise ValueError(f'norm={norm!r}: choose one of {NORMS}')
  if steps < 0 or restarts < 1:
    raise ValueError(f'steps={steps} must be >= 0 and restarts={restarts} >= 1')
  x = jax.lax.stop_gradient(x)
  shape, b = x.shape, x.shape[0]
  eps = jnp.asarray(eps, jnp.float32)
  alpha = eps * (2.5 / max(steps, 1) if step_size is None else step_size)
  xf = x.reshape(b, -1)

  def total(xa):
    return jnp.sum(loss_fn(xa))

  grad_fn = jax.grad(total)

  # The returned point is x + d rounded to float32 and clipped to the box; each coordinate's
  # rounding can add up to half an ulp of 1 to |x_adv - x|, so the last projection aims a hair
  # inside the ball (absolute margin of 6e-8 per coordinate in the norm's accumulation).
  dim = xf.shape[-1]
  margin = {'linf': 0.0, 'l2': 6e-8 * dim ** 0.5, 'l1': 6e-8 * dim}[norm]
  eps_final = jnp.maximum(eps * (1.0 - _SAFETY) - margin, 0.0)

  def finish(d):
    # box exactly: clip the final point (only shrinks |d| coordinate-wise, so the ball still holds)
    return jnp.clip(x + project(d, x, eps_final, norm, box), box[0], box[1])

  def one_run(k):
    d = _random_start(k, shape, norm, eps) if rand_init else jnp.zeros(shape, jnp.float32)
    d = project(d, x, eps, norm, box)

    def body(_, d):
      xa = jnp.clip(x + d, box[0], box[1])
      g = grad_fn(xa).reshape(b, -1)
      step = _direction(g, xa.reshape(b, -1), norm, box, l1_sparsity)
      return project((d.reshape(b, -1) + alpha * step).reshape(shape), x, eps, norm, box)

    d = jax.lax.fori_loop(0, steps, body, d)
    xa = finish(d)
    return xa, _per_example(loss_fn(xa), b)

  if restarts == 1:
    x_adv = one_run(key)[0]
  else:
    def scan_body(best, k):
      best_x, best_l = best
      xa, l = one_run(k)
      better = l > best_l
      best_x = jnp.where(better.reshape((b,) + (1,) * (len(shape) - 1)), xa, best_x)
      return (best_x, jnp.where(better, l, best_l)), None
    init = (x, jnp.full((b,), -jnp.inf, jnp.float32))
    (x_adv, _), _ = jax.lax.scan(scan_body, init, jax.random.split(key, restarts))
  # eps == 0: exactly the clean input (also when x sits slightly outside the box)
  return jax.lax.stop_gradient(jnp.where(eps > 0, x_adv, x)).astype(x.dtype)
