"""One GPU job inside a time budget, start to end, and unpacking what it brings back.

For a time-limited GPU machine without internet (a SLURM job with ``--time``, a preemptible VM,
a Colab runtime). On that machine, ``bash scripts/device_window.sh BUDGET_S`` installs the
copied wheels, lays out the copied data and compile cache, then runs

  python -m tools.long_runs.window run --budget_s=450 --out=$OUT

which runs, in this order, each phase with its own deadline so that the last one always happens:

a. ``info`` (devices, versions, nvidia-smi) and the smoke test (``tools.long_runs.gpu_check``:
   the meta-gradient of one task vs the float64 CPU reference, at 'highest' and default (TF32)
   matmul precision) in the background (:mod:`tools.long_runs.phases`);
b. the benchmark (``benchmarks/meta_step.py``, or ``benchmarks/formulations.py`` with
   ``--bench=formulations``) and the torch.func peer (``benchmarks/torch_peer.py``);
c. a campaign sitting (``python -m tools.long_runs.campaign sitting``) for the rest of the
   budget, with the precision and formulation chosen from a. and b.
   (:mod:`tools.long_runs.choices`); it trains only if its own formulation passed the smoke test;
d. packing into ``$OUT`` within the host's transfer limits (``--max_files``, ``--max_file_mib``,
   ``--part_mib``; :mod:`tools.long_runs.pack`).

Back here, ``bash scripts/unpack_window.sh DIR`` (= ``python -m tools.long_runs.window unpack
DIR``) puts the results in place. docs/gpu_window.md is the user's guide.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from tools.long_runs import autotune
from tools.long_runs import choices
from tools.long_runs import pack as pack_lib
from tools.long_runs import phases
from tools.long_runs import runs as runs_lib
from tools.long_runs import procs
from tools.long_runs import records
from tools.long_runs import reports
from tools.long_runs.phases import Job, run_phase
from tools.long_runs.procs import read_json

ROOT = procs.ROOT
# The job's last seconds (each at most a tenth of the budget): packing $OUT after the sitting's
# hard stop, and the sitting's own margin before that stop. Measured on an H200 (2026-12-04,
# docs/bench/windows): packing took 0.2-0.4 s; sittings ended 0.5-0.9 s after their deadline and
# their process exited 3-4 s after its start-up plus its budget. Every second here is a second
# not trained.
PACK_RESERVE_S = 8.0
SITTING_MARGIN_S = 12.0


def run_window(a) -> dict:
  """The job: phases a-d (module docstring). Returns its summary (also ``$OUT/window.json``)."""
  job = Job.start(a)
  run_phase(job, 'info', phases.info_phase)
  job.log(f"devices {job.result('info').get('devices')}")
  for name, state in (job.result('info').get('data') or {}).items():
    job.log(f'data {name}: {state}')   # e.g. which miniImageNet parts are still needed
  job.summary['autotune_cache'] = {
      **tuned_for(job), 'entries_at_start': autotune.check(
          autotune.CACHE_DIR, os.path.join(ROOT, '.gpu_cache', autotune.META), tuned_for(job),
          job.log)}
  phases.plan_bench(job)
  phases.start_smoke(job)
  run_phase(job, 'bench', phases.bench_phase)
  run_phase(job, 'smoke', phases.smoke_phase)
  run_phase(job, 'torch', phases.torch_phase)
  choose(job)
  run_phase(job, 'campaign', campaign_phase)
  return finish(job)


def tuned_for(job: Job) -> dict:
  """The jax version and card of this job: what XLA's autotune results are valid for."""
  return autotune.identity(job.result('info').get('versions', {}).get('jax', ''),
                           job.device_kind)


def choose(job: Job) -> None:
  """The precision and formulation of the sitting, from the smoke test and the benchmark."""
  smoke = job.result('smoke')
  precision, why = choices.choose_precision(smoke, job.bench_rows)
  job.summary['precision_choice'] = {'precision': precision, 'why': why}
  job.log(f'matmul precision for a campaign still on auto: {precision} ({why})')
  form = choices.choose_formulation(read_json(job.path('formulations.json')), smoke)
  job.summary['formulation_choice'] = form
  trains = sitting_formulation(job, form)
  why = form['why'] if form['overrides'] or not trains else \
      f'recorded for {job.device_kind} in campaign.json'
  job.log(f"formulation of this sitting: {trains or 'the configs default'} ({why}); "
          f"XLA_FLAGS={sitting_xla_flags(job, form)!r}")


