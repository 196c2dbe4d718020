"""The node's hop between the in-node reduce and the update, when a run spans several nodes.

Inside a node the workers reduce their slices of the gradient into ``reduced`` (weighted by their
shards, i.e. the node's mean). With ``cross_node`` set (an ``engine.parallel.cluster.Cluster``,
or any object with the same ``mean_`` method), each worker then arrives at barrier REDUCED and
waits for NODE_DONE. A thread of the owner process, the only caller of MPI on the node, waits for
every worker's REDUCED, replaces ``reduced`` by the mean over every node weighted by examples
(one in-place allreduce), decides for all nodes alike whether the step goes on (a global loss or
gradient that is not finite stops it on every node at the same step), writes the clipping scale
of the global norm, and rings NODE_DONE; the workers update their slices from the global mean.
In states mode the same thread averages ``params`` across nodes after each in-node average,
weighted by the examples each node saw since the last one.

Failure: an error of the collective (a dead or hung peer node: ClusterError) is kept, the node's
workers are released from their barriers (abort), and the owner raises it once the pass returns.
"""
import math
import threading

import numpy as np

from engine.core.kernels import clip_scale, sum_squares
from engine.parallel import workspace as ws
from engine.parallel.barrier import Aborted

OWNER = 0  # the owner writes NODE_DONE into worker slot 0's counter of that kind


class NodeHop:
    """Runs the cross-node part of one pass in a thread of the owner."""

    def __init__(self, cluster, work, data, barriers):
        self.cluster, self.work, self.data, self.barriers = cluster, work, data, barriers
        self.error, self.losses, self.norms = None, [], []
        self._thread = None

    def start(self, num_steps, clip_norm, sync, averages, into_reduced):
        self.error, self.losses, self.norms = None, [], []
        target = self._gradient_steps if sync == "gradients" else self._averages
        arguments = (num_steps, clip_norm) if sync == "gradients" else (averages, into_reduced)
        self._thread = threading.Thread(target=self._guarded, args=(target, *arguments),
                                        name="engine-cross-node", daemon=True)
        self._thread.start()

    def join(self):
        """Wait for the thread (the workers have finished or aborted); raise its error."""
        if self._thread is not None:
            self.barriers.abort_all()  # a thread still waiting (the pass stopped early) leaves
            self._thread.join()
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _guarded(self, target, *arguments):
        try:
            target(*arguments)
        except Aborted:
            pass
        except BaseException as error:  # noqa: BLE001 - re-raised by join() in the owner
            self.error = error
            self.barriers.abort_all()

    def _gradient_steps(self, num_steps, clip_norm):
        work, barriers, control = self.work, self.barriers, self.work.control
        averaged = work.averaged
        ranges = work.spec.get("weight_ranges") or ((0, work.spec["num_weights"]),)
        weights = sum(stop - start for start, stop in ranges)  # trainable weights lead the slot
        for k in range(num_steps):
            barriers.wait(ws.REDUCED, k + 1)
            row = self.data.records[k]
            counts = row[:, ws.R_COUNT]
            examples = float(counts.sum())
            local_loss = float(np.dot(counts, row[:, ws.R_LOSS]) / examples) if examples else 0.0
            if not np.all(np.isfinite(row[:, ws.R_SUM_SQUARES])):
                local_loss = math.nan  # a non-finite gradient stops every node, like a NaN loss
            loss, _ = self.cluster.mean_(averaged, examples, local_loss)
            norm = math.sqrt(sum_squares(averaged, 0, min(weights, averaged.size)))
            stop = not (math.isfinite(loss) and math.isfinite(norm))
            control[ws.HOP_STOP] = 1.0 if stop else 0.0
            control[ws.HOP_SCALE] = 1.0 if stop else clip_scale(norm, clip_norm)
            self.losses.append(loss)
            self.norms.append(norm)
            barriers.arrive(ws.NODE_DONE, OWNER, k + 1)
            if stop:
                return

    def _averages(self, averages, into_reduced):
        work, barriers = self.work, self.barriers
        # Frozen weights are equal on every node: only the trainable weights and theta travel
        # (a mean of equal float32 values need not give them back bitwise).
        ranges = list(work.spec.get("weight_ranges") or ((0, work.spec["num_weights"]),))
        ranges.append((work.spec["num_weights"], work.spec["num_values"]))
        for j in range(averages):
            barriers.wait(ws.AVERAGE_OUT, j + 1)
            examples = float(work.results[:, ws.SINCE_SYNC].sum())
            target = work.reduced if (into_reduced and j == averages - 1) else work.params
            if len(ranges) == 2 and ranges[0] == (0, work.spec["num_weights"]):
                self.cluster.mean_(target, examples)
            else:
                compact = np.concatenate([target[a:b] for a, b in ranges])
                self.cluster.mean_(compact, examples)
                offset = 0
                for a, b in ranges:
                    target[a:b] = compact[offset:offset + b - a]
                    offset += b - a
            barriers.arrive(ws.NODE_DONE, OWNER, j + 1)
