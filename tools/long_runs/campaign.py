"""The Table-1 campaign: 8 paper runs x 2 meta-gradients as resumable state in the repository.

  python launch.py --mode=campaign --budget_minutes=8          # one sitting (GPU window or CPU)
  python launch.py --mode=campaign --plan                      # what the next sitting would run
  python launch.py --mode=campaign --report_only               # regenerate the tables only

State lives in ``results/table1/`` (committed after every GPU window):

* ``campaign.json``: the run list (order = priority) and the campaign-wide decisions that must
  not change once a run has started (matmul precision on the GPU);
* ``<run>/``: one ordinary training workdir per run (``config.json``, ``checkpoints/<step>``
  with ``keep_checkpoints=1``, ``metrics.jsonl``, ``runs.jsonl`` = one line per sitting with
  steps, minutes, device, jax version and commit, and ``results.json`` once the run reached
  ``num_steps`` and was meta-tested with the paper's protocol);
* ``sittings.jsonl``: one line per sitting of the campaign (device, budget, what each run did);
* ``table1.md`` / ``status.md``: generated (``metadrop_jax.report`` layout; progress per run);
  ``docs/results.md``'s status block is regenerated from the same state.

Order: every run in the computation that reproduces the authors (``meta_gradient='authors'``)
first, then the exact one; within each, Omniglot 20-way 1-shot (both methods), miniImageNet
5-way 1-shot, Omniglot 20-way 5-shot, miniImageNet 5-way 5-shot. A sitting works through that
order: the two runs of a setting share the time left equally, the one with fewer steps first
(when the time left is too short to split, that one alone gets it, so both methods advance in
turn), a run that reaches ``num_steps`` is meta-tested at once if the time left allows (else
first thing in the next sitting), and a run whose data is not on this machine is skipped.

Every sitting is ``train.train`` with ``max_minutes_per_run``: checkpointed atomically, and a
resumed run equals an uninterrupted one (tests/test_train.py) on one platform. Across CPU and
GPU (or two jax versions) the restored state is bit-identical and the episodes and noise of
every step are the same (threefry keys), but float arithmetic differs, and these meta-gradients
amplify rounding strongly (docs/gpu_window.md), so after a change of machine the trajectory is
another sample of the same training process, not the bits an uninterrupted run would produce.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from metadrop_jax import metrics as metrics_lib

DEFAULT_DIR = os.path.join('results', 'table1')
# Table 1's settings in campaign order, and the two methods of each.
SETTINGS = ('omniglot_20way1shot', 'mimgnet_5way1shot', 'omniglot_20way5shot', 'mimgnet_5way5shot')
METHODS = ('metadrop', 'maml')
# The computation that reproduces the authors first (paper cells comparable), then the exact one.
GRADIENTS = ('authors', 'exact')
PRECISIONS = ('highest', 'default', 'auto')
# Loop fields a campaign sets on every run (never change results; see train._LOOP_FIELDS).
RUN_LOOP_FIELDS = {'keep_checkpoints': 1, 'progress_bar': False}
# eval.batch_tasks stays the config's on every machine: the test episodes of evaluate() are drawn
# per compiled call of batch_tasks episodes, so the same value is what lets a CPU meta-test of a
# committed checkpoint see the very episodes (and noise) the GPU's did.
# A run is not started with less than this (an accelerator's first step includes a compile of
# up to a minute; the time limit is checked after each step).
MIN_SHARE_S = {'accelerator': 60.0, 'cpu': 20.0}
EVAL_MIN_S = {'accelerator': 60.0, 'cpu': 10.0}   # 1000 episodes x 30 MC samples, compile included


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


def init_campaign(cdir: str, settings=None, overrides: dict | None = None,
                  matmul_precision: str = 'auto') -> dict:
  """Creates ``campaign.json`` if it is missing; returns the campaign (an existing one unchanged;
  ``settings`` other than its own is an error)."""
  path = campaign_path(cdir)
  if os.path.exists(path):
    camp = load_campaign(cdir)
    have = list(dict.fromkeys(r['setting'] for r in camp['runs']))
    if settings is not None and list(settings) != have:
      raise ValueError(f'{path} is a campaign of {have}, not {list(settings)}: use another '
                       '--campaign_dir')
    return camp
  settings = SETTINGS if settings is None else settings
  if matmul_precision not in PRECISIONS:
    raise ValueError(f'matmul_precision={matmul_precision!r}: choose one of {PRECISIONS}')
  os.makedirs(cdir, exist_ok=True)
  camp = {'version': 1, 'runs': default_runs(tuple(settings)), 'overrides': dict(overrides or {}),
          'matmul_precision': matmul_precision,
          'matmul_precision_note': (
              "GPU only (CPU float32 dots are exact float32 either way). 'auto' is resolved and "
              'locked by the first GPU sitting from that window\'s smoke test and benchmark '
              '(metadrop_jax.window.choose_precision) and never changes afterwards.')}
  metrics_lib.write_json_atomic(path, camp)
  return camp


def load_campaign(cdir: str) -> dict:
  path = campaign_path(cdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: not a campaign directory (launch.py '
                            '--mode=campaign creates results/table1/campaign.json)')
  with open(path) as f:
    return json.load(f)


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
  """Steps done (from the checkpoint directory names), sittings, minutes, results."""
  wd = workdir_of(cdir, run)
  ck = os.path.join(wd, 'checkpoints')
  steps = [int(d) for d in os.listdir(ck) if d.isdigit()] if os.path.isdir(ck) else []
  sittings = metrics_lib.read_jsonl(os.path.join(wd, 'runs.jsonl'))
  res = None
  if os.path.exists(os.path.join(wd, 'results.json')):
    with open(os.path.join(wd, 'results.json')) as f:
      res = json.load(f)
  num_steps = None
  if os.path.exists(os.path.join(wd, 'config.json')):
    with open(os.path.join(wd, 'config.json')) as f:
      num_steps = json.load(f).get('num_steps')
  step = max(steps) if steps else 0
  return {'step': step, 'num_steps': num_steps, 'sittings': len(sittings),
          'minutes': sum(float(s.get('minutes_this_run', 0.0)) for s in sittings),
          'devices': sorted({str(s.get('device', '?')) for s in sittings}),
          'trained': bool(num_steps) and step >= num_steps,
          'evaluated': res is not None and res.get('step') == step, 'results': res}


def data_available(config) -> bool:
  """Whether this machine has the run's training data without downloading anything."""
  from metadrop_jax import data as data_lib
  if config.data.name == 'synthetic':
    return True
  c = data_lib.with_default_path(config.data)
  return bool(c.path) and os.path.exists(os.path.expanduser(c.path))


