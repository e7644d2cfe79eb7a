"""Adversarial robustness of trained meta-learners (the paper's robustness figure, §2.3).

Protocol (one row per attack radius, for each norm):

1. the test episodes and the adaptation noise of :func:`metadrop_jax.evaluation.evaluate` (same
   ``eval.seed``, same batches): each episode's support set adapts theta with ``mc_samples`` MC
   samples of the method's perturbed inner loss (30 by default, as in the paper's meta-test);
2. the *adapted* model's query inputs are attacked with PGD (:func:`metadrop_jax.attacks.pgd`)
   on the per-example query cross-entropy of the deterministic query pass (the same function
   that makes the predictions: no noise at query time, so no expectation over noise is needed);
   the support set is clean. The query set is attacked as one batch (transductive batch norm
   normalises the query set with its own statistics, so queries interact, as at meta-test);
3. accuracy on the attacked queries, mean and 95% CI over episodes (``metrics.summarize``).

At radius 0 the numbers equal ``evaluation.evaluate`` on the same episodes (same adaptation, no
attack). Results go to ``<workdir>/robustness_<norm>.json`` (atomic writes).

Attack settings (the authors' are not documented, docs/paper.md; these are our defaults, all
configurable): PGD, 20 steps, step ``2.5 * eps / steps``, one random start, l1 steps move the 5%
largest-gradient pixels. Radius grids default to the authors' Omniglot figure: l1 0..100 step 20,
l2 0..5 step 1, linf 0..0.1 step 0.02 (pixels in [0, 1]).

CLI::

  python -m metadrop_jax.cli.robustness --workdirs=wd/maml,wd/metadrop --norms=linf,l2 \\
      --episodes=100 --out=robustness.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metadrop_jax import attacks
from metadrop_jax import keys as keys_lib
from metadrop_jax import meta
from metadrop_jax import methods
from metadrop_jax import metrics as metrics_lib
from metadrop_jax import nets
from metadrop_jax import workdir as workdir_lib

# The authors' figure (Omniglot, pixels in [0, 1]).
DEFAULT_RADII = {
    'l1': (0.0, 20.0, 40.0, 60.0, 80.0, 100.0),
    'l2': (0.0, 1.0, 2.0, 3.0, 4.0, 5.0),
    'linf': (0.0, 0.02, 0.04, 0.06, 0.08, 0.1),
}
_NORM_TITLES = {'l1': r'$\ell_1$', 'l2': r'$\ell_2$', 'linf': r'$\ell_\infty$'}


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  """PGD settings of the robustness evaluation (see :func:`metadrop_jax.attacks.pgd`)."""
  steps: int = 20
  step_size: float | None = None   # relative to eps; None -> 2.5 / steps
  restarts: int = 1
  rand_init: bool = True
  l1_sparsity: float = 0.05

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['step_size'] = self.step_size if self.step_size is not None else 2.5 / max(self.steps, 1)
    d['algorithm'] = 'pgd'
    return d


def _adapted(params, ep, key, spec):
  return meta.inner_adapt(params, ep.support_x, ep.support_y, key, spec)[0], ep


def make_adapt_step(config, mc_samples: int, num_tasks: int):
  """Jitted ``(params, images, episode_key, noise_key) -> (thetas[T], episodes[T])``.

  The evaluation batch of :func:`meta.eval_batch_fn` (the one ``meta.make_eval_step`` scores):
  same episodes, same noise, so the adaptation is the one ``evaluation.evaluate`` scores.
  """
  return jax.jit(meta.eval_batch_fn(_adapted, config, mc_samples, num_tasks))


def make_attack_step(config, norm: str, attack: AttackSettings):
  """Jitted ``(params, thetas[T], query_x[T], query_y[T], eps, key) -> acc[T]`` (eps traced)."""
  spec = meta.spec_from_config(config)

  @jax.jit
  def attack_step(params, thetas, qx, qy, eps, key):
    t = qx.shape[0]

    def one(theta, x, y, k):
      adapted = {**params, 'theta': theta}

      def loss_fn(xx):
        logits = nets.forward(adapted, xx, None, spec.net, sample=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

      x_adv = attacks.pgd(loss_fn, x, k, norm=norm, eps=eps, steps=attack.steps,
                          step_size=attack.step_size, restarts=attack.restarts,
                          rand_init=attack.rand_init, l1_sparsity=attack.l1_sparsity)
      logits = nets.forward(adapted, x_adv, None, spec.net, sample=False)
      return meta.accuracy(logits, y)

    return meta.map_tasks(one, spec, thetas, qx, qy, keys_lib.task_keys(key, t))

  return attack_step


def make_clean_step(config):
  """Jitted ``(params, thetas[T], query_x[T], query_y[T]) -> acc[T]``: the adapted models'
  query accuracy without attack (radius 0, where PGD would return the clean inputs)."""
  spec = meta.spec_from_config(config)

  @jax.jit
  def clean_step(params, thetas, qx, qy):
    def one(theta, x, y):
      return meta.accuracy(nets.forward({**params, 'theta': theta}, x, None, spec.net,
                                        sample=False), y)
    return meta.map_tasks(one, spec, thetas, qx, qy)

  return clean_step


def robustness_curves(params, images, config, norms: Sequence[str], *,
                      radii: dict | None = None, num_episodes: int | None = None,
                      mc_samples: int | None = None, attack: AttackSettings = AttackSettings(),
                      split: str = 'test', progress: bool = False) -> dict[str, dict]:
  """Accuracy under attack per radius for each norm: ``{norm: {'radii', 'accuracy', 'ci95',
  'n', 'accs' (f64[R, n] per-episode accuracies)}}`` (accuracies in percent).

  Each batch of episodes is adapted once and then attacked at every radius of every norm
  (radius 0 is scored without running PGD). ``progress``: a tqdm bar over episodes (ETA).
  """
  radii = {n: tuple(float(r) for r in (radii or {}).get(n, DEFAULT_RADII[n])) for n in norms}
  for n in norms:
    if n not in attacks.NORMS:
      raise ValueError(f'norm {n!r}: choose from {attacks.NORMS}')
    if any(r < 0 for r in radii[n]):
      raise ValueError(f'radii for {n} must be >= 0: {radii[n]}')
  n_ep = num_episodes or config.eval.num_episodes
  mc = mc_samples or config.eval.mc_samples
  bt = min(config.eval.batch_tasks, n_ep)
  adapt = make_adapt_step(config, mc, bt)
  steps = {n: make_attack_step(config, n, attack) for n in norms}
  clean = make_clean_step(config)
  ep_key, noise_key = keys_lib.eval_keys(config, split)
  akey = keys_lib.attack_key(config, split)
  images = jnp.asarray(images)
  accs = {n: [[] for _ in radii[n]] for n in norms}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n_ep, desc='attacked meta-test', unit='episode', dynamic_ncols=True)
  for i in range(math.ceil(n_ep / bt)):
    thetas, eps = adapt(params, images, *keys_lib.eval_batch_keys(ep_key, noise_key, i))
    for n in norms:
      for j, r in enumerate(radii[n]):
        if r == 0:
          a = clean(params, thetas, eps.query_x, eps.query_y)
        else:
          k = jax.random.fold_in(jax.random.fold_in(akey, i), j)
          a = steps[n](params, thetas, eps.query_x, eps.query_y, jnp.float32(r), k)
        accs[n][j].append(a)
    if bar is not None:
      jax.block_until_ready(accs[norms[-1]][-1][-1])
      bar.update(min(bt, n_ep - i * bt))
  if bar is not None:
    bar.close()
  out = {}
  for n in norms:
    per = np.stack([np.concatenate(jax.device_get(a))[:n_ep] for a in accs[n]])
    rows = [metrics_lib.summarize(p) for p in per]
    out[n] = {'radii': list(radii[n]), 'accuracy': [r['mean'] for r in rows],
              'ci95': [r['ci95'] for r in rows], 'n': rows[0]['n'], 'accs': per}
  return out


def evaluate_workdir(workdir: str, norms: Sequence[str], *, radii: dict | None = None,
                     num_episodes: int | None = None, mc_samples: int | None = None,
                     attack: AttackSettings = AttackSettings(), split: str = 'test',
                     config=None, progress: bool = False) -> dict[str, dict]:
  """Restores ``workdir``'s latest checkpoint, runs :func:`robustness_curves` and writes
  ``workdir/robustness_<norm>.json`` (``_<split>`` appended for splits other than test), with
  the per-episode accuracies at each radius (``episode_accs``, fractions) for paired
  comparisons of models attacked on the same episodes."""
  config, state = workdir_lib.restore(workdir, config)
  images = workdir_lib.load_eval_split(config, split)
  t0 = time.time()
  curves = robustness_curves(state.params, images, config, norms, radii=radii,
                             num_episodes=num_episodes, mc_samples=mc_samples, attack=attack,
                             split=split, progress=progress)
  minutes = (time.time() - t0) / 60.0
  results = {}
  for n, c in curves.items():
    res = {
        'name': config.name, 'method': config.method, 'dataset': config.data.name,
        'way': config.way, 'shot': config.shot, 'query': config.query,
        'step': int(state.step), 'num_steps': config.num_steps, 'norm': n,
        'radii': c['radii'], 'accuracy': c['accuracy'], 'ci95': c['ci95'], 'episodes': c['n'],
        'mc_samples': mc_samples or config.eval.mc_samples, 'split': split,
        'eval_seed': config.eval.seed, 'attack': attack.as_dict(),
        'target': 'query inputs of the adapted model (support clean)',
        'minutes_all_norms': minutes, 'meta_gradient': config.meta_gradient,
        'episode_accs': [[round(float(a), 6) for a in row] for row in c['accs']],
        **workdir_lib.provenance(),
    }
    if methods.get(config.method).query_attack:
      res['adv_training'] = {'norm': config.methods.adv_norm, 'eps': config.methods.adv_eps,
                             'steps': config.methods.adv_steps,
                             'step_size': config.methods.adv_step_size,
                             'restarts': config.methods.adv_restarts}
    suffix = '' if split == 'test' else f'_{split}'
    metrics_lib.write_json_atomic(os.path.join(workdir, f'robustness_{n}{suffix}.json'), res)
    results[n] = res
  return results


# ------------------------------------------------------------------------------------------------
# plotting
# ------------------------------------------------------------------------------------------------

_STYLE = {  # the authors' figure colours
    'metadrop': dict(color='tab:red'), 'maml': dict(color='black'),
    'mixup': dict(color='tab:green', linestyle='-'), 'vib': dict(color='tab:green', linestyle='--'),
    'infodrop': dict(color='tab:green', linestyle=':'), 'adv': dict(color='tab:orange'),
}
_MG_LABELS = {'authors': "authors'", 'exact': 'exact', 'first_order': 'first-order'}
_MG_LINESTYLE = {'exact': '--', 'first_order': ':'}   # the authors' computation: solid


def label_of(result: dict) -> str:
  """Legend entry: the method's name (adversarial training adds its norm and radius), and the
  meta-gradient computation where the results name it."""
  m = result.get('method', '?')
  lab = methods.label(m)
  if 'adv_training' in result:
    lab += f" {result['adv_training']['norm']} e={result['adv_training']['eps']:g}"
  if result.get('meta_gradient') in _MG_LABELS:
    lab += f" ({_MG_LABELS[result['meta_gradient']]})"
  return lab


def load_results(workdir: str, norm: str, split: str = 'test') -> dict | None:
  suffix = '' if split == 'test' else f'_{split}'
  path = os.path.join(workdir, f'robustness_{norm}{suffix}.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def plot(workdirs: Sequence[str], norms: Sequence[str], out: str, *,
         labels: Sequence[str] | None = None, split: str = 'test', title: str | None = None):
  """Accuracy (%) vs attack radius, one panel per norm, one curve (with 95% CI band) per workdir.

  Reads ``robustness_<norm>.json`` from each workdir; legends use the method names (or
  ``labels``). Returns the matplotlib figure (also saved to ``out``).
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(norms), figsize=(4.2 * len(norms), 3.6), squeeze=False)
  adv_rank = {}   # adversarially trained workdirs: one line style each, the same in every panel
  for ax, n in zip(axes[0], norms):
    for i, wd in enumerate(workdirs):
      r = load_results(wd, n, split)
      if r is None:
        continue
      lab = labels[i] if labels else label_of(r)
      style = dict(_STYLE.get(r['method'], {}))
      if r.get('meta_gradient') in _MG_LINESTYLE:
        style['linestyle'] = _MG_LINESTYLE[r['meta_gradient']]
      if 'adv_training' in r:   # adversarially trained
        rank = adv_rank.setdefault(i, len(adv_rank))
        style['linestyle'] = ['-', '--', ':', '-.'][rank % 4]
      x, y, c = np.array(r['radii']), np.array(r['accuracy']), np.array(r['ci95'])
      line, = ax.plot(x, y, marker='o', markersize=3, label=lab, **style)
      ax.fill_between(x, y - c, y + c, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_title(_NORM_TITLES.get(n, n) + ' attack')
    ax.set_xlabel(r'radius $\epsilon$')
    ax.set_ylabel('accuracy (%)')
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=150)
  return fig


