"""Pictures: decision boundaries (from :mod:`metadrop_jax.export` arrays) and stochastic features.

Decision boundary (the authors' ``plot.py``): for one 2-way sub-task at one inner step, every
point's last-layer feature ``f`` is drawn at

* x = ``f · u`` with ``u = (w0 - w1) / |w0 - w1|`` (the head's discriminative direction),
* y = a 1-D t-SNE (``sklearn.manifold.TSNE(n_components=1)``) of the orthogonal remainder
  ``f - (f · u) u``, fitted jointly on the training, perturbed-training and test points,

and the decision boundary is the vertical line where the logit difference vanishes,
``(w0 - w1) · f + (b0 - b1) = 0``, i.e. ``x = (b1 - b0) / |w0 - w1|``. Class 0 lies to the right.

Stochastic features: for one training image, the first block's perturbed pre-batch-norm map
``feats['u0'] = mu * softplus(a + eps)`` (conv output of theta gated by the noise), a few
channels, under several noise draws (plus the noise-free map ``mu * softplus(a)`` of the
deterministic path); meta-learned initial parameters (before any inner step). ``--layer`` picks a
deeper block ``u{l}``. An animated GIF (PIL, one frame per draw) and a still PNG grid.

All figures are drawn with matplotlib's object API (no pyplot state, Agg canvas) at a fixed
size and dpi, so their pixel size is known: see each function.

  python -m metadrop_jax.cli.visualize boundaries --npz=/tmp/db/metadrop.npz --out_dir=/tmp/db/png
  python -m metadrop_jax.cli.visualize panel --npz=maml.npz,metadrop.npz --task=0 --step=-1 \\
      --out=docs/images/decision_boundary.png
  python -m metadrop_jax.cli.visualize features --workdir=workdirs/omni1_metadrop \\
      --out_png=docs/images/stochastic_features.png --out_gif=docs/images/stochastic_features.gif
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

DPI = 100
CLASS_COLORS = ('firebrick', 'royalblue')


def _figure(width_in: float, height_in: float):
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  fig = Figure(figsize=(width_in, height_in), dpi=DPI)
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig, path: str, dpi: int | None = None) -> str:
  """Saves atomically (temp file + rename) at the figure's own size (no tight bbox: the pixel
  size is figsize * dpi)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  root, ext = os.path.splitext(os.path.basename(path))
  tmp = os.path.join(d, f'.{root}.tmp.{os.getpid()}{ext}')
  fig.savefig(tmp, dpi=dpi or DPI)
  os.replace(tmp, path)
  return path


def _str(x) -> str:
  return str(np.asarray(x).item()) if x is not None else ''


# ------------------------------------------------------------------------------------------------
# decision boundaries
# ------------------------------------------------------------------------------------------------

def boundary_embedding(feat_train, feat_test, feat_perturbed, w, b, *, seed: int = 0,
                       perplexity: float | None = None) -> dict[str, Any]:
  """The 2-D view of one sub-task at one step.

  Args: ``feat_train [2S, F]``, ``feat_test [2Q, F]``, ``feat_perturbed [P, 2S, F]`` (P may be
  0), ``w [F, 2]``, ``b [2]``.
  Returns ``{'train': [2S, 2], 'test': [2Q, 2], 'perturbed': [P, 2S, 2], 'boundary': float}``.
  """
  from sklearn.manifold import TSNE
  ft, fq = np.asarray(feat_train, np.float64), np.asarray(feat_test, np.float64)
  fp = np.asarray(feat_perturbed, np.float64)
  w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
  d = w[:, 0] - w[:, 1]
  norm = float(np.linalg.norm(d))
  if not norm > 0:
    raise ValueError('w0 - w1 is zero: the head does not separate the two classes')
  u = d / norm
  n_tr, n_te = len(ft), len(fq)
  x = np.concatenate([ft, fq, fp.reshape(-1, ft.shape[-1])])
  proj = x @ u
  rem = x - proj[:, None] * u[None, :]
  n = len(x)
  perp = perplexity if perplexity else min(30.0, max(1.0, (n - 1) / 3.0))
  if n >= 3 and float(np.ptp(rem, axis=0).max()) > 0:
    # exact t-SNE: a few hundred points at most; Barnes-Hut is far slower at this size
    y = TSNE(n_components=1, perplexity=perp, random_state=seed, init='pca',
             method='exact' if n <= 2000 else 'barnes_hut').fit_transform(rem)[:, 0]
  else:
    y = np.zeros(n)
  xy = np.stack([proj, y], -1)
  return {'train': xy[:n_tr], 'test': xy[n_tr:n_tr + n_te],
          'perturbed': xy[n_tr + n_te:].reshape(fp.shape[:2] + (2,)) if fp.size else
          np.zeros((0, n_tr, 2)),
          'boundary': float((b[1] - b[0]) / norm)}


def _method_label(arrays, label=None) -> str:
  if label:
    return label
  from metadrop_jax import methods
  m = _str(arrays.get('method'))
  return methods.label(m) if m else 'model'