# ------------------------------------------------------------------------------------------------
# planning and one sitting
# ------------------------------------------------------------------------------------------------

def plan(cdir: str, camp: dict | None = None) -> list[dict]:
  """Every run in campaign order with its progress, whether its data is here, and its next
  action ('train', 'eval' or 'done')."""
  camp = camp or load_campaign(cdir)
  out = []
  for run in camp['runs']:
    p = progress(cdir, run)
    cfg = run_config(run, camp)
    p['num_steps'] = p['num_steps'] or cfg.num_steps
    p['trained'] = p['step'] >= p['num_steps']
    action = 'done' if p['trained'] and p['evaluated'] else ('eval' if p['trained'] else 'train')
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
                      'model.task_map', 'model.inner_loop', 'model.dot_algorithm')


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


def resolve_formulation(cdir: str, camp: dict, given: dict) -> dict:
  """The formulation of this sitting: ``given`` (chosen by a measurement on this kind of device,
  then recorded in campaign.json for it), else the one recorded for this kind, else the configs'
  defaults ({})."""
  import jax
  kind = device_kind()
  if not given:
    return recorded_formulation(camp, kind)
  if recorded_formulation(camp, kind) != given:
    camp.setdefault('formulations', {})[kind] = {
        'overrides': dict(given), 'jax': jax.__version__, 'date': time.strftime('%Y-%m-%d')}
    save_campaign(cdir, camp)
  return dict(given)