def sitting_formulation(job: Job, form: dict) -> dict:
  """What the sitting trains with: the formulation this job chose, else the one campaign.json
  records for this kind of card (runs.resolve_formulation), else {} (the configs' defaults)."""
  return form['overrides'] or choices.recorded(os.path.abspath(job.a.campaign_dir),
                                               job.device_kind)


def sitting_xla_flags(job: Job, form: dict) -> str:
  """The sitting's XLA_FLAGS: the job's, with the determinism flags (and any other flag) of the
  formulation it trains in force: those this job measured it with, else those campaign.json
  records with it, else the job's own."""
  flags = form.get('xla_flags') if form['overrides'] else choices.recorded_flags(
      os.path.abspath(job.a.campaign_dir), job.device_kind)
  return runs_lib.formulation_xla_flags(job.env.get('XLA_FLAGS', ''), flags)


def campaign_phase(job: Job) -> dict:
  """c. One sitting of the campaign in a child process, killed at its hard deadline (the
  sitting aims to be done SITTING_MARGIN_S before it)."""
  a, cdir = job.a, os.path.abspath(job.a.campaign_dir)
  form = job.summary['formulation_choice']
  checked = choices.formulation_checked(job.result('smoke'), sitting_formulation(job, form))
  if checked is False:
    return {'skipped': "the float32 meta-gradient check failed for this sitting's formulation: "
                       'no training on this device'}
  hard = job.end - min(PACK_RESERVE_S, 0.1 * a.budget_s)
  job.summary['campaign_started_s'] = round(time.time() - job.t0, 1)
  cmd = [job.py, '-m', 'tools.long_runs.campaign', 'sitting', f'--campaign_dir={cdir}',
         f'--deadline={hard - min(SITTING_MARGIN_S, 0.1 * a.budget_s):.1f}',
         f"--precision_choice={job.summary['precision_choice']['precision']}"]
  if form['overrides']:
    cmd.append('--formulation=' + ','.join(f'{k}={v}' for k, v in form['overrides'].items()))
    if form.get('xla_flags') is not None:
      cmd.append(f"--formulation_xla_flags={form['xla_flags']}")
  env = {**job.env, 'XLA_FLAGS': sitting_xla_flags(job, form)}
  if a.campaign_settings:
    cmd.append(f'--campaign_settings={a.campaign_settings}')
    if a.campaign_overrides:
      cmd.append(f'--campaign_overrides={a.campaign_overrides}')
  rc, _ = job.log.run(cmd, hard - time.time(), env)
  row = procs.read_jsonl_tail(os.path.join(cdir, 'sittings.jsonl'))
  if not (row and row.get('start', '') >= job.summary['start']) and os.path.isdir(cdir):
    row = recover_sitting(cdir, job.t0, job.summary['start'])
    job.log(f"campaign killed before its summary: recovered from the runs' logs: {row['runs']}")
  return {'rc': rc, 'sitting': row}


def recover_sitting(cdir: str, since: float, start: str) -> dict:
  """The sitting row of a campaign process that was killed before writing it, rebuilt from
  what train() wrote for each run it finished (runs.jsonl, results.json changed since
  ``since``); appended to sittings.jsonl (on a line of its own) when it names a run. A run cut
  inside its share left only its last checkpoint (its steps since then are lost) and no row."""
  from metadrop_jax import metrics as metrics_lib
  runs = []
  for name in sorted(os.listdir(cdir)):
    log_path = os.path.join(cdir, name, 'runs.jsonl')
    if not os.path.exists(log_path) or os.path.getmtime(log_path) < since:
      continue
    rows = metrics_lib.read_jsonl(log_path)
    if not rows:
      continue
    last = rows[-1]
    entry = {'name': name, 'from': last.get('start_step'), 'to': last.get('step'),
             'minutes': round(float(last.get('minutes_this_run', 0.0)), 3),
             'stopped': last.get('stopped'), 'evaluated': False}
    res = os.path.join(cdir, name, 'results.json')
    if os.path.exists(res) and os.path.getmtime(res) >= since:
      r = read_json(res, {}) or {}
      entry.update(evaluated=True, accuracy=r.get('accuracy'), ci95=r.get('ci95'))
    runs.append(entry)
  row = {'start': start, 'killed': 'the window stopped the campaign process at its deadline',
         'runs': runs, 'skipped': []}
  if runs:
    metrics_lib.append_jsonl(os.path.join(cdir, 'sittings.jsonl'), row)
  return row


