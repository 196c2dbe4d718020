"""A data-parallel CPU training engine: worker processes, shared memory, numba kernels.

    from engine import NetworkState, ParallelBatchProcessor

Layers (imports run one way, tests/architecture keeps it so): ``engine.core`` (state, kernels,
optimizers, sharding, checks, errors) <- ``engine.parallel`` (shared memory, workers, pool,
processor) <- ``engine.backends`` (Keras, tf.distribute) <- ``engine.training`` (fit, callbacks,
checkpoints, data) <- ``engine.cli``.
"""
from engine.core.errors import (ClusterError, EngineError, InsufficientMemoryError,
                                NonFiniteLossError, WorkerCrashedError, WorkerError,
                                WorkerTimeoutError)
from engine.core.optim import SGD, Adam, AdamW
from engine.core.protocol import ModelContractError
from engine.core.state import NetworkState
from engine.parallel.processor import ParallelBatchProcessor
from engine.parallel.shm import SharedMemoryFullError
from engine.parallel.system import usable_cores
from engine.training.history import History
from engine.training.inference import Predictor
from engine.training.trainer import Trainer, evaluate, fit

__all__ = ["Adam", "AdamW", "EngineError", "InsufficientMemoryError", "NetworkState",
           "NonFiniteLossError", "ParallelBatchProcessor", "SGD", "WorkerCrashedError",
           "WorkerError", "WorkerTimeoutError", "usable_cores", "History", "Trainer", "evaluate",
           "fit", "Predictor", "ModelContractError", "SharedMemoryFullError", "ClusterError"]
__version__ = "0.1.0"