def sitting(cdir: str, budget_s: float, *, eval_min_s: float | None = None,
            precision_choice: str | None = None, formulation: dict | None = None,
            log=print) -> dict:
  """Trains the campaign's next runs for ``budget_s`` seconds (wall clock, compile included),
  checkpointing each; meta-tests runs that finish; regenerates the tables. Returns a summary.
  ``formulation``: execution fields (:data:`FORMULATION_FIELDS`) set on every run it trains."""
  import jax
  from metadrop_jax import data as data_lib
  from metadrop_jax import evaluation
  from metadrop_jax import train
  from metadrop_jax import workdir as workdir_lib
  t_start = time.time()
  deadline = t_start + budget_s
  camp = load_campaign(cdir)
  formulation = resolve_formulation(cdir, camp, check_formulation(formulation))
  on_acc = jax.default_backend() != 'cpu'
  precision = resolve_precision(cdir, camp, precision_choice)
  jax.config.update('jax_default_matmul_precision', precision)
  # A finished run is meta-tested when at least this much time is left (else first thing in the
  # next sitting). No time is held back for it: a run that reaches num_steps stops before its
  # share ends, and the rest of its share is what the evaluation uses.
  if eval_min_s is None:
    eval_min_s = EVAL_MIN_S['accelerator'] if on_acc else min(EVAL_MIN_S['cpu'], 0.1 * budget_s)
  min_share_s = (MIN_SHARE_S['accelerator'] if on_acc else
                 min(MIN_SHARE_S['cpu'], 0.1 * budget_s))
  summary = {'start': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t_start)),
             'budget_s': budget_s, 'backend': jax.default_backend(),
             'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
             'commit': workdir_lib.provenance()['commit'], 'matmul_precision': precision,
             'xla_flags': os.environ.get('XLA_FLAGS', ''), 'formulation': formulation,
             'runs': [], 'skipped': []}
  left = lambda: deadline - time.time()

  def evaluate(run, cfg, entry):
    t0 = time.time()
    r = evaluation.evaluate_checkpoint(cfg, workdir_of(cdir, run))
    entry.update(evaluated=True, accuracy=r['accuracy'], ci95=r['ci95'],
                 eval_s=round(time.time() - t0, 1))
    log(f"[campaign] {run['name']}: meta-test {r['accuracy']:.2f} ± {r['ci95']:.2f} "
        f"({entry['eval_s']} s)")

  rows = plan(cdir, camp)
  # 1. runs trained to the end but not yet meta-tested: first.
  for row in rows:
    if row['action'] == 'eval' and row['data_here'] and left() > eval_min_s:
      run = _run_of(camp, row['name'])
      entry = {'name': run['name'], 'from': row['step'], 'to': row['step'], 'minutes': 0.0}
      evaluate(run, run_config(run, camp), entry)
      summary['runs'].append(entry)
  # 2. training, group by group, equal shares within a group.
  todo = [r for r in rows if r['action'] == 'train']
  for r in todo:
    if not r['data_here']:
      summary['skipped'].append({'name': r['name'], 'why': f"no {r['data']} data here"})
  todo = [r for r in todo if r['data_here']]
  groups: dict[str, list[dict]] = {}
  for r in todo:
    groups.setdefault(r['group'], []).append(r)
  stop = False
  for g, members in groups.items():
    # the run that is behind goes first: when a sitting is too short to split, the two methods
    # of a setting still advance in turn
    members = sorted(members, key=lambda r: r['step'])
    for i, row in enumerate(members):
      run = _run_of(camp, row['name'])
      cfg = config_lib_override(run_config(run, camp), formulation)
      t_data = time.time()
      data_lib.load_split(cfg.data, 'train')   # prepares the cache outside the run's share
      if time.time() - t_data > 1:
        log(f"[campaign] {cfg.data.name} data ready in {time.time() - t_data:.0f} s")
      share = left() / (len(members) - i)
      if share < min_share_s:
        if left() < min_share_s:
          stop = True
          break
        share = min_share_s      # too short to split: this run gets the minimum, then stop
      cfg.max_minutes_per_run = share / 60.0
      log(f"[campaign] {run['name']}: step {row['step']}/{row['num_steps']}, share {share:.0f} s")
      status = train.train(cfg, workdir_of(cdir, run))
      status.pop('state')
      entry = {'name': run['name'], 'from': row['step'], 'to': status['step'],
               'minutes': round(status['minutes_this_run'], 3), 'stopped': status['stopped'],
               'evaluated': False}
      log(f"[campaign] {run['name']}: now at {status['step']}/{status['num_steps']} "
          f"({status['minutes_this_run'] * 60:.0f} s, {status['stopped']})")
      if status['done'] and left() > eval_min_s:
        evaluate(run, cfg, entry)
      summary['runs'].append(entry)
    if stop:
      break
  summary['seconds'] = round(time.time() - t_start, 1)
  with open(os.path.join(cdir, 'sittings.jsonl'), 'a') as f:
    f.write(json.dumps(summary) + '\n')
  write_reports(cdir)
  return summary


