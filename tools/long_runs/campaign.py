"""The Table-1 campaign's command line: 8 paper runs x 2 meta-gradients, trained in sittings.

  python -m tools.long_runs.campaign plan                      # what the next sitting would run
  python -m tools.long_runs.campaign sitting --budget_minutes=8   # one sitting (GPU or CPU)
  python -m tools.long_runs.campaign sitting --deadline=UNIX_TIME # one sitting, ends by then
  python -m tools.long_runs.campaign report                    # regenerate the tables only

``--plan`` and ``--report_only`` are accepted for ``plan`` and ``report``; ``python launch.py
--mode=campaign ...`` forwards here (without a command: a sitting). The state is
``--campaign_dir`` (default ``results/table1/``; :mod:`tools.long_runs.runs` says what is in it),
created by the first sitting with the four Table-1 settings (``--campaign_settings`` for another
list). ``plan`` and ``report`` never create or change it. Errors a user must fix (a damaged
campaign.json, a folder of runs without one, an option that does not fit the campaign) print one
line, ``error: <problem>: <fix>``, and exit with code 2; nothing is written. A full disk in a
sitting is one line too (what it was writing is left as it was before).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from tools.long_runs import runs as runs_lib

COMMANDS = ('plan', 'sitting', 'report')
# The options of launch.py's former campaign mode that name a command.
COMMAND_FLAGS = {'--plan': 'plan', '--report_only': 'report'}


def _comma_list(text: str) -> list[str]:
  return [x for x in text.split(',') if x]


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--campaign_dir', default=runs_lib.DEFAULT_DIR,
                      help='the campaign state (default: %(default)s)')
  common.add_argument('--campaign_settings', type=_comma_list, default=None,
                      help='new campaign only: configs/<name>.py settings, comma-separated '
                           "(default: the four of Table 1); an existing campaign's own may be "
                           'repeated, others are refused')
  common.add_argument('--campaign_overrides', type=_comma_list, default=[],
                      help='new campaign only: field=value overrides of every run, '
                           "comma-separated (tests: val_every=0); an existing campaign's own may "
                           'be repeated, others are refused')
  ap = argparse.ArgumentParser(prog='python -m tools.long_runs.campaign',
                               description=__doc__.split('\n')[0],
                               epilog='--plan and --report_only stand for plan and report.')
  sub = ap.add_subparsers(dest='cmd', required=True, metavar='{plan,sitting,report}')
  sub.add_parser('plan', parents=[common], help='print what the next sitting would run; no work')
  s = sub.add_parser('sitting', parents=[common], help='train the next runs until a deadline')
  when = s.add_mutually_exclusive_group()
  when.add_argument('--budget_minutes', type=float, default=10.0,
                    help='wall time of this sitting (default: %(default)s)')
  when.add_argument('--deadline', type=float, default=0.0,
                    help='end the sitting by this unix time instead (a job whose start-up '
                         'counts against its time limit)')
  s.add_argument('--formulation', type=_comma_list, default=[],
                 help='execution fields set on every run of this sitting, field=value, '
                      'comma-separated (e.g. model.pool_impl=select; runs.FORMULATION_FIELDS)')
  s.add_argument('--formulation_xla_flags', default=None,
                 help='with --formulation: the XLA flags it was measured with (its '
                      'deterministic-ops flag and any it needs), recorded with it in '
                      'campaign.json for this kind of device; this process must run under them')
  s.add_argument('--precision_choice', choices=['highest', 'default'], default=None,
                 help="used when the campaign's matmul precision is still 'auto' (a GPU job "
                      'decides it from its smoke test and benchmark)')
  sub.add_parser('report', parents=[common], help='regenerate the tables only')
  return ap


def _with_command(argv: list[str]) -> list[str]:
  """``--plan`` / ``--report_only`` as the commands they stand for."""
  if any(a in COMMANDS for a in argv):
    return argv
  named = [COMMAND_FLAGS[a] for a in argv if a in COMMAND_FLAGS]
  return named[:1] + [a for a in argv if a not in COMMAND_FLAGS] if named else argv


def fail(message: str):
  """The one-line error of a command line (exit code 2)."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  raise SystemExit(2)


def main(argv=None) -> int:
  ap = _parser()
  a = ap.parse_args(_with_command(list(sys.argv[1:] if argv is None else argv)))
  from metadrop_jax import cli
  try:
    return _main(a)
  except runs_lib.CampaignError as e:
    fail(e)
  except Exception as e:  # pylint: disable=broad-except
    line = cli.error_line(e, a.campaign_dir, '--campaign_dir')   # a full disk, a read-only one
    if line is None:
      raise
    fail(line)


def _options(a) -> tuple[dict, dict, float]:
  """(--campaign_overrides, --formulation, the sitting's budget in seconds from now), checked
  before anything is read or written."""
  from metadrop_jax.cli import parse_overrides
  if os.path.exists(a.campaign_dir) and not os.path.isdir(a.campaign_dir):
    raise runs_lib.CampaignError(f'--campaign_dir={a.campaign_dir} is a file, not a folder: '
                                 'choose another path')
  overrides = parse_overrides(a.campaign_overrides)
  if a.cmd != 'sitting':
    return overrides, {}, 0.0
  try:
    formulation = runs_lib.check_formulation(parse_overrides(a.formulation))
  except ValueError as e:
    raise runs_lib.CampaignError(f'--formulation: {e}') from None
  if a.formulation_xla_flags is not None:
    if not formulation:
      raise runs_lib.CampaignError('--formulation_xla_flags records the flags of a measured '
                                   '--formulation: give that --formulation too')
    missing = set(a.formulation_xla_flags.split()) - set(os.environ.get('XLA_FLAGS', '').split())
    if missing:
      raise runs_lib.CampaignError(f'--formulation_xla_flags: this process runs without '
                                   f'{sorted(missing)}: set them in XLA_FLAGS before starting it')
  if a.deadline:
    budget_s = a.deadline - time.time()
    if not budget_s > 0:
      raise runs_lib.CampaignError(f'--deadline={a.deadline:.0f} is {-budget_s:.0f} s in the '
                                   'past: give a unix time in the future')
  else:
    budget_s = a.budget_minutes * 60.0
    if not (math.isfinite(budget_s) and budget_s > 0):
      raise runs_lib.CampaignError(f'--budget_minutes={a.budget_minutes}: give a positive number '
                                   'of minutes')
  return overrides, formulation, budget_s


def _main(a) -> int:
  cdir = a.campaign_dir
  started = time.monotonic()       # the budget (and --deadline) counts from here
  overrides, formulation, budget_s = _options(a)
  # plan and report never write the campaign's state: a missing campaign is created by a sitting
  camp = runs_lib.open_campaign(cdir, a.campaign_settings, overrides, create=a.cmd == 'sitting')
  if a.cmd == 'plan':
    print(runs_lib.format_plan(runs_lib.plan(cdir, camp)))
    if not os.path.exists(runs_lib.campaign_path(cdir)):
      print(f'({runs_lib.campaign_path(cdir)} does not exist yet: the first sitting creates it)')
    return 0
  if a.cmd == 'report':
    from tools.long_runs import reports
    runs_lib.load_campaign(cdir)        # no campaign.json: nothing to report
    print('\n'.join(reports.write_reports(cdir)))
    return 0
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')   # TF only comes with the TFDS source
  from tools.long_runs import sitting
  summary = sitting.sitting(cdir, budget_s, precision_choice=a.precision_choice,
                            formulation=formulation, started=started,
                            formulation_xla_flags=a.formulation_xla_flags if formulation else None)
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
