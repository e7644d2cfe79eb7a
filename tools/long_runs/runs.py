"""The Table-1 campaign's runs and state: 8 paper runs x 2 meta-gradients as resumable state in
the repository, and what the next sitting should do with them.

State lives in ``results/table1/`` (committed after every GPU job):

* ``campaign.json``: the run list (order = priority) and the campaign-wide decisions that must
  not change once a run has started (matmul precision on the GPU; the formulation measured
  fastest per kind of device);
* ``<run>/``: one ordinary training workdir per run (``config.json``, ``checkpoints/<step>``
  with ``keep_checkpoints=1``, ``metrics.jsonl``, ``runs.jsonl`` = one line per sitting with
  steps, minutes, device, jax version and commit, and ``results.json`` once the run reached
  ``num_steps`` and was meta-tested with the paper's protocol);
* ``sittings.jsonl``: one line per sitting of the campaign (device, budget, what each run did);
* ``table1.md`` / ``status.md``: generated (:mod:`tools.long_runs.reports`).

Order: every run in the computation that reproduces the authors (``meta_gradient='authors'``)
first, then the exact one; within each, Omniglot 20-way 1-shot (both methods), miniImageNet
5-way 1-shot, Omniglot 20-way 5-shot, miniImageNet 5-way 5-shot.

A resumed run equals an uninterrupted one (tests/test_train.py) on one platform. Across CPU and
GPU (or two jax versions) the restored state is bit-identical and the episodes and noise of
every step are the same (threefry keys), but float arithmetic differs, and these meta-gradients
amplify rounding strongly (docs/gpu_window.md), so after a change of machine the trajectory is
another sample of the same training process, not the bits an uninterrupted run would produce.
"""

from __future__ import annotations

import os
import time
from typing import Any

from metadrop_jax import metrics as metrics_lib
from tools.long_runs import state
from tools.long_runs.state import PRECISIONS, CampaignError

DEFAULT_DIR = os.path.join('results', 'table1')
# Table 1's settings in campaign order, and the two methods of each.
SETTINGS = ('omniglot_20way1shot', 'mimgnet_5way1shot', 'omniglot_20way5shot', 'mimgnet_5way5shot')
METHODS = ('metadrop', 'maml')
# The computation that reproduces the authors first (paper cells comparable), then the exact one.
GRADIENTS = ('authors', 'exact')
# Loop fields a campaign sets on every run (never change results; see train._LOOP_FIELDS).
RUN_LOOP_FIELDS = {'keep_checkpoints': 1, 'progress_bar': False}


def run_name(setting: str, method: str, gradient: str) -> str:
  return f'{setting}_{method}_{gradient}'


def default_runs(settings=SETTINGS, methods=METHODS, gradients=GRADIENTS) -> list[dict]:
  return [{'name': run_name(s, m, g), 'setting': s, 'method': m, 'meta_gradient': g,
           'group': f'{s}/{g}'}
          for g in gradients for s in settings for m in methods]


# ------------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------------

def campaign_path(cdir: str) -> str:
  return os.path.join(cdir, 'campaign.json')


def new_campaign(settings=None, overrides: dict | None = None,
                 matmul_precision: str = 'auto') -> dict:
  """A campaign (not written): ``settings`` (default: Table 1's), ``overrides`` of every run
  (each run's config is built with them first: a misspelled field or a bad value is refused)."""
  if matmul_precision not in PRECISIONS:
    raise CampaignError(f'matmul_precision={matmul_precision!r}: choose one of {PRECISIONS}')
  camp = {'version': 1, 'runs': default_runs(tuple(settings or SETTINGS)),
          'overrides': dict(overrides or {}), 'matmul_precision': matmul_precision,
          'matmul_precision_note': (
              "GPU only (CPU float32 dots are exact float32 either way). 'auto' is resolved and "
              'locked by the first GPU sitting from that window\'s smoke test and benchmark '
              '(tools.long_runs.choices.choose_precision) and never changes afterwards.')}
  _check_run_configs(camp, '--campaign_settings / --campaign_overrides', 'fix the option')
  return camp


