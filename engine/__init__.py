"""A data-parallel CPU training engine: worker processes, shared memory, numba kernels.

    from engine import NetworkState, ParallelBatchProcessor
"""
from engine.errors import (EngineError, InsufficientMemoryError, NonFiniteLossError,
                           WorkerCrashedError, WorkerError, WorkerTimeoutError)
from engine.optim import SGD, Adam, AdamW
from engine.processor import ParallelBatchProcessor
from engine.state import NetworkState
from engine.system import usable_cores

__all__ = ["Adam", "AdamW", "EngineError", "InsufficientMemoryError", "NetworkState", "NonFiniteLossError",
           "ParallelBatchProcessor", "SGD", "WorkerCrashedError", "WorkerError",
           "WorkerTimeoutError", "usable_cores"]
__version__ = "0.1.0"
