"""Adversarial robustness of trained meta-learners (the paper's robustness figure, §2.3).

Protocol (one row per attack radius, for each norm):

1. the test episodes and the adaptation noise of :func:`metadrop_jax.train.evaluate` (same
   ``eval.seed``, same batches): each episode's support set adapts theta with ``mc_samples`` MC
   samples of the method's perturbed inner loss (30 by default, as in the paper's meta-test);
2. the *adapted* model's query inputs are attacked with PGD (:func:`metadrop_jax.attacks.pgd`)
   on the per-example query cross-entropy of the deterministic query pass (the same function
   that makes the predictions: no noise at query time, so no expectation over noise is needed);
   the support set is clean. The query set is attacked as one batch (transductive batch norm
   normalises the query set with its own statistics, so queries interact, as at meta-test);
3. accuracy on the attacked queries, mean and 95% CI over episodes (``metrics.summarize``).

At radius 0 the numbers equal ``train.evaluate`` on the same episodes (same adaptation, no
attack). Results go to ``<workdir>/robustness_<norm>.json`` (atomic writes).

Attack settings (the authors' are not known, paper_facts §2.3; these are our defaults, all
configurable): PGD, 20 steps, step ``2.5 * eps / steps``, one random start, l1 steps move the 5%
largest-gradient pixels. Radius grids default to the authors' Omniglot figure: l1 0..100 step 20,
l2 0..5 step 1, linf 0..0.1 step 0.02 (pixels in [0, 1]).

CLI::

  python -m metadrop_jax.robustness --workdirs=wd/maml,wd/metadrop --norms=linf,l2 \\
      --episodes=100 --out=robustness.png
"""

from __future__ import annotations

import argparse
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
from metadrop_jax import episodes as episodes_lib
from metadrop_jax import meta
from metadrop_jax import methods
from metadrop_jax import metrics as metrics_lib
from metadrop_jax import nets

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


def _map_tasks(fn, spec: meta.MetaSpec, *args):
  """vmap over the leading task axis, or lax.map where the config picks it (CPU)."""
  if spec.net.task_map == 'map':
    return jax.lax.map(lambda a: fn(*a), args)
  return jax.vmap(fn)(*args)


def make_adapt_step(config, mc_samples: int, num_tasks: int):
  """Jitted ``(params, images, episode_key, noise_key) -> (thetas[T], episodes[T])``.

  The episodes and noise keys are those of :func:`meta.make_eval_step`, so the adaptation is the
  one ``train.evaluate`` scores.
  """
  spec = meta.spec_from_config(config, mc_samples=mc_samples)

  @jax.jit
  def adapt(params, images, episode_key, noise_key):
    eps = episodes_lib.sample_batch(episode_key, images, num_tasks, config.way, config.shot,
                                    config.query)
    keys = jax.random.split(noise_key, num_tasks)
    thetas = _map_tasks(
        lambda sx, sy, k: meta.inner_adapt(params, sx, sy, k, spec)[0], spec,
        eps.support_x, eps.support_y, keys)
    return thetas, eps

  return adapt


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

    return _map_tasks(one, spec, thetas, qx, qy, jax.random.split(key, t))

  return attack_step


def attack_keys(config, split: str = 'test'):
  """Root key of the attacks' random starts: fixed by ``eval.seed`` and split (as eval keys)."""
  from metadrop_jax import train
  ep_key, _ = train.eval_keys(config, split)
  return jax.random.fold_in(ep_key, 7919)


