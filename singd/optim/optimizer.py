"""``from singd.optim.optimizer import SINGD``, the reference package's import path of
:class:`singd.SINGD` (the same class; it lives in :mod:`singd.optimizer`)."""

from singd.optimizer import SINGD

__all__ = ["SINGD"]
