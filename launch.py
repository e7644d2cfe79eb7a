"""Meta-train and evaluate MAML / Meta-Dropout (and the paper's comparison methods).

  python launch.py --config=configs/mimgnet_5way1shot.py --workdir=workdirs/mimg1
  python launch.py --config=configs/omniglot_20way1shot.py --config.method=maml --workdir=...
  python launch.py --mode=eval --workdir=workdirs/mimg1          # paper protocol -> results.json

Modes: train_eval (default: train to num_steps, resuming if the workdir has a checkpoint, then
evaluate), train (stop after training), eval (meta-test the latest checkpoint with the workdir's
config.json; a --config given with it may change only eval.*, data locations and loop fields),
prepare (build the data cache only). ``--mode=campaign`` is an alias of the Table-1 campaign's
own command line, ``python -m tools.long_runs.campaign`` (``--mode=campaign --plan`` = its
``plan``; docs/gpu_window.md). Every config field can be overridden:
--config.<field>=<value>. Ctrl-C or SIGTERM during training: the step in flight finishes, is
checkpointed, and the run stops (exit 0; rerun the command to resume).

Errors a user can fix (a missing or broken config file, an unknown or bad field, missing or
corrupt data, an empty workdir, a full disk, ...) print one line, ``error: <problem>: <fix>``, on
stderr and exit with code 2. ``--verbose`` (or METADROP_VERBOSE=1) prints the traceback too.
The libraries' log lines below WARNING (orbax's, ~35 per checkpoint) are not shown; absl's
``--verbosity=0`` (INFO) or ``--verbosity=1`` (DEBUG) shows them.
"""

from __future__ import annotations

import copy
import json
import logging as logging_std
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from metadrop_jax import cli     # light: no jax

config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py). Fields override with --config.x=y.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, results.json '
                    '(default: workdirs/<config.name>_<config.method>).')
flags.DEFINE_enum('mode', 'train_eval', ['train_eval', 'train', 'eval', 'prepare'],
                  'What to run. (--mode=campaign is an alias of python -m '
                  'tools.long_runs.campaign, the Table-1 campaign\'s home: --mode=campaign '
                  '--plan prints its plan; other options go there unchanged.)')
flags.DEFINE_enum('split', 'test', ['test', 'val'], 'eval mode: which split to meta-test on.')
flags.DEFINE_bool('verbose', False, 'On an error, print the full traceback as well '
                  '(same as METADROP_VERBOSE=1).')
FLAGS = flags.FLAGS

EXIT_USER_ERROR = cli.EXIT_USER_ERROR
# Fields that fix the shapes of the parameters in a checkpoint: evaluating a workdir with other
# values cannot restore it.
_SHAPE_FIELDS = ('method', 'way', 'model.channels', 'model.num_layers', 'data.name',
                 'data.image_size', 'data.channels')


class UserError(Exception):
  """An error whose message already names the problem and the fix (printed as is)."""


# ------------------------------------------------------------------------------------------------
# one-line error reports
# ------------------------------------------------------------------------------------------------

def verbose(argv=None) -> bool:
  """--verbose or METADROP_VERBOSE=1 (argv is read directly when the flags did not parse)."""
  if os.environ.get('METADROP_VERBOSE', '').strip().lower() not in ('', '0', 'false', 'no'):
    return True
  if FLAGS.is_parsed():
    return bool(FLAGS.verbose)
  argv = sys.argv if argv is None else argv
  return any(a in ('--verbose', '-verbose', '--verbose=true', '--verbose=True', '--verbose=1')
             for a in argv)


def _one_line(text) -> str:
  return ' '.join(str(text).split())


def _config_arg(argv) -> str | None:
  """The value of --config in argv (without a ':args' suffix), or None."""
  argv = list(argv or [])
  for i, a in enumerate(argv):
    if re.match(r'^--?config=', a):
      return a.split('=', 1)[1].split(':', 1)[0]
    if a in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1].split(':', 1)[0]
  return None