def draw_boundary(ax, arrays: dict, task: int, step: int, *, seed: int = 0, title: str | None = None,
                  legend: bool = True) -> dict:
  """Draws one sub-task / step of an export onto ``ax``; returns the embedding."""
  step = step % arrays['feat_train'].shape[1]
  emb = boundary_embedding(arrays['feat_train'][task, step], arrays['feat_test'][task, step],
                           arrays['feat_perturbed'][task, step], arrays['w'][task, step],
                           arrays['b'][task, step], seed=seed)
  ytr, yte = np.asarray(arrays['y_train']), np.asarray(arrays['y_test'])
  for c in range(2):
    col = CLASS_COLORS[c]
    pts = emb['perturbed'][:, ytr == c].reshape(-1, 2)
    if len(pts):
      ax.scatter(pts[:, 0], pts[:, 1], marker='o', s=50, c=col, alpha=0.3, edgecolors='black',
                 linewidths=0.5, linestyle=':', zorder=1,
                 label='perturbed train' if c == 0 else None)
    q = emb['test'][yte == c]
    ax.scatter(q[:, 0], q[:, 1], marker='*', s=110, c=col, edgecolors='black', linewidths=0.6,
               zorder=3, label='test' if c == 0 else None)
    t = emb['train'][ytr == c]
    ax.scatter(t[:, 0], t[:, 1], marker='o', s=110, c=col, edgecolors='black', linewidths=1.2,
               zorder=5, label='train' if c == 0 else None)
  ax.axvline(emb['boundary'], c='black', lw=1.5, zorder=4, label='decision boundary')
  xs = np.concatenate([emb['train'][:, 0], emb['test'][:, 0], emb['perturbed'][..., 0].ravel(),
                       [emb['boundary']]])
  pad = 0.08 * (xs.max() - xs.min() + 1e-9)
  ax.set_xlim(xs.min() - pad, xs.max() + pad)
  ax.set_xlabel('projection on w0 - w1')
  ax.set_ylabel('1-D t-SNE of the remainder')
  ax.set_yticks([])
  if title is None:
    cls = arrays['classes'][task]
    acc = float(arrays['acc_test'][task, step])
    title = f'task {task} (classes {cls[0]},{cls[1]}), step {step}: test acc {acc:.0%}'
  ax.set_title(title, fontsize=9)
  if legend:
    ax.legend(loc='lower left', fontsize=7, framealpha=0.8)
  return emb


def plot_boundary(arrays: dict, task: int, step: int, out: str, *, label: str | None = None,
                  seed: int = 0, size=(5.0, 4.0)) -> str:
  """One PNG (``size * 100`` pixels, default 500 x 400) for one sub-task and inner step."""
  fig = _figure(*size)
  ax = fig.add_axes((0.1, 0.13, 0.86, 0.77))
  step = step % arrays['feat_train'].shape[1]
  cls = arrays['classes'][task]
  title = (f'{_method_label(arrays, label)}: task {task} (classes {cls[0]},{cls[1]}), '
           f'step {step}, test acc {float(arrays["acc_test"][task, step]):.0%}')
  draw_boundary(ax, arrays, task, step, seed=seed, title=title)
  return save_figure(fig, out)


def plot_all_boundaries(arrays: dict, out_dir: str, *, tasks: Sequence[int] | None = None,
                        steps: Sequence[int] | None = None, label: str | None = None,
                        seed: int = 0) -> list[str]:
  """``out_dir/task{t}_step{k}.png`` for every (selected) sub-task and inner step."""
  n_tasks, n_steps = arrays['feat_train'].shape[:2]
  tasks = range(n_tasks) if tasks is None else tasks
  steps = range(n_steps) if steps is None else [s % n_steps for s in steps]
  return [plot_boundary(arrays, t, k, os.path.join(out_dir, f'task{t}_step{k}.png'), label=label,
                        seed=seed) for t in tasks for k in steps]


def plot_boundary_panel(exports: Sequence[dict], out: str, *, task: int = 0,
                        steps: Sequence[int] = (-1,), labels: Sequence[str] | None = None,
                        seed: int = 0, panel_size: float = 4.0) -> str:
  """A grid like the authors' figure: one column per export (e.g. MAML, Meta-dropout), one row
  per inner step. Pixel size: ``(100 * panel_size * len(exports), 100 * panel_size * len(steps))``.
  """
  ncol, nrow = len(exports), len(steps)
  fig = _figure(panel_size * ncol, panel_size * nrow)
  for i, arrays in enumerate(exports):
    lab = _method_label(arrays, labels[i] if labels else None)
    for j, s in enumerate(steps):
      k = s % arrays['feat_train'].shape[1]
      ax = fig.add_subplot(nrow, ncol, j * ncol + i + 1)
      acc = float(arrays['acc_test'][task, k])
      draw_boundary(ax, arrays, task, k, seed=seed, legend=(j == 0),
                    title=f'{lab} ({_str(arrays.get("dataset"))}), step {k}, test acc {acc:.0%}')
  fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1 / nrow + 0.02, top=1 - 0.08 / nrow,
                      wspace=0.15, hspace=0.35)
  return save_figure(fig, out)


