"""Command-line entry points (argparse); the library modules they drive hold no CLI code.

Each runs as ``python -m metadrop_jax.<module>`` (a two-line hook in that module) or
``python -m metadrop_jax.cli.<module>``.
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