def _config_file_error(e: BaseException, path: str | None) -> str | None:
  """A config file that does not exist, does not compile, lacks get_config, or fails in it."""
  if not path:
    return None
  if not os.path.exists(path):
    return (f'config file {path!r} not found (relative to {os.getcwd()}): pass an existing file, '
            'e.g. --config=configs/omniglot_20way1shot.py')
  if os.path.isdir(path):
    return f'--config={path} is a folder: pass a config file, e.g. --config=configs/tiny.py'
  try:
    with open(path, 'rb') as f:
      compile(f.read(), path, 'exec')
  except SyntaxError as s:
    return (f'config file {path}, line {s.lineno}: syntax error ({s.msg}): fix the file '
            '(python -m py_compile shows the spot)')
  except OSError as o:
    return f'config file {path}: cannot read it ({o.strerror or o}): check its permissions'
  target = os.path.abspath(path)
  for x in cli.exception_chain(e):
    if isinstance(x, AttributeError) and 'get_config' in str(x):
      return (f'config file {path} has no get_config(): define get_config() returning an '
              'ml_collections.ConfigDict (see configs/tiny.py)')
    frames = [f for f in traceback.extract_tb(x.__traceback__)
              if os.path.abspath(f.filename) == target]
    if frames:
      return (f'config file {path}, line {frames[-1].lineno}: get_config() raised '
              f'{type(x).__name__}: {_one_line(x)}: fix the file')
    if 'Error whilst parsing config file' in str(x):
      last = str(x).strip().splitlines()[-1]
      return f'config file {path}: get_config() failed ({_one_line(last)}): fix the file'
  return None


def _override_error(e: BaseException, argv) -> str | None:
  """--config.<field> names no field: one line, with ml_collections' "did you mean"."""
  overrides = [a.lstrip('-').split('=', 1)[0].split('.', 1)[1] for a in argv or []
               if re.match(r'^--?(no)?config\.', a)]
  for x in cli.exception_chain(e):
    if not isinstance(x, (AttributeError, KeyError)):
      continue
    text = str(x.args[0]) if x.args else str(x)
    m = re.search(r"'([^'\"\\]+)'", text.replace("\\'", "'"))
    if not m:
      continue
    key = m.group(1)
    hits = [o for o in overrides if key in o.split('.')]
    if not hits:
      continue
    bad = hits[0]
    hint = ''
    s = re.search(r'Did you mean "([^"]+)"', text)
    if s:
      parts = bad.split('.')
      parts[parts.index(key)] = s.group(1)
      hint = f'; did you mean --config.{".".join(parts)}?'
    return (f'--config.{bad}: the config has no field {key!r}{hint} (every field and its default '
            'is in metadrop_jax/config.py)')
  return None


def _loaded_config(e: BaseException | None):
  """What the config file's get_config() returned: the flag's value, or, when an override failed
  to parse, the ``config`` that ml_collections' parser held (the flag has no value then)."""
  for x in cli.exception_chain(e):
    tb = x.__traceback__
    while tb is not None:
      frame = tb.tb_frame
      if frame.f_code.co_name == '_parse' and 'config_flags' in frame.f_code.co_filename:
        return frame.f_locals.get('config')
      tb = tb.tb_next
  return FLAGS['config'].value


def _config_type_error(path: str | None, e: BaseException | None = None) -> str | None:
  """A config file whose get_config() returned something other than a ConfigDict (a dict)."""
  from ml_collections import ConfigDict
  value = _loaded_config(e)
  if value is None or isinstance(value, ConfigDict) or type(value).__module__.startswith(
      'ml_collections'):                   # (its stand-in for a file that failed to load)
    return None
  return (f'config file {path}: get_config() returned a {type(value).__name__}, not an '
          'ml_collections.ConfigDict: return metadrop_jax.config.base_config() with your changes '
          '(see configs/tiny.py)')


def error_line(e: BaseException, argv=None, workdir: str | None = None) -> str | None:
  """The one line (problem and fix) for an error a user can fix; None for anything else (a bug:
  the traceback is the useful report)."""
  config_path = _config_arg(argv)
  config_failed = any(isinstance(x, OSError) and 'Configuration is not available' in str(x)
                      for x in cli.exception_chain(e))
  if isinstance(e, flags.Error) or config_failed or getattr(e, '_metadrop_flags', False):
    line = (_config_file_error(e, config_path) or _config_type_error(config_path, e) or
            _override_error(e, argv))
    if line:
      return line
    if isinstance(e, flags.Error):
      text = _one_line(str(e).strip().splitlines()[0])
      if text.startswith('flag --config.'):
        return f'{text}: give the field a value of its type (see metadrop_jax/config.py)'
      return f'{text} (python launch.py --helpshort lists the flags)'
  if isinstance(e, (UserError, app.UsageError, FloatingPointError)):
    return str(e)
  return cli.error_line(e, workdir)


