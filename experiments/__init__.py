"""The experiment harness: workloads, training from a run spec, notebook sweeps and the CLI.

Notebooks and benchmarks build on it; it builds on ``singd`` and ``diagnostics`` through their
public APIs (see docs/architecture.md).
"""

from experiments.training import TrainResult, train

__all__ = ["TrainResult", "train"]
