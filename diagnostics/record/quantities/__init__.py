"""The quantities a `Recorder` computes, one class per kind of record.

Each quantity declares the tensors whose norms it needs (`Probe`), so that the recorder
takes all norms of a recorded step in one fused pass, and turns norms and reads into rows
of the `Recording`'s frames (`Tables`). How the rows are drawn is `diagnostics.views`.
"""

from diagnostics.record.quantities.base import MemoryRow, MetricRow, Probe, SpectrumBlock, Tables
from diagnostics.record.quantities.events import Events
from diagnostics.record.quantities.factors import FactorSpectra
from diagnostics.record.quantities.memory import Memory
from diagnostics.record.quantities.optimizer_state import OptimizerState
from diagnostics.record.quantities.step_scalars import StepScalars

__all__ = [
    "Events",
    "FactorSpectra",
    "MemoryRow",
    "Memory",
    "MetricRow",
    "OptimizerState",
    "Probe",
    "SpectrumBlock",
    "StepScalars",
    "Tables",
]
