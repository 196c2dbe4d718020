"""A data-parallel CPU training engine: worker processes, shared memory, numba kernels.

    from engine import NetworkState, ParallelBatchProcessor
"""
from engine.errors import (EngineError, InsufficientMemoryError, NonFiniteLossError,
                           WorkerCrashedError, WorkerError, WorkerTimeoutError)
from engine.history import History
from engine.optim import SGD, Adam, AdamW
from engine.processor import ParallelBatchProcessor
from engine.state import NetworkState
from engine.system import usable_cores
from engine.trainer import Trainer, evaluate, fit

__all__ = ["Adam", "AdamW", "EngineError", "InsufficientMemoryError", "NetworkState", "NonFiniteLossError",
           "ParallelBatchProcessor", "SGD", "WorkerCrashedError", "WorkerError",
           "WorkerTimeoutError", "usable_cores", "History", "Trainer", "evaluate", "fit"]
__version__ = "0.1.0"
