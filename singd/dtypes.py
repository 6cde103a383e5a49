"""Floating dtypes the optimizers accept by object or by name, and their parsing."""

from __future__ import annotations

from typing import Any

import torch

#: Floating dtypes by name, e.g. ``"bfloat16" -> torch.bfloat16``.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def resolve_dtype(value: Any, arg: str) -> torch.dtype | None:
    """A floating dtype from ``None``, a ``torch.dtype`` or its name; ValueError naming ``arg``."""
    if value is None:
        return None
    if isinstance(value, str) and value in FLOAT_DTYPES:
        return FLOAT_DTYPES[value]
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPES.values():
        return value
    valid = ", ".join(["None", *FLOAT_DTYPES, *(f"torch.{n}" for n in FLOAT_DTYPES)])
    raise ValueError(f"{arg} must be one of {valid}; got {value!r}")
