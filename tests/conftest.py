"""Shared test configuration: small, deterministic problems; matplotlib off-screen."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
