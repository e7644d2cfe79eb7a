"""Command-line entry points (argparse); the library modules they drive hold no CLI code.

Each runs as ``python -m metadrop_jax.cli.<module>`` or, once the project is installed, as
``metadrop-<module>`` (``[project.scripts]`` in pyproject.toml): report, export, visualize,
robustness, method_study, publish, tuning. The library modules import nothing from here.

A mistake a user can fix (a path that is not there, a workdir without a run, bad data) ends every
one of them, and launch.py, the same way: one line ``error: <problem>: <fix>``, exit code 2
(:func:`user_errors`); anything else is a bug, and its traceback is the report.
"""

import contextlib
import errno
import os
import re
import sys

EXIT_USER_ERROR = 2


def fail(message) -> None:
  """Prints one line, ``error: <problem>: <fix>``, and exits with code 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_USER_ERROR)


def _loaded(module: str, name: str):
  """``module.name`` if that module is loaded (none of these errors can come from one that is
  not), else None: a light command never imports jax to name an error."""
  return getattr(sys.modules.get(module), name, None)


def exception_chain(e: BaseException):
  """e, its cause / context, and so on."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def error_line(e: BaseException, workdir: str | None = None,
               option: str = '--workdir') -> str | None:
  """The one line for an error a user can fix; None for anything else. ``workdir``: where the
  command writes (named by ``option``), for an error that names no file."""
  for x in exception_chain(e):
    # An OSError with its errno, or (tensorstore, under orbax) only the OS's words in a message.
    if ((isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT)) or
        any(t in str(x) for t in ('No space left on device', 'Disk quota exceeded'))):
      where = getattr(x, 'filename', None) or workdir or os.getcwd()
      how_much = re.search(r'\(([^()]*needs about[^()]*)\)', str(x))   # (a refused checkpoint)
      how_much = f' ({how_much.group(1)})' if how_much else ''
      return f'disk full at {where}{how_much}: free space or choose another {option}'
    if isinstance(x, OSError) and x.errno == errno.EROFS:
      return f'read-only file system at {x.filename or workdir}: choose a writable {option}'
  ours = [c for c in (_loaded('metadrop_jax.config', 'ConfigError'),
                      _loaded('metadrop_jax.data.cache', 'DataError'),
                      _loaded('metadrop_jax.workdir', 'WorkdirError'),
                      _loaded('metadrop_jax.report', 'ResultsError')) if c is not None]
  if ours and isinstance(e, tuple(ours)):
    return str(e)
  if isinstance(e, PermissionError):
    return (f'permission denied: {e.filename}: make it accessible to this user, or choose '
            'another --workdir / --config.data.path / --config.data.cache_dir')
  if isinstance(e, FileNotFoundError):
    if e.filename is None:     # ours: the message names the file and the fix
      return str(e)
    return f'{e.filename}: no such file or directory: check the path'
  if isinstance(e, (NotADirectoryError, IsADirectoryError)):
    return f'{e.filename}: {(e.strerror or str(e)).lower()}: check the path'
  return None


@contextlib.contextmanager
def user_errors(workdir: str | None = None):
  """Runs the body; a user's mistake ends it as :func:`fail` does, anything else propagates."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    line = error_line(e, workdir)
    if line is None:
      raise
    fail(line)


def parse_overrides(items) -> dict:
  """``['model.channels=8', 'first_order=true']`` -> ``{'model.channels': 8, 'first_order': True}``
  (ints, floats and true/false are cast; anything else stays a string), for ``config.override``. Here, not in
  config.py, so that a process that only launches others (the benchmark's parent) imports no jax."""
  def value(v: str):
    for cast in (int, float):
      try:
        return cast(v)
      except ValueError:
        pass
    return {'true': True, 'false': False}.get(v.lower(), v)
  return {k: value(v) for k, _, v in (s.partition('=') for s in items)}


def _is_eval_without_config(argv) -> bool:
  """Whether ``argv`` asks for ``--mode=eval`` and names no ``--config`` file."""
  args = list(argv or [])
  mode = None
  for i, a in enumerate(args):
    if a.startswith(('--mode=', '-mode=')):
      mode = a.split('=', 1)[1]
    elif a in ('--mode', '-mode') and i + 1 < len(args):
      mode = args[i + 1]
  has_config = any(a.split('=', 1)[0] in ('--config', '-config') for a in args)
  return mode == 'eval' and not has_config


def split_workdir_overrides(argv) -> tuple[list, dict]:
  """``launch.py --mode=eval --workdir=W`` without ``--config`` reads W's config.json; its
  ``--config.FIELD=VALUE`` arguments are overrides of that config, which absl cannot parse
  without a config file. Returns (argv without them, ``{FIELD: VALUE}`` cast as
  :func:`parse_overrides`); argv unchanged and ``{}`` for any other command line. A
  ``--config.FIELD VALUE`` (no '=') raises ValueError saying how to write it."""
  if not _is_eval_without_config(argv):
    return list(argv or []), {}
  kept, items = [], []
  for a in argv:
    if a.startswith(('--config.', '-config.')):
      if '=' not in a:
        raise ValueError(f'{a}: write an override of the workdir\'s config as '
                         f'{a.lstrip("-")}=VALUE (e.g. --config.eval.num_episodes=100)')
      items.append(a.lstrip('-')[len('config.'):])
    else:
      kept.append(a)
  return kept, parse_overrides(items)
