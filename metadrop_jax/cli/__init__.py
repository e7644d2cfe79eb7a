"""Command-line entry points (argparse); the library modules they drive hold no CLI code.

Each runs as ``python -m metadrop_jax.<module>`` (a two-line hook in that module) or
``python -m metadrop_jax.cli.<module>``.
"""
