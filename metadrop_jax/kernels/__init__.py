"""Hand-written kernels behind opt-in config fields. Each equals the plain JAX formulation it
replaces (tests/test_fast_paths.py); the plain code in :mod:`metadrop_jax.nets` stays the
reference."""
