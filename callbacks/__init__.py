"""Lightning callbacks: schedule-driven pruning, fixed masks, rewind points for lottery tickets.

>>> from prunekit.callbacks import HoldMasks, Pruning, RewindPoint
"""

from prunekit.callbacks._hold import HoldMasks
from prunekit.callbacks._pruning import UNITS, Pruning
from prunekit.callbacks._rewind import RewindPoint

__all__ = ["UNITS", "HoldMasks", "Pruning", "RewindPoint"]