def init_campaign(cdir: str, settings=None, overrides: dict | None = None,
                  matmul_precision: str = 'auto') -> dict:
  """:func:`open_campaign`, writing campaign.json if it is missing."""
  return open_campaign(cdir, settings, overrides, create=True, matmul_precision=matmul_precision)


def open_campaign(cdir: str, settings=None, overrides: dict | None = None, *, create: bool,
                  matmul_precision: str = 'auto') -> dict:
  """The campaign of ``cdir``. An existing one is returned unchanged; ``settings`` or
  ``overrides`` other than its own are refused (they would change its runs). A missing one is
  built (and written only if ``create``); a folder that holds runs but no campaign.json is an
  error, never a new campaign."""
  path = campaign_path(cdir)
  if os.path.exists(path):
    camp = load_campaign(cdir)
    have = list(dict.fromkeys(r['setting'] for r in camp['runs']))
    if settings and list(settings) != have:
      raise CampaignError(f'{path} is a campaign of {have}, not {list(settings)}: use another '
                          '--campaign_dir')
    if overrides and dict(overrides) != camp.get('overrides', {}):
      raise CampaignError(f"{path} has the overrides {camp.get('overrides', {})}, not "
                          f'{dict(overrides)}: an existing campaign keeps its own (they set its '
                          "runs' results); drop --campaign_overrides or use another --campaign_dir")
    return camp
  held = state.run_folders(cdir)
  if held:
    raise CampaignError(f'{cdir} holds campaign runs ({", ".join(held[:3])}'
                        f'{", ..." if len(held) > 3 else ""}) but no campaign.json: '
                        + state.restore_hint(path))
  camp = new_campaign(settings, overrides, matmul_precision)
  if create:
    os.makedirs(cdir, exist_ok=True)
    metrics_lib.write_json_atomic(path, camp)
  return camp


def load_campaign(cdir: str) -> dict:
  """``cdir/campaign.json``, checked: a missing, cut, emptied or wrong-shaped file, or a run
  whose config does not build (an unknown setting or field), is a CampaignError naming the file
  and the fix."""
  path = campaign_path(cdir)
  camp = state.read_campaign_file(path)
  _check_run_configs(camp, path, 'fix the file or ' + state.restore_hint(path))
  return camp


def _check_run_configs(camp: dict, where: str, fix: str) -> None:
  for run in camp['runs']:
    try:
      run_config(run, camp)
    except (KeyError, ValueError, TypeError) as e:   # TypeError: a value of the wrong type
      why = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
      raise CampaignError(f"{where}: run {run['name']}: {' '.join(why.split())}: {fix}") from None


def save_campaign(cdir: str, camp: dict) -> None:
  metrics_lib.write_json_atomic(campaign_path(cdir), camp)


def run_config(run: dict, camp: dict):
  """The training config of one campaign run (paper config + method + meta-gradient)."""
  import configs
  return configs.get(run['setting'], **{'method': run['method'],
                                        'meta_gradient': run['meta_gradient'],
                                        **RUN_LOOP_FIELDS, **camp.get('overrides', {})})


def config_lib_override(cfg, fields: dict):
  from metadrop_jax import config as config_lib
  return config_lib.validate(config_lib.override(cfg, fields)) if fields else cfg


def workdir_of(cdir: str, run: dict) -> str:
  return os.path.join(cdir, run['name'])


def progress(cdir: str, run: dict) -> dict[str, Any]:
  """Steps done (from the checkpoint directory names), sittings, minutes, results; ``problem``:
  why the run cannot train now (a cut config.json), else None. A cut results.json reads as none
  (with a warning): the run is meta-tested again; so is one whose per-episode accuracies are
  missing (the paired interval of the gain needs them)."""
  import warnings
  r = state.read_run(workdir_of(cdir, run))
  if r['unread']:
    warnings.warn(f"{r['unread']}: read as not meta-tested (the next sitting meta-tests "
                  f"{run['name']} again)", RuntimeWarning)
  sittings, res, step = r['logged'], r['results'], r['step']
  num_steps = (r['config'] or {}).get('num_steps')
  problem = r['blocking'] and (f"{r['blocking']}: restore it from git or a copy of the run "
                               'folder (runs.jsonl names the commit that wrote it)')
  return {'step': step, 'num_steps': num_steps, 'sittings': len(sittings),
          'minutes': sum(float(s.get('minutes_this_run', 0.0)) for s in sittings),
          'devices': sorted({str(s.get('device', '?')) for s in sittings}),
          'trained': bool(num_steps) and step >= num_steps, 'problem': problem or None,
          'evaluated': res is not None and res.get('step') == step and os.path.exists(
              metrics_lib.episode_accs_path(workdir_of(cdir, run), 'test')),
          'results': res}


