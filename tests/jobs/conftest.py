"""Fixtures of the jobs tests: the evaluation tests' planted-outlier MLP (a real model and data, small)."""
from tests.evaluation.conftest import _two_threads, planted  # noqa: F401 - fixtures used by name
