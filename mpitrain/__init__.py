"""mpitrain: data-parallel neural-network training over MPI with collectives of its own."""

__version__ = "0.1.0"
