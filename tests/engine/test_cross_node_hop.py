"""The owner's cross-node hop, with two nodes simulated by two processors in two threads joined
by an in-memory stand-in for MPI: 2 nodes x N workers give the state of 1 node with the whole
global batch (float32 tolerance, rtol 1e-4), in both sync modes; a non-finite step stops both."""
import threading

import numpy as np
import pytest

from engine import NonFiniteLossError, ParallelBatchProcessor
from models import MLP

MODEL = MLP(sizes=(12, 16, 3))


class ThreadCluster:
    """Two ranks in one process: mean_ sums the ranks' buffers weighted by examples, as
    engine.parallel.cluster.Cluster.mean_ does over MPI."""

    def __init__(self, rank, shared):
        self.rank, self.size, self.shared = rank, 2, shared

    def _exchange(self, value):
        shared = self.shared
        shared["values"][self.rank] = value
        shared["barrier"].wait(timeout=60)
        values = list(shared["values"])
        shared["barrier"].wait(timeout=60)
        return values

    def mean_(self, buffer, examples, loss=0.0, *, scaled=False):
        everything = self._exchange((buffer.copy(), float(examples), float(loss)))
        total = sum(item[1] for item in everything)
        buffer[...] = sum(item[0].astype(np.float64) * (item[1] / total)
                          for item in everything).astype(np.float32)
        return sum(item[2] * item[1] for item in everything) / total, total

    def bcast_(self, buffer):
        buffer[...] = self._exchange(buffer.copy())[0]


def _two_nodes(blobs, epochs, workers_per_node, **options):
    shared = dict(values=[None, None], barrier=threading.Barrier(2))
    finals, errors, losses = [None, None], [], [None, None]

    def node(rank):
        try:
            with ParallelBatchProcessor(MODEL, num_processes=workers_per_node,
                                        cluster=ThreadCluster(rank, shared), **options) as p:
                state = MODEL.init_state(rank)  # rank 1's differs: the bcast makes it rank 0's
                for _ in range(epochs):
                    state, results = p.run_parallel(*blobs, state, {"learning_rate": 0.05})
                finals[rank], losses[rank] = state, (results["loss"], results["examples"])
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)
            shared["barrier"].abort()

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    _two_nodes.losses = losses
    return finals


@pytest.mark.parametrize("sync,interval", [("gradients", 1), ("states", 3)])
def test_two_nodes_of_one_worker_equal_one_node_of_two(blobs, sync, interval):
    options = dict(batch_size=101, optimizer="sgd" if sync == "states" else "adam", seed=4,
                   sync=sync, update_interval=interval)  # 101: uneven node shares
    first, second = _two_nodes(blobs, 2, 1, **options)
    np.testing.assert_array_equal(first.buffer, second.buffer)
    (loss_0, examples_0), (loss_1, examples_1) = _two_nodes.losses
    np.testing.assert_array_equal(loss_0, loss_1)  # the global losses, the same on every node
    assert examples_0.tolist() == examples_1.tolist() == [101] * 5 + [95]
    with ParallelBatchProcessor(MODEL, num_processes=2, **options) as processor:
        state = MODEL.init_state(0)
        for _ in range(2):
            state, _ = processor.run_parallel(*blobs, state, {"learning_rate": 0.05})
    np.testing.assert_allclose(first.buffer, state.buffer, rtol=1e-4, atol=1e-6)


def test_two_nodes_of_two_workers_agree_with_clipping(blobs):
    options = dict(batch_size=64, optimizer="adam", seed=5)
    first, second = _two_nodes(blobs, 1, 2, **options)
    np.testing.assert_array_equal(first.buffer, second.buffer)


def test_a_non_finite_step_on_one_node_stops_both_at_the_same_step(blobs):
    examples, labels = blobs[0].copy(), blobs[1]
    examples[5] = 1e38  # overflows in the first layer of whichever node gets row 5's batch
    with pytest.raises(NonFiniteLossError):
        _two_nodes((examples, labels), 1, 1, batch_size=50, optimizer="sgd", seed=0)


@pytest.mark.parametrize("sync", ["gradients", "states"])
def test_frozen_weights_stay_bitwise_across_nodes(blobs, sync):
    frozen = sorted(MODEL.init_state(0).weights)[0]
    first, second = _two_nodes(blobs, 1, 1, batch_size=64, optimizer="adam", seed=2, sync=sync,
                               update_interval=2, freeze=[frozen])
    start = MODEL.init_state(0)
    for state in (first, second):
        np.testing.assert_array_equal(state.weights[frozen], start.weights[frozen])
    np.testing.assert_array_equal(first.buffer, second.buffer)
