"""The experiment harness: workloads, training from a run spec, notebook sweeps and the CLI.

Notebooks and benchmarks build on it; it builds on ``singd`` and ``diagnostics`` through their
public APIs (see docs/architecture.md).
"""

from experiments.sweep import load_sweep, parameter_columns, run_sweep
from experiments.training import RunSpec, TrainResult, run_spec, train
from experiments.workloads import WORKLOADS, BatchLoader, DigitsData, build_model, load_digits_data

__all__ = [
    "WORKLOADS",
    "BatchLoader",
    "DigitsData",
    "RunSpec",
    "TrainResult",
    "build_model",
    "load_digits_data",
    "load_sweep",
    "parameter_columns",
    "run_spec",
    "run_sweep",
    "train",
]