def plot_seeds(comps, out: str, *, title: str | None = None, dpi: int = 100) -> str:
  """Robustness across training seeds, one column per comparison
  (:func:`metadrop_jax.seeds.robustness_comparisons`, two or more seeds each): on top each
  method's accuracy vs radius at every seed (thin lines) and its mean over seeds (thick line);
  below, the paired difference a − b at every seed (thin lines with their episode 95% CI as
  error bars) and its mean over seeds with the t-interval as a band, zero line marked. Returns
  ``out`` (written atomically)."""
  from matplotlib.figure import Figure
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  import textwrap
  from metadrop_jax import seeds as seeds_lib
  from metadrop_jax import visualize
  comps = seeds_lib.with_two_seeds(comps, 'robustness seeds figure')
  fig = Figure(figsize=(5.5 * len(comps), 7.0), dpi=dpi)
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, len(comps), squeeze=False, sharex='col')
  for col, c in enumerate(comps):
    ax_acc, ax_diff = axes[0, col], axes[1, col]
    x = np.array(c.radii)
    for side, value in (('b', c.b_value), ('a', c.a_value)):
      color = _STYLE.get(value, {}).get('color', 'tab:blue' if side == 'a' else 'tab:gray')
      ys = np.array([r[side]['accuracy'] for r in c.rows])
      for y in ys:
        ax_acc.plot(x, y, color=color, lw=0.8, alpha=0.45)
      ax_acc.plot(x, ys.mean(0), color=color, lw=2.4, marker='o', ms=3,
                  label=f'{methods.label(value)}: mean of {len(ys)} seeds (thin: each seed)')
    width = (x.max() - x.min()) or 1.0
    for k, r in enumerate(c.rows):
      ax_diff.errorbar(x + (k - (len(c.rows) - 1) / 2) * 0.008 * width, r['diff'],
                       yerr=r['ci95'], color=f'C{k % 10}', lw=0.8, marker='o', ms=2.5,
                       capsize=2, alpha=0.8, label=f"seed {r['seed']} (episode CI)")
    across = c.across()
    mean = np.array([a['mean'] for a in across])
    half = np.array([a['half'] for a in across])
    ax_diff.plot(x, mean, color=seeds_lib.MEAN_COLOR, lw=2.4, label='mean over seeds')
    ax_diff.fill_between(x, mean - half, mean + half, color=seeds_lib.MEAN_COLOR, alpha=0.15,
                         linewidth=0, label='95% t-interval over seeds')
    ax_diff.axhline(0.0, color='k', lw=0.9, ls='--')
    a_lab, b_lab = c.labels()
    ax_acc.set_title('\n'.join(textwrap.wrap(f'{c.title}: {c.where}', 60)), fontsize=8)
    ax_acc.set_ylabel('accuracy (%)')
    ax_acc.set_ylim(0, 100)
    ax_diff.set_ylabel(f'{a_lab} − {b_lab} (points)')
    ax_diff.set_xlabel(r'radius $\epsilon$')
    for ax in (ax_acc, ax_diff):
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return visualize.save_figure(fig, out, dpi)
