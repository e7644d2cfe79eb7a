"""A PyTorch (torch.func) peer of one meta-training step, for speed ratios on the same card.

  python benchmarks/torch_peer.py --configs omniglot_20way1shot --methods metadrop,maml \\
      --precision highest --check --out torch.json

The same computation as ``meta.make_train_step`` with ``meta_gradient='exact'``: per block a
3x3 SAME convolution of theta and of phi on the same input, ``u = mu * softplus(a + eps)`` on
the support set (``mu * softplus(a)`` on the query set; MAML ``u = mu``), transductive batch
norm (this batch's mean and biased variance over N, H, W; offset only; eps 1e-3), ReLU, 2x2
max-pool (stride 2, floor); dense head with one logit-noise scale per example
``softplus(feat w_phi + b_phi) * eps`` on the support set; K inner SGD steps on theta with
fresh noise each step (``torch.func.grad`` inside the outer ``torch.func.grad``: second order);
tasks vmapped (``torch.func.vmap``); query cross-entropy averaged over tasks; element-wise clip
to [-3, 3], then Adam (phi frozen for MAML). Episodes are drawn on the GPU from a resident uint8
tensor of the split's real shape, noise with ``torch.randn``, both inside the timed step.

``--check`` compares the loss and meta-gradient of one task with JAX's (``meta.task_loss``) on
the same weights, episode and noise (JAX's noise reproduced from its keys and transposed), so
the timing compares equal computations. torch's precision follows ``--precision``: 'highest'
disables TF32 in cuBLAS and cuDNN, 'default' enables both (JAX's default on Hopper).

Timing: median over ``--iters`` steps after ``--warmup``, each step synchronised; eager mode
(torch.compile of nested torch.func transforms is not attempted). torch is not a dependency, so
CI does not run this file; the GPU job (tools/long_runs) runs ``--check`` before any timing.

Nothing in the package or the tests imports this file (torch is not a dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_SHAPES = {'omniglot': (4800, 20, 28, 28, 1), 'miniimagenet': (64, 600, 84, 84, 3)}


def _config(name, method):
  sys.path.insert(0, ROOT)
  import configs
  return configs.get(name, method=method, meta_gradient='exact')


class Peer:
  """The meta-step of one config in torch.func."""

  def __init__(self, cfg, device, dtype=None):
    import torch
    self.torch = torch
    self.cfg = cfg
    self.device = device
    self.dtype = dtype or torch.float32
    self.L = cfg.model.num_layers
    self.C = cfg.model.channels
    self.method = cfg.method
    self.noisy = cfg.method == 'metadrop'
    self.eps = cfg.model.bn_eps
    self.K = cfg.inner_steps
    self.lr = cfg.inner_lr

  # ---- parameters -----------------------------------------------------------------------------
  def init_params(self, seed=0):
    torch = self.torch
    g = torch.Generator(device='cpu').manual_seed(seed)
    from metadrop_jax import data as data_lib
    h, w, cin = data_lib.image_shape(self.cfg.data)
    p = {}
    for l in range(self.L):
      ci = cin if l == 0 else self.C
      for part in ('theta', 'phi'):
        p[f'{part}.conv{l}.w'] = 0.02 * torch.randn(self.C, ci, 3, 3, generator=g)
        p[f'{part}.conv{l}.b'] = torch.zeros(self.C)
      p[f'bn.conv{l}.beta'] = torch.zeros(self.C)
      h, w = h // 2, w // 2
    f = h * w * self.C
    p['theta.dense.w'] = 0.02 * torch.randn(f, self.cfg.way, generator=g)
    p['theta.dense.b'] = torch.zeros(self.cfg.way)
    p['phi.dense.w'] = 0.02 * torch.randn(f, 1, generator=g)
    p['phi.dense.b'] = torch.zeros(1)
    return {k: v.to(self.device, self.dtype) for k, v in p.items()}

  @staticmethod
  def from_jax(params, device, dtype):
    """torch params from a JAX ``{'theta','phi','bn'}`` tree (HWIO -> OIHW)."""
    import numpy as np
    import torch
    out = {}
    for part in ('theta', 'phi'):
      for name, leaf in params[part].items():
        w, b = np.asarray(leaf['w']), np.asarray(leaf['b'])
        if w.ndim == 4:
          w = w.transpose(3, 2, 0, 1)
        out[f'{part}.{name}.w'] = torch.tensor(np.ascontiguousarray(w), device=device, dtype=dtype)
        out[f'{part}.{name}.b'] = torch.tensor(b, device=device, dtype=dtype)
    for name, leaf in params['bn'].items():
      out[f'bn.{name}.beta'] = torch.tensor(np.asarray(leaf['beta']), device=device, dtype=dtype)
    return out

  # ---- the network ----------------------------------------------------------------------------
  def forward(self, p, x, noise):
    """Logits of ``x: [B, C, H, W]``; ``noise``: None (query / MAML) or a list of L conv noises
    ``[B, C, H_l, W_l]`` plus the logit noise ``[B, way]``."""
    torch = self.torch
    F = torch.nn.functional
    h = x
    for l in range(self.L):
      if self.noisy:
        w = torch.cat([p[f'theta.conv{l}.w'], p[f'phi.conv{l}.w']], 0)
        b = torch.cat([p[f'theta.conv{l}.b'], p[f'phi.conv{l}.b']], 0)
        both = F.conv2d(h, w, b, padding=1)
        mu, a = both[:, :self.C], both[:, self.C:]
        u = mu * F.softplus(a + noise[l]) if noise is not None else mu * F.softplus(a)
      else:
        u = F.conv2d(h, p[f'theta.conv{l}.w'], p[f'theta.conv{l}.b'], padding=1)
      mean = u.mean(dim=(0, 2, 3), keepdim=True)
      var = (u - mean).square().mean(dim=(0, 2, 3), keepdim=True)
      u = (u - mean) * torch.rsqrt(var + self.eps) + p[f'bn.conv{l}.beta'].view(1, -1, 1, 1)
      h = F.max_pool2d(F.relu(u), 2, 2)
    feat = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)    # NHWC order, as the JAX head
    logits = feat @ p['theta.dense.w'] + p['theta.dense.b']
    if self.noisy and noise is not None:
      sigma = F.softplus(feat @ p['phi.dense.w'] + p['phi.dense.b'])
      logits = logits + sigma * noise[self.L]
    return logits

  def task_loss(self, p, sx, sy, qx, qy, noises):
    torch = self.torch
    from torch.func import grad
    F = torch.nn.functional
    theta = {k: v for k, v in p.items() if k.startswith('theta.')}
    rest = {k: v for k, v in p.items() if not k.startswith('theta.')}

    def support_loss(th, noise):
      return F.cross_entropy(self.forward({**rest, **th}, sx, noise), sy)

    for k in range(self.K):
      g = grad(support_loss)(theta, noises[k] if self.noisy else None)
      theta = {n: theta[n] - self.lr * g[n] for n in theta}
    return F.cross_entropy(self.forward({**rest, **theta}, qx, None), qy)

  def batch_loss(self, p, sx, sy, qx, qy, noises):
    from torch.func import vmap
    losses = vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0, 0))(p, sx, sy, qx, qy, noises)
    return losses.mean()

  # ---- one training step ----------------------------------------------------------------------
  def sample(self, images):
    """A meta-batch of episodes from ``images: u8[classes, per_class, H, W, C]`` on the GPU."""
    torch = self.torch
    cfg = self.cfg
    T, N, K, Q = cfg.meta_batch, cfg.way, cfg.shot, cfg.query
    nc, m = images.shape[:2]
    cls = torch.argsort(torch.rand(T, nc, device=self.device), dim=1)[:, :N]
    inst = torch.argsort(torch.rand(T, N, m, device=self.device), dim=2)[:, :, :K + Q]
    imgs = images[cls[:, :, None], inst]                         # [T, N, K+Q, H, W, C]
    x = imgs.to(self.dtype).div_(255.0).permute(0, 1, 2, 5, 3, 4)  # [T, N, K+Q, C, H, W]
    hw = x.shape[3:]
    sx = x[:, :, :K].reshape(T, N * K, *hw)
    qx = x[:, :, K:].reshape(T, N * Q, *hw)
    sy = torch.arange(N, device=self.device).repeat_interleave(K).expand(T, -1)
    qy = torch.arange(N, device=self.device).repeat_interleave(Q).expand(T, -1)
    return sx, sy, qx, qy

  def noise_shapes(self, b, hw):
    h, w = hw
    shapes = []
    for _ in range(self.L):
      shapes.append((b, self.C, h, w))
      h, w = h // 2, w // 2
    shapes.append((b, self.cfg.way))
    return shapes

  def draw_noise(self, T, b, hw):
    torch = self.torch
    if not self.noisy:
      return [[torch.zeros(T, device=self.device)] for _ in range(self.K)]  # unused placeholder
    return [[torch.randn(T, *s, device=self.device, dtype=self.dtype)
             for s in self.noise_shapes(b, hw)] for _ in range(self.K)]

  def make_step(self, params):
    """``step(images)``: sample a meta-batch, meta-gradient, clip, Adam (multi-tensor kernels)."""
    torch = self.torch
    from torch.func import grad
    names = [k for k in params if self.noisy or not k.startswith('phi.')]   # MAML: phi frozen
    ps = [params[k] for k in names]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    lr, b1, b2, eps = self._meta_lr(), 0.9, 0.999, 1e-8      # optax.adam's defaults
    count = [0]
    clip = self.cfg.grad_clip

    def step(images):
      sx, sy, qx, qy = self.sample(images)
      noises = self.draw_noise(sx.shape[0], sx.shape[1], sx.shape[-2:])
      g = grad(lambda p: self.batch_loss(p, sx, sy, qx, qy, noises))(params)
      with torch.no_grad():
        gs = [g[k].clamp(-clip, clip) for k in names]
        count[0] += 1
        t = count[0]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, gs, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(torch._foreach_div(v, 1 - b2 ** t))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, torch._foreach_div(m, 1 - b1 ** t), denom, value=-lr)

    return step

  def _meta_lr(self):
    from metadrop_jax import config as config_lib
    return config_lib.meta_lr(self.cfg)


def set_precision(torch, precision):
  tf32 = precision == 'default'
  torch.backends.cuda.matmul.allow_tf32 = tf32
  torch.backends.cudnn.allow_tf32 = tf32


def measure(name, method, precision='highest', iters=20, warmup=3) -> dict:
  import numpy as np
  import torch
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  set_precision(torch, precision)
  torch.backends.cudnn.benchmark = True     # cuDNN autotuning, as XLA autotunes its convolutions
  cfg = _config(name, method)
  peer = Peer(cfg, device)
  params = peer.init_params(cfg.seed)
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.integers(0, 256, SPLIT_SHAPES[cfg.data.name], dtype=np.uint8),
                        device=device)
  step = peer.make_step(params)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  step(images)
  sync()
  first = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    step(images)
  sync()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    step(images)
    sync()
    times.append(time.perf_counter() - t)
  return {'config': name, 'method': method, 'precision': precision, 'framework': 'torch.func',
          'torch': torch.__version__, 'device': torch.cuda.get_device_name() if device == 'cuda'
          else 'cpu', 'first_step_s': first, 's_per_iter': float(np.median(times)),
          's_per_iter_min': float(np.min(times)), 'iters': iters,
          'peak_mem_bytes': torch.cuda.max_memory_allocated() if device == 'cuda' else None}


def check_against_jax(name, method, precision='highest') -> dict:
  """Loss and meta-gradient of one task: torch peer vs ``meta.task_loss`` on the same inputs, at
  the GPU smoke test's point (``gpu_check``: initial parameters, sparse binary images, inner lr
  0.01, where float32 meta-gradients are well conditioned; at the paper's 0.1 two correct
  float32 implementations already differ by tens of percent)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from metadrop_jax import meta
  from tools.long_runs import gpu_check
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  set_precision(torch, precision)
  jax.config.update('jax_default_matmul_precision', precision)
  cfg, params, ep, key = gpu_check._problem(name, method, 'exact', gpu_check.SMOKE_OVERRIDES)
  spec = meta.spec_from_config(cfg)
  loss_j, g_j = jax.jit(jax.value_and_grad(lambda p, e, k: meta.task_loss(p, e, k, spec)[0]))(
      params, ep, key)
  # JAX's noise, from the same keys as nets.forward_features(sample=True) in step k.
  peer = Peer(cfg, device)
  b = ep.support_x.shape[0]
  hw = ep.support_x.shape[1:3]
  noises = []
  for k in range(cfg.inner_steps):
    keys = jax.random.split(jax.random.fold_in(key, k), cfg.model.num_layers + 1)
    step_noise = []
    for l, s in enumerate(peer.noise_shapes(b, hw)):
      if len(s) == 4:
        z = np.asarray(jax.random.normal(keys[l], (s[0], s[2], s[3], s[1]), jnp.float32))
        z = z.transpose(0, 3, 1, 2)
      else:
        z = np.asarray(jax.random.normal(keys[l], s, jnp.float32))
      step_noise.append(torch.tensor(np.ascontiguousarray(z), device=device)[None])
    noises.append(step_noise)
  tp = Peer.from_jax(params, device, torch.float32)
  t = lambda a, dt=torch.float32: torch.tensor(np.asarray(a), device=device, dtype=dt)[None]
  sx, qx = t(ep.support_x).permute(0, 1, 4, 2, 3), t(ep.query_x).permute(0, 1, 4, 2, 3)
  sy, qy = t(ep.support_y, torch.long), t(ep.query_y, torch.long)
  from torch.func import grad_and_value
  g_t, loss_t = grad_and_value(lambda p: peer.batch_loss(p, sx, sy, qx, qy, noises))(tp)
  ref = Peer.from_jax(jax.device_get(g_j), 'cpu', torch.float64)
  num = den = 0.0
  worst = 0.0
  for k, r in ref.items():
    d = (g_t[k].detach().double().cpu() - r)
    num += float(d.square().sum())
    den += float(r.square().sum())
    if float(r.norm()) > 0:
      worst = max(worst, float(d.norm() / r.norm()))
  return {'config': name, 'method': method, 'precision': precision, 'point': 'gpu_check smoke',
          'inner_lr': cfg.inner_lr, 'jax_loss': float(loss_j),
          'torch_loss': float(loss_t), 'loss_rel_err': abs(float(loss_t) - float(loss_j)) /
          abs(float(loss_j)), 'grad_rel_err': (num / max(den, 1e-300)) ** 0.5,
          'grad_worst_array_rel_err': worst}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--configs', default='omniglot_20way1shot,omniglot_20way5shot,'
                  'mimgnet_5way1shot,mimgnet_5way5shot')
  ap.add_argument('--methods', default='metadrop,maml')
  ap.add_argument('--precision', default='highest', choices=['highest', 'default'])
  ap.add_argument('--iters', type=int, default=20)
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--cells', default='', help='config:method,... instead of configs x methods')
  ap.add_argument('--check', action='store_true',
                  help='first compare one task of the first cell with JAX')
  ap.add_argument('--deadline', type=float, default=0.0, help='unix time: stop starting rows')
  ap.add_argument('--out', default='')
  a = ap.parse_args(argv)
  rows = []

  def save():
    if a.out:
      with open(a.out, 'w') as f:
        json.dump({'rows': rows}, f, indent=1)

  cells = ([tuple(c.split(':')) for c in a.cells.split(',') if c] if a.cells else
           [(n, m) for n in a.configs.split(',') for m in a.methods.split(',')])
  for i, (name, method) in enumerate(cells):
    if a.deadline and time.time() > a.deadline:
      rows.append({'config': name, 'method': method, 'error': 'not run: window budget'})
      continue
    try:
      if a.check and i == 0:
        c = check_against_jax(name, method, a.precision)
        c['kind'] = 'check'
        rows.append(c)
        print(f"[torch check] {name} {method}: loss rel err {c['loss_rel_err']:.1e}, "
              f"grad rel err {c['grad_rel_err']:.1e}", flush=True)
      r = measure(name, method, a.precision, a.iters, a.warmup)
      r['kind'] = 'time'
      rows.append(r)
      print(f"[torch] {name} {method} {a.precision}: {r['s_per_iter'] * 1e3:.2f} ms/iter "
            f"(first step {r['first_step_s']:.1f} s)", flush=True)
    except Exception as e:  # noqa: BLE001 - a failed row is data, the next one may work
      import traceback
      rows.append({'config': name, 'method': method, 'error': repr(e)[-500:],
                   'traceback': traceback.format_exc()[-2000:]})
      print(f'[torch] {name} {method}: ERROR {e!r}', flush=True)
    save()
  save()
  return 0


if __name__ == '__main__':
  sys.exit(main())
