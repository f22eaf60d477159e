"""Shared fixtures: `slurm_cluster`, a real local SLURM cluster for the whole session (tests/slurm_cluster.py)."""
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session-scoped fixture)