def finish(job: Job) -> dict:
  """d. Everything into ``$OUT``; ``window.json`` last, with the final summary."""
  a, log, summary = job.a, job.log, job.summary
  limits = transfer_limits(a)
  summary['seconds_before_pack'] = round(time.time() - job.t0, 1)
  extra = {}
  if os.path.exists(job.path('formulations.json')):
    extra['formulations.json'] = job.path('formulations.json')
  if os.path.isdir(job.path('traces')):
    extra['traces.tgz'] = job.path('traces')
  cache_dir = os.environ.get('JAX_COMPILATION_CACHE_DIR', '') if a.pack_cache else ''
  if cache_dir and os.path.isdir(cache_dir):
    n = records.pack_cache(cache_dir, job.path('jax_cache.tgz'),
                           limits.max_file_bytes - pack_lib.MiB)
    log(f'compile cache: the {n} newest entries packed' if n else 'compile cache: nothing packed')
    if n:
      extra['jax_cache.tgz'] = job.path('jax_cache.tgz')
  tuned = autotune.CACHE_DIR if a.pack_cache else ''
  if tuned and os.path.isdir(tuned) and os.listdir(tuned):
    n = records.pack_cache(tuned, job.path(autotune.ARCHIVE), limits.max_file_bytes - pack_lib.MiB)
    summary.setdefault('autotune_cache', {})['entries_packed'] = n
    log(f'autotune cache: {n} entries packed')
    if n:
      extra[autotune.ARCHIVE] = job.path(autotune.ARCHIVE)
  summary['accounting'] = accounting(job)
  files = pack_lib.pack(a.out, job.work, os.path.abspath(a.campaign_dir), since=job.t0,
                        summary=summary, log=log, cache_dir='', extra=extra, limits=limits)
  summary['files'] = files
  log(f'packed {len(files)} files into {a.out}: ' +
      ', '.join(f"{n} ({s / 2**20:.1f} MiB)" for n, s in files.items()))
  log(reports.format_window(summary))
  out_log = os.path.join(a.out, 'window.log')   # the log above is already in it
  if os.path.getsize(log.path) <= limits.max_file_bytes:
    shutil.copy(log.path, out_log)
  else:
    pack_lib.tail_copy(log.path, out_log, limits.max_file_bytes - 2**20)
  with open(os.path.join(a.out, 'window.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  return summary


def accounting(job: Job) -> dict:
  """What the job bought: its wall time, the time before training started, the minutes the
  campaign's runs trained and the steps they made."""
  sitting = (job.result('campaign').get('sitting') or {})
  runs = sitting.get('runs', [])
  steps = sum(max(0, (r.get('to') or 0) - (r.get('from') or 0)) for r in runs)
  minutes = sum(float(r.get('minutes') or 0.0) for r in runs)
  wall = time.time() - job.t0
  out = {'job_s': round(wall, 1), 'training_min': round(minutes, 2), 'steps_trained': steps,
         'steps_by_run': {r['name']: max(0, (r.get('to') or 0) - (r.get('from') or 0))
                          for r in runs},
         'steps_per_job_minute': round(steps / (wall / 60.0), 1) if wall > 0 else None,
         'training_started_s': job.summary.get('campaign_started_s')}
  job.log(f"job {out['job_s']:.0f} s: training {minutes:.2f} min (started at "
          f"{out['training_started_s']} s), {steps} steps ({out['steps_per_job_minute']} per "
          'minute of the job)')
  return out


def transfer_limits(a) -> pack_lib.TransferLimits:
  return pack_lib.TransferLimits(max_files=a.max_files,
                                 max_file_bytes=int(a.max_file_mib * pack_lib.MiB),
                                 part_bytes=int(a.part_mib * pack_lib.MiB))


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog='python -m tools.long_runs.window',
                               description=__doc__.split('\n')[0])
  sub = ap.add_subparsers(dest='cmd', required=True)
  r = sub.add_parser('run', help='one job (on the GPU machine)')
  r.add_argument('--budget_s', type=float, required=True)
  r.add_argument('--out', default=os.environ.get('OUT', '/tmp/window_out'))
  r.add_argument('--work', default='')
  r.add_argument('--campaign_dir', default=os.path.join('results', 'table1'))
  r.add_argument('--campaign_settings', default='', help='new campaign only (tests: tiny)')
  r.add_argument('--campaign_overrides', default='', help='new campaign only: k=v,k=v')
  r.add_argument('--smoke', default='auto', choices=['auto', 'run'],
                 help='auto: not run when a committed result of this card kind and numerics '
                      'fingerprint passed the formulations in --smoke_conv_impls')
  r.add_argument('--smoke_setting', default='omniglot_20way1shot')
  r.add_argument('--smoke_gradients', default='authors,exact')
  r.add_argument('--smoke_set', default='', help='config overrides of the smoke test: k=v,k=v')
  r.add_argument('--bench', default='auto', choices=['auto', 'full', 'quick', 'skip',
                                                    'formulations'],
                 help='auto: the formulations (benchmarks/formulations.py, --formulations_cells) '
                      'that have no committed timing on this card kind, beside the one the '
                      'campaign trains with, and the sitting trains with the fastest; none left: '
                      'the job only trains. formulations: the cells as given. full / quick: '
                      "benchmarks/meta_step.py's cells (all / the campaign's next run)")
  r.add_argument('--formulations_cells', default=','.join(choices.FORMULATION_CELLS),
                 help='the cells --bench=auto times where untimed, in this order')
  r.add_argument('--formulations_parallel', type=int, default=6)
  r.add_argument('--formulations_concurrent', default='',
                 help='copies of the fastest cell trained at once, e.g. 2,4 (H200, 2026-12-04: '
                      'no gain, the step keeps the card busy)')
  r.add_argument('--smoke_precisions', default='highest,default')
  r.add_argument('--smoke_conv_impls', default='im2col',
                 help="formulations the smoke test checks (gpu_check --conv_impls) besides "
                      "those of the planned formulation cells; the sitting trains only if its "
                      "own passed")
  r.add_argument('--bench_configs', default=','.join(choices.PAPER_SETTINGS))
  r.add_argument('--bench_gradient', default='authors')
  r.add_argument('--bench_set', default='', help='config overrides of every benchmark cell '
                 '(k=v,k=v; the dry-run test makes tiny tinier)')
  r.add_argument('--bench_iters', type=int, default=20)
  r.add_argument('--bench_warmup', type=int, default=3)
  r.add_argument('--bench_seeds', type=int, default=4,
                 help='full benchmark: the first cell with this many seeds vmapped in one step')
  r.add_argument('--measure_cap_s', type=float, default=180.0,
                 help='the benchmark and the torch.func peer together end within this many '
                      'seconds of the benchmark\'s start (one wave; the rest of the job trains)')
  r.add_argument('--torch', default='auto', choices=['auto', 'skip'])
  r.add_argument('--torch_share', type=float, default=0.15,
                 help='fraction of the budget for the torch peer, after the benchmark')
  r.add_argument('--pack_cache', type=int, default=1)
  d = pack_lib.TransferLimits()
  lim = r.add_argument_group("the host's transfer limits (what a job may bring back)")
  lim.add_argument('--max_files', type=int, default=d.max_files,
                   help='files in $OUT at most (window.json and window.log included)')
  lim.add_argument('--max_file_mib', type=float, default=d.max_file_bytes / pack_lib.MiB,
                   help='MiB per file at most')
  lim.add_argument('--part_mib', type=float, default=d.part_bytes / pack_lib.MiB,
                   help='the campaign archive is cut into parts of this many MiB')
  u = sub.add_parser('unpack', help="put a job's returned files in place (here); nothing is "
                     'changed unless every check passes (tools.long_runs.unpack)')
  u.add_argument('src')
  u.add_argument('--repo', default=ROOT)
  u.add_argument('--campaign_dir', default=os.path.join('results', 'table1'))
  u.add_argument('--force', default='', help='comma-separated: runs whose returned state '
                 "replaces this folder's even if older; matmul_precision / formulations: the "
                 "returned campaign.json's decision replaces this one's")
  u.add_argument('--skip', default='', help="comma-separated runs whose returned state is left "
                 "out (this folder's kept), e.g. one damaged in transfer")
  u.add_argument('--machine_minutes', type=float, default=None,
                 help="the host's count of this job's machine time in minutes (start-up, copies "
                      "and idle included), kept in its record beside the job's own wall time")
  return ap


def main(argv=None) -> int:
  ap = _parser()
  a = ap.parse_args(argv)
  if a.cmd == 'run':
    try:
      transfer_limits(a)
    except ValueError as e:
      ap.error(str(e))
    import signal
    signal.signal(signal.SIGTERM, procs.on_term)
    run_window(a)
  else:
    from tools.long_runs import unpack as unpack_lib
    try:
      done = unpack_lib.unpack(a.src, a.repo, a.campaign_dir, force=_names(a.force),
                               skip=_names(a.skip), machine_minutes=a.machine_minutes)
    except unpack_lib.CampaignError as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      return 2
    for path in records.store_measurements(a.src, done['bench'][:-len('.json')]):
      print(f'wrote {path}')
  return 0


def _names(text: str) -> list[str]:
  return [x for x in text.split(',') if x]


if __name__ == '__main__':
  sys.exit(main())
