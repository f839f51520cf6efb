"""Lightning callbacks: schedule-driven pruning and rewind points for lottery tickets.

>>> from prunekit.callbacks import Pruning, RewindPoint
"""

from prunekit.callbacks._pruning import UNITS, Pruning
from prunekit.callbacks._rewind import RewindPoint

__all__ = ["UNITS", "Pruning", "RewindPoint"]
