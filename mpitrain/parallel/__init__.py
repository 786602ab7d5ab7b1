"""Training strategies: how gradients and parameters move between ranks."""

from mpitrain.parallel.data_parallel import DataParallel

__all__ = ["DataParallel"]
