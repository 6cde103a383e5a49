"""`ChangeCache`: values computed from a factor, kept while the factor is unchanged.

A factor counts as unchanged while it is the same live object and its stored tensors are
the same storage with the same version counters (`Stamp`). In-place changes made through
``.data`` do not move a version counter: an optimizer that changes its factors that way
would have them taken as unchanged (SINGD and KFAC change them through ordinary tensor
operations). The recorder keeps two: the norms of a factor's stored tensors (refreshed at
every recorded step) and its spectrum (refreshed when it is decomposed).
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


class Stamp(NamedTuple):
    """What identifies a factor's current values: its object (weakly) and, per stored
    tensor, its data pointer, version counter and shape."""

    ref: weakref.ref
    versions: tuple


def stamp(matrix: object, parts: list[torch.Tensor]) -> Stamp | None:
    """The `Stamp` of a factor stored in ``parts`` (None when it cannot be referenced weakly)."""
    try:
        ref = weakref.ref(matrix)
    except TypeError:
        return None
    return Stamp(ref, tuple((p.data_ptr(), p._version, p.shape) for p in parts))


@dataclass
class Entry:
    """One cached value and the stamp it was computed at; ``value`` may be filled later
    (a spectrum computed on the worker thread is filled when its job is merged)."""

    stamp: Stamp
    value: Any = None


class ChangeCache:
    """Per key (layer, factor), the last value computed and the `Stamp` it belongs to."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, Entry] = {}

    def get(self, key: Hashable, matrix: object, current: Stamp | None) -> Entry | None:
        """The entry of ``key`` if ``matrix`` is unchanged since it was stored, else None."""
        entry = self._entries.get(key)
        if entry is None or current is None:
            return None
        if entry.stamp.ref() is not matrix or entry.stamp.versions != current.versions:
            return None
        return entry

    def put(self, key: Hashable, current: Stamp | None, value: Any = None) -> Entry | None:
        """Store ``value`` for ``key`` at ``current`` (forget ``key`` when there is no stamp)."""
        if current is None:
            self._entries.pop(key, None)
            return None
        entry = self._entries[key] = Entry(current, value)
        return entry

    def drop(self, key: Hashable) -> None:
        """Forget ``key`` (its factor held NaN/Inf: nothing of it may be reused)."""
        self._entries.pop(key, None)