def data_available(config) -> bool:
  """Whether this machine has the run's training data without downloading anything."""
  from metadrop_jax import data as data_lib
  if config.data.name == 'synthetic':
    return True
  c = data_lib.with_default_path(config.data)
  return bool(c.path) and os.path.exists(os.path.expanduser(c.path))


# ------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------

def plan(cdir: str, camp: dict | None = None) -> list[dict]:
  """Every run in campaign order with its progress, whether its data is here, and its next
  action ('train', 'eval', 'done', or 'skip': its files need a fix first, ``problem`` says
  which)."""
  camp = camp or load_campaign(cdir)
  out = []
  for run in camp['runs']:
    p = progress(cdir, run)
    cfg = run_config(run, camp)
    p['num_steps'] = p['num_steps'] or cfg.num_steps
    p['trained'] = p['step'] >= p['num_steps']
    action = ('skip' if p['problem'] else 'done' if p['trained'] and p['evaluated'] else
              'eval' if p['trained'] else 'train')
    out.append({**run, **{k: v for k, v in p.items() if k != 'results'}, 'action': action,
                'data': cfg.data.name, 'data_here': data_available(cfg),
                'accuracy': (p['results'] or {}).get('accuracy'),
                'ci95': (p['results'] or {}).get('ci95')})
  return out


def resolve_precision(cdir: str, camp: dict, choice: str | None) -> str:
  """The matmul precision of this sitting; locks 'auto' on the first accelerator sitting."""
  import jax
  p = camp.get('matmul_precision', 'auto')
  if jax.default_backend() == 'cpu':   # float32 dots are exact float32 on the CPU: nothing to lock
    return 'highest' if p == 'auto' else p
  if p == 'auto':
    p = choice if choice in ('highest', 'default') else 'highest'
    camp['matmul_precision'] = p
    camp['matmul_precision_locked_by'] = {'device': jax.devices()[0].device_kind,
                                          'jax': jax.__version__,
                                          'date': time.strftime('%Y-%m-%d'),
                                          'from_window_choice': choice}
    save_campaign(cdir, camp)
  return p


# Fields a sitting may set on every run it trains (execution strategies: equal results to float32
# rounding, tests/test_fast_paths.py, and on the device to the smoke test's bound, gpu_check;
# workdir.LOOP_FIELDS lets a run change them between sittings).
FORMULATION_FIELDS = ('model.conv_impl', 'model.pool_impl', 'model.fuse_noise_conv',
                      'model.task_map', 'model.inner_loop', 'model.dot_algorithm',
                      'model.bn_impl')


def check_formulation(formulation: dict | None) -> dict:
  """``formulation`` (field -> value) if every field is an execution strategy, else ValueError."""
  bad = sorted(set(formulation or {}) - set(FORMULATION_FIELDS))
  if bad:
    raise ValueError(f'formulation fields {bad} change results; a sitting may only set '
                     f'{FORMULATION_FIELDS}')
  return dict(formulation or {})


def device_kind() -> str:
  """'cpu', or the accelerator's kind ('NVIDIA H200'): what formulations are recorded by."""
  import jax
  return 'cpu' if jax.default_backend() == 'cpu' else jax.devices()[0].device_kind


def recorded_formulation(camp: dict, kind: str) -> dict:
  return dict((camp.get('formulations') or {}).get(kind, {}).get('overrides', {}))


def recorded_xla_flags(camp: dict, kind: str) -> str | None:
  """The XLA flags of the formulation recorded for this kind of device (its deterministic-ops
  flag and any flag it needs, :func:`formulation_xla_flags`), or None where none was recorded
  (formulations recorded before flags were: the job's deterministic ops)."""
  return (camp.get('formulations') or {}).get(kind, {}).get('xla_flags')


