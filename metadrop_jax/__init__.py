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