# ------------------------------------------------------------------------------------------------
# stochastic features
# ------------------------------------------------------------------------------------------------

def pick_channels(maps: dict, n: int = 3) -> list[int]:
  """The ``n`` channels whose values vary most across noise draws (mean std over pixels)."""
  std = maps['draws'].std(axis=0).mean(axis=(0, 1))
  return [int(c) for c in np.argsort(-std)[:n]]


def _norm_channels(maps, channels):
  """Per-channel [0, 1] scaling shared by all draws and the noise-free map."""
  out = []
  for c in channels:
    allv = np.concatenate([maps['draws'][..., c].ravel(), maps['mean'][..., c].ravel()])
    lo, hi = float(allv.min()), float(allv.max())
    scale = (hi - lo) if hi > lo else 1.0
    out.append(((maps['draws'][..., c] - lo) / scale, (maps['mean'][..., c] - lo) / scale))
  return out


def _to_rgb_tile(a, tile: int, cmap=None):
  from PIL import Image
  a = np.clip(np.asarray(a, np.float64), 0, 1)
  if cmap is not None:
    rgb = (cmap(a)[..., :3] * 255).astype(np.uint8)
  else:
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    rgb = (a * 255).astype(np.uint8)
    if rgb.ndim == 2:
      rgb = np.repeat(rgb[..., None], 3, -1)
  return Image.fromarray(rgb).resize((tile, tile), Image.NEAREST)


def write_feature_gif(maps: dict, out: str, *, channels: Sequence[int] | None = None,
                      tile: int = 84, gap: int = 4, duration_ms: int = 400) -> str:
  """Animated GIF, one frame per noise draw: ``[input | channel a | channel b | ...]``.

  Frame size: ``(n * tile + (n - 1) * gap, tile)`` pixels with ``n = 1 + len(channels)``.
  """
  from matplotlib import colormaps
  from PIL import Image
  channels = list(channels) if channels is not None else pick_channels(maps)
  cmap = colormaps['viridis']
  normed = _norm_channels(maps, channels)
  n = 1 + len(channels)
  img_tile = _to_rgb_tile(maps['image'], tile)
  frames = []
  for d in range(maps['draws'].shape[0]):
    frame = Image.new('RGB', (n * tile + (n - 1) * gap, tile), (255, 255, 255))
    frame.paste(img_tile, (0, 0))
    for i, (dr, _) in enumerate(normed):
      frame.paste(_to_rgb_tile(dr[d], tile, cmap), ((i + 1) * (tile + gap), 0))
    frames.append(frame.convert('P', palette=Image.ADAPTIVE, colors=255))
  d = os.path.dirname(os.path.abspath(out))
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, f'.{os.path.basename(out)}.tmp.{os.getpid()}.gif')
  frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0,
                 disposal=1)
  os.replace(tmp, out)
  return out


def plot_feature_grid(maps: dict, out: str, *, channels: Sequence[int] | None = None,
                      cell: float = 1.5, title: str | None = None) -> str:
  """Still grid: rows = noise-free map + each draw, columns = input image + channels.

  Pixel size: ``(100 * cell * (1 + len(channels)), 100 * cell * (1 + D) + 40)``.
  """
  channels = list(channels) if channels is not None else pick_channels(maps)
  normed = _norm_channels(maps, channels)
  n_draws = maps['draws'].shape[0]
  nrow, ncol = 1 + n_draws, 1 + len(channels)
  fig = _figure(cell * ncol, cell * nrow + 0.4)
  top = 1 - 0.4 / (cell * nrow + 0.4)
  gs = fig.add_gridspec(nrow, ncol, left=0.1, right=0.99, bottom=0.01, top=top - 0.03,
                        wspace=0.05, hspace=0.1)
  img = maps['image']
  for r in range(nrow):
    for c in range(ncol):
      ax = fig.add_subplot(gs[r, c])
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel('no noise' if r == 0 else f'draw {r}', fontsize=8)
        if r == 0:
          ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap='gray', vmin=0, vmax=1)
          ax.set_title('input', fontsize=8)
        else:
          for s in ax.spines.values():
            s.set_visible(False)
        continue
      dr, mean = normed[c - 1]
      ax.imshow(mean if r == 0 else dr[r - 1], cmap='viridis', vmin=0, vmax=1,
                interpolation='nearest')
      if r == 0:
        ax.set_title(f'channel {channels[c - 1]}', fontsize=8)
  fig.suptitle(title or f'stochastic features u{maps.get("layer", 0)} (shared colour scale per '
               'channel)', fontsize=9, y=1 - 0.1 / (cell * nrow + 0.4))
  return save_figure(fig, out)
