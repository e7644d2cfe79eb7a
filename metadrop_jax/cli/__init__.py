"""Command-line entry points (argparse); the library modules they drive hold no CLI code.

Each runs as ``python -m metadrop_jax.cli.<module>`` or, once the project is installed, as
``metadrop-<module>`` (``[project.scripts]`` in pyproject.toml): report, export, visualize,
robustness. The library modules import nothing from here.
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