def robustness_curves(params, images, config, norms: Sequence[str], *,
                      radii: dict | None = None, num_episodes: int | None = None,
                      mc_samples: int | None = None, attack: AttackSettings = AttackSettings(),
                      split: str = 'test') -> dict[str, dict]:
  """Accuracy under attack per radius for each norm: ``{norm: {'radii', 'accuracy', 'ci95',
  'n', 'accs' (f64[R, n] per-episode accuracies)}}`` (accuracies in percent).

  Each batch of episodes is adapted once and then attacked at every radius of every norm.
  """
  from metadrop_jax import train
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
  ep_key, noise_key = train.eval_keys(config, split)
  akey = attack_keys(config, split)
  images = jnp.asarray(images)
  accs = {n: [[] for _ in radii[n]] for n in norms}
  for i in range(math.ceil(n_ep / bt)):
    thetas, eps = adapt(params, images, jax.random.fold_in(ep_key, i),
                        jax.random.fold_in(noise_key, i))
    for n in norms:
      for j, r in enumerate(radii[n]):
        k = jax.random.fold_in(jax.random.fold_in(akey, i), j)
        accs[n][j].append(steps[n](params, thetas, eps.query_x, eps.query_y, jnp.float32(r), k))
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
                     config=None) -> dict[str, dict]:
  """Restores ``workdir``'s latest checkpoint, runs :func:`robustness_curves` and writes
  ``workdir/robustness_<norm>.json`` (``_<split>`` appended for splits other than test)."""
  from metadrop_jax import train
  config, state = train.restore_workdir(workdir, config)
  images = train.load_eval_split(config, split)
  t0 = time.time()
  curves = robustness_curves(state.params, images, config, norms, radii=radii,
                             num_episodes=num_episodes, mc_samples=mc_samples, attack=attack,
                             split=split)
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
        'minutes_all_norms': minutes, **train.provenance(),
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
def label_of(result: dict) -> str:
  """Legend entry: the method's name (adversarial training adds its norm and radius)."""
  m = result.get('method', '?')
  lab = methods.label(m)
  if 'adv_training' in result:
    lab += f" {result['adv_training']['norm']} e={result['adv_training']['eps']:g}"
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


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _floats(s: str):
  return tuple(float(v) for v in s.split(',') if v.strip())


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m metadrop_jax.robustness',
      description='Adversarial robustness of trained workdirs: for every workdir, adapt on each '
      "test episode's support set (MC samples, as the meta-test) and attack the adapted "
      "model's query inputs with PGD at each radius; writes <workdir>/robustness_<norm>.json "
      'and plots accuracy vs radius (one panel per norm, one curve per workdir).',
      epilog='Attack: PGD on the per-example query cross-entropy of the deterministic query '
      'pass, exact projection onto the norm ball intersected with the [0,1] pixel box '
      '(metadrop_jax/attacks.py); defaults 20 steps, step 2.5*eps/steps, 1 random start. '
      'Radius defaults are the grids of the authors\' Omniglot figure. Episodes and '
      'adaptation noise are those of launch.py --mode=eval (eval.seed), so radius 0 equals the '
      'clean meta-test accuracy. Example: python -m metadrop_jax.robustness '
      '--workdirs=wd/maml,wd/metadrop --norms=linf,l2 --episodes=100 --out=fig.png',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--workdirs', required=True,
                 help='comma-separated training workdirs (each with config.json + checkpoints)')
  p.add_argument('--norms', default='linf,l2,l1', help='comma-separated subset of l1,l2,linf')
  p.add_argument('--episodes', type=int, default=None,
                 help='test episodes per workdir (default: the config\'s eval.num_episodes)')
  p.add_argument('--mc_samples', type=int, default=None,
                 help='MC samples of the inner loss during adaptation (default: eval.mc_samples)')
  p.add_argument('--radii_l1', type=_floats, default=DEFAULT_RADII['l1'],
                 help='l1 radii, comma-separated (default: the authors\' Omniglot figure)')
  p.add_argument('--radii_l2', type=_floats, default=DEFAULT_RADII['l2'], help='l2 radii')
  p.add_argument('--radii_linf', type=_floats, default=DEFAULT_RADII['linf'], help='linf radii')
  p.add_argument('--steps', type=int, default=AttackSettings.steps, help='PGD steps')
  p.add_argument('--step_size', type=float, default=None,
                 help='PGD step relative to the radius (default 2.5/steps)')
  p.add_argument('--restarts', type=int, default=AttackSettings.restarts,
                 help='random restarts (worst case kept per example)')
  p.add_argument('--no_rand_init', action='store_true', help='start PGD at the clean input')
  p.add_argument('--l1_sparsity', type=float, default=AttackSettings.l1_sparsity,
                 help='fraction of pixels moved by one l1 step')
  p.add_argument('--split', default='test', choices=['test', 'val'])
  p.add_argument('--out', default='', help='figure path (png/pdf); empty: no figure')
  p.add_argument('--labels', default='', help='comma-separated legend labels (default: methods)')
  p.add_argument('--plot_only', action='store_true',
                 help='only plot existing robustness_<norm>.json files (no evaluation)')
  p.add_argument('--skip_existing', action='store_true',
                 help='do not re-evaluate a workdir whose robustness_<norm>.json files exist')
  p.add_argument('--title', default=None, help='figure title')
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  workdirs = [w for w in args.workdirs.split(',') if w]
  norms = [n for n in args.norms.split(',') if n]
  for n in norms:
    if n not in attacks.NORMS:
      raise SystemExit(f'--norms: {n!r} is not one of {attacks.NORMS}')
  attack = AttackSettings(steps=args.steps, step_size=args.step_size, restarts=args.restarts,
                          rand_init=not args.no_rand_init, l1_sparsity=args.l1_sparsity)
  radii = {'l1': args.radii_l1, 'l2': args.radii_l2, 'linf': args.radii_linf}
  if not args.plot_only:
    for wd in workdirs:
      if args.skip_existing and all(load_results(wd, n, args.split) for n in norms):
        print(f'{wd}: results exist, skipped')
        continue
      res = evaluate_workdir(wd, norms, radii=radii, num_episodes=args.episodes,
                             mc_samples=args.mc_samples, attack=attack, split=args.split)
      for n, r in res.items():
        row = ', '.join(f'{e:g}: {a:.2f}±{c:.2f}'
                        for e, a, c in zip(r['radii'], r['accuracy'], r['ci95']))
        print(f'{wd} [{r["method"]}] {n}: {row}')
  if args.out:
    labels = [s for s in args.labels.split(',')] if args.labels else None
    plot(workdirs, norms, args.out, labels=labels, split=args.split, title=args.title)
    print(f'figure: {args.out}')


if __name__ == '__main__':
  main()
