"""Tooling that runs beside the library (never imported by it): ``tools.long_runs``."""
