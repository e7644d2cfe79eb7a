"""metadrop_jax: Meta Dropout (Lee et al., ICLR 2020) and MAML in JAX.

The public API, usable from a notebook without launch.py::

  from metadrop_jax import api as md
  config = md.get_config('configs/tiny.py')            # or configs.tiny.get_config()
  state, tx = md.create_state(jax.random.PRNGKey(0), config)
  logits = md.forward(state.params, x, key, md.net_spec(config), sample=True)
  theta, inner_losses = md.inner_adapt(state.params, sx, sy, key, md.meta_spec(config))
  loss, metrics = md.task_loss(state.params, episode, key, md.meta_spec(config))
  step = md.make_train_step(config, tx); state, m = step(state, images, train_key)
  result = md.evaluate(state.params, test_images, config)    # paper protocol, mean ± ci95
  md.train_and_evaluate(config, workdir)                      # what launch.py runs
"""

__version__ = '0.1.0'


def _moved_entry_point() -> None:
  """``python -m metadrop_jax.<module>`` of a library module whose command line moved to
  ``metadrop_jax.cli.<module>`` (it ran nothing and exited 0): one line saying where, exit 2."""
  import os
  import sys
  argv = getattr(sys, 'orig_argv', [])
  if sys.argv[:1] != ['-m'] or '-m' not in argv[:-1]:   # (sys.argv[0] is '-m' while -m imports)
    return
  package, _, name = argv[argv.index('-m') + 1].rpartition('.')
  cli_file = os.path.join(os.path.dirname(__file__), 'cli', f'{name}.py')
  if package == __name__ and not name.startswith('_') and os.path.isfile(cli_file):
    cli = f'{__name__}.cli.{name}'
    print(f'error: {__name__}.{name} is a library module; its command line moved to {cli}: run '
          f'python -m {cli} (installed: metadrop-{name}) with the same options',
          file=sys.stderr, flush=True)
    raise SystemExit(2)


_moved_entry_point()