def report(e: BaseException, argv=None, workdir: str | None = None):
  """Prints ``error: <line>`` and exits with code 2 for a user error; re-raises anything else.

  Must be called inside the ``except`` block that caught ``e``."""
  line = error_line(e, argv, workdir)
  if line is None:
    raise e
  if verbose(argv):
    traceback.print_exception(e)
  print(f'error: {line}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


# --mode=eval --workdir=W without --config: the --config.FIELD=VALUE overrides of W's config.json
_WORKDIR_OVERRIDES: dict = {}


def parse_flags(argv):
  """app.run's flag parser: a bad flag, config file or override is one line, exit code 2."""
  global _WORKDIR_OVERRIDES
  try:
    argv, _WORKDIR_OVERRIDES = cli.split_workdir_overrides(argv)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    e._metadrop_flags = True   # raised while parsing the flags  # pylint: disable=protected-access
    report(e, argv)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

# The project's own code: its log lines are kept whatever the verbosity (launch.py's, for now).
_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), d, '')
                      for d in ('metadrop_jax', 'tools', 'configs'))


class QuietLibraries(logging_std.Filter):
  """Keeps the project's own log records and the libraries' warnings; drops the libraries'
  INFO lines (orbax writes ~35 per checkpoint) and the tracebacks that orbax's threads (and the
  asyncio loop they run) log for an error that reaches the main thread anyway (a disk that
  filled during a save: its one line says it). Installed on absl's handler unless
  ``--verbosity`` is given (``--verbose`` keeps the tracebacks)."""

  def __init__(self, keep_tracebacks: bool = False):
    super().__init__()
    self.keep_tracebacks = keep_tracebacks

  def filter(self, record) -> bool:
    path = os.path.abspath(record.pathname)
    if path == os.path.abspath(__file__) or path.startswith(_PROJECT_DIRS):
      return True
    if record.levelno < logging_std.WARNING:
      return False
    return self.keep_tracebacks or not (record.exc_info and ('orbax' in path or
                                                             'asyncio' in path))


def quiet_libraries() -> QuietLibraries | None:
  """Installs :class:`QuietLibraries` on absl's log handler, unless the command line gives
  ``--verbosity`` (absl's flag: all of the libraries' lines at that level, as absl shows them)."""
  handler = logging.get_absl_handler()
  for f in [f for f in handler.filters if isinstance(f, QuietLibraries)]:
    handler.removeFilter(f)           # (an earlier command in this process: a notebook, a test)
  if FLAGS['verbosity'].present:
    return None
  quiet = QuietLibraries(keep_tracebacks=verbose())
  handler.addFilter(quiet)
  return quiet


def main(argv):
  workdir = FLAGS.workdir
  quiet_libraries()
  try:
    _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    report(e, sys.argv, workdir)


def _main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments {argv[1:]}: every option is a --flag '
                    '(python launch.py --helpshort lists them)')
  # Quiet TensorFlow's C++ logging. TF is imported only by the TFDS Omniglot source, and the
  # tfds extra installs tensorflow-cpu, which has no GPU support: it cannot take accelerator memory.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from metadrop_jax import config as config_lib
  try:
    config = FLAGS.config
    if config is not None:
      not_a_config = _config_type_error(_config_arg(sys.argv))
      if not_a_config:
        raise UserError(not_a_config)
      config.method   # pylint: disable=pointless-statement  (a file that failed to load raises here)
  except Exception as e:  # pylint: disable=broad-except
    e._metadrop_flags = True   # pylint: disable=protected-access
    raise
  import jax
  from metadrop_jax import train
  from metadrop_jax import workdir as workdir_lib

  if config is None and FLAGS.workdir and FLAGS.mode == 'eval':
    config = eval_config(workdir_lib.load_run_config(FLAGS.workdir), _WORKDIR_OVERRIDES,
                         FLAGS.workdir)
  if config is None:
    raise UserError('--config is required (e.g. --config=configs/omniglot_20way1shot.py; '
                    '--mode=eval --workdir=DIR reads DIR/config.json instead)')
  config_lib.validate(config)
  logging.info('devices: %s', jax.devices())

  workdir = FLAGS.workdir or os.path.join('workdirs', f'{config.name}_{config.method}')
  logging.info('workdir: %s', workdir)
  _run(config, workdir, train)