# The XLA flags that decide whether a GPU computes deterministically: all of them only
# deterministic kernels, the first also the first autotuning candidate (benchmarks/formulations.py
# measures both).
DETERMINISTIC_OPS = '--xla_gpu_deterministic_ops=true'
EXCLUDE_NONDET = '--xla_gpu_exclude_nondeterministic_ops=true'
FLAG_FAMILIES = tuple(f[2:].split('=')[0] for f in (DETERMINISTIC_OPS, EXCLUDE_NONDET))


def determinism_label(deterministic_ops: bool, extra_flags: str = '') -> str:
  """How a formulations cell keeps determinism: 'det' (deterministic ops), 'excl' (only
  deterministic kernels, autotuned) or 'nondet'."""
  return 'det' if deterministic_ops else 'excl' if EXCLUDE_NONDET in extra_flags else 'nondet'


def formulation_xla_flags(base: str, flags: str | None) -> str:
  """``base`` (XLA_FLAGS) with a formulation's ``flags`` in force: the determinism flags of
  ``base`` (:data:`FLAG_FAMILIES`) are replaced by those of ``flags``, whatever else ``base``
  sets stays; ``flags`` None leaves ``base`` as it is."""
  if flags is None:
    return base
  kept = [f for f in base.split() if not any(k in f for k in FLAG_FAMILIES)]
  new = [f for f in flags.split() if f not in kept]
  return ' '.join(kept + new)


def flags_differ_from_record(camp: dict, env_flags: str, kind: str | None = None) -> str | None:
  """What is wrong when this process's XLA_FLAGS (``env_flags``) lack flags that the formulation
  recorded for its kind of device trains under (a sitting started by hand on a GPU), or None."""
  kind = kind or device_kind()
  rec = recorded_xla_flags(camp, kind)
  if rec is None:
    return None
  want = formulation_xla_flags(env_flags, rec)
  if set(want.split()) == set(env_flags.split()):
    return None
  return (f'campaign.json records the formulation of {kind} with XLA_FLAGS {rec!r}; this process '
          f'runs with {env_flags!r}: start it with XLA_FLAGS={want!r} to train as recorded')


def resolve_formulation(cdir: str, camp: dict, given: dict, xla_flags: str | None = None) -> dict:
  """The formulation of this sitting: ``given`` (chosen by a measurement on this kind of device,
  then recorded in campaign.json for it, with the ``xla_flags`` it was measured with), else the
  one recorded for this kind, else the configs' defaults ({})."""
  import jax
  kind = device_kind()
  if not given:
    return recorded_formulation(camp, kind)
  if (recorded_formulation(camp, kind) != given or
      (xla_flags is not None and recorded_xla_flags(camp, kind) != xla_flags)):
    rec = {'overrides': dict(given), 'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d')}
    if xla_flags is not None:
      rec['xla_flags'] = xla_flags
    camp.setdefault('formulations', {})[kind] = rec
    save_campaign(cdir, camp)
  return dict(given)


def run_of(camp, name):
  return next(r for r in camp['runs'] if r['name'] == name)


def format_plan(rows: list[dict]) -> str:
  lines = []
  for r in rows:
    lines.append(f"{r['name']:<42} {r['step']:>6}/{r['num_steps']:<6} {r['action']:<6} "
                 f"data {'here' if r['data_here'] else 'MISSING'} ({r['data']})"
                 + (f"  ({r['problem']})" if r['problem'] else ''))
  nxt = [r for r in rows if r['action'] not in ('done', 'skip')]
  if nxt:
    lines.append(f"next: {nxt[0]['name']} ({nxt[0]['action']}); needs {nxt[0]['data']} data")
    if nxt[0]['data'] == 'miniimagenet':
      lines.append('  on a GPU machine without it: bash scripts/pack_device_data.sh --mimg (the '
                   'zip in parts that fit one copy; it lists them in order)')
  else:
    lines.append('campaign complete')
  return '\n'.join(lines)