def _run_of(camp, name):
  return next(r for r in camp['runs'] if r['name'] == name)


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------

STATUS_BEGIN = '<!-- campaign-status:begin (generated by launch.py --mode=campaign) -->'
STATUS_END = '<!-- campaign-status:end -->'


def status_table(cdir: str) -> str:
  rows = plan(cdir)
  lines = ['| # | run | setting | method | meta-gradient | steps | sittings | GPU/CPU minutes | '
           'devices | meta-test accuracy | next |', '|' + '---|' * 11]
  for i, r in enumerate(rows, 1):
    acc = '—' if r['accuracy'] is None else f"{r['accuracy']:.2f} ± {r['ci95']:.2f}"
    lines.append(f"| {i} | `{r['name']}` | {r['setting']} | {r['method']} | {r['meta_gradient']} | "
                 f"{r['step']:,} / {r['num_steps']:,} | {r['sittings']} | {r['minutes']:.1f} | "
                 f"{', '.join(r['devices']) or '—'} | {acc} | {r['action']} |")
  return '\n'.join(lines) + '\n'


def write_reports(cdir: str, results_md: str | None = None) -> list[str]:
  """``table1.md`` (report layout, one column per meta-gradient), ``status.md``, and the status
  block of ``docs/results.md`` (when ``cdir`` is the repository's campaign)."""
  from metadrop_jax import report
  camp = load_campaign(cdir)
  wds = [workdir_of(cdir, r) for r in camp['runs']
         if os.path.exists(os.path.join(workdir_of(cdir, r), 'results.json'))]
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    table = report.build_table(report.load_results(wds))
  written = [report.write_atomic(os.path.join(cdir, 'table1.md'), table)]
  status = status_table(cdir)
  head = ('# Table-1 campaign: progress\n\nGenerated by `python launch.py --mode=campaign` from '
          'the state in this folder (see README.md).\n\n')
  written.append(report.write_atomic(os.path.join(cdir, 'status.md'), head + status))
  if results_md is None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.abspath(cdir) == os.path.join(root, DEFAULT_DIR):
      results_md = os.path.join(root, 'docs', 'results.md')
  if results_md and os.path.exists(results_md):
    with open(results_md) as f:
      text = f.read()
    if STATUS_BEGIN in text and STATUS_END in text:
      a, rest = text.split(STATUS_BEGIN, 1)
      _, b = rest.split(STATUS_END, 1)
      text = a + STATUS_BEGIN + '\n' + status + STATUS_END + b
      written.append(report.write_atomic(results_md, text))
  return written


def format_plan(rows: list[dict]) -> str:
  lines = []
  for r in rows:
    lines.append(f"{r['name']:<42} {r['step']:>6}/{r['num_steps']:<6} {r['action']:<6} "
                 f"data {'here' if r['data_here'] else 'MISSING'} ({r['data']})")
  nxt = [r for r in rows if r['action'] != 'done']
  if nxt:
    lines.append(f"next: {nxt[0]['name']} ({nxt[0]['action']}); needs {nxt[0]['data']} data")
  else:
    lines.append('campaign complete')
  return '\n'.join(lines)
