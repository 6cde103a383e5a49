"""singd: SINGD (structured inverse-free natural gradient descent) for PyTorch.

``from singd import SINGD``; structured matrices live in :mod:`singd.structures`, the layer
hooks in :mod:`singd.capture`, the math in :mod:`singd.update`.
"""

from singd import structures
from singd.kfac import KFAC
from singd.optimizer import SINGD

__all__ = ["KFAC", "SINGD", "structures"]
