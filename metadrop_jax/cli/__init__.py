"""Command-line entry points (argparse); the library modules they drive hold no CLI code.

Each runs as ``python -m metadrop_jax.cli.<module>`` or, once the project is installed, as
``metadrop-<module>`` (``[project.scripts]`` in pyproject.toml): report, export, visualize,
robustness, method_study, publish, tuning. The library modules import nothing from here.
"""


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
