"""Training strategies behind one interface (``base.Strategy``), chosen by name with ``--strategy``."""

from mpitrain.parallel.base import STRATEGIES, Job, State, Strategy, Sums, Totals, options_for, register
from mpitrain.parallel.base import get as strategy_class
from mpitrain.parallel.data_parallel import AllReduce, DataParallel
from mpitrain.parallel.gossip import Gossip
from mpitrain.parallel.local_sgd import LocalSGD
from mpitrain.parallel.param_server import (
    AsynchronousParameterServer,
    StaleSynchronousParameterServer,
    SyncParameterServer,
)
from mpitrain.parallel.pipeline import Pipeline
from mpitrain.parallel.reducer import GradientReducer

__all__ = [
    "STRATEGIES",
    "AllReduce",
    "AsynchronousParameterServer",
    "DataParallel",
    "Gossip",
    "GradientReducer",
    "Job",
    "LocalSGD",
    "Pipeline",
    "StaleSynchronousParameterServer",
    "State",
    "Strategy",
    "Sums",
    "SyncParameterServer",
    "Totals",
    "options_for",
    "register",
    "strategy_class",
]