def eval_config(stored, overrides: dict, workdir: str):
  """The workdir's config with the command line's overrides, which may set only fields that do
  not change results (``eval.*`` and loop fields: workdir.LOOP_FIELDS); the progress bar is on
  unless an override says otherwise."""
  from metadrop_jax import config as config_lib
  from metadrop_jax import workdir as workdir_lib
  allowed = lambda k: any(k == f or k.startswith(f + '.') for f in workdir_lib.LOOP_FIELDS)
  for k in overrides:     # a field the config lacks: say so, whether or not it would be allowed
    try:
      config_lib.override(copy.deepcopy(stored), {k: overrides[k]})
    except KeyError as e:
      raise UserError(f'--config.{e.args[0]} (every field and its default is in '
                      'metadrop_jax/config.py)') from e
    except TypeError as e:
      raise UserError(f'--config.{e}') from e
  bad = [k for k in overrides if not allowed(k)]
  if bad:
    raise UserError(f'--config.{bad[0]}: evaluating {workdir} takes only eval.* and loop fields '
                    f'({", ".join(workdir_lib.LOOP_FIELDS)}) from the command line; a change of '
                    f'{bad[0]} needs a new training run (--config=... --workdir=<new>)')
  return config_lib.override(stored, {'progress_bar': True, **overrides})


def check_eval_config(config, workdir: str, train) -> None:
  """Eval of ``workdir`` with a config whose parameter shapes differ from the trained ones: a
  clear error instead of orbax's shape mismatch."""
  from metadrop_jax import workdir as workdir_lib
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    return
  stored = workdir_lib.load_run_config(workdir)
  diff = []
  for k in _SHAPE_FIELDS:
    a, b = stored, config
    for p in k.split('.'):
      a, b = a.get(p), b.get(p)
    if a != b:
      diff.append((k, a, b))
  if diff:
    now = ', '.join(f'{k}={b!r}' for k, _, b in diff)
    then = ', '.join(f'{k}={a!r}' for k, a, _ in diff)
    raise UserError(f'{now} does not match the checkpoint in {workdir}, trained with {then}: '
                    f'evaluate with the workdir\'s own config (launch.py --mode=eval '
                    f'--workdir={workdir}, without --config) or use a new --workdir')


def _run(config, workdir, train):
  if FLAGS.mode == 'prepare':
    from metadrop_jax import data as data_lib
    for split in data_lib.SPLITS:
      x = data_lib.load_split(config.data, split)
      print(f'{split}: {None if x is None else x.shape}')
    return
  if FLAGS.mode == 'eval':
    if FLAGS.config is not None:
      check_eval_config(config, workdir, train)
    from metadrop_jax import evaluation
    result = evaluation.evaluate_checkpoint(config, workdir, split=FLAGS.split)
    print(json.dumps(result, indent=2))
    from metadrop_jax import report
    print(f'\n{report.RESULT_HEADER}\n{report.result_row(result)}')
    return
  if FLAGS.mode == 'train':
    status = train.train(config, workdir)
    status.pop('state')
  else:
    status = train.train_and_evaluate(config, workdir)
  print(json.dumps(status, indent=2, default=str))
  if not status['done']:
    print(f"paused at step {status['step']}/{status['num_steps']} ({status['stopped']}); "
          'run the same command again to continue.', file=sys.stderr)


def campaign_alias(argv) -> int | None:
  """``launch.py --mode=campaign [options]`` forwards to ``python -m tools.long_runs.campaign``
  (the campaign's home; ``--plan`` -> ``plan``, ``--report_only`` -> ``report``, else a
  ``sitting``). Returns its exit code, or None when ``argv`` asks for another mode."""
  argv = list(argv)
  for i, a in enumerate(argv):
    if a in ('--mode=campaign', '-mode=campaign'):
      rest = argv[:i] + argv[i + 1:]
      break
    if a in ('--mode', '-mode') and argv[i + 1:i + 2] == ['campaign']:
      rest = argv[:i] + argv[i + 2:]
      break
  else:
    return None
  from tools.long_runs import campaign
  if not any(a in campaign.COMMANDS or a in campaign.COMMAND_FLAGS for a in rest):
    # no command: a sitting, except that --help alone asks for the overview of all of them
    rest = rest if rest and all(a in ('-h', '--help') for a in rest) else ['sitting'] + rest
  return campaign.main(rest)


if __name__ == '__main__':
  rc = campaign_alias(sys.argv[1:])
  if rc is not None:
    sys.exit(rc)
  app.run(main, flags_parser=parse_flags)
